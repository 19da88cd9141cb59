"""FedAPEN: mutual learning of private P and shared S, and the learned mixing weight lambda."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from algorithms.fedapen import FedAPEN, adapt_split
from bench.accounting import payload_bytes, transmit
from bench.config import RunConfig
from bench.errors import UserError
from bench.runner import client_splits
from bench.simulator import Simulation
from data import DeviceData, synthetic_dataset

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

    sim.ctx.train(client, [private, shared], loss, 1, phase="test", indices=algo.splits[client.id][0])
    snapshots.append((params(private), params(shared)))
    assert len(snapshots) >= 3
    for (p0, s0), (p1, s1) in zip(snapshots, snapshots[1:]):
        assert not torch.equal(p0, p1) and not torch.equal(s0, s1)


def test_each_model_gets_only_its_own_loss_gradient():
    sim = make_sim()
    algo, client = sim.algo, sim.clients[1]
    private, shared = client.state["model"], client.state["shared"]
    lam = client.state["lambda"]
    x = sim.ctx.data.normalise(sim.ctx.data.x_train[client.split.train[:16]])
    y = sim.ctx.data.y_train[client.split.train[:16]]
    algo.loss_fn(client)(x, y).backward()
    grad_p = [p.grad.clone() for p in private.parameters()]
    for m in (private, shared):
        m.zero_grad()
    p, s = private(x), shared(x)
    loss_p = (F.cross_entropy(p, y) + F.kl_div(F.log_softmax(p, 1), F.softmax(s, 1).detach(), reduction="batchmean")
              + F.cross_entropy(lam * p + (1 - lam) * s.detach(), y))
    loss_p.backward()
    for g, q in zip(grad_p, private.parameters()):
        torch.testing.assert_close(g, q.grad, rtol=1e-4, atol=1e-6)


def test_server_s_is_the_weighted_mean_of_uploads():
    sim = make_sim()
    algo = sim.algo
    uploads = {}
    for client in sim.clients[:3]:
        payload, _ = transmit(algo.server_payload(client, 0), CPU)
        uploads[client.id], _ = transmit(algo.client_update(client, payload, 0), CPU)
    algo.aggregate(uploads, 0)
    weights = {cid: float(len(sim.clients[cid].split.train)) for cid in uploads}
    assert len(set(weights.values())) > 1  # the weights matter
    total = sum(weights.values())
    for name, tensor in algo.global_shared.state_dict().items():
        expected = sum(weights[cid] / total * uploads[cid][name] for cid in uploads)
        torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-6)


def train_alone(sim, client, key, epochs=4):
    model = client.state[key].train()
    sim.ctx.train(client, [model], lambda x, y: F.cross_entropy(model(x), y), epochs, phase=f"alone-{key}")


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
    sim = make_sim(rounds=3)
    algo = sim.algo
    seen = {}
    train = sim.ctx.train

    def spy(client, trainable, loss_fn, epochs, phase, indices=None):
        seen[client.id] = indices
        return train(client, trainable, loss_fn, epochs, phase, indices)

    monkeypatch.setattr(sim.ctx, "train", spy)
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
    sim = make_sim(hp={"skip_current_download": False})
    sim.run_round(0)
    assert sim.run_round(1)["bytes_down"] == len(sim.clients) * 2 * 4 * CNN5_PARAMS[10]


@pytest.mark.parametrize("classes", [10, 100])
def test_shared_model_payload_is_cnn5(classes):
    sim = make_sim(classes=classes, partition="iid")
    assert payload_bytes(sim.algo.server_payload(sim.clients[0], 0)) == 4 * CNN5_PARAMS[classes]


def test_probability_mixing_option():
    sim = make_sim(hp={"mix": "probs"})
    client = sim.clients[0]
    x = sim.ctx.data.normalise(sim.ctx.data.x_test[:8])
    with torch.no_grad():
        probs = 0.5 * F.softmax(client.state["model"].eval()(x), 1) + 0.5 * F.softmax(client.state["shared"].eval()(x), 1)
        torch.testing.assert_close(sim.algo.predict(client, x).exp(), probs)
    sim.run_round(0)


@pytest.mark.parametrize("bad", [{"shared_arch": "vgg"}, {"adapt_fraction": 0.0}, {"adapt_fraction": 1.0},
                                 {"lambda_init": 1.5}, {"mix": "max"}, {"lambda_lr": 0.0}])
def test_bad_hyperparameters(bad):
    with pytest.raises(UserError):
        FedAPEN.make_hparams(bad)
