"""HetLoRA: ranks spread over clients; the download is the global factors truncated to the client's rank; a
round trains the factors and the header on CE + lambda sum ||A_tail|| ||B_tail|| (one SGD step by hand in the
merged form); the rank is pruned to floor(gamma r) exactly when that tail's norm product fell during the round,
the pruned ranks zeroed and left out of the upload; the server zero-pads and averages weighted by
||s B_k A_k||_F per layer and shape; bytes equal the hand count at the ranks before and after pruning."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from algorithms.hetlora import HetLoRA
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
RANKS = [16, 13, 10, 7, 4]


def make_sim(hp=None, **cfg):
    settings = dict(model_group="vit-small-hetero", batch_size=FULL, lr=0.05, hp=hp or {})
    settings.update(cfg)
    return make_hand_simulation("hetlora", **settings)


def qv_shapes(arch: str) -> list[tuple[int, int]]:
    depth, width, _ = VIT_SPECS[arch]
    return [(width, width)] * 2 * depth


def randomise_global(sim, seed=0):
    """Non-zero global B (so the tail's norm is not zero from the start)."""
    gen = torch.Generator().manual_seed(seed)
    for key, value in sim.algo.global_factors.items():
        sim.algo.global_factors[key] = torch.randn(value.shape, generator=gen) * 0.05


def test_conforms():
    check_algorithm(HetLoRA, model_group="vit-hetero", train_size=100, test_size=50)


def test_ranks_and_truncated_download():
    assert [spread_rank(j, 5, 4, 16) for j in range(5)] == RANKS and spread_rank(0, 1, 4, 16) == 16
    assert [arch_rank("vit-depth-hetero", a, 4, 16) for a in ("vit1", "vit2", "vit3")] == [16, 10, 4]
    sim = make_sim()
    randomise_global(sim)
    for client in sim.clients:
        rank = RANKS[client.id]
        assert client.state["rank"] == rank
        payload = sim.algo.server_payload(client, 0)
        for key, value in payload.items():
            full = sim.algo.global_factors[key]
            assert torch.equal(value, full[:rank] if key.endswith("lora_A") else full[:, :rank])
        assert sum(v.numel() * 4 for v in payload.values()) == factor_bytes(qv_shapes(client.arch), rank)
    # the global factors have the largest rank among the clients holding the layer: 16 for width 64, 7 for 32
    assert sim.algo.global_factors["extractor.blocks.0.attn.q@64x64.lora_A"].shape == (16, 64)
    assert sim.algo.global_factors["extractor.blocks.0.attn.q@32x32.lora_B"].shape == (32, 7)
    # ViT-1 in vit-hetero at r 16: 8 blocks x (q, v) x 16 x (256 + 256) x 4 bytes each way
    assert factor_bytes(qv_shapes("vit1"), 16) == 8 * 2 * 16 * 512 * 4 == 524_288


def regulariser(p, rank, gamma, lam):
    start = math.floor(gamma * rank)
    return lam * sum(torch.linalg.vector_norm(p[f"{n}.lora_A"][start:rank]) *
                     torch.linalg.vector_norm(p[f"{n}.lora_B"][:, start:rank]) for n in lora_names(p))


def test_one_step_is_ce_plus_the_tail_regulariser_from_the_truncated_global():
    hp = {"prune_lambda": 0.5, "prune_gamma": 0.7}
    sim = make_sim(hp)
    randomise_global(sim)
    client = sim.clients[1]  # rank 13: tail = ranks 9..12
    model = client.state["model"]
    payload = sim.algo.server_payload(client, 0)
    start = params_of(model)
    for name in lora_names(start):
        key = next(k[:-len(".lora_A")] for k in payload if k.startswith(f"{name}@") and k.endswith("lora_A"))
        start[f"{name}.lora_A"], start[f"{name}.lora_B"] = payload[f"{key}.lora_A"], payload[f"{key}.lora_B"]
    batches = record_train_batches(pytest.MonkeyPatch(), sim.ctx.data)
    client_update(sim, client, payload, 0)
    (x, y), = batches[0]
    expected = hand_step(client.arch, 10, start, x, y, sim.cfg, 2.0, extra=lambda q: regulariser(q, 13, 0.7, 0.5))
    after = params_of(model)
    if client.state["rank"] < 13:  # pruned: the expected step, then the pruned ranks zeroed
        for name in lora_names(start):
            expected[f"{name}.lora_A"][client.state["rank"]:] = 0
            expected[f"{name}.lora_B"][:, client.state["rank"]:] = 0
    assert_close_update(start, after, {k: v for k, v in expected.items() if ".lora_" in k or "header" in k})
    without = hand_step(client.arch, 10, start, x, y, sim.cfg, 2.0)  # the regulariser changes the step
    assert not torch.allclose(without[f"{lora_names(start)[0]}.lora_B"], expected[f"{lora_names(start)[0]}.lora_B"])


@torch.no_grad()
def tail_product(layers, rank, gamma):
    start = math.floor(gamma * rank)
    return float(sum(torch.linalg.vector_norm(l.lora_A[start:rank]) * torch.linalg.vector_norm(l.lora_B[:, start:rank])
                     for l in layers.values()))


def test_a_tail_pushed_down_by_the_regulariser_is_pruned():
    sim = make_sim({"prune_lambda": 5.0, "prune_gamma": 0.75})
    randomise_global(sim)
    client = sim.clients[0]  # rank 16: tail 12..15
    layers = sim.algo.keyed_layers(client)
    seen = {}
    sim.observers.add(AtStart("phase", lambda info: seen.update(start=tail_product(layers, 16, 0.75))))
    upload, _ = client_update(sim, client, sim.algo.server_payload(client, 0), 0)
    assert seen["start"] > 0
    assert client.state["rank"] == math.floor(0.75 * 16) == 12
    for layer in layers.values():  # pruned ranks zero; the prediction still runs every stored rank
        assert not layer.lora_A[12:].any() and not layer.lora_B[:, 12:].any() and layer.rank == 16
    assert all(v.shape[0 if k.endswith("lora_A") else 1] == 12 for k, v in upload.items())
    assert sum(v.numel() * 4 for v in upload.values()) == factor_bytes(qv_shapes(client.arch), 12)


def test_without_self_pruning_the_rank_stays():
    sim = make_sim({"prune_lambda": 5.0, "prune_gamma": 0.75, "self_pruning": False})
    randomise_global(sim)
    client = sim.clients[0]
    upload, _ = client_update(sim, client, sim.algo.server_payload(client, 0), 0)
    assert client.state["rank"] == 16
    assert sum(v.numel() * 4 for v in upload.values()) == factor_bytes(qv_shapes(client.arch), 16)


def test_round_zero_never_prunes_because_b_starts_at_zero():
    sim = make_sim({"prune_lambda": 5.0}, participation=1.0)
    sim.run_round(0)
    assert [c.state["rank"] for c in sim.clients] == RANKS


def test_a_pruned_client_downloads_and_trains_at_its_new_rank():
    sim = make_sim({"prune_lambda": 5.0, "prune_gamma": 0.75})
    randomise_global(sim)
    client = sim.clients[0]
    upload, _ = client_update(sim, client, sim.algo.server_payload(client, 0), 0)
    assert client.state["rank"] == 12
    # the server learns the new rank from the upload (it never reads the client's state): not before
    assert sum(v.numel() * 4 for v in sim.algo.server_payload(client, 1).values()) == \
        factor_bytes(qv_shapes(client.arch), 16)
    sim.algo.aggregate({client.id: upload}, 0)
    assert sim.algo.ranks[client.id] == 12
    payload = sim.algo.server_payload(client, 1)
    assert sum(v.numel() * 4 for v in payload.values()) == factor_bytes(qv_shapes(client.arch), 12)
    phases = []
    sim.observers.add(AtStart("phase", lambda info: phases.append(
        (info["phase"].name, {layer.rank for layer in sim.algo.layers(client).values()}))))
    client_update(sim, client, payload, 1)
    assert phases == [("train-r12", {12})]


@pytest.mark.parametrize("aggregation", ["sparsity", "samples", "uniform"])
def test_server_zero_pads_and_weights_by_sparsity(aggregation):
    sim = make_sim({"aggregation": aggregation, "self_pruning": False}, participation=1.0)
    seen = capture_uploads(sim)
    sim.run_round(0)
    uploads = seen[0]
    n = {c.id: c.num_train for c in sim.clients}
    for key, (_, _, r_max) in sim.algo.layer_shapes.items():
        ids = [c for c in uploads if f"{key}.lora_A" in uploads[c]]
        a = {c: uploads[c][f"{key}.lora_A"] for c in ids}
        b = {c: uploads[c][f"{key}.lora_B"] for c in ids}
        if aggregation == "sparsity":
            w = {c: float(torch.sqrt(((2.0 * b[c] @ a[c]) ** 2).sum())) for c in ids}
        else:
            w = {c: float(n[c]) if aggregation == "samples" else 1.0 for c in ids}
        total = sum(w.values())
        pad_a = sum(w[c] / total * torch.cat([a[c], torch.zeros(r_max - a[c].shape[0], a[c].shape[1])]) for c in ids)
        pad_b = sum(w[c] / total * F.pad(b[c], (0, r_max - b[c].shape[1])) for c in ids)
        torch.testing.assert_close(sim.algo.global_factors[f"{key}.lora_A"], pad_a)
        torch.testing.assert_close(sim.algo.global_factors[f"{key}.lora_B"], pad_b)
    if aggregation == "sparsity":  # unequal norms: not the uniform mean
        key = "extractor.blocks.0.attn.q@64x64"
        norms = [float(torch.linalg.matrix_norm(uploads[c][f"{key}.lora_B"] @ uploads[c][f"{key}.lora_A"]))
                 for c in (0, 1, 2)]
        assert max(norms) > 1.05 * min(norms)


def test_bad_options_are_refused():
    with pytest.raises(UserError, match="hetlora needs 1 <= min_rank <= max_rank"):
        HetLoRA.make_hparams({"min_rank": 0})
    with pytest.raises(UserError, match="hetlora.prune_gamma must be in"):
        HetLoRA.make_hparams({"prune_gamma": 1.0})
    with pytest.raises(UserError, match="hetlora.aggregation must be one of sparsity, samples, uniform"):
        HetLoRA.make_hparams({"aggregation": "mean"})
