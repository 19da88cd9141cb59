"""FedAvg: the client trains the downloaded global model, the server takes the (n_k- or uniformly) weighted
average of the whole uploaded models, and the global model (or each client's own) is what is evaluated.
Recomputed by hand on the tiny model of tests/test_fedgh.py."""
from __future__ import annotations

import pytest
import torch

from algorithms.fedavg import FedAvg
from bench.accounting import transmit
from bench.training import run_updates
from bench.errors import UserError
from tests.conftest import make_hand_simulation, make_simulation
from tests.handcalc import (client_step, cross_entropy, evaluation_by_hand, record_train_batches, snapshot,
                              use_tiny)

CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


def make_sim(**kwargs):
    return make_hand_simulation("fedavg", model_group="cnn5-homo", **kwargs)


def randomise(module) -> None:
    """Give the global model values no client model has."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.05)


@pytest.mark.parametrize("batched", [False, True])
def test_clients_train_the_downloaded_global_model_by_one_sgd_step_with_ce(monkeypatch, batched):
    use_tiny(monkeypatch, batchnorm=False)  # batched training needs a model without buffers
    sim = make_sim(batch_size=64, lr=0.5, batched_training=batched)  # one batch per client: one step
    randomise(sim.algo.global_model)
    start = snapshot(sim.algo.global_model)
    calls = record_train_batches(monkeypatch, sim.ctx.data)
    payloads = {c.id: transmit(sim.algo.server_payload(c, 0), CPU)[0] for c in sim.clients}
    if batched:
        import bench.batched

        together = []
        train_same_arch = bench.batched.train_same_arch
        monkeypatch.setattr(bench.batched, "train_same_arch",
                            lambda models, *a, **k: (together.append(len(models)), train_same_arch(models, *a, **k))[1])
    uploads = run_updates(sim.ctx, sim.algo, sim.clients, payloads, 0).uploads
    if batched:
        assert together == [5]  # the five clients really trained as one batched model
    assert len(calls) == 5 and all(len(batches) == 1 for batches in calls)
    batch_of = {}  # client -> its one batch, recognised by its classes (client i holds 2i and 2i+1)
    for (x, y), in calls:
        batch_of[int(y.min()) // 2] = (x, y)
    for client in sim.clients:
        expected = client_step(start, *batch_of[client.id], sim.cfg)
        for name, value in expected.items():
            torch.testing.assert_close(uploads[client.id][name], value, rtol=1e-4, atol=1e-5, msg=name)
            torch.testing.assert_close(client.state["model"].state_dict()[name], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("aggregation", ["samples", "uniform"])
def test_global_model_is_the_weighted_average_of_the_whole_uploaded_models(monkeypatch, aggregation):
    use_tiny(monkeypatch)
    sim = make_sim(hp={"aggregation": aggregation})
    captured = {}
    aggregate = sim.algo.aggregate
    sim.algo.aggregate = lambda uploads, r: (captured.update(uploads), aggregate(uploads, r))
    sim.run_round(0)
    sizes = {c.id: len(c.split.train) for c in sim.clients}
    assert len(set(sizes.values())) == 5  # n_k differ, so the two weightings differ
    weights = sizes if aggregation == "samples" else {cid: 1 for cid in sizes}
    other = {cid: 1 for cid in sizes} if aggregation == "samples" else sizes
    glob = snapshot(sim.algo.global_model)
    assert set(captured[0]) == set(glob)  # the whole model travels, BatchNorm statistics included
    for name in ("extractor.1.weight", "extractor.2.running_mean", "header.bias"):
        want = sum(weights[c] * captured[c][name].double() for c in captured) / sum(weights.values())
        torch.testing.assert_close(glob[name].double(), want, rtol=1e-5, atol=1e-7)
        wrong = sum(other[c] * captured[c][name].double() for c in captured) / sum(other.values())
        assert not torch.allclose(glob[name].double(), wrong, rtol=1e-6, atol=1e-9)


def test_global_evaluation_covers_every_client_with_the_aggregated_model(monkeypatch):
    use_tiny(monkeypatch)
    sim = make_sim(participation=0.4)  # 2 of 5 clients train per round
    metrics = sim.run_round(0)
    glob = snapshot(sim.algo.global_model)
    assert sorted(sim.test_evals) == [0, 1, 2, 3, 4]
    total_correct = 0
    for client in sim.clients:
        correct, loss = evaluation_by_hand(sim, client, glob)
        assert sim.test_evals[client.id].correct == correct
        assert sim.test_evals[client.id].loss == pytest.approx(loss, rel=1e-5)
        total_correct += correct
    assert metrics["acc_mean"] == pytest.approx(total_correct / sum(len(c.split.test) for c in sim.clients))


def test_local_evaluation_uses_each_sampled_clients_model_after_training(monkeypatch):
    use_tiny(monkeypatch)
    sim = make_sim(participation=0.4, hp={"eval_model": "local"})
    sim.run_round(0)
    sampled = sorted(sim.test_evals)
    assert len(sampled) == 2  # only the clients whose model changed
    glob = snapshot(sim.algo.global_model)
    for cid in sampled:
        client = sim.clients[cid]
        own = snapshot(client.state["model"])
        correct, loss = evaluation_by_hand(sim, client, own)
        assert sim.test_evals[cid].correct == correct
        assert sim.test_evals[cid].loss == pytest.approx(loss, rel=1e-5)
        assert loss != pytest.approx(evaluation_by_hand(sim, client, glob)[1], rel=1e-3)  # guard


def test_step_zero_evaluation_of_the_global_model_runs_in_eval_mode(monkeypatch):
    use_tiny(monkeypatch)
    sim = make_sim()
    glob = sim.algo.global_model.train()
    with torch.no_grad():  # running statistics far from a test batch's own
        glob.extractor[2].running_mean.uniform_(-2, 2)
        glob.extractor[2].running_var.uniform_(0.5, 3)
    before = snapshot(glob)
    sim.initial_metrics()
    assert all(torch.equal(v, snapshot(glob)[k]) for k, v in before.items())
    for client in sim.clients:
        assert sim.test_evals[client.id].loss == pytest.approx(evaluation_by_hand(sim, client, before)[1], rel=1e-5)


def test_bytes_are_the_whole_model_both_ways():
    sim = make_simulation("fedavg", model_group="cnn5-homo")
    metrics = sim.run_round(0)
    model_bytes = sum(t.numel() * t.element_size() for t in sim.algo.global_model.state_dict().values())
    assert model_bytes == 4 * 670_058  # CNN-5, 10 classes (SPEC)
    assert metrics["bytes_up_per_client"] == metrics["bytes_down_per_client"] == model_bytes


def test_profiles_keep_the_spec_options():
    for profile in ("official", "htfllib"):
        sim = make_simulation("fedavg", model_group="cnn5-homo", profile=profile)
        assert (sim.algo.hp.aggregation, sim.algo.hp.eval_model) == ("samples", "global")
    sim = make_simulation("fedavg", model_group="cnn5-homo", profile="official",
                          algo={"fedavg": {"aggregation": "uniform"}})  # the user's value on top
    assert sim.algo.hp.aggregation == "uniform"


def test_needs_a_homogeneous_group():
    with pytest.raises(UserError, match="model-homogeneous"):
        make_simulation("fedavg", model_group="cnn-hetero")


@pytest.mark.parametrize("bad", [{"aggregation": "mean"}, {"eval_model": "personal"}])
def test_bad_hyperparameters(bad):
    with pytest.raises(UserError):
        FedAvg.make_hparams(bad)


def test_hand_cross_entropy_matches_torch():
    """Guards the hand computations the tests above rely on."""
    z, y = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    torch.testing.assert_close(cross_entropy(z, y), torch.nn.functional.cross_entropy(z, y))
