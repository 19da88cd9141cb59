import pytest
import torch

from algorithms.base import state_payload
from tests.conftest import make_simulation


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def record_phases(sim):
    """Wrap ctx.train to record, per training phase, which of (model, adapter) changed."""
    seen = []
    original = sim.ctx.train

    def train(client, trainable, loss_fn, epochs, phase, indices=None):
        model, adapter = client.state["model"], client.state["adapter"]
        before_m, before_a = snapshot(model), snapshot(adapter)
        out = original(client, trainable, loss_fn, epochs, phase, indices)
        seen.append((phase, bool(changed(before_m, model)), bool(changed(before_a, adapter))))
        return out

    sim.ctx.train = train
    return seen


@pytest.mark.parametrize("placement", ["model", "representation", "header-lora"])
def test_iterative_phases_freeze_the_right_part(placement):
    sim = make_simulation("pfedlora", algo={"pfedlora": {"placement": placement, "rank": 8}})
    phases = record_phases(sim)
    sim.run_round(0)
    assert len(phases) == 2 * 5
    for phase, model_changed, adapter_changed in phases:
        if phase.startswith("phase1"):
            assert model_changed and not adapter_changed, phase
        else:
            assert adapter_changed and not model_changed, phase


def test_joint_training_changes_both():
    sim = make_simulation("pfedlora", algo={"pfedlora": {"training": "joint", "rank": 8}})
    phases = record_phases(sim)
    sim.run_round(0)
    assert phases and all(p == ("joint", True, True) for p in phases)


def test_global_adapter_is_the_sample_weighted_mean_of_uploads():
    sim = make_simulation("pfedlora", participation=0.6, algo={"pfedlora": {"rank": 8}})
    uploads = {}
    original = sim.algo.client_update

    def client_update(client, payload, round_index):
        up = original(client, payload, round_index)
        uploads[client.id] = {k: v.clone() for k, v in up.items()}
        return up

    sim.algo.client_update = client_update
    sim.run_round(0)
    assert len(uploads) == 3
    n = {cid: sim.clients[cid].num_train for cid in uploads}
    assert len(set(n.values())) > 1  # unequal weights, so a plain mean would fail
    for name, value in state_payload(sim.algo.global_adapter).items():
        expected = sum(n[c] * uploads[c][name] for c in uploads) / sum(n.values())
        torch.testing.assert_close(value, expected)
    # each uploaded adapter is exactly the client's own (personal) adapter
    for cid, up in uploads.items():
        for name, value in state_payload(sim.clients[cid].state["adapter"]).items():
            assert torch.equal(up[name], value)


def test_adapter_epochs_option_changes_phase_two_work():
    flops = {}
    for e_adapter in (1, 2):
        sim = make_simulation("pfedlora", algo={"pfedlora": {"adapter_epochs": e_adapter, "eval_phase1": False}})
        flops[e_adapter] = sim.run_round(0)["train_flops"]
    assert flops[2] > flops[1]


def test_phase1_accuracy_is_logged():
    sim = make_simulation("pfedlora")
    metrics = sim.run_round(0)
    assert 0 <= metrics["acc_phase1"] <= 1
    assert 0 <= metrics["acc_mean"] <= 1


def test_pfedlora_learns_on_synthetic_data():
    sim = make_simulation("pfedlora", rounds=3, local_epochs=3, algo={"pfedlora": {"rank": 16}})
    start = sim.initial_metrics()["acc_mean"]
    for t in range(3):
        metrics = sim.run_round(t)
    assert metrics["acc_mean"] > max(0.75, start + 0.2)
