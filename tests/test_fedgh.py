"""FedGH: server-trained global header from per-class mean representations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from algorithms.fedgh import FedGH
from bench.accounting import payload_bytes, transmit
from bench.config import RunConfig
from bench.errors import UserError
from bench.runner import client_splits
from bench.simulator import Simulation
from data import DeviceData, synthetic_dataset

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def make_sim(num_clients=5, rounds=2, classes=10, partition="label-skew", hp=None, **cfg_kw):
    cfg = RunConfig(algorithms=["fedgh"], dataset="synthetic", num_clients=num_clients, rounds=rounds,
                    batch_size=32, device="cpu", partition=partition, algo={"fedgh": hp or {}}, **cfg_kw)
    ds = synthetic_dataset(num_classes=classes, train_size=600, test_size=100, seed=0)
    data = DeviceData(ds, CPU, augment=cfg.augment)
    return Simulation(cfg, FedGH, 0, data, client_splits(cfg, ds, 0, CPU), CPU)


def local_round(sim, round_index=0):
    """Every client's download, training and upload, as the simulator does it (without aggregating)."""
    uploads = {}
    for client in sim.clients:
        payload, _ = transmit(sim.algo.server_payload(client, round_index), CPU)
        uploads[client.id], _ = transmit(sim.algo.client_update(client, payload, round_index), CPU)
    return uploads


def test_server_header_trains_and_lowers_the_loss_on_the_uploads():
    sim = make_sim()
    algo = sim.algo
    uploads = local_round(sim)
    before = {k: v.clone() for k, v in algo.header.state_dict().items()}
    loss_before = algo.server_loss(uploads)
    optimizer = algo.optimizer
    algo.aggregate(uploads, 0)
    assert not torch.equal(before["weight"], algo.header.weight.detach())
    assert algo.server_loss(uploads) < loss_before
    # The server's own optimizer was stepped, and it persists across rounds (momentum kept).
    assert algo.optimizer is optimizer
    assert all("momentum_buffer" in optimizer.state[p] for p in algo.header.parameters())
    algo.aggregate(local_round(sim, 1), 1)
    assert algo.optimizer is optimizer


@pytest.mark.parametrize("server_batch_size", [0, 4])
def test_server_batching_options_train(server_batch_size):
    sim = make_sim(hp={"server_batch_size": server_batch_size, "server_epochs": 3})
    uploads = local_round(sim)
    loss_before = sim.algo.server_loss(uploads)
    sim.algo.aggregate(uploads, 0)
    assert sim.algo.server_loss(uploads) < loss_before


def test_uploads_are_exact_class_means_of_the_trained_extractor():
    sim = make_sim()
    client = sim.clients[0]
    upload = sim.algo.client_update(client, sim.algo.server_payload(client, 0), 0)
    model = client.state["model"].eval()
    idx = client.split.train
    with torch.no_grad():
        x = sim.ctx.data.normalise(sim.ctx.data.x_train[idx])  # no augmentation
        h = model.extractor(x)
    y = sim.ctx.data.y_train[idx]
    expected_classes = torch.unique(y)
    assert torch.equal(upload["classes"].long(), expected_classes)
    assert upload["classes"].dtype == torch.uint8
    assert upload["reps"].dtype == torch.float32 and upload["reps"].shape == (len(expected_classes), 500)
    for row, c in enumerate(expected_classes):
        torch.testing.assert_close(upload["reps"][row], h[y == c].mean(0), rtol=1e-5, atol=1e-5)


def test_client_loads_the_global_header_before_training(monkeypatch):
    sim = make_sim()
    algo, client = sim.algo, sim.clients[3]
    with torch.no_grad():
        algo.header.weight.add_(1.0)  # make H distinguishable from any client's own header
    monkeypatch.setattr(sim.ctx, "train", lambda *args, **kwargs: torch.zeros(()))
    algo.client_update(client, transmit(algo.server_payload(client, 0), CPU)[0], 0)
    assert torch.equal(client.state["model"].header.weight, algo.header.weight)
    assert torch.equal(client.state["model"].header.bias, algo.header.bias)


def test_bytes_per_round():
    sim = make_sim()
    metrics = sim.run_round(0)
    classes_held = [len(torch.unique(sim.ctx.data.y_train[c.split.train])) for c in sim.clients]
    assert metrics["bytes_down"] == len(sim.clients) * 4 * (500 * 10 + 10)
    assert metrics["bytes_up"] == sum(4 * 500 * k + 1 * k for k in classes_held)  # float32 reps + uint8 ids
    assert metrics["server_flops"] > 0
    assert metrics["train_flops"] > 0


def test_round_zero_without_initial_header_downloads_nothing():
    sim = make_sim(hp={"load_initial_header": False})
    assert sim.run_round(0)["bytes_down"] == 0
    assert sim.run_round(1)["bytes_down"] == len(sim.clients) * 4 * (500 * 10 + 10)


def test_hundred_classes_download():
    sim = make_sim(classes=100, partition="iid")
    assert payload_bytes(sim.algo.server_payload(sim.clients[0], 0)) == 4 * (500 * 100 + 100)


def test_representation_flops_are_client_training_flops():
    sim = make_sim()
    client = sim.clients[0]
    before = sim.accountant.by_client[client.id]
    sim.algo.representations(client)
    assert sim.accountant.by_client[client.id] > before
    assert sim.accountant.totals["eval"] == 0


@pytest.mark.parametrize("bad", [{"server_lr": 0.0}, {"server_epochs": 0}, {"server_batch_size": -1}])
def test_bad_hyperparameters(bad):
    with pytest.raises(UserError):
        FedGH.make_hparams(bad)


def test_prediction_is_the_clients_own_model():
    sim = make_sim()
    sim.run_round(0)
    client = sim.clients[1]
    x = sim.ctx.data.normalise(sim.ctx.data.x_test[:8])
    with torch.no_grad():
        torch.testing.assert_close(sim.algo.predict(client, x), client.state["model"](x))
    assert F.softmax(sim.algo.predict(client, x), 1).shape == (8, 10)
