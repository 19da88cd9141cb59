"""pFedES: phase 1 trains the local model F_k on the mu-mixed loss with the proxy extractor G frozen, phase 2
trains G on CE(F_k(G(x))) with F_k frozen (each step written out by hand, G's forward included); only G
travels (bytes by hand on the 5-CNN group, 10 and 100 classes) and is averaged by n_k; prediction is F_k(x);
the official profile's longer phase 2 and run-long proxy momentum; bad values."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from algorithms.base import state_payload
from algorithms.pfedes import PFedES
from bench.errors import UserError
from bench.testing import check_algorithm
from tests.conftest import bench_main, make_hand_simulation
from tests.handcalc import clipped, record_train_batches

pytestmark = pytest.mark.usefixtures("one_thread")
PROXY_PARAMS = (3 * 8 * 9 + 8) + (8 * 3 * 9 + 3)  # conv3x3 3 -> 8 and 8 -> 3, with biases


def make_sim(**kwargs):
    return make_hand_simulation("pfedes", **kwargs)


def params_of(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def proxy_by_hand(g, x):
    h = F.relu(F.conv2d(x, g["conv1.weight"], g["conv1.bias"], padding=1))
    return F.relu(F.conv2d(h, g["conv2.weight"], g["conv2.bias"], padding=1))


def sgd_by_hand(params, loss, lr, wd, clip):
    """One fresh-SGD step (first momentum step = the gradient) with the group's norm clipped."""
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    grads = clipped(torch.autograd.grad(loss(leaves), list(leaves.values())), clip)
    return {k: v - lr * (g + wd * v) for (k, v), g in zip(params.items(), grads)}


def test_conformance():
    check_algorithm(PFedES)
    check_algorithm(PFedES, profile="official", hparams={"proxy_extra_epochs": 1})


@pytest.mark.parametrize("mu, clip", [(0.5, 0.0), (0.2, 0.5)])
def test_phase1_trains_the_model_with_g_frozen_then_phase2_trains_g_with_the_model_frozen(monkeypatch, mu, clip):
    sim = make_sim(batch_size=64, lr=0.05, grad_clip=clip, hp={"mu": mu})  # one batch per epoch
    algo, client = sim.algo, sim.clients[1]
    model, proxy = client.state["model"], client.state["proxy"]
    payload = {k: v + 0.05 * torch.randn_like(v) for k, v in algo.server_payload(client, 0).items()}
    f0, g0 = params_of(model), dict(payload)
    calls = record_train_batches(monkeypatch, sim.ctx.data)
    update = algo.client_update(client, payload, 0)

    phase1 = next(update)
    assert [list(m.parameters()) for m in phase1.trainable] == [list(model.parameters())]
    assert not any(p.requires_grad for p in proxy.parameters()) and all(p.requires_grad for p in model.parameters())
    sim.ctx.train(client, phase1)
    (x1, y1), = calls[0]
    assert all(torch.equal(v, g0[k]) for k, v in params_of(proxy).items())  # G untouched by phase 1

    def mixed(f):
        return (1 - mu) * F.cross_entropy(functional_call(model, f, (x1,)), y1) + \
            mu * F.cross_entropy(functional_call(model, f, (proxy_by_hand(g0, x1),)), y1)

    f1 = sgd_by_hand(f0, mixed, sim.cfg.lr, sim.cfg.weight_decay, clip)
    for k, v in params_of(model).items():
        torch.testing.assert_close(v, f1[k], rtol=1e-4, atol=1e-6, msg=k)

    phase2 = update.send(torch.tensor(0.0))
    assert [list(m.parameters()) for m in phase2.trainable] == [list(proxy.parameters())]
    assert not any(p.requires_grad for p in model.parameters()) and all(p.requires_grad for p in proxy.parameters())
    sim.ctx.train(client, phase2)
    (x2, y2), = calls[1]
    g1 = sgd_by_hand(g0, lambda g: F.cross_entropy(functional_call(model, f1, (proxy_by_hand(g, x2),)), y2),
                     sim.cfg.lr, sim.cfg.weight_decay, clip)
    with pytest.raises(StopIteration) as done:
        update.send(torch.tensor(0.0))
    upload = done.value.value
    for k, v in g1.items():
        torch.testing.assert_close(upload[k], v, rtol=1e-4, atol=1e-6, msg=k)
        torch.testing.assert_close(params_of(proxy)[k], v, rtol=1e-4, atol=1e-6)
    for k, v in params_of(model).items():  # F_k frozen in phase 2: still phase 1's result
        torch.testing.assert_close(v, f1[k], rtol=1e-4, atol=1e-6)
    assert all(p.requires_grad for p in model.parameters())  # unfrozen for the next round


def test_phase2_runs_e_plus_the_extra_epochs():
    sim = make_sim(batch_size=64, local_epochs=2, hp={"proxy_extra_epochs": 3})
    update = sim.algo.client_update(sim.clients[0], sim.algo.server_payload(sim.clients[0], 0), 0)
    assert next(update).epochs == 2 and update.send(None).epochs == 5


@pytest.mark.parametrize("aggregation", ["samples", "uniform"])
def test_server_proxy_is_the_weighted_mean_of_the_uploads(aggregation):
    sim = make_sim(batch_size=64, hp={"aggregation": aggregation})
    uploads = {}
    original = sim.algo.client_update

    def spy(client, payload, round_index):
        up = yield from original(client, payload, round_index)
        uploads[client.id] = {k: v.clone() for k, v in up.items()}
        return up

    sim.algo.client_update = spy
    sim.run_round(0)
    w = {c: float(sim.clients[c].num_train) if aggregation == "samples" else 1.0 for c in uploads}
    for name, tensor in state_payload(sim.algo.global_proxy).items():
        want = sum(w[c] * uploads[c][name].double() for c in uploads) / sum(w.values())
        torch.testing.assert_close(tensor.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_classes, cpc", [(10, 2), (100, 20)])
def test_bytes_per_client_and_round_match_a_hand_count_on_the_five_cnns(num_classes, cpc):
    sim = make_sim(num_classes=num_classes, classes_per_client=cpc, per_class=1, batch_size=64)
    assert sim.ctx.client_archs == ["cnn1", "cnn2", "cnn3", "cnn4", "cnn5"]
    metrics = sim.run_round(0)
    for cid in range(5):  # G only, whatever the local model and the number of classes
        assert sim.bytes_up[cid] == sim.bytes_down[cid] == 4 * PROXY_PARAMS
    assert metrics["bytes_up_per_client"] == metrics["bytes_down_per_client"] == 4 * PROXY_PARAMS


def test_prediction_is_the_local_model_alone():
    sim = make_sim(batch_size=64)
    sim.run_round(0)
    client = sim.clients[2]
    x, y = next(sim.ctx.data.eval_batches("test", client.split.test, 64))
    with torch.no_grad():
        z = client.state["model"](x)
    torch.testing.assert_close(sim.algo.predict(client, x), z)
    assert sim.test_evals[client.id].correct == int((z.argmax(1) == y).sum())


def test_torchvision_group_runs():
    sim = make_sim(model_group="tv-hetero", num_clients=3, per_class=1, batch_size=64)
    metrics = sim.run_round(0)
    assert metrics["bytes_up_per_client"] == 4 * PROXY_PARAMS and 0 <= metrics["acc_mean"] <= 1


def test_official_profile_keeps_one_proxy_momentum_for_the_run():
    sim = make_sim(profile="official", batch_size=64)
    assert (sim.algo.hp.proxy_extra_epochs, sim.algo.hp.persistent_optimizer) == (10, "shared")
    assert not sim.algo.batchable_clients
    assert not sim.algo.proxy_momentum.any()
    sim.run_round(0)
    kept = sim.algo.proxy_momentum.clone()
    assert kept.abs().sum() > 0
    sim.run_round(1)
    assert not torch.equal(kept, sim.algo.proxy_momentum)
    assert make_sim(profile="htfllib").algo.hp == PFedES.make_hparams()  # HtFLlib has no pFedES


def test_phase2_needs_an_epoch():
    with pytest.raises(UserError, match=r"pfedes.proxy_extra_epochs must be >= 0 with local_epochs=1"):
        make_sim(hp={"proxy_extra_epochs": -1})


@pytest.mark.parametrize("key, value, message", [
    ("mu", 1.5, "pfedes.mu must be in [0, 1], got 1.5"),
    ("proxy_channels", 0, "pfedes.proxy_channels must be >= 1, got 0"),
    ("aggregation", "mean", "pfedes.aggregation must be one of samples, uniform, got 'mean'"),
    ("persistent_optimizer", "client", "pfedes.persistent_optimizer must be one of none, shared, got 'client'"),
])
def test_bad_values_are_one_line_user_errors(key, value, message):
    with pytest.raises(UserError) as err:
        PFedES.make_hparams({key: value})
    assert str(err.value) == message


def test_cli_refuses_a_bad_value_in_one_line(monkeypatch, capsys, tmp_path):
    code, _, err = bench_main(monkeypatch, capsys, "run", "--algo", "pfedes", "--dataset", "synthetic",
                              "--set", "pfedes.mu=2", "--output-dir", str(tmp_path))
    assert code == 2 and err.strip().splitlines() == ["error: pfedes.mu must be in [0, 1], got 2.0"]
