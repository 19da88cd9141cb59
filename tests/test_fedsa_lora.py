"""FedSA-LoRA: every client starts from the server's A; a round trains A, the client's own B and header (one SGD
step checked by hand in the merged form W + s B A) with the base frozen; only A travels (bytes counted by hand);
the server's A is the n_k-weighted mean per layer and shape; B and the header stay local across rounds."""
from __future__ import annotations

import pytest
import torch

from algorithms.fedsa_lora import FedSALoRA
from bench.errors import UserError
from bench.observe import AtStart
from bench.testing import check_algorithm
from models.groups import VIT_SPECS
from tests.conftest import client_update, make_hand_simulation
from tests.handcalc import record_train_batches
from tests.lora_handcalc import (FULL, assert_close_update, capture_uploads, factor_bytes, hand_step, lora_names,
                                 params_of)

pytestmark = pytest.mark.usefixtures("one_thread")


def make_sim(hp=None, **cfg):
    settings = dict(model_group="vit-small-hetero", batch_size=FULL, lr=0.05, hp={"dropout": 0.0, **(hp or {})})
    settings.update(cfg)
    return make_hand_simulation("fedsalora", **settings)


def qv_shapes(arch: str) -> list[tuple[int, int]]:
    depth, width, _ = VIT_SPECS[arch]
    return [(width, width)] * 2 * depth


def test_conforms():
    check_algorithm(FedSALoRA, model_group="vit-hetero", train_size=100, test_size=50)


def test_round_zero_gives_every_client_the_servers_a_and_only_a_travels():
    sim = make_sim()
    for client in sim.clients:
        payload = sim.algo.server_payload(client, 0)
        assert payload and all(k.endswith(".lora_A") for k in payload)
        for key, a in payload.items():
            assert torch.equal(a, sim.algo.global_a[key])
        assert sum(v.numel() * 4 for v in payload.values()) == factor_bytes(qv_shapes(client.arch), 8, "A")
    # two clients of one width get the same tensors for the blocks both have (vits1 depth 4, vits2 depth 3)
    a0, a1 = (sim.algo.server_payload(sim.clients[i], 0) for i in (0, 1))
    shared = set(a0) & set(a1)
    assert len(shared) == 6 and all(torch.equal(a0[k], a1[k]) for k in shared)


def test_one_step_trains_a_b_and_the_header_from_the_downloaded_a():
    sim = make_sim()
    client = sim.clients[2]
    model = client.state["model"]
    with torch.no_grad():  # a non-zero B, so the step moves A too
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)
    payload = {k: v + 0.01 for k, v in sim.algo.server_payload(client, 0).items()}
    before = params_of(model)
    start = dict(before)
    for name in lora_names(before):  # the downloaded A replaces the client's, per layer key
        key = next(k for k in payload if k.startswith(f"{name}@"))
        start[f"{name}.lora_A"] = payload[key]
    batches = record_train_batches(pytest.MonkeyPatch(), sim.ctx.data)
    upload, _ = client_update(sim, client, payload, 0)
    (x, y), = batches[0]
    expected = hand_step(client.arch, 10, start, x, y, sim.cfg, scaling=2.0)
    after = params_of(model)
    assert_close_update(start, after, {k: v for k, v in expected.items() if ".lora_" in k or "header" in k})
    for k, v in before.items():  # the base does not move
        if ".lora_" not in k and not k.startswith("header."):
            assert torch.equal(after[k], v), k
    assert set(upload) == set(payload)  # A only
    for name in lora_names(after):
        key = next(k for k in upload if k.startswith(f"{name}@"))
        assert torch.equal(upload[key], after[f"{name}.lora_A"])


@pytest.mark.parametrize("aggregation", ["samples", "uniform"])
def test_server_a_is_the_weighted_mean_per_layer_and_shape(aggregation):
    sim = make_sim({"aggregation": aggregation}, participation=1.0)
    with torch.no_grad():  # non-zero B: A moves in the round's one step, differently on each client
        for client in sim.clients:
            for name, p in client.state["model"].named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(0, 0.5)
    seen = capture_uploads(sim)
    before = {k: v.clone() for k, v in sim.algo.global_a.items()}
    sim.run_round(0)
    uploads = seen[0]
    n = {c.id: c.num_train for c in sim.clients}
    assert len(set(n.values())) == 5
    for key, value in sim.algo.global_a.items():
        ids = [c for c in uploads if key in uploads[c]]
        w = {c: (n[c] if aggregation == "samples" else 1.0) for c in ids}
        expected = sum(uploads[c][key] * w[c] for c in ids) / sum(w.values())
        other = sum(uploads[c][key] * (1.0 if aggregation == "samples" else n[c]) for c in ids) / \
            sum(1.0 if aggregation == "samples" else n[c] for c in ids)
        torch.testing.assert_close(value, expected)
        moved = float((expected - before[key]).abs().max())
        assert moved > 1e-4  # the mean is not the server's old A (one step of lr 0.05 moves it by ~1e-3)
        assert len(ids) == 1 or float((other - expected).abs().max()) > 0.01 * moved  # the weights matter
    # block 0's q: the width-64 clients (0, 1, 2) and the width-32 ones (3, 4) are separate layers
    keys = sorted(k for k in sim.algo.global_a if k.startswith("extractor.blocks.0.attn.q@"))
    assert keys == ["extractor.blocks.0.attn.q@32x32.lora_A", "extractor.blocks.0.attn.q@64x64.lora_A"]
    assert [c for c in uploads if keys[1] in uploads[c]] == [0, 1, 2]
    assert [c for c in uploads if keys[0] in uploads[c]] == [3, 4]
    # block 3 exists only in vits1 (depth 4, width 64) and vits4 (depth 4, width 32)
    assert [c for c in uploads if "extractor.blocks.3.attn.v@64x64.lora_A" in uploads[c]] == [0]


def test_b_and_the_header_stay_local_across_rounds_and_bytes_match_the_hand_count():
    sim = make_sim(participation=1.0)
    sim.run_round(0)
    local = lambda c: {k: v for k, v in params_of(c.state["model"]).items() if "lora_B" in k or "header" in k}  # noqa
    kept = {c.id: local(c) for c in sim.clients}
    at_start = {}
    sim.observers.add(AtStart("phase", lambda info: at_start.update(
        {cid: local(sim.clients[cid]) for cid in info["clients"]})))
    down_before = dict(sim.bytes_down)
    metrics = sim.run_round(1)
    for client in sim.clients:
        for k, v in kept[client.id].items():  # round 1 started from the client's own B and header
            assert torch.equal(at_start[client.id][k], v), (client.id, k)
        per_round = factor_bytes(qv_shapes(client.arch), 8, "A")
        assert sim.bytes_down[client.id] - down_before[client.id] == per_round
        assert sim.bytes_up[client.id] == 2 * per_round
    assert metrics["bytes_up"] == metrics["bytes_down"] == sum(factor_bytes(qv_shapes(c.arch), 8, "A")
                                                               for c in sim.clients)
    # the hand count for one vit-hetero client: ViT-1, 8 blocks x (q, v) x r 8 x in 256 x 4 bytes
    assert factor_bytes(qv_shapes("vit1"), 8, "A") == 8 * 2 * 8 * 256 * 4 == 131_072


def test_bad_options_are_refused():
    with pytest.raises(UserError, match="fedsalora.rank must be >= 1"):
        FedSALoRA.make_hparams({"rank": 0})
    with pytest.raises(UserError, match="fedsalora.aggregation must be one of samples, uniform"):
        FedSALoRA.make_hparams({"aggregation": "sparsity"})
    with pytest.raises(UserError, match="fedsalora.targets is empty"):
        FedSALoRA.make_hparams({"targets": " "})
