"""FedAPEN: each term of both losses, the learned lambda in training and prediction, lambda learning on the
held-out split (SGD, passes, clipping), the server's average, and evaluation after the post-aggregation
download. Expected values are computed here by hand (plain torch ops, float64 copies)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from algorithms.base import Phase
from algorithms.fedapen import FedAPEN, adapt_split
from bench.accounting import payload_bytes, transmit
from bench.config import RunConfig
from bench.errors import UserError
from bench.runner import client_splits
from bench.observe import AtStart
from bench.simulator import Simulation
from data import DeviceData, synthetic_dataset
from tests.conftest import client_update, make_hand_simulation, make_simulation
from tests.handcalc import clipped

CPU = torch.device("cpu")
CNN5_PARAMS = {10: 670_058, 100: 715_148}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_sim(num_clients=5, rounds=2, classes=10, partition="label-skew", hp=None, train_size=600, **cfg_kw):
    cfg = RunConfig(algorithms=["fedapen"], dataset="synthetic", num_clients=num_clients, rounds=rounds,
                    batch_size=32, device="cpu", partition=partition, algo={"fedapen": hp or {}}, **cfg_kw)
    ds = synthetic_dataset(num_classes=classes, train_size=train_size, test_size=100, seed=0)
    data = DeviceData(ds, CPU, augment=cfg.augment)
    return Simulation(cfg, FedAPEN, 0, data, client_splits(cfg, ds, 0, CPU), CPU)


def params(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()


def test_p_and_s_both_change_every_step():
    sim = make_sim()
    algo, client = sim.algo, sim.clients[0]
    private, shared = client.state["model"], client.state["shared"]
    inner = algo.loss_fn(client)
    snapshots = []

    def loss(x, y):
        snapshots.append((params(private), params(shared)))
        return inner(x, y)

    sim.ctx.train(client, Phase("test", [private, shared], 1, loss=loss, indices=algo.splits[client.id][0]))
    snapshots.append((params(private), params(shared)))
    assert len(snapshots) >= 3
    for (p0, s0), (p1, s1) in zip(snapshots, snapshots[1:]):
        assert not torch.equal(p0, p1) and not torch.equal(s0, s1)


def hand_sim(hp=None, **cfg):
    """5 clients (CNN-1..5 private models), n_k = 20, 22, 24, 26, 28; a 30% held-out split (6-8 samples)."""
    return make_hand_simulation("fedapen", per_class=10, hp={"adapt_fraction": 0.3, **(hp or {})}, **cfg)


def hand_losses(p_model, s_model, x, y, lam, mix="logits", drop=(), detach_mix=True):
    """L_P + L_S of SPEC with plain ops; `drop` removes terms ("ce_p", "kl_p", "mix_p", "ce_s", "kl_s",
    "mix_s")."""
    p, s = p_model(x), s_model(x)
    cut = (lambda t: t.detach()) if detach_mix else (lambda t: t)

    def ce(z):
        return -z.log_softmax(1).gather(1, y[:, None]).mean()

    def kl(target, inp):  # KL(softmax(target) || softmax(inp)), batchmean
        q = target.softmax(1)
        return (q * (q.log() - inp.log_softmax(1))).sum() / len(y)

    def mixture(a, b):
        if mix == "logits":
            return ce(lam * a + (1 - lam) * b)
        return -(lam * a.softmax(1) + (1 - lam) * b.softmax(1)).log().gather(1, y[:, None]).mean()

    terms = {"ce_p": ce(p), "kl_p": kl(s.detach(), p), "mix_p": mixture(p, cut(s)),
             "ce_s": ce(s), "kl_s": kl(p.detach(), s), "mix_s": mixture(cut(p), s)}
    return sum(v for k, v in terms.items() if k not in drop)


def hand_grads(private, shared, x, y, lam, **kw):
    p_model, s_model = copy.deepcopy(private).double(), copy.deepcopy(shared).double()
    total = hand_losses(p_model, s_model, x.double(), y, lam, **kw)
    params = [*p_model.parameters(), *s_model.parameters()]
    return float(total.detach()), torch.autograd.grad(total, params)


def close(a, b):
    """Equal up to float32 rounding (relative to each tensor's scale)."""
    return all(torch.allclose(g.double(), h, rtol=1e-4, atol=1e-5 * float(h.abs().max())) for g, h in zip(a, b))


@pytest.mark.parametrize("mix", ["logits", "probs"])
def test_losses_and_gradients_equal_the_hand_loss_with_the_learned_lambda(mix):
    sim = hand_sim(hp={"mix": mix})
    algo, client = sim.algo, sim.clients[1]
    private, shared = client.state["model"], client.state["shared"]
    client.state["lambda"] = torch.tensor(0.3)  # as learned after an earlier round
    idx = client.split.train[:8]
    x, y = sim.ctx.data.normalise(sim.ctx.data.x_train[idx]), sim.ctx.data.y_train[idx]
    loss = algo.loss_fn(client)(x, y)
    loss.backward()
    grads = [q.grad for q in (*private.parameters(), *shared.parameters())]
    value, want = hand_grads(private, shared, x, y, 0.3, mix=mix)
    assert float(loss.detach()) == pytest.approx(value, rel=1e-5)
    assert close(grads, want)
    # Sharp enough to see every term, lambda frozen at its initial 0.5, and the detached partner in each mixture.
    alternatives = [{"drop": (t,)} for t in ("ce_p", "kl_p", "mix_p", "ce_s", "kl_s", "mix_s")]
    alternatives += [{"lam": 0.5}, {"detach_mix": False}]
    for alt in alternatives:
        kw = {"lam": 0.3, "mix": mix, **alt}
        alt_value, alt_grads = hand_grads(private, shared, x, y, kw.pop("lam"), **kw)
        assert not (alt_value == pytest.approx(value, rel=1e-5) and close(alt_grads, want)), alt


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_one_step_on_the_training_part_moves_p_and_s_each_by_its_own_gradient(clip):
    # One batch of the 95% training part: SGD's first step moves each model by -lr (g + wd w), g clipped per model.
    sim = hand_sim(batch_size=64, grad_clip=clip, lr=0.1)
    algo, client = sim.algo, sim.clients[0]
    client.state["lambda"] = torch.tensor(0.7)
    private, shared = client.state["model"], client.state["shared"]
    before = [copy.deepcopy(private), copy.deepcopy(algo.global_shared)]  # S starts from the download
    assert not torch.equal(params(shared), params(algo.global_shared))
    payload, _ = transmit(algo.server_payload(client, 0), CPU)
    gen = torch.Generator().set_state(sim.ctx.client_generator(client.id, 0).get_state())
    (x, y), = list(sim.ctx.data.train_batches(algo.splits[client.id][0], 64, gen))
    assert len(y) == len(algo.splits[client.id][0]) < client.num_train
    _, grads = hand_grads(*before, x, y, 0.7)
    n_p = len(list(private.parameters()))
    grads = clipped(grads[:n_p], clip) + clipped(grads[n_p:], clip)
    upload, _ = client_update(sim, client, payload, 0)
    lr, wd = sim.cfg.lr, sim.cfg.weight_decay
    old = [*before[0].parameters(), *before[1].parameters()]
    new = [*private.parameters(), *shared.parameters()]
    for w0, w1, g in zip(old, new, grads):
        torch.testing.assert_close((w1 - w0).double(), -lr * (g + wd * w0.double()), rtol=1e-3, atol=1e-8)
    for name, tensor in shared.state_dict().items():  # the upload is the trained S
        assert torch.equal(upload[name], tensor)


# ---- lambda learning ----------------------------------------------------------------------------------------

def held_out_outputs(client, indices, data):
    """P and S logits (float64 copies) on the held-out samples, in split order."""
    x, y = data.normalise(data.x_train[indices]).double(), data.y_train[indices]
    with torch.no_grad():
        return copy.deepcopy(client.state["model"]).double()(x), copy.deepcopy(client.state["shared"]).double()(x), y


def hand_lambda(p, s, y, lam, lr, passes, batch, mix="logits"):
    """Plain SGD on lambda over the held-out batches, clipped to [0, 1] after every step. The gradient of the
    mixture's CE by hand: logits: mean_b sum_c (softmax(z)_c - [c = y]) (p_c - s_c), z = lam p + (1 - lam) s;
    probs: -mean_b (P_y - S_y) / (lam P_y + (1 - lam) S_y). Returns (lambda, whether a step was clipped)."""
    hit = False
    for _ in range(passes):
        for i in range(0, len(y), batch):
            pb, sb, yb = p[i:i + batch], s[i:i + batch], y[i:i + batch]
            if mix == "logits":
                q = (lam * pb + (1 - lam) * sb).softmax(1)
                q[torch.arange(len(yb)), yb] -= 1
                grad = float((q * (pb - sb)).sum(1).mean())
            else:
                py = pb.softmax(1)[torch.arange(len(yb)), yb]
                sy = sb.softmax(1)[torch.arange(len(yb)), yb]
                grad = float((-(py - sy) / (lam * py + (1 - lam) * sy)).mean())
            step = lam - lr * grad
            lam = min(max(step, 0.0), 1.0)
            hit |= lam != step
    return lam, hit


@pytest.mark.parametrize("mix, lr, passes, clips", [("logits", 0.05, 3, False), ("logits", 0.2, 2, True),
                                                    ("probs", 0.05, 3, False)])
def test_lambda_is_learned_by_sgd_on_the_held_out_split(mix, lr, passes, clips):
    sim = hand_sim(batch_size=4, hp={"mix": mix, "lambda_lr": lr, "lambda_epochs": passes})
    algo, client = sim.algo, sim.clients[2]
    train_alone(sim, client, "model", epochs=2)  # P and S differ in quality: lambda has somewhere to go
    held = algo.splits[client.id][1]
    assert len(held) == 7  # two batches of 4 and 3: a step per batch
    p, s, y = held_out_outputs(client, held, sim.ctx.data)
    want, hit = hand_lambda(p, s, y, 0.5, lr, passes, 4, mix)
    assert hit == clips
    assert abs(want - 0.5) > 1e-3
    if not clips:  # a pass more or less is seen
        assert want != pytest.approx(hand_lambda(p, s, y, 0.5, lr, passes - 1, 4, mix)[0], abs=1e-4)
    else:  # clipped at a step, then back inside: clipping after every step (not only at the end) is seen
        assert 0 < want < 1
    before = [params(client.state["model"]), params(client.state["shared"])]
    algo.learn_lambda(client)
    assert float(client.state["lambda"]) == pytest.approx(want, abs=1e-5)
    assert torch.equal(before[0], params(client.state["model"]))  # P and S frozen
    assert torch.equal(before[1], params(client.state["shared"]))


# ---- the server and the round ---------------------------------------------------------------------------------

@pytest.mark.parametrize("aggregation", ["samples", "uniform"])
def test_server_s_is_the_weighted_mean_of_uploads(aggregation):
    sim = hand_sim(hp={"aggregation": aggregation})
    captured = {}
    aggregate = sim.algo.aggregate
    sim.algo.aggregate = lambda uploads, r: (captured.update(uploads), aggregate(uploads, r))
    sim.run_round(0)
    weights = {cid: float(sim.clients[cid].num_train) if aggregation == "samples" else 1.0 for cid in captured}
    n = [sim.clients[cid].num_train for cid in captured]
    assert len(captured) == 5 and len(set(n)) == 5  # n_k all differ
    total = sum(weights.values())
    for name, tensor in sim.algo.global_shared.state_dict().items():
        expected = sum(weights[cid] / total * captured[cid][name].double() for cid in captured)
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-5, atol=1e-7)
        other = sum(captured[cid][name].double() for cid in captured) / 5 if aggregation == "samples" else \
            sum(sim.clients[cid].num_train * captured[cid][name].double() for cid in captured) / sum(n)
        if name.endswith("weight"):
            assert not torch.allclose(tensor.double(), other, rtol=1e-7, atol=1e-9)


def test_round_learns_lambda_on_the_new_s_and_evaluates_after_it():
    sim = hand_sim(batch_size=64, hp={"lambda_lr": 0.5, "lambda_epochs": 2})
    algo, data = sim.algo, sim.ctx.data
    sim.run_round(0)
    for c in sim.clients:
        for name, tensor in algo.global_shared.state_dict().items():  # S is the post-aggregation download
            assert torch.equal(c.state["shared"].state_dict()[name], tensor), name
        p, s, y = held_out_outputs(c, algo.splits[c.id][1], data)
        lam, _ = hand_lambda(p, s, y, 0.5, 0.5, 2, 64)
        assert float(c.state["lambda"]) == pytest.approx(lam, abs=1e-5)
        x, y = data.normalise(data.x_test[c.split.test]).double(), data.y_test[c.split.test]
        with torch.no_grad():
            logits = lam * copy.deepcopy(c.state["model"]).double()(x) + \
                (1 - lam) * copy.deepcopy(c.state["shared"]).double()(x)
        assert sim.test_evals[c.id].correct == int((logits.argmax(1) == y).sum())


def train_alone(sim, client, key, epochs=4):
    model = client.state[key].train()
    sim.ctx.train(client, Phase(f"alone-{key}", [model], epochs))


@pytest.mark.parametrize("strong, direction", [("model", 1), ("shared", -1)])
def test_lambda_moves_toward_the_better_model(strong, direction):
    sim = make_sim(train_size=1000)
    algo, client = sim.algo, sim.clients[0]
    train_alone(sim, client, strong)  # the other model stays at its random initialisation
    algo.learn_lambda(client)  # SPEC defaults: lr 1e-3, 10 passes
    lam = float(client.state["lambda"])
    assert (lam - 0.5) * direction > 0
    # One huge step from 0.5 in the same direction overshoots and is clipped to the boundary.
    client.state["lambda"] = torch.tensor(0.5)
    algo.hp.lambda_lr, algo.hp.lambda_epochs = 100.0, 1
    assert len(algo.splits[client.id][1]) <= sim.cfg.batch_size  # one held-out batch: one step
    algo.learn_lambda(client)
    assert float(client.state["lambda"]) == (1.0 if direction > 0 else 0.0)
    algo.hp.lambda_epochs = 10  # many huge steps: it may bounce, but never leaves [0, 1]
    algo.learn_lambda(client)
    assert float(client.state["lambda"]) in (0.0, 1.0)


def test_lambda_learning_counts_client_training_flops_and_leaves_models_frozen():
    sim = make_sim()
    algo, client = sim.algo, sim.clients[2]
    before = (params(client.state["model"]), params(client.state["shared"]))
    flops = sim.accountant.by_client[client.id]
    algo.learn_lambda(client)
    assert sim.accountant.by_client[client.id] > flops
    assert torch.equal(before[0], params(client.state["model"]))
    assert torch.equal(before[1], params(client.state["shared"]))
    assert 0.0 <= float(client.state["lambda"]) <= 1.0


def test_prediction_is_the_lambda_mixture():
    sim = make_sim()
    client = sim.clients[3]
    client.state["lambda"] = torch.tensor(0.3)
    x = sim.ctx.data.normalise(sim.ctx.data.x_test[:8])
    with torch.no_grad():
        expected = 0.3 * client.state["model"].eval()(x) + 0.7 * client.state["shared"].eval()(x)
        torch.testing.assert_close(sim.algo.predict(client, x), expected)


def test_adaptability_split():
    train = torch.arange(1000, 1400)
    part, held = adapt_split(train, 0.05, seed=0, client_id=3)
    assert len(held) == 20 and len(part) == 380
    assert torch.equal(torch.sort(torch.cat([part, held])).values, train)
    again = adapt_split(train, 0.05, seed=0, client_id=3)
    assert torch.equal(again[1], held)
    assert not torch.equal(adapt_split(train, 0.05, seed=1, client_id=3)[1], held)


def test_round_trains_on_95_percent_and_ends_with_the_global_s(monkeypatch):
    sim = make_hand_simulation("fedapen", per_class=10, rounds=3)
    algo = sim.algo
    seen = {}

    def at_phase_start(info):
        (cid,) = info["clients"]
        seen[cid] = info["phase"].indices

    sim.observers.add(AtStart("phase", at_phase_start))
    metrics = sim.run_round(0)
    dense = 4 * CNN5_PARAMS[10]
    n = len(sim.clients)
    assert metrics["bytes_up"] == n * dense
    assert metrics["bytes_down"] == n * 2 * dense  # start-of-round S and the new S after aggregation
    for client in sim.clients:
        held = algo.splits[client.id][1]
        assert len(seen[client.id]) + len(held) == client.num_train
        assert not torch.isin(seen[client.id], held).any()
        for name, tensor in algo.global_shared.state_dict().items():
            assert torch.equal(client.state["shared"].state_dict()[name], tensor)
        assert 0.0 <= float(client.state["lambda"]) <= 1.0
    assert "lambda" in metrics
    # Full participation: every client already holds the global S, so only the post-aggregation download.
    assert sim.run_round(1)["bytes_down"] == n * dense


def test_download_every_round_when_not_skipping():
    sim = hand_sim(hp={"skip_current_download": False})
    sim.run_round(0)
    assert sim.run_round(1)["bytes_down"] == len(sim.clients) * 2 * 4 * CNN5_PARAMS[10]


@pytest.mark.parametrize("classes", [10, 100])
def test_shared_model_payload_is_cnn5(classes):
    sim = make_sim(classes=classes, partition="iid")
    assert payload_bytes(sim.algo.server_payload(sim.clients[0], 0)) == 4 * CNN5_PARAMS[classes]


def test_probability_mixing_option():
    sim = hand_sim(hp={"mix": "probs"})
    client = sim.clients[0]
    x = sim.ctx.data.normalise(sim.ctx.data.x_test[:8])
    with torch.no_grad():
        probs = 0.5 * F.softmax(client.state["model"].eval()(x), 1) + 0.5 * F.softmax(client.state["shared"].eval()(x), 1)
        torch.testing.assert_close(sim.algo.predict(client, x).exp(), probs)
    sim.run_round(0)


def test_profiles():
    assert FedAPEN.profiles == {"official": {"aggregation": "uniform"}}  # HtFLlib has no FedAPEN: spec
    assert FedAPEN.make_hparams().aggregation == "samples"
    assert make_simulation("fedapen", profile="official").algo.hp.aggregation == "uniform"
    assert make_simulation("fedapen", profile="htfllib").algo.hp == FedAPEN.make_hparams()


@pytest.mark.parametrize("bad", [{"shared_arch": "vgg"}, {"adapt_fraction": 0.0}, {"adapt_fraction": 1.0},
                                 {"lambda_init": 1.5}, {"mix": "max"}, {"lambda_lr": 0.0},
                                 {"aggregation": "median"}])
def test_bad_hyperparameters(bad):
    with pytest.raises(UserError):
        FedAPEN.make_hparams(bad)
