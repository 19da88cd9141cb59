"""LG-FedAvg: only the header (fc3) travels, the client trains from the global header, the server's
header is the n_k-weighted mean of the uploads, and the private layers are never touched by the server."""
from __future__ import annotations

import math

import pytest
import torch

from algorithms.base import state_payload
from algorithms.lgfedavg import LGFedAvg
from bench.config import RunConfig
from bench.errors import UserError
from bench.runner import client_splits
from bench.simulator import Simulation
from tests.conftest import hand_dataset as dataset, hand_splits, make_hand_simulation

CPU = torch.device("cpu")


def make_sim(**kwargs) -> Simulation:
    return make_hand_simulation("lgfedavg", **kwargs)


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("num_classes", [10, 100])
def test_only_the_header_travels(num_classes):
    cpc = 2 if num_classes == 10 else 20
    sim = make_sim(num_classes=num_classes, classes_per_client=cpc, per_class=1, batch_size=64)
    assert sim.ctx.client_archs == ["cnn1", "cnn2", "cnn3", "cnn4", "cnn5"]
    captured = {}
    aggregate = sim.algo.aggregate
    sim.algo.aggregate = lambda uploads, r: (captured.update(uploads), aggregate(uploads, r))
    metrics = sim.run_round(0)
    header_bytes = 4 * (500 * num_classes + num_classes)
    assert header_bytes == 4 * {10: 5_010, 100: 50_100}[num_classes]
    for cid in range(5):  # the same for every architecture
        assert set(captured[cid]) == {"header.weight", "header.bias"}
        assert sim.bytes_up[cid] == sim.bytes_down[cid] == header_bytes
    assert set(sim.algo.server_payload(sim.clients[0], 1)) == {"header.weight", "header.bias"}
    assert metrics["bytes_up_per_client"] == metrics["bytes_down_per_client"] == header_bytes


def test_client_trains_from_the_global_header_and_its_own_extractor():
    sim = make_sim()
    sim.run_round(0)  # headers now differ from client to client
    client = sim.clients[1]
    model = client.state["model"]
    extractor_before = snapshot(model.extractor)
    assert not same(snapshot(model.header), snapshot(sim.algo.global_header))
    seen = {}
    train = sim.ctx.train

    def spying_train(c, trainable, loss_fn, epochs, phase, indices=None):
        seen["header"], seen["extractor"] = snapshot(model.header), snapshot(model.extractor)
        seen["trainable"] = trainable
        return train(c, trainable, loss_fn, epochs, phase, indices)

    sim.ctx.train = spying_train
    payload = sim.algo.server_payload(client, 1)
    upload = sim.algo.client_update(client, payload, 1)
    assert same(seen["header"], {k[len("header."):]: v for k, v in payload.items()})  # loaded the global header
    assert same(seen["extractor"], extractor_before)  # and kept its own extractor
    assert seen["trainable"] == [model]  # the whole model trains
    assert not same(snapshot(model.extractor), extractor_before)
    assert same({"header." + k: v for k, v in snapshot(model.header).items()}, upload)  # uploads what it trained


def test_aggregation_is_the_weighted_mean_and_never_touches_private_layers():
    sim = make_sim()
    captured = {}
    before = {}
    aggregate = sim.algo.aggregate

    def spying_aggregate(uploads, r):
        captured.update(uploads)
        before.update({c.id: snapshot(c.state["model"]) for c in sim.clients})
        aggregate(uploads, r)

    sim.algo.aggregate = spying_aggregate
    sim.run_round(0)
    for c in sim.clients:  # the server's update changed no client model, extractor or header
        assert same(snapshot(c.state["model"]), before[c.id])
    weights = {cid: sim.ctx.client_weights[cid] for cid in captured}
    assert len(set(weights.values())) == 5
    total = sum(weights.values())
    glob = state_payload(sim.algo.global_header, "header.")
    for name, tensor in glob.items():
        want = sum(weights[cid] / total * captured[cid][name].double() for cid in captured)
        torch.testing.assert_close(tensor.double(), want, rtol=1e-5, atol=1e-6)
        unweighted = sum(captured[cid][name].double() for cid in captured) / len(captured)
        assert not torch.allclose(tensor.double(), unweighted, rtol=1e-7, atol=1e-9)


def test_local_header_init_sends_nothing_in_round_zero():
    sim = make_sim(hp={"header_init": "local"})
    client = sim.clients[0]
    header0 = snapshot(client.state["model"].header)
    assert sim.algo.server_payload(client, 0) == {}
    first = sim.run_round(0)
    assert first["bytes_down"] == 0 and first["bytes_up_per_client"] == 4 * 5_010
    assert not same(snapshot(client.state["model"].header), header0)  # trained from its own header
    second = sim.run_round(1)
    assert second["bytes_down_per_client"] == 4 * 5_010


def test_end_to_end_on_a_label_skew_partition():
    cfg = RunConfig(dataset="synthetic", num_clients=5, rounds=2, batch_size=32, classes_per_client=2,
                    eval_batch_size=256, device="cpu", algorithms=["lgfedavg"])
    ds, data = dataset(10)
    sim = Simulation(cfg, LGFedAvg, 0, data, client_splits(cfg, ds, 0, CPU), CPU)
    sim.initial_metrics()
    for r in range(2):
        metrics = sim.run_round(r)
        assert math.isfinite(metrics["train_loss"])
    assert 0.0 <= metrics["acc_mean"] <= 1.0
    client = sim.clients[4]
    x = data.normalise(data.x_test[:8])
    with torch.no_grad():
        torch.testing.assert_close(sim.algo.predict(client, x), client.state["model"](x))


def test_needs_one_representation_size():
    cfg = RunConfig(dataset="synthetic", num_clients=3, rounds=1, classes_per_client=2, device="cpu",
                    model_group="tv-hetero", algorithms=["lgfedavg"])
    ds, data = dataset(10)
    with pytest.raises(UserError, match="representation size"):
        Simulation(cfg, LGFedAvg, 0, data, hand_splits(ds, 3, 2, 3), CPU)


def test_bad_hyperparameters_are_user_errors():
    with pytest.raises(UserError):
        LGFedAvg.make_hparams({"header_init": "random"})
    assert LGFedAvg.make_hparams().header_init == "server"
