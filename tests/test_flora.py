"""FLoRA: the server stacks the uploads ([p_k s A_k] rows, [B_k] columns) so that B A is exactly
sum_k p_k s B_k A_k for mixed ranks; a client merges every stack it has not merged (the concatenation of the
rounds it missed) into its base weight, starts a fresh LoRA (B = 0) and trains it with its header (one SGD
step by hand); bytes: round 0 downloads nothing, then the summed ranks of the stacks, counted by hand."""
from __future__ import annotations

import pytest
import torch

from algorithms.flora import FLoRA
from algorithms.lora_common import arch_rank, spread_rank
from bench.errors import UserError
from bench.observe import AtStart
from bench.testing import check_algorithm
from models.groups import VIT_SPECS
from tests.conftest import client_update, make_hand_simulation
from tests.handcalc import record_train_batches
from tests.lora_handcalc import (FULL, assert_close_update, capture_uploads, factor_bytes, hand_step, lora_names,
                                 params_of)

pytestmark = pytest.mark.usefixtures("one_thread")
RANKS = [spread_rank(j, 5, 4, 16) for j in range(5)]  # 16, 13, 10, 7, 4: one per architecture


def make_sim(hp=None, **cfg):
    settings = dict(model_group="vit-small-hetero", batch_size=FULL, lr=0.05, hp={"dropout": 0.0, **(hp or {})})
    settings.update(cfg)
    return make_hand_simulation("flora", **settings)


def qv_shapes(arch: str) -> list[tuple[int, int]]:
    depth, width, _ = VIT_SPECS[arch]
    return [(width, width)] * 2 * depth


def test_conforms():
    check_algorithm(FLoRA, model_group="vit-hetero", train_size=100, test_size=50)


def test_conforms_on_a_homogeneous_group_batched():
    """One architecture, one rank (ranks follow the architecture): the FLOP cache per architecture holds."""
    assert {arch_rank("vit5-homo", "vit5", 4, 16)} == {16}
    check_algorithm(FLoRA, model_group="vit5-homo", hparams={"dropout": 0.0}, batched_training=True,
                    train_size=60, test_size=30)


def test_ranks_are_spread_and_round_zero_downloads_nothing():
    sim = make_sim(participation=1.0)
    assert RANKS == [16, 13, 10, 7, 4] == [arch_rank("vit-small-hetero", f"vits{j}", 4, 16) for j in range(1, 6)]
    for client in sim.clients:
        assert {layer.rank for layer in sim.algo.layers(client).values()} == {RANKS[client.id]}
        assert sim.algo.server_payload(client, 0) == {}
    sim.run_round(0)
    for client in sim.clients:
        assert sim.bytes_down[client.id] == 0
        assert sim.bytes_up[client.id] == factor_bytes(qv_shapes(client.arch), RANKS[client.id])


@pytest.mark.parametrize("aggregation", ["samples", "uniform"])
def test_the_stack_is_the_exact_weighted_sum_of_products(aggregation):
    sim = make_sim({"aggregation": aggregation}, participation=1.0)
    seen = capture_uploads(sim)
    sim.run_round(0)
    uploads, stack = seen[0], sim.algo.stacks[-1]
    n = {c.id: c.num_train for c in sim.clients}
    for key in sim.algo.layer_shapes:
        ids = [c for c in uploads if f"{key}.lora_A" in uploads[c]]
        w = {c: (n[c] if aggregation == "samples" else 1.0) for c in ids}
        total = sum(w.values())
        exact = sum(w[c] / total * 2.0 * uploads[c][f"{key}.lora_B"] @ uploads[c][f"{key}.lora_A"] for c in ids)
        a, b = stack[f"{key}.lora_A"], stack[f"{key}.lora_B"]
        assert a.shape[0] == b.shape[1] == sum(RANKS[c] for c in ids)  # ranks stacked, not averaged
        torch.testing.assert_close(b @ a, exact)
        # the naive average of A and B separately is not the same update
        naive = 2.0 * sum(w[c] / total * uploads[c][f"{key}.lora_B"][:, :4] for c in ids) @ \
            sum(w[c] / total * uploads[c][f"{key}.lora_A"][:4] for c in ids)
        assert len(ids) == 1 or not torch.allclose(naive, exact)


def test_a_client_merges_the_stack_then_trains_a_fresh_lora():
    sim = make_sim(participation=1.0)
    sim.run_round(0)
    client = sim.clients[1]
    model = client.state["model"]
    before = params_of(model)
    payload = sim.algo.server_payload(client, 1)
    seen = {}
    sim.observers.add(AtStart("phase", lambda info: seen.update(params_of(model))))
    batches = record_train_batches(pytest.MonkeyPatch(), sim.ctx.data)
    upload, _ = client_update(sim, client, payload, 1)
    for name in lora_names(before):
        key = next(k[:-len(".lora_A")] for k in payload if k.startswith(f"{name}@") and k.endswith(".lora_A"))
        merged = before[f"{name}.base.weight"] + payload[f"{key}.lora_B"] @ payload[f"{key}.lora_A"]
        torch.testing.assert_close(seen[f"{name}.base.weight"], merged)
        assert not seen[f"{name}.lora_B"].any()                                  # B = 0 again
        assert not torch.equal(seen[f"{name}.lora_A"], before[f"{name}.lora_A"])  # a fresh A
    (x, y), = batches[0]
    expected = hand_step(client.arch, 10, seen, x, y, sim.cfg, scaling=2.0)
    after = params_of(model)
    assert_close_update(seen, after, {k: v for k, v in expected.items() if ".lora_" in k or "header" in k})
    for k, v in seen.items():
        if ".lora_" not in k and not k.startswith("header."):
            assert torch.equal(after[k], v), k  # the base does not train
    for name in lora_names(after):  # the upload: the trained factors at the client's rank
        key = next(k[:-len(".lora_A")] for k in upload if k.startswith(f"{name}@") and k.endswith(".lora_A"))
        assert torch.equal(upload[f"{key}.lora_A"], after[f"{name}.lora_A"])
        assert torch.equal(upload[f"{key}.lora_B"], after[f"{name}.lora_B"])


def test_a_client_that_missed_rounds_receives_every_stack_since_and_bytes_match():
    sim = make_sim(participation=0.6)
    seen = capture_uploads(sim)
    stacks, sampled = [], []
    for r in range(3):
        down_before = dict(sim.bytes_down)
        payloads = {c.id: sim.algo.server_payload(c, r) for c in sim.clients}
        sim.run_round(r)
        sampled.append(sorted(seen[r]))
        for cid in sampled[-1]:  # what each sampled client downloaded: every stack since its last round
            missed = [s for t, s in enumerate(stacks) if t >= max([-1] + [u for u in range(r) if cid in sampled[u]])]
            keys = [k for k in payloads[cid] if k.endswith(".lora_A")]
            expected_bytes = 0
            for key in keys:
                base = key[:-len(".lora_A")]
                parts = [s for s in missed if key in s]
                a = torch.cat([s[key] for s in parts], 0)
                b = torch.cat([s[f"{base}.lora_B"] for s in parts], 1)
                torch.testing.assert_close(payloads[cid][f"{base}.lora_B"] @ payloads[cid][key], b @ a)
                expected_bytes += 4 * a.shape[0] * (a.shape[1] + b.shape[0])
            assert sim.bytes_down[cid] - down_before[cid] == expected_bytes, (r, cid)
        stacks.append({k: v.clone() for k, v in sim.algo.stacks[-1].items()})
    assert any(len([u for u in range(3) if cid in sampled[u]]) < 3 for cid in range(5))  # someone missed a round


def test_bad_options_are_refused():
    with pytest.raises(UserError, match="flora needs 1 <= min_rank <= max_rank"):
        FLoRA.make_hparams({"min_rank": 8, "max_rank": 4})
    with pytest.raises(UserError, match="flora.dropout must be in"):
        FLoRA.make_hparams({"dropout": 1.0})
