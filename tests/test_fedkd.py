"""FedKD: SVD compression of the mentee update, mutual distillation, server/client synchronisation, costs."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from algorithms.fedkd import (FedKD, compress, decompress, energy_threshold, svd_factors, svd_flops,
                              truncation_rank)
from bench.accounting import EXTRA_FLOP_FORMULAS, payload_bytes, transmit
from bench.config import RunConfig
from bench.errors import UserError
from bench.runner import client_splits
from bench.simulator import Simulation
from data import DeviceData, synthetic_dataset

CPU = torch.device("cpu")
CNN5_PARAMS = {10: 670_058, 100: 715_148}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_sim(num_clients=5, rounds=3, participation=1.0, classes=10, partition="label-skew", hp=None, **cfg_kw):
    cfg = RunConfig(algorithms=["fedkd"], dataset="synthetic", num_clients=num_clients, rounds=rounds,
                    participation=participation, batch_size=32, device="cpu", partition=partition,
                    algo={"fedkd": hp or {}}, **cfg_kw)
    ds = synthetic_dataset(num_classes=classes, train_size=600, test_size=100, seed=0)
    data = DeviceData(ds, CPU, augment=cfg.augment)
    return Simulation(cfg, FedKD, 0, data, client_splits(cfg, ds, 0, CPU), CPU)


def state_copy(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return all(not torch.equal(before[k], v) for k, v in module.state_dict().items() if v.is_floating_point())


@pytest.fixture(scope="module")
def real_update():
    """A real mentee update: one client's local training from the global mentee."""
    sim = make_sim()
    algo, client = sim.algo, sim.clients[0]
    algo.receive_mentee(client, transmit(algo.server_payload(client, 0), CPU)[0])
    before = state_copy(client.state["mentee"])
    algo.local_train(client)
    after = client.state["mentee"].state_dict()
    return {k: after[k] - before[k] for k in algo.shapes}, algo.shapes, algo.dense_bytes


def test_bytes_fall_as_threshold_falls(real_update):
    update, _, dense = real_update
    sizes = [payload_bytes(compress(update, t)) for t in (0.99, 0.9, 0.5)]
    assert sizes[0] >= sizes[1] >= sizes[2]
    assert sizes[0] > sizes[2]
    assert sizes[2] < dense
    assert payload_bytes(update) == dense


def test_full_energy_reconstruction_is_exact(real_update):
    update, shapes, _ = real_update
    rebuilt = decompress(compress(update, 1.0), shapes)
    for name in update:
        torch.testing.assert_close(rebuilt[name], update[name], rtol=1e-5, atol=1e-6)
    for name, tensor in update.items():  # the factors themselves, not only the dense fallback
        if tensor.dim() >= 2:
            matrix = tensor.reshape(tensor.shape[0], -1)
            u, v = svd_factors(matrix, 1.0)
            torch.testing.assert_close(u @ v, matrix, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.95, 0.99])
def test_energy_kept_reaches_threshold_with_minimal_rank(real_update, threshold):
    update, shapes, _ = real_update
    sent = compress(update, threshold)
    factored = [k[:-2] for k in sent if k.endswith(".U")]
    assert factored, "some matrix should be sent as factors"
    for name in factored:
        matrix = update[name].reshape(update[name].shape[0], -1)
        u, v = sent[name + ".U"], sent[name + ".V"]
        assert u.shape[1] == v.shape[0] and u.shape[1] * sum(matrix.shape) < matrix.numel()
        kept = (u @ v).double().pow(2).sum() / matrix.double().pow(2).sum()
        assert kept >= threshold - 1e-5
        s = torch.linalg.svdvals(matrix.double())
        r = u.shape[1]
        if r > 1:  # one rank less would not reach the threshold
            assert s[: r - 1].pow(2).sum() / s.pow(2).sum() < threshold
    for name, tensor in update.items():  # 1-D tensors always dense
        if tensor.dim() < 2:
            assert name in sent


def test_truncation_rank_and_threshold_schedule():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert truncation_rank(s, 0.5) == 1
    assert truncation_rank(s, 0.9) == 2
    assert truncation_rank(s, 0.99) == 3
    assert truncation_rank(s, 1.0) == 3
    assert energy_threshold(0, 10, 0.95, 0.98) == pytest.approx(0.953)
    assert energy_threshold(9, 10, 0.95, 0.98) == pytest.approx(0.98)


def test_mentor_mentee_and_w_train():
    sim = make_sim()
    algo, client = sim.algo, sim.clients[1]
    before = {k: state_copy(client.state[k]) for k in ("model", "mentee", "W")}
    algo.local_train(client)
    for key in ("model", "mentee", "W"):
        assert changed(before[key], client.state[key]), key
    assert "W" in client.state and tuple(client.state["W"].weight.shape) == (500, 500)
    assert not any("W" in k for k in algo.client_update(client, algo.server_payload(client, 0), 0))


def test_server_and_clients_stay_identical_full_participation():
    sim = make_sim(rounds=3)
    algo = sim.algo
    m0 = sim.run_round(0)
    m1 = sim.run_round(1)
    assert m0["bytes_down_per_client"] == 4 * CNN5_PARAMS[10]  # round 0: the full initial mentee
    assert m1["bytes_down_per_client"] < m0["bytes_down_per_client"]  # from round 2 on: compressed
    assert m1["bytes_up_per_client"] < 4 * CNN5_PARAMS[10]
    for client in sim.clients:
        payload, _ = transmit(algo.server_payload(client, 2), CPU)
        assert payload and all(k.startswith("d0/") for k in payload)
        algo.receive_mentee(client, payload)
        for name, tensor in algo.global_mentee.state_dict().items():
            assert torch.equal(client.state["mentee"].state_dict()[name], tensor), name


def test_server_and_clients_stay_identical_partial_participation():
    sim = make_sim(rounds=4, participation=0.4)
    for r in range(3):
        sim.run_round(r)
    algo = sim.algo
    for client in sim.clients:  # in sync, a few rounds behind, or never sampled: all end identical
        algo.receive_mentee(client, transmit(algo.server_payload(client, 3), CPU)[0])
        for name, tensor in algo.global_mentee.state_dict().items():
            assert torch.equal(client.state["mentee"].state_dict()[name], tensor), name


def test_svd_flops_counted_on_server():
    assert torch.ops.aten._linalg_svd in EXTRA_FLOP_FORMULAS
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as mode:
        torch.linalg.svd(torch.randn(50, 30), full_matrices=False)
    assert svd_flops((50, 30), False) == 6 * 50 * 30**2 + 20 * 30**3
    assert mode.get_total_flops() >= svd_flops((50, 30), False)
    sim = make_sim(rounds=1)
    metrics = sim.run_round(0)
    # The server runs at least one SVD of the 500x800 fc1 update.
    assert metrics["server_flops"] >= svd_flops((500, 800), False)
    assert metrics["train_flops"] > 0


@pytest.mark.parametrize("classes", [10, 100])
def test_full_download_is_the_cnn5_mentee(classes):
    sim = make_sim(classes=classes, partition="iid")
    payload = sim.algo.server_payload(sim.clients[0], 0)
    assert payload_bytes(payload) == 4 * CNN5_PARAMS[classes]


def test_inference_is_the_mentor():
    sim = make_sim(rounds=1)
    client = sim.clients[2]
    x = sim.ctx.data.normalise(sim.ctx.data.x_train[:4])
    with torch.no_grad():
        assert torch.equal(sim.algo.predict(client, x), client.state["model"].eval()(x))


@pytest.mark.parametrize("bad", [{"mentee_arch": "cnn9"}, {"energy_start": 0.0}, {"kl_reduction": "sum"},
                                 {"divisor_floor": -1.0}])
def test_bad_hyperparameters(bad):
    with pytest.raises(UserError):
        FedKD.make_hparams(bad)
