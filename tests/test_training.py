"""bench/training.py, the one local-training path: the simulator drives each client's client_update generator,
runs the Phases it yields (one client after the other, or with cfg.batched_training all clients in lockstep,
same-structure plain phases trained together), sends each phase's mean loss back, and keeps the losses and
uploads. Small plugin algorithms on the tiny model of tests/handcalc.py; every expected value is replayed by
hand on the batches the phases really drew (recorded by a spy on the data)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from algorithms.base import Algorithm, Phase
from bench.observe import Recorder
from bench.simulator import Simulation
from bench.training import run_updates
from tests.conftest import make_hand_simulation
from tests.handcalc import Tiny, cross_entropy, logits, record_train_batches, sgd_step, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = ["extractor.1.weight", "extractor.1.bias", "header.weight", "header.bias"]
HEADER = ["header.weight", "header.bias"]
EXTRACTOR = ["extractor.1.weight", "extractor.1.bias"]


class TinyPlugin(Algorithm):
    """Each client holds a Tiny model without buffers (batchable), seeded by its id; subclasses yield phases."""
    name = "tiny-plugin"

    def init_client(self, client) -> None:
        torch.manual_seed(100 + client.id)
        client.state["model"] = self.tiny()

    def tiny(self) -> Tiny:
        return Tiny(self.ctx.num_classes, self.ctx.in_channels, self.ctx.image_size, batchnorm=False).to(self.ctx.device)

    def init_server(self) -> None:
        self.received: dict[int, list[torch.Tensor]] = {}  # the values client_update's yields returned


class TwoPhases(TinyPlugin):
    """Phase "first": the whole model, 2 epochs; phase "second": the header alone (extractor frozen), 1 epoch;
    both on the plain loss. Uploads the header."""

    def client_update(self, client, payload, round_index):
        model = client.state["model"].train()
        first = yield Phase("first", [model], 2)
        model.extractor.requires_grad_(False)
        second = yield Phase("second", [model], 1)
        model.extractor.requires_grad_(True)
        self.received[client.id] = [first, second]
        return {"header.weight": model.header.weight.detach().clone()}


class WithPartner(TinyPlugin):
    """One plain phase CE(model(x) + partner(x)) with a frozen partner (pFedLoRA's phases)."""

    def init_client(self, client) -> None:
        super().init_client(client)
        client.state["partner"] = self.tiny().requires_grad_(False)

    def client_update(self, client, payload, round_index):
        yield Phase("with-partner", [client.state["model"].train()], 1, partner=client.state["partner"])
        return {}


class Declared(TinyPlugin):
    """Three phases that are not plain: their own loss (2 CE), their own indices (the first 3 training
    samples), their own optimizer (lr 0: the model must not move). Never batched."""

    def client_update(self, client, payload, round_index):
        model = client.state["model"].train()
        own_loss = yield Phase("own-loss", [model], 1, loss=lambda x, y: 2 * F.cross_entropy(model(x), y))
        subset = yield Phase("subset", [model], 1, indices=client.split.train[:3])
        params, _ = self.ctx.optimizers_for([model])
        frozen = yield Phase("lr-zero", [model], 1, optimizers=(params, [self.ctx.optimizer(params[0], lr=0.0)]))
        self.received[client.id] = [own_loss, subset, frozen]
        return {}


class Mixed(TinyPlugin):
    """One phase per client, chosen so that only clients 0 and 1 may train together: 2 is named differently,
    3 has its header frozen, 4 has a partner."""

    def init_client(self, client) -> None:
        super().init_client(client)
        client.state["partner"] = self.tiny().requires_grad_(False)

    def client_update(self, client, payload, round_index):
        model = client.state["model"].train()
        model.header.requires_grad_(client.id != 3)
        partner = client.state["partner"] if client.id == 4 else None
        yield Phase("b" if client.id == 2 else "a", [model], 1, partner=partner)
        model.header.requires_grad_(True)
        return {}


def plugin_sim(plugin: type[Algorithm], observers=(), **overrides) -> Simulation:
    """5 clients with n_k = 6, 8, 10, 12, 14 (client i holds classes 2i, 2i+1), batches of 4 (uneven last
    batches), lr 0.1 (momentum 0.9, weight decay, clipping at the run's defaults)."""
    settings = dict(batch_size=4, lr=0.1, grad_clip=1.0)
    settings.update(overrides)
    base = make_hand_simulation("standalone", **settings)
    return Simulation(base.cfg, plugin, 0, base.ctx.data, [c.split for c in base.clients], torch.device("cpu"),
                      observers=observers)


def epochs_by_client(calls) -> dict[int, list[list]]:
    """The recorded train_batches calls (one per epoch) of each client, in the order each client drew them."""
    out: dict[int, list[list]] = {}
    for batches in calls:
        out.setdefault(int(batches[0][1].min()) // 2, []).append(batches)
    return out


def replay(p, epochs, cfg, names, scale=1.0, extra=None, lr=None):
    """One phase by hand: a fresh SGD over `epochs` (lists of (x, y) batches), momentum carried across its
    steps; loss scale * CE(logits + extra). Returns (parameters, the sample-weighted mean loss)."""
    buffers, total, seen = None, 0.0, 0
    for batches in epochs:
        for x, y in batches:
            def loss_of(q, x=x, y=y):
                z = logits(q, x) + (0 if extra is None else extra(x))
                return scale * cross_entropy(z, y)

            total += float(loss_of(p)) * len(y)
            seen += len(y)
            p, buffers = sgd_step(p, names, loss_of, cfg.lr if lr is None else lr, cfg.weight_decay, cfg.grad_clip,
                                  buffers, cfg.momentum)
    return p, total / seen


def assert_params(model, expected, atol=5e-5):
    trained = snapshot(model)
    for name in ALL:
        torch.testing.assert_close(trained[name], expected[name], rtol=1e-4, atol=atol, msg=name)


def approx(value: float):
    return pytest.approx(value, rel=1e-4, abs=1e-5)


# ---- phases, losses, uploads --------------------------------------------------------------------------------

@pytest.mark.parametrize("batched", [False, True])
def test_phases_train_in_order_and_each_mean_loss_is_reported_sent_back_and_final(monkeypatch, batched):
    sim = plugin_sim(TwoPhases, batched_training=batched)
    start = {c.id: snapshot(c.state["model"]) for c in sim.clients}
    calls = record_train_batches(monkeypatch, sim.ctx.data)
    done = run_updates(sim.ctx, sim.algo, sim.clients, {c.id: {} for c in sim.clients}, 0)
    epochs = epochs_by_client(calls)
    reported = {(cid, name): float(loss) for cid, name, loss in done.losses}
    assert len(done.losses) == len(reported) == 2 * len(sim.clients)  # every phase of every client, once
    for c in sim.clients:
        assert len(epochs[c.id]) == 3  # "first" ran 2 epochs, "second" 1
        assert sum(len(y) for batches in epochs[c.id] for _, y in batches) == 3 * c.num_train
        p, first = replay(start[c.id], epochs[c.id][:2], sim.cfg, ALL)
        p, second = replay(p, epochs[c.id][2:], sim.cfg, HEADER)
        assert_params(c.state["model"], p)
        assert (reported[(c.id, "first")], reported[(c.id, "second")]) == (approx(first), approx(second))
        assert [float(v) for v in sim.algo.received[c.id]] == [approx(first), approx(second)]
        assert float(done.final_loss[c.id]) == approx(second)
        torch.testing.assert_close(done.uploads[c.id]["header.weight"], p["header.weight"], rtol=1e-4, atol=5e-5)


def test_round_train_loss_is_the_n_k_weighted_mean_of_the_last_phase_losses():
    sim = plugin_sim(TwoPhases)
    metrics = sim.run_round(0)
    n = {c.id: c.num_train for c in sim.clients}
    last = sum(n[cid] * float(losses[1]) for cid, losses in sim.algo.received.items()) / sum(n.values())
    first = sum(n[cid] * float(losses[0]) for cid, losses in sim.algo.received.items()) / sum(n.values())
    assert len(sim.algo.received) == 5
    assert metrics["train_loss"] == approx(last)
    assert metrics["train_loss"] != approx(first)  # guard: the phases' losses differ


@pytest.mark.parametrize("batched", [False, True])
def test_phases_with_their_own_loss_indices_or_optimizer_run_as_declared(monkeypatch, batched):
    sim = plugin_sim(Declared, batched_training=batched)
    start = {c.id: snapshot(c.state["model"]) for c in sim.clients}
    calls = record_train_batches(monkeypatch, sim.ctx.data)
    sim.run_round(0)
    epochs = epochs_by_client(calls)
    for c in sim.clients:
        own, subset, frozen = epochs[c.id]
        assert sum(len(y) for _, y in subset) == 3 and sum(len(y) for _, y in own) == c.num_train
        first3 = sim.ctx.data.y_train[c.split.train[:3]]
        assert torch.equal(torch.cat([y for _, y in subset]).sort().values, first3.sort().values)
        p, own_loss = replay(start[c.id], [own], sim.cfg, ALL, scale=2.0)
        p, subset_loss = replay(p, [subset], sim.cfg, ALL)
        after, frozen_loss = replay(p, [frozen], sim.cfg, ALL, lr=0.0)
        assert_params(c.state["model"], after)
        assert all(torch.equal(after[k], p[k]) for k in ALL)  # guard: lr 0 leaves the hand model as it was
        assert [float(v) for v in sim.algo.received[c.id]] == [approx(own_loss), approx(subset_loss),
                                                                  approx(frozen_loss)]


# ---- the partner's logits and the FLOPs of a batched group --------------------------------------------------

@pytest.mark.parametrize("batched", [False, True])
def test_plain_loss_adds_the_frozen_partners_logits(monkeypatch, batched):
    sim = plugin_sim(WithPartner, batched_training=batched)
    start = {c.id: snapshot(c.state["model"]) for c in sim.clients}
    partners = {c.id: snapshot(c.state["partner"]) for c in sim.clients}
    calls = record_train_batches(monkeypatch, sim.ctx.data)
    sim.run_round(0)
    epochs = epochs_by_client(calls)
    for c in sim.clients:
        expected, _ = replay(start[c.id], epochs[c.id], sim.cfg, ALL, extra=lambda x, q=partners[c.id]: logits(q, x))
        assert_params(c.state["model"], expected)
        without, _ = replay(start[c.id], epochs[c.id], sim.cfg, ALL)
        assert not torch.allclose(without["header.bias"], expected["header.bias"], atol=1e-4)  # guard
        assert all(torch.equal(v, partners[c.id][k]) for k, v in snapshot(c.state["partner"]).items())


def test_batched_training_credits_each_client_the_flops_of_its_own_steps():
    """Forward of the model and of the partner, backward of the model: the same figure per client batched as
    sequential (where the steps themselves are counted)."""
    flops = {}
    for batched in (False, True):
        sim = plugin_sim(WithPartner, batched_training=batched)
        metrics = sim.run_round(0)
        flops[batched] = (metrics["train_flops"], dict(sim.accountant.by_client))
    assert flops[True] == flops[False]
    assert len(set(flops[False][1].values())) == 5  # n_k differ, so a misattribution shows


# ---- which plain phases train together ----------------------------------------------------------------------

def test_only_plain_phases_of_one_name_structure_and_partnership_train_together(monkeypatch):
    recorder = Recorder(["phase"])
    sim = plugin_sim(Mixed, observers=[recorder], batched_training=True)
    start = {c.id: snapshot(c.state["model"]) for c in sim.clients}
    partner = snapshot(sim.clients[4].state["partner"])
    calls = record_train_batches(monkeypatch, sim.ctx.data)
    sim.run_round(0)
    groups = sorted(sorted(info["clients"]) for info in recorder.of("phase"))
    assert groups == [[0, 1], [2], [3], [4]]
    epochs = epochs_by_client(calls)
    for c in sim.clients:
        names = EXTRACTOR if c.id == 3 else ALL
        extra = (lambda x: logits(partner, x)) if c.id == 4 else None
        expected, _ = replay(start[c.id], epochs[c.id], sim.cfg, names, extra=extra)
        assert_params(c.state["model"], expected)
