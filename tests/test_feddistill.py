"""FedDistill: the uploaded per-class logits are the means of the logits really produced in training, the
server's logits are per-class means over the clients holding the class, the loss uses them (and only where
they exist), and the bytes are SPEC's |classes_k| x classes floats up and classes x classes down."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from algorithms.feddistill import KEY_PREFIX, FedDistill
from bench.config import RunConfig
from bench.errors import UserError
from bench.runner import client_splits
from bench.simulator import Simulation
from tests.conftest import hand_dataset as dataset, hand_splits, make_hand_simulation

CPU = torch.device("cpu")


def make_sim(**kwargs) -> Simulation:
    return make_hand_simulation("feddistill", **kwargs)


def capture_training(sim, client):
    """Record every training forward of the client's model with the labels of its batch."""
    outputs, labels = [], []
    hook = client.state["model"].register_forward_hook(lambda m, i, out: outputs.append(out.detach().clone()))
    original = sim.ctx.data.train_batches

    def recording(*args, **kwargs):
        for x, y in original(*args, **kwargs):
            labels.append(y.clone())
            yield x, y

    sim.ctx.data.train_batches = recording
    return outputs, labels, lambda: (hook.remove(), delattr(sim.ctx.data, "train_batches"))


def train_phases(sim) -> set[str]:
    return {key[2] for key in sim.accountant._cache if key[0] == "train"}  # (kind, algo, phase, ...)


def class_means(outputs, labels):
    logits, y = torch.cat(outputs), torch.cat(labels)
    return {c: logits[y == c].mean(0) for c in y.unique().tolist()}


@pytest.mark.parametrize("record", ["all", "last-epoch"])
def test_upload_is_per_class_mean_of_the_training_logits(record):
    sim = make_sim(hp={"record": record}, local_epochs=2, batch_size=4, per_class=5)
    algo = sim.algo
    client = sim.clients[1]
    outputs, labels, undo = capture_training(sim, client)
    try:
        upload = algo.client_update(client, algo.server_payload(client, 0), 0)
    finally:
        undo()
    n_batches = math.ceil(client.num_train / 4)
    assert len(outputs) == len(labels) == 2 * n_batches
    assert not torch.equal(outputs[0], outputs[n_batches])  # the model trained (lr > 0) while recording
    if record == "last-epoch":
        outputs, labels = outputs[n_batches:], labels[n_batches:]
    expected = class_means(outputs, labels)
    held = sorted(torch.unique(sim.ctx.data.y_train[client.split.train]).tolist())
    assert sorted(expected) == held == [2, 3]
    assert sorted(upload) == [f"{KEY_PREFIX}{c}" for c in held]
    for c in held:
        torch.testing.assert_close(upload[f"{KEY_PREFIX}{c}"], expected[c], rtol=1e-5, atol=1e-5)


def test_server_logit_is_mean_over_clients_holding_the_class():
    # 5 clients x 2 classes on 5 classes: every class is held by two clients.
    sim = make_sim(num_classes=5, classes_per_client=2)
    captured = {}
    aggregate = sim.algo.aggregate
    sim.algo.aggregate = lambda uploads, r: (captured.update(uploads), aggregate(uploads, r))
    sim.run_round(0)
    assert sim.algo.valid_classes == set(range(5))
    for c in range(5):
        holders = [cid for cid, up in captured.items() if f"{KEY_PREFIX}{c}" in up]
        assert len(holders) == 2
        expected = torch.stack([captured[cid][f"{KEY_PREFIX}{c}"] for cid in holders]).mean(0)
        torch.testing.assert_close(sim.algo.global_logits[c], expected)
    # Unweighted over clients, not over samples: client sizes differ here.
    assert len({sim.ctx.client_weights[cid] for cid in captured}) > 1


@pytest.mark.parametrize("aggregation", ["round", "latest"])
def test_partial_rounds_keep_or_average_latest(aggregation):
    sim = make_sim(hp={"aggregation": aggregation})
    a, b, c, d = (torch.full((10,), v) for v in (1.0, 2.0, 4.0, 10.0))
    sim.algo.aggregate({0: {"logit.1": a, "logit.2": b}, 1: {"logit.2": c}}, 0)
    assert sim.algo.valid_classes == {1, 2}
    torch.testing.assert_close(sim.algo.global_logits[1], a)
    torch.testing.assert_close(sim.algo.global_logits[2], (b + c) / 2)
    assert sim.algo.global_logits[3].abs().sum() == 0
    sim.algo.aggregate({1: {"logit.2": d}}, 1)  # only client 1 this round
    torch.testing.assert_close(sim.algo.global_logits[1], a)  # nobody uploaded class 1: kept
    want = d if aggregation == "round" else (b + d) / 2
    torch.testing.assert_close(sim.algo.global_logits[2], want)
    down = sim.algo.server_payload(sim.clients[0], 2)
    assert sorted(down) == ["logit.1", "logit.2"]  # only classes that have a global logit are sent


def expected_loss(sim, client, generator_state, distance, normalise, lam):
    """Recompute the mean training loss over the same augmented batches (the model did not move: lr=0)."""
    model = client.state["model"]
    gen = torch.Generator().set_state(generator_state)
    targets, valid = sim.algo.global_logits, torch.zeros(10, dtype=torch.bool)
    valid[sorted(sim.algo.valid_classes)] = True
    total, seen = 0.0, 0
    for x, y in sim.ctx.data.train_batches(client.split.train, sim.cfg.batch_size, gen):
        with torch.no_grad():
            logits = model(x)
        loss = F.cross_entropy(logits, y)
        per_sample = []
        for i in range(len(y)):  # per sample, plainly, as a reference
            if not valid[y[i]]:
                continue
            if distance == "mse":
                per_sample.append(((logits[i] - targets[y[i]]) ** 2).mean())
            else:
                q = F.softmax(targets[y[i]], 0)
                per_sample.append((q * (q.log() - F.log_softmax(logits[i], 0))).sum())
        denom = len(y) if normalise == "batch" else max(len(per_sample), 1)
        if per_sample:
            loss = loss + lam * torch.stack(per_sample).sum() / denom
        total += float(loss) * len(y)
        seen += len(y)
    return total / seen


@pytest.mark.parametrize("distance, normalise, lam", [("mse", "batch", 1.0), ("kl", "batch", 1.0),
                                                      ("mse", "distilled", 0.5), ("mse", "batch", 0.0)])
def test_loss_distils_towards_global_logits_only_where_they_exist(distance, normalise, lam):
    sim = make_sim(hp={"distance": distance, "normalise": normalise, "lam": lam}, lr=0.0, batch_size=4,
                   per_class=5)
    algo, client = sim.algo, sim.clients[2]  # holds classes 4 and 5
    # A global logit for class 4 only (and for class 0, which this client does not hold).
    algo.global_logits[4] = torch.linspace(-3, 3, 10)
    algo.global_logits[0] = torch.ones(10)
    algo.valid_classes = {0, 4}
    payload = algo.server_payload(client, 1)
    assert sorted(payload) == ["logit.0", "logit.4"]
    state = sim.ctx.generator.get_state()
    algo.client_update(client, payload, 1)
    want = expected_loss(sim, client, state, distance, normalise, lam)
    assert float(sim.ctx.last_train_loss) == pytest.approx(want, rel=1e-5)
    ce_only = expected_loss(sim, client, state, distance, normalise, 0.0)
    if lam > 0:
        assert want > ce_only + 1e-3  # the term is really there
    assert train_phases(sim) == ({f"distill-{distance}"} if lam > 0 else {"ce-only"})


def test_term_skipped_before_any_global_logit():
    sim = make_sim(lr=0.0)
    assert sim.algo.server_payload(sim.clients[0], 0) == {}
    sim.run_round(0)
    assert train_phases(sim) == {"ce-only"}
    sim.run_round(1)
    assert train_phases(sim) == {"ce-only", "distill-mse"}


@pytest.mark.parametrize("num_classes, cpc", [(10, 2), (100, 20)])
def test_bytes_follow_spec_for_every_cnn(num_classes, cpc):
    # Clients 0..4 run CNN-1..CNN-5; together they hold every class.
    sim = make_sim(num_classes=num_classes, classes_per_client=cpc, per_class=1, batch_size=64)
    assert sim.ctx.client_archs == ["cnn1", "cnn2", "cnn3", "cnn4", "cnn5"]
    first = sim.run_round(0)
    assert first["bytes_up_per_client"] == 4 * cpc * num_classes
    assert first["bytes_down"] == 0  # nothing exists to send before the first aggregation
    second = sim.run_round(1)
    assert second["bytes_up_per_client"] == 4 * cpc * num_classes
    assert second["bytes_down_per_client"] == 4 * num_classes * num_classes
    for cid in range(5):
        assert sim.bytes_up[cid] == 2 * 4 * cpc * num_classes
        assert sim.bytes_down[cid] == 4 * num_classes * num_classes
    if num_classes == 10:
        assert second["bytes_up_per_client"] == 4 * 2 * 10 and second["bytes_down_per_client"] == 4 * 10 * 10


@pytest.mark.parametrize("distance", ["mse", "kl"])
def test_end_to_end_on_a_label_skew_partition(distance):
    cfg = RunConfig(dataset="synthetic", num_clients=5, rounds=2, batch_size=32, classes_per_client=2,
                    eval_batch_size=256, device="cpu", algorithms=["feddistill"],
                    algo={"feddistill": {"distance": distance}})
    ds, data = dataset(10)
    sim = Simulation(cfg, FedDistill, 0, data, client_splits(cfg, ds, 0, CPU), CPU)
    sim.initial_metrics()
    for r in range(2):
        metrics = sim.run_round(r)
        assert math.isfinite(metrics["train_loss"])
    assert 0.0 <= metrics["acc_mean"] <= 1.0
    assert metrics["bytes_up_per_client"] == 4 * 2 * 10
    # Prediction is the private model alone.
    client = sim.clients[0]
    x = data.normalise(data.x_test[:8])
    with torch.no_grad():
        torch.testing.assert_close(sim.algo.predict(client, x), client.state["model"](x))


@pytest.mark.parametrize("overrides", [{"distance": "l1"}, {"lam": -1.0}, {"aggregation": "x"},
                                       {"record": "first"}, {"normalise": "none"}])
def test_bad_hyperparameters_are_user_errors(overrides):
    with pytest.raises(UserError):
        FedDistill.make_hparams(overrides)


def test_defaults_are_spec():
    hp = FedDistill.make_hparams()
    assert (hp.lam, hp.distance) == (1.0, "mse")
