"""FedDistill: the loss (CE plus lambda times the distance to the downloaded class logit, checked against a
hand-written loss and SGD step), the skip where no global logit exists, the uploaded per-class means of the
logits really produced in training, the server's per-class mean over the holders (or over the other holders,
exclude_own), what the server remembers between rounds, evaluation of the trained model, and the bytes
(SPEC: |classes_k| x classes floats up, classes x classes down)."""
from __future__ import annotations

import math

import pytest
import torch

from algorithms.feddistill import KEY_PREFIX, FedDistill
from bench.errors import UserError
from models.cnn import CNN
from tests.conftest import client_update, make_hand_simulation, make_simulation

pytestmark = pytest.mark.usefixtures("one_thread")


def make_sim(**kwargs):
    return make_hand_simulation("feddistill", **kwargs)


def key(c: int) -> str:
    return f"{KEY_PREFIX}{c}"


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
    return {k[2] for k in sim.accountant._cache if k[0] == "train"}  # (kind, algo, phase, ...)


def captured_round(sim, round_index=0):
    captured = {}
    aggregate = sim.algo.aggregate
    sim.algo.aggregate = lambda uploads, r: (captured.update(uploads), aggregate(uploads, r))
    sim.run_round(round_index)
    sim.algo.aggregate = aggregate
    return captured


# ---- the client's upload ----------------------------------------------------------------------------------
@pytest.mark.parametrize("record", ["all", "last-epoch"])
def test_upload_is_per_class_mean_of_the_training_logits(record):
    sim = make_sim(hp={"record": record}, local_epochs=2, batch_size=4, per_class=5)
    algo = sim.algo
    client = sim.clients[1]
    outputs, labels, undo = capture_training(sim, client)
    try:
        upload, _ = client_update(sim, client, algo.server_payload(client, 0), 0)
    finally:
        undo()
    n_batches = math.ceil(client.num_train / 4)
    assert len(outputs) == len(labels) == 2 * n_batches
    assert not torch.equal(outputs[0], outputs[n_batches])  # the model trained (lr > 0) while recording
    if record == "last-epoch":
        outputs, labels = outputs[n_batches:], labels[n_batches:]
    logits, y = torch.cat(outputs), torch.cat(labels)
    held = sorted(torch.unique(sim.ctx.data.y_train[client.split.train]).tolist())
    assert held == [2, 3] and sorted(upload) == [key(c) for c in held]
    for c in held:
        torch.testing.assert_close(upload[key(c)], logits[y == c].sum(0) / (y == c).sum(), rtol=1e-5, atol=1e-5)


# ---- the loss, against a hand-written one ------------------------------------------------------------------
def log_softmax(z):
    return z - z.logsumexp(-1, keepdim=True)


def hand_term(logits, y, table, distance):
    """Per-sample D(f(x), zbar_y); a sample whose class has no row in `table` is its own (detached) target."""
    terms = []
    for z, c in zip(logits, y.tolist()):
        t = table[c] if c in table else z.detach()
        if distance == "mse":
            terms.append(((z - t) ** 2).sum() / len(z))
        elif distance == "kl":
            q = log_softmax(t)
            terms.append((q.exp() * (q - log_softmax(z))).sum())
        else:
            terms.append(-(t * log_softmax(z)).sum())
    return torch.stack(terms)


def hand_loss(logits, y, table, distance, normalise, lam):
    ce = -log_softmax(logits)[torch.arange(len(y)), y].mean()
    terms = hand_term(logits, y, table, distance)
    if normalise == "batch":
        return ce + lam * terms.sum() / len(y)
    has = torch.tensor([c in table for c in y.tolist()])
    return ce + lam * terms[has].sum() / max(int(has.sum()), 1)


# Client 2 holds classes 4 and 5; the download has a logit for class 4 only (and for class 0, not held).
TABLE = {4: torch.linspace(-3, 3, 10), 0: torch.ones(10)}


@pytest.mark.parametrize("distance, normalise, lam", [("mse", "batch", 1.0), ("kl", "batch", 1.0),
                                                      ("ce", "batch", 0.7), ("mse", "distilled", 0.5)])
def test_one_step_follows_the_hand_written_loss(distance, normalise, lam):
    # One batch (batch >= n_k): SGD's first step is w - lr * (grad + wd * w).
    sim = make_sim(hp={"distance": distance, "normalise": normalise, "lam": lam}, lr=0.05, batch_size=64,
                   per_class=5)
    client = sim.clients[2]
    model = client.state["model"]
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = sim.ctx.client_generator(client.id, 1).get_state()
    _, loss = client_update(sim, client, {key(c): v for c, v in TABLE.items()}, 1)

    ref = CNN(client.arch, 10)
    ref.load_state_dict(before)
    (x, y), = list(sim.ctx.data.train_batches(client.split.train, 64, torch.Generator().set_state(state)))
    assert sorted(set(y.tolist())) == [4, 5]
    grads = torch.autograd.grad(hand_loss(ref(x), y, TABLE, distance, normalise, lam), list(ref.parameters()))
    lr, wd = sim.cfg.lr, sim.cfg.weight_decay
    for (name, after), g in zip(model.named_parameters(), grads):
        torch.testing.assert_close(after.detach(), before[name] - lr * (g + wd * before[name]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("distance, normalise, lam", [("mse", "batch", 1.0), ("kl", "batch", 1.0),
                                                      ("ce", "batch", 1.0), ("mse", "distilled", 0.5),
                                                      ("mse", "batch", 0.0)])
def test_loss_distils_towards_the_downloaded_logits_only_where_they_exist(distance, normalise, lam):
    # lr = 0: the model stays put, so the mean loss over batches of 4, 4 and 2 can be recomputed.
    sim = make_sim(hp={"distance": distance, "normalise": normalise, "lam": lam}, lr=0.0, batch_size=4,
                   per_class=5)
    client = sim.clients[2]
    state = sim.ctx.client_generator(client.id, 1).get_state()
    _, loss = client_update(sim, client, {key(c): v for c, v in TABLE.items()}, 1)
    total = ce_only = seen = 0.0
    with torch.no_grad():
        for x, y in sim.ctx.data.train_batches(client.split.train, 4, torch.Generator().set_state(state)):
            logits = client.state["model"](x)
            total += float(hand_loss(logits, y, TABLE, distance, normalise, lam)) * len(y)
            ce_only += float(hand_loss(logits, y, {}, distance, normalise, 0.0)) * len(y)
            seen += len(y)
    assert float(loss) == pytest.approx(total / seen, rel=1e-5)
    if lam > 0:
        assert abs(total - ce_only) > 1e-3  # the term is really there ("ce" can be negative)
    assert train_phases(sim) == ({f"distill-{distance}"} if lam > 0 else {"ce-only"})


@pytest.mark.parametrize("distance", ["mse", "ce"])
def test_term_skipped_before_any_global_logit(distance):
    # Round 0: nothing to download, the loss is the plain CE (with "ce" an own-logit target would not be 0).
    sim = make_sim(lr=0.0, hp={"distance": distance})
    client = sim.clients[2]
    assert sim.algo.server_payload(client, 0) == {}
    state = sim.ctx.client_generator(client.id, 0).get_state()
    _, loss = client_update(sim, client, {}, 0)
    with torch.no_grad():
        want = sum(float(hand_loss(client.state["model"](x), y, {}, distance, "batch", 0.0)) * len(y)
                   for x, y in sim.ctx.data.train_batches(client.split.train, 32, torch.Generator().set_state(state)))
    assert float(loss) == pytest.approx(want / client.num_train, rel=1e-5)
    sim.run_round(0)
    assert train_phases(sim) == {"ce-only"}
    sim.run_round(1)
    assert train_phases(sim) == {"ce-only", f"distill-{distance}"}


def test_term_skipped_when_no_held_class_has_a_logit():
    sim = make_sim(lr=0.0)
    client = sim.clients[2]  # classes 4 and 5
    state = sim.ctx.client_generator(client.id, 1).get_state()
    _, loss = client_update(sim, client, {key(0): torch.ones(10)}, 1)
    with torch.no_grad():
        want = sum(float(hand_loss(client.state["model"](x), y, {}, "mse", "batch", 0.0)) * len(y)
                   for x, y in sim.ctx.data.train_batches(client.split.train, 32, torch.Generator().set_state(state)))
    assert float(loss) == pytest.approx(want / client.num_train, rel=1e-5)
    assert train_phases(sim) == {"ce-only"}


# ---- the server ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("exclude_own", [False, True])
def test_server_logit_is_the_mean_over_the_holders(exclude_own):
    # 5 clients x 2 classes on 5 classes: every class is held by two clients.
    sim = make_sim(num_classes=5, classes_per_client=2, hp={"exclude_own": exclude_own})
    captured = captured_round(sim)
    assert len({sim.ctx.client_weights[cid] for cid in captured}) > 1  # client sizes differ: unweighted mean
    for client in sim.clients:
        down = sim.algo.server_payload(client, 1)
        assert sorted(down) == [key(c) for c in range(5)]
        for c in range(5):
            holders = [cid for cid, up in captured.items() if key(c) in up]
            assert len(holders) == 2
            if exclude_own and client.id in holders:
                holders.remove(client.id)  # Jeong et al.: the other holder's logit only
            want = sum(captured[cid][key(c)] for cid in holders) / len(holders)
            torch.testing.assert_close(down[key(c)], want)


def test_exclude_own_leaves_no_target_for_a_class_only_the_client_holds():
    # 5 clients x 2 classes on 10 classes: every class has one holder, so nobody gets a target for its own.
    sim = make_sim(hp={"exclude_own": True}, lr=0.0)
    first = captured_round(sim)
    for client in sim.clients:
        own = {int(k[len(KEY_PREFIX):]) for k in first[client.id]}
        down = sim.algo.server_payload(client, 1)
        assert sorted(down) == [key(c) for c in range(10) if c not in own]
        for c in range(10):
            if c not in own:
                holder, = [cid for cid, up in first.items() if key(c) in up]
                torch.testing.assert_close(down[key(c)], first[holder][key(c)])
    second = sim.run_round(1)
    assert second["bytes_down_per_client"] == 4 * 8 * 10  # 8 other classes x 10 logits
    assert train_phases(sim) == {"ce-only"}  # no held class has a target


@pytest.mark.parametrize("aggregation", ["round", "latest", "fresh"])
def test_partial_rounds_keep_replace_or_average_latest(aggregation):
    sim = make_sim(hp={"aggregation": aggregation})
    a, b, c, d = (torch.full((10,), v) for v in (1.0, 2.0, 4.0, 10.0))
    sim.algo.aggregate({0: {key(1): a, key(2): b}, 1: {key(2): c}}, 0)
    down = sim.algo.server_payload(sim.clients[3], 1)
    assert sorted(down) == [key(1), key(2)]  # only classes that have a global logit are sent
    torch.testing.assert_close(down[key(1)], a)
    torch.testing.assert_close(down[key(2)], (b + c) / 2)
    sim.algo.aggregate({1: {key(2): d}}, 1)  # only client 1 this round
    down = sim.algo.server_payload(sim.clients[3], 2)
    if aggregation == "fresh":  # HtFLlib: nobody uploaded class 1, so it has no global logit
        assert sorted(down) == [key(2)]
    else:
        torch.testing.assert_close(down[key(1)], a)  # kept
    torch.testing.assert_close(down[key(2)], (b + d) / 2 if aggregation == "latest" else d)


# ---- evaluation, bytes, options ---------------------------------------------------------------------------
def test_evaluation_is_the_trained_private_model_after_the_round():
    sim = make_sim(per_class=4, lr=0.05)
    sim.initial_metrics()
    sim.run_round(0)
    before = {c.id: c.state["model"].header.weight.detach().clone() for c in sim.clients}
    metrics = sim.run_round(1)  # with distillation
    data = sim.ctx.data
    correct = total = 0
    for c in sim.clients:
        assert not torch.equal(before[c.id], c.state["model"].header.weight)  # trained this round
        idx = c.split.test
        with torch.no_grad():
            z, y = c.state["model"](data.normalise(data.x_test[idx])), data.y_test[idx]
        right = int((z.argmax(1) == y).sum())
        assert sim.test_evals[c.id].correct == right
        nll = float(-log_softmax(z)[torch.arange(len(y)), y].sum())
        assert sim.test_evals[c.id].loss == pytest.approx(nll, rel=1e-5)  # few test samples: hits alone are weak
        correct, total = correct + right, total + len(idx)
    assert metrics["acc_mean"] == pytest.approx(correct / total)
    x = data.normalise(data.x_test[:8])
    with torch.no_grad():  # prediction is the private model alone
        torch.testing.assert_close(sim.algo.predict(sim.clients[0], x), sim.clients[0].state["model"](x))


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


def test_profiles_select_the_reference_options():
    spec = make_simulation("feddistill").algo.hp
    assert (spec.exclude_own, spec.distance, spec.aggregation, spec.lam) == (False, "mse", "round", 1.0)
    official = make_simulation("feddistill", profile="official").algo.hp
    assert (official.exclude_own, official.distance, official.aggregation) == (True, "kl", "round")
    htfllib = make_simulation("feddistill", profile="htfllib").algo.hp
    assert (htfllib.exclude_own, htfllib.distance, htfllib.aggregation, htfllib.lam, htfllib.normalise,
            htfllib.record) == (False, "kl", "fresh", 1.0, "batch", "all")


@pytest.mark.parametrize("overrides", [{"distance": "l1"}, {"lam": -1.0}, {"aggregation": "x"},
                                       {"record": "first"}, {"normalise": "none"}, {"exclude_own": 1}])
def test_bad_hyperparameters_are_user_errors(overrides):
    with pytest.raises(UserError):
        FedDistill.make_hparams(overrides)


def test_defaults_are_spec():
    hp = FedDistill.make_hparams()
    assert (hp.lam, hp.distance, hp.exclude_own) == (1.0, "mse", False)
