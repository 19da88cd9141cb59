"""FedGH: a global header H trained on the server from the clients' per-class mean representations.

The mechanism tests run on a tiny model (flatten -> linear -> BatchNorm -> ReLU -> header) put in place of
the model zoo, so every step can be recomputed here by hand with plain torch ops: the client's SGD step
from the downloaded H, its uploaded class means, the server's header training, and what is evaluated."""
from __future__ import annotations

import math

import pytest
import torch

from algorithms.fedgh import FedGH, class_id_dtype
from bench.accounting import payload_bytes, transmit
from bench.errors import UserError
from tests.conftest import client_update, make_hand_simulation, make_simulation
from tests.handcalc import (REP, class_means, client_step, cross_entropy, evaluation_by_hand, features,
                            record_train_batches, sgd_step, snapshot, use_tiny, with_header)

CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny(monkeypatch):
    use_tiny(monkeypatch)


def make_sim(**kwargs):
    return make_hand_simulation("fedgh", **kwargs)


# ---- the hand computations ------------------------------------------------------------------------------------

def train_split(sim, client):
    idx = client.split.train
    return sim.ctx.data.normalise(sim.ctx.data.x_train[idx]), sim.ctx.data.y_train[idx]  # no augmentation


def server_training(header, rounds, hp, seed, run_batch, grad_clip):
    """The server's header training by hand over several rounds of uploads: CE on the (rep, class) pairs in
    client-id order, permuted by a generator seeded once with seed*1000+3, SGD with momentum."""
    generator = torch.Generator().manual_seed(seed * 1000 + 3)
    p, buffers = {"weight": header["weight"], "bias": header["bias"]}, None
    for uploads in rounds:
        ids = sorted(uploads)
        reps = torch.cat([uploads[i]["reps"] for i in ids])
        labels = torch.cat([uploads[i]["classes"].long() for i in ids])
        batch = {0: len(labels), -1: run_batch}.get(hp["server_batch_size"], hp["server_batch_size"])
        if not hp["keep_server_optimizer"]:
            buffers = None
        for _ in range(hp["server_epochs"]):
            order = torch.randperm(len(labels), generator=generator)
            for start in range(0, len(labels), batch):
                idx = order[start:start + batch]
                p, buffers = sgd_step(p, ["weight", "bias"],
                                      lambda q: cross_entropy(reps[idx] @ q["weight"].T + q["bias"], labels[idx]),
                                      hp["server_lr"], hp["server_weight_decay"],
                                      grad_clip if hp["server_grad_clip"] else 0.0, buffers, hp["server_momentum"])
    return p


# ---- the client ---------------------------------------------------------------------------------------------

def test_client_loads_h_trains_the_whole_model_with_ce_and_uploads_exact_class_means(tiny, monkeypatch):
    sim = make_sim(batch_size=64, lr=0.5)  # one batch per client: exactly one SGD step
    algo, client = sim.algo, sim.clients[2]
    with torch.no_grad():
        algo.header.weight.normal_()  # H unlike the client's own header
    own, header = snapshot(client.state["model"]), snapshot(algo.header)
    calls = record_train_batches(monkeypatch, sim.ctx.data)
    payload, _ = transmit(algo.server_payload(client, 0), CPU)  # round index 0: H is sent by default
    upload, _ = transmit(client_update(sim, client, payload, 0)[0], CPU)

    assert len(calls) == 1 and len(calls[0]) == 1  # one training pass of one batch, nothing else augmented
    x, y = calls[0][0]
    expected = client_step(with_header(own, header), x, y, sim.cfg)
    trained = snapshot(client.state["model"])
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6, msg=name)

    classes, means = class_means(features(expected, train_split(sim, client)[0], "eval"), train_split(sim, client)[1])
    assert upload["classes"].dtype == torch.uint8
    assert torch.equal(upload["classes"].long(), classes)
    assert upload["reps"].dtype == torch.float32
    torch.testing.assert_close(upload["reps"], means, rtol=1e-5, atol=1e-6)


def test_without_initial_header_round_zero_trains_from_the_clients_own_header(tiny, monkeypatch):
    sim = make_sim(batch_size=64, lr=0.5, hp={"load_initial_header": False})
    algo, client = sim.algo, sim.clients[1]
    assert algo.server_payload(client, 0) == {}
    own = snapshot(client.state["model"])
    calls = record_train_batches(monkeypatch, sim.ctx.data)
    client_update(sim, client, {}, 0)
    x, y = calls[0][0]
    expected = client_step(own, x, y, sim.cfg)
    torch.testing.assert_close(snapshot(client.state["model"])["header.weight"], expected["header.weight"],
                               rtol=1e-5, atol=1e-6)
    payload = algo.server_payload(client, 1)  # from round index 1 on, H is sent
    assert all(torch.equal(payload[k], v) for k, v in snapshot(algo.header).items())


def test_batch_mean_representations_are_means_of_per_batch_class_means_over_augmented_batches(tiny, monkeypatch):
    sim = make_sim(batch_size=4, hp={"representation": "batch-mean"})
    algo, client = sim.algo, sim.clients[4]  # 14 samples: batches of 4, 4, 4, 2
    calls = record_train_batches(monkeypatch, sim.ctx.data)
    upload, _ = client_update(sim, client, algo.server_payload(client, 0), 0)
    assert len(calls) == 2 and len(calls[1]) == 4  # training, then one more pass over augmented batches
    p = snapshot(client.state["model"])
    sums: dict[int, torch.Tensor] = {}
    batches: dict[int, int] = {}
    for x, y in calls[1]:
        for c, mean in zip(*class_means(features(p, x, "eval"), y)):
            sums[int(c)] = sums.get(int(c), 0) + mean
            batches[int(c)] = batches.get(int(c), 0) + 1
    classes = sorted(sums)
    assert upload["classes"].tolist() == classes
    expected = torch.stack([sums[c] / batches[c] for c in classes])
    torch.testing.assert_close(upload["reps"], expected, rtol=1e-5, atol=1e-6)
    # Guard: here the mean of batch means is not the exact mean of the augmented samples.
    x_all, y_all = (torch.cat(t) for t in zip(*calls[1]))
    assert not torch.allclose(class_means(features(p, x_all, "eval"), y_all)[1], expected, atol=1e-4)


def test_class_id_dtype_is_the_smallest_that_holds_the_ids():
    assert class_id_dtype(10) == class_id_dtype(256) == torch.uint8
    assert class_id_dtype(257) == class_id_dtype(32768) == torch.int16
    assert class_id_dtype(32769) == torch.int32


# ---- the server -------------------------------------------------------------------------------------------------

def uploads_of(rounds: int, seed: int = 1):
    """Made-up uploads: per round, three clients with 2-3 classes each (uint8 ids, as sent)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rounds):
        out.append({cid: {"reps": torch.rand(len(cls), REP, generator=g) * 3,
                          "classes": torch.tensor(cls, dtype=torch.uint8)}
                    for cid, cls in ((0, [0, 1]), (2, [3, 7, 9]), (3, [1, 5]))})
    return out


SERVER_CASES = [
    {},  # SPEC: one step per pair, lr 0.01, momentum 0.9, one epoch
    {"server_batch_size": 3, "server_epochs": 2, "server_lr": 0.3, "server_momentum": 0.5,
     "server_weight_decay": 0.05},
    {"server_batch_size": 0, "server_lr": 0.5},
    {"server_batch_size": -1, "server_lr": 0.5},  # the run's batch_size (4 here)
    {"keep_server_optimizer": False, "server_batch_size": 2, "server_lr": 0.2},
    {"server_grad_clip": False, "server_batch_size": 2, "server_lr": 0.2},
]


@pytest.mark.parametrize("hp", SERVER_CASES)
def test_server_trains_h_by_hand_over_two_rounds(tiny, hp):
    sim = make_sim(batch_size=4, grad_clip=0.3, hp=hp)  # a clip small enough to act
    algo = sim.algo
    initial = snapshot(algo.header)
    rounds = uploads_of(2)
    full_hp = {**vars(FedGH.make_hparams()), **hp}
    for r, uploads in enumerate(rounds):
        algo.aggregate(uploads, r)
        expected = server_training(initial, rounds[:r + 1], full_hp, 0, 4, 0.3)
        for name in ("weight", "bias"):
            torch.testing.assert_close(snapshot(algo.header)[name], expected[name], rtol=1e-5, atol=1e-6)
    if hp.get("server_grad_clip", True):  # guard: the clip acted, so leaving it out would be seen
        no_clip = server_training(initial, rounds, {**full_hp, "server_grad_clip": False}, 0, 4, 0.3)
        assert not torch.allclose(no_clip["weight"], algo.header.weight.detach(), atol=1e-4)


def test_spec_server_defaults():
    hp = FedGH.make_hparams()
    assert (hp.server_lr, hp.server_momentum, hp.server_weight_decay, hp.server_epochs, hp.server_batch_size) == \
        (0.01, 0.9, 0.0, 1, 1)
    assert hp.keep_server_optimizer and hp.server_grad_clip and hp.load_initial_header
    assert (hp.representation, hp.eval_header) == ("exact", "local")


def test_a_round_broadcasts_the_header_trained_on_that_rounds_uploads(tiny):
    sim = make_sim(grad_clip=0.3)
    initial = snapshot(sim.algo.header)
    captured = {}
    aggregate = sim.algo.aggregate
    sim.algo.aggregate = lambda uploads, r: (captured.update(uploads), aggregate(uploads, r))
    sim.run_round(0)
    expected = server_training(initial, [captured], vars(FedGH.make_hparams()), 0, 32, 0.3)
    payload = sim.algo.server_payload(sim.clients[0], 1)
    assert set(payload) == {"weight", "bias"}
    for name in ("weight", "bias"):
        torch.testing.assert_close(payload[name], expected[name], rtol=1e-5, atol=1e-6)


# ---- evaluation ---------------------------------------------------------------------------------------------

def test_every_sampled_client_is_evaluated_after_training_with_its_own_model(tiny):
    sim = make_sim(batch_size=64)
    sim.run_round(0)
    header = snapshot(sim.algo.header)
    for client in sim.clients:
        p = snapshot(client.state["model"])  # the model as trained in this round
        correct, loss = evaluation_by_hand(sim, client, p)
        assert sim.test_evals[client.id].correct == correct
        assert sim.test_evals[client.id].loss == pytest.approx(loss, rel=1e-5)
        with_h = evaluation_by_hand(sim, client, with_header(p, header))[1]
        assert sim.test_evals[client.id].loss != pytest.approx(with_h, rel=1e-3)  # guard: H gives another loss


def test_global_eval_header_broadcasts_h_to_every_client_and_evaluates_all(tiny):
    sim = make_sim(participation=0.4, hp={"eval_header": "global"})  # 2 of 5 clients train per round
    h_bytes = 4 * (REP * 10 + 10)
    first = sim.run_round(0)
    header = snapshot(sim.algo.header)
    assert first["bytes_down"] == 2 * h_bytes + 5 * h_bytes  # round 0's H to the trained two, then the broadcast
    for client in sim.clients:
        p = snapshot(client.state["model"])
        assert torch.equal(p["header.weight"], header["weight"]) and torch.equal(p["header.bias"], header["bias"])
        correct, loss = evaluation_by_hand(sim, client, p)
        assert sim.test_evals[client.id].correct == correct
        assert sim.test_evals[client.id].loss == pytest.approx(loss, rel=1e-5)
    assert sim.algo.server_payload(sim.clients[0], 1) == {}  # every client already holds the current H
    assert sim.run_round(1)["bytes_down"] == 5 * h_bytes


def test_step_zero_evaluation_runs_in_eval_mode_on_a_batchnorm_group():
    sim = make_hand_simulation("fedgh", model_group="resnet18-homo", num_clients=2, rounds=1)
    models = [c.state["model"].train() for c in sim.clients]
    before = [snapshot(m) for m in models]
    sim.initial_metrics()
    for client, model, old in zip(sim.clients, models, before):
        new = snapshot(model)
        assert all(torch.equal(old[k], new[k]) for k in old), "evaluation changed a BatchNorm statistic"
        assert all(m.training for m in model.modules())  # flags restored
        x, y = next(sim.ctx.data.eval_batches("test", client.split.test, 10_000))
        with torch.no_grad():
            z = model.eval()(x)
        model.train()
        assert sim.test_evals[client.id].loss == pytest.approx(float(cross_entropy(z, y, "sum")), rel=1e-5)


# ---- costs, options, profiles -----------------------------------------------------------------------------------

def test_bytes_per_round():
    sim = make_simulation("fedgh")
    metrics = sim.run_round(0)
    classes_held = [len(torch.unique(sim.ctx.data.y_train[c.split.train])) for c in sim.clients]
    assert metrics["bytes_down"] == len(sim.clients) * 4 * (500 * 10 + 10)
    assert metrics["bytes_up"] == sum(4 * 500 * k + 1 * k for k in classes_held)  # float32 reps + uint8 ids
    assert metrics["server_flops"] > 0
    assert metrics["train_flops"] > 0


def test_round_zero_without_initial_header_downloads_nothing(tiny):
    sim = make_sim(hp={"load_initial_header": False})
    assert sim.run_round(0)["bytes_down"] == 0
    assert sim.run_round(1)["bytes_down"] == len(sim.clients) * 4 * (REP * 10 + 10)


def test_hundred_classes_download():
    sim = make_simulation("fedgh", num_classes=100, partition="iid")
    assert payload_bytes(sim.algo.server_payload(sim.clients[0], 0)) == 4 * (500 * 100 + 100)


@pytest.mark.parametrize("representation", ["exact", "batch-mean"])
def test_representation_flops_are_client_training_flops(tiny, representation):
    sim = make_sim(hp={"representation": representation})
    client = sim.clients[0]
    before = sim.accountant.by_client[client.id]
    sim.algo.representations(client)
    assert sim.accountant.by_client[client.id] > before
    assert sim.accountant.totals["eval"] == 0


def test_profiles_select_the_reference_options():
    official = make_simulation("fedgh", profile="official")
    assert official.algo.server_payload(official.clients[0], 0) == {}  # no download in round 0
    assert official.algo.hp.representation == "batch-mean"
    htfllib = make_simulation("fedgh", profile="htfllib", algo={"fedgh": {"server_epochs": 2}})
    hp = htfllib.algo.hp
    assert (hp.server_epochs, hp.server_batch_size, hp.server_momentum) == (2, -1, 0.0)  # the user's value wins
    assert not hp.keep_server_optimizer and not hp.server_grad_clip
    assert htfllib.algo.broadcast_after_aggregation and htfllib.algo.prediction_uses_server_state
    assert FedGH.profiles["htfllib"]["server_epochs"] == 100
    spec = make_simulation("fedgh")
    assert not spec.algo.broadcast_after_aggregation and spec.algo.hp == FedGH.make_hparams()


@pytest.mark.parametrize("bad", [{"server_lr": 0.0}, {"server_epochs": 0}, {"server_batch_size": -2},
                                 {"representation": "mean"}, {"eval_header": "server"}, {"server_grad_clip": 1}])
def test_bad_hyperparameters(bad):
    with pytest.raises(UserError):
        FedGH.make_hparams(bad)


def test_end_to_end_metrics_are_finite():
    sim = make_simulation("fedgh", profile="htfllib", algo={"fedgh": {"server_epochs": 2}})
    sim.initial_metrics()
    for r in range(2):
        metrics = sim.run_round(r)
    assert math.isfinite(metrics["train_loss"]) and 0.0 <= metrics["acc_mean"] <= 1.0
