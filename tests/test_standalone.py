"""Standalone: nothing travels, each client's model takes its own CE steps, and is evaluated after them.
Recomputed by hand on the tiny model of tests/test_fedgh.py."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import make_hand_simulation, make_simulation
from tests.handcalc import client_step, evaluation_by_hand, record_train_batches, snapshot, use_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("batched", [False, True])
def test_nothing_is_sent_either_way(batched):
    sim = make_simulation("standalone", batched_training=batched)
    for r in range(2):
        metrics = sim.run_round(r)
        assert metrics["bytes_up"] == metrics["bytes_down"] == 0
    assert all(sim.bytes_up[c.id] == sim.bytes_down[c.id] == 0 for c in sim.clients)
    assert all(sim.algo.server_payload(c, 1) == {} for c in sim.clients)


@pytest.mark.parametrize("batched", [False, True])
def test_each_client_takes_one_sgd_step_with_ce_on_its_own_model(monkeypatch, batched):
    use_tiny(monkeypatch, batchnorm=batched is False)  # batched training needs a model without buffers
    sim = make_hand_simulation("standalone", batch_size=64, lr=0.5, batched_training=batched)  # one batch each
    start = {c.id: snapshot(c.state["model"]) for c in sim.clients}
    assert not torch.equal(start[0]["header.weight"], start[1]["header.weight"])  # private, distinct models
    calls = record_train_batches(monkeypatch, sim.ctx.data)
    sim.run_round(0)
    assert len(calls) == 5 and all(len(batches) == 1 for batches in calls)
    for (x, y), in calls:
        client = sim.clients[int(y.min()) // 2]  # client i holds classes 2i and 2i+1
        expected = client_step(start[client.id], x, y, sim.cfg)
        trained = snapshot(client.state["model"])
        for name, value in expected.items():
            torch.testing.assert_close(trained[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_sampled_clients_are_evaluated_after_their_training(monkeypatch):
    use_tiny(monkeypatch)
    sim = make_hand_simulation("standalone", participation=0.4)
    sim.run_round(0)
    assert len(sim.test_evals) == 2  # the two sampled clients; the others did not change
    for cid in sim.test_evals:
        client = sim.clients[cid]
        correct, loss = evaluation_by_hand(sim, client, snapshot(client.state["model"]))
        assert sim.test_evals[cid].correct == correct
        assert sim.test_evals[cid].loss == pytest.approx(loss, rel=1e-5)
