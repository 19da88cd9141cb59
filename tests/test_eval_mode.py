"""Evaluation always runs in eval mode: BatchNorm normalises with (and keeps) its running statistics, whatever
a plugin's predict does, and the training flags are restored afterwards."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.base import Algorithm, Phase
from tests.conftest import make_simulation


class BatchNormPlugin(Algorithm):
    """A plugin whose predict never calls .eval(): the simulator must still evaluate in eval mode."""
    name = "bn-plugin"

    def init_client(self, client) -> None:
        torch.manual_seed(client.id)
        client.state["model"] = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Dropout(0.9), nn.Linear(16, self.ctx.num_classes)).to(self.ctx.device)
        # Non-trivial running statistics, so normalising with batch statistics gives other logits.
        bn = client.state["model"][1]
        bn.running_mean.uniform_(-1.0, 1.0)
        bn.running_var.uniform_(0.5, 2.0)

    def init_server(self) -> None:
        # A server-side module in the prediction path (like FedAvg's global model): also evaluated in eval mode.
        self.server_bn = nn.BatchNorm1d(self.ctx.num_classes).to(self.ctx.device)
        self.server_bn.running_mean.uniform_(-1.0, 1.0)

    def client_update(self, client, payload, round_index):
        model = client.state["model"].train()
        yield Phase("local", [model], 1)
        return {}

    def predict(self, client, x):
        return self.server_bn(client.state["model"](x))


def simulation_with(plugin: type[Algorithm], **overrides):
    sim = make_simulation("standalone", augment=False, num_clients=5, **overrides)
    # The same run with the test's plugin in place of the registered algorithm.
    from bench.simulator import Simulation

    return Simulation(sim.cfg, plugin, 0, sim.ctx.data, [c.split for c in sim.clients], torch.device("cpu"))


def bn_buffers(module: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for name, b in module.named_buffers() if "running" in name or "num_batches" in name]


def hand_accuracy(sim, client, model: nn.Module) -> float:
    """Accuracy of `model` in eval mode on the client's test split, computed here without the simulator."""
    model.eval()
    idx = client.split.test
    with torch.no_grad():
        x = sim.ctx.data.eval_batches("test", idx, 10_000)
        xs, ys = zip(*x)
        logits = model(torch.cat(xs))
    return int((logits.argmax(1) == torch.cat(ys)).sum()) / len(idx)


def test_evaluation_uses_eval_mode_keeps_running_statistics_and_restores_flags():
    sim = simulation_with(BatchNormPlugin)
    for client in sim.clients:
        client.state["model"].train()
    server_bn = sim.algo.server_bn.train()
    server_before = bn_buffers(server_bn)
    before = {c.id: bn_buffers(c.state["model"]) for c in sim.clients}
    sim.initial_metrics()
    assert all(torch.equal(a, b) for a, b in zip(server_before, bn_buffers(server_bn)))
    assert server_bn.training
    server_bn.eval()
    for c in sim.clients:
        model = c.state["model"]
        for old, new in zip(before[c.id], bn_buffers(model)):
            assert torch.equal(old, new), "evaluation changed a BatchNorm running statistic"
        assert all(m.training for m in model.modules()), "evaluation did not restore the training flags"
        expected = hand_accuracy(sim, c, nn.Sequential(model, server_bn))
        assert sim.test_evals[c.id].accuracy == expected
        model.train()


def test_training_mode_evaluation_would_differ():
    """Guards the test above: on this plugin, train-mode logits differ from eval-mode ones."""
    sim = simulation_with(BatchNormPlugin)
    client = sim.clients[0]
    model = client.state["model"]
    x, _ = next(iter(sim.ctx.data.eval_batches("test", client.split.test, 10_000)))
    with torch.no_grad():
        torch.manual_seed(0)
        train_logits = model.train()(x)
        eval_logits = model.eval()(x)
    assert not torch.allclose(train_logits, eval_logits)


def test_builtin_standalone_on_batchnorm_group_evaluates_in_eval_mode():
    sim = make_simulation("standalone", augment=False, num_clients=5, model_group="resnet18-homo", rounds=1)
    for c in sim.clients:
        c.state["model"].train()
    before = {c.id: bn_buffers(c.state["model"]) for c in sim.clients}
    metrics = sim.initial_metrics()
    total_correct = total = 0
    for c in sim.clients:
        for old, new in zip(before[c.id], bn_buffers(c.state["model"])):
            assert torch.equal(old, new)
        acc = hand_accuracy(sim, c, c.state["model"])
        assert sim.test_evals[c.id].accuracy == acc
        total_correct += acc * len(c.split.test)
        total += len(c.split.test)
    assert abs(metrics["acc_mean"] - total_correct / total) < 1e-9
