"""LG-FedAvg: the client loads the downloaded header, trains the whole model with CE (checked against a
hand-written SGD step) and uploads only its header; the server's header is the n_k-weighted (or uniform)
mean; evaluation uses each client's own trained model (eval_header="local") or, as the official code and
HtFLlib, the new global header broadcast to every client (bytes counted by hand); the private layers are
never touched by the server."""
from __future__ import annotations

import pytest
import torch

from algorithms.base import state_payload
from algorithms.lgfedavg import LGFedAvg
from bench.config import RunConfig
from bench.errors import UserError
from bench.observe import AtStart
from bench.simulator import Simulation
from models.cnn import CNN
from tests.conftest import client_update, hand_dataset as dataset, hand_splits, make_hand_simulation, make_simulation

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
HEADER_BYTES = 4 * (500 * 10 + 10)


def make_sim(**kwargs) -> Simulation:
    return make_hand_simulation("lgfedavg", **kwargs)


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def unprefixed(payload: dict) -> dict:
    return {k[len("header."):]: v for k, v in payload.items()}


def record_sampling(sim) -> list[list[int]]:
    rounds = []
    sample = sim.sample_clients
    sim.sample_clients = lambda: rounds.append(sample()) or rounds[-1]
    return rounds


@pytest.mark.parametrize("num_classes", [10, 100])
def test_only_the_header_travels(num_classes):
    cpc = 2 if num_classes == 10 else 20
    sim = make_sim(num_classes=num_classes, classes_per_client=cpc, per_class=1, batch_size=64)
    assert sim.ctx.client_archs == ["cnn1", "cnn2", "cnn3", "cnn4", "cnn5"]
    captured = {}
    aggregate = sim.algo.aggregate
    sim.algo.aggregate = lambda uploads, r: (captured.update(uploads), aggregate(uploads, r))
    metrics = sim.run_round(0)
    header_bytes = 4 * (500 * num_classes + num_classes)
    assert header_bytes == 4 * {10: 5_010, 100: 50_100}[num_classes]
    for cid in range(5):  # the same for every architecture
        assert set(captured[cid]) == {"header.weight", "header.bias"}
        assert same(unprefixed(captured[cid]), snapshot(sim.clients[cid].state["model"].header))  # what it trained
        assert sim.bytes_up[cid] == sim.bytes_down[cid] == header_bytes
    assert set(sim.algo.server_payload(sim.clients[0], 1)) == {"header.weight", "header.bias"}
    assert metrics["bytes_up_per_client"] == metrics["bytes_down_per_client"] == header_bytes


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_one_step_trains_the_whole_model_from_the_downloaded_header(clip):
    # One batch (batch >= n_k): SGD's first step is w - lr * (clipped grad + wd * w), grad of plain CE.
    sim = make_sim(batch_size=64, lr=0.05, grad_clip=clip)
    client = sim.clients[3]
    model = client.state["model"]
    before = snapshot(model)
    payload = {k: v + 0.01 * torch.randn_like(v) for k, v in sim.algo.server_payload(client, 0).items()}
    state = sim.ctx.client_generator(client.id, 0).get_state()
    upload, _ = client_update(sim, client, payload, 0)

    ref = CNN(client.arch, 10)
    ref.load_state_dict({**before, **{f"header.{k}": v for k, v in unprefixed(payload).items()}})
    start = snapshot(ref)
    (x, y), = list(sim.ctx.data.train_batches(client.split.train, 64, torch.Generator().set_state(state)))
    z = ref(x)
    loss = -(z - z.logsumexp(1, keepdim=True))[torch.arange(len(y)), y].mean()
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    if clip > 0:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        grads = [g * torch.clamp(clip / (norm + 1e-6), max=1.0) for g in grads]
    lr, wd = sim.cfg.lr, sim.cfg.weight_decay
    for (name, after), g in zip(model.named_parameters(), grads):
        torch.testing.assert_close(after.detach(), start[name] - lr * (g + wd * start[name]), rtol=1e-4, atol=1e-6)
    assert same(unprefixed(upload), snapshot(model.header))


def test_client_trains_from_the_global_header_and_its_own_extractor():
    sim = make_sim()
    sim.run_round(0)  # headers now differ from client to client
    client = sim.clients[1]
    model = client.state["model"]
    extractor_before = snapshot(model.extractor)
    assert not same(snapshot(model.header), snapshot(sim.algo.global_header))
    seen = {}

    def at_phase_start(info):
        seen["header"], seen["extractor"] = snapshot(model.header), snapshot(model.extractor)
        seen["trainable"] = info["phase"].trainable

    sim.observers.add(AtStart("phase", at_phase_start))
    payload = sim.algo.server_payload(client, 1)
    upload, _ = client_update(sim, client, payload, 1)
    assert same(seen["header"], unprefixed(payload))  # loaded the global header
    assert same(seen["extractor"], extractor_before)  # and kept its own extractor
    assert seen["trainable"] == [model]  # the whole model trains
    assert not same(snapshot(model.extractor), extractor_before)
    assert same(unprefixed(upload), snapshot(model.header))  # uploads what it trained


@pytest.mark.parametrize("aggregation", ["samples", "uniform"])
def test_aggregation_is_the_weighted_mean_and_never_touches_private_layers(aggregation):
    sim = make_sim(hp={"aggregation": aggregation})
    captured = {}
    before = {}
    aggregate = sim.algo.aggregate

    def spying_aggregate(uploads, r):
        captured.update(uploads)
        before.update({c.id: snapshot(c.state["model"]) for c in sim.clients})
        aggregate(uploads, r)

    sim.algo.aggregate = spying_aggregate
    sim.run_round(0)
    for c in sim.clients:  # the server's update changed no client model, extractor or header
        assert same(snapshot(c.state["model"]), before[c.id])
    n = {cid: float(len(sim.clients[cid].split.train)) for cid in captured}
    assert len(set(n.values())) == 5
    weights = n if aggregation == "samples" else {cid: 1.0 for cid in captured}
    other = {cid: 1.0 for cid in captured} if aggregation == "samples" else n
    glob = state_payload(sim.algo.global_header, "header.")
    for name, tensor in glob.items():
        want = sum(weights[c] * captured[c][name].double() for c in captured) / sum(weights.values())
        torch.testing.assert_close(tensor.double(), want, rtol=1e-5, atol=1e-6)
        wrong = sum(other[c] * captured[c][name].double() for c in captured) / sum(other.values())
        assert not torch.allclose(tensor.double(), wrong, rtol=1e-7, atol=1e-9)


# ---- evaluation: which header, and when -----------------------------------------------------------------
def hand_eval(sim, client, header: dict | None = None) -> tuple[int, float]:
    """(hits, summed CE) on the test set of the client's extractor with `header` (default: its own)."""
    data = sim.ctx.data
    idx = client.split.test
    model = CNN(client.arch, 10)
    model.load_state_dict({**snapshot(client.state["model"]), **{f"header.{k}": v for k, v in (header or {}).items()}})
    with torch.no_grad():
        z, y = model(data.normalise(data.x_test[idx])), data.y_test[idx]
        nll = -(z - z.logsumexp(1, keepdim=True))[torch.arange(len(y)), y].sum()
    return int((z.argmax(1) == y).sum()), float(nll)


def assert_evaluated_as(sim, client, header: dict | None = None) -> int:
    right, nll = hand_eval(sim, client, header)
    assert sim.test_evals[client.id].correct == right
    assert sim.test_evals[client.id].loss == pytest.approx(nll, rel=1e-5)  # 2 test samples: hits alone are weak
    return right


def test_local_eval_header_evaluates_the_sampled_clients_own_trained_models():
    sim = make_sim(participation=0.4, per_class=4, lr=0.05)
    sampled = record_sampling(sim)
    sim.initial_metrics()
    initial = {c.id: sim.test_evals[c.id].loss for c in sim.clients}
    for r in range(2):
        sim.run_round(r)
        for c in sim.clients:
            if c.id in sampled[r]:  # its own extractor and the header it just trained
                assert_evaluated_as(sim, c)
                initial[c.id] = None
            elif initial[c.id] is not None:  # never trained: still the initial evaluation
                assert sim.test_evals[c.id].loss == initial[c.id]
    glob = snapshot(sim.algo.global_header)
    trained = sampled[1][0]
    assert not same(snapshot(sim.clients[trained].state["model"].header), glob)  # kept its own header


def test_global_eval_header_broadcasts_to_every_client_and_evaluates_all():
    sim = make_sim(participation=0.4, per_class=4, lr=0.05, hp={"eval_header": "global"})
    assert sim.algo.broadcast_after_aggregation and sim.algo.prediction_uses_server_state
    sampled = record_sampling(sim)
    sim.initial_metrics()
    down = {c.id: 0 for c in sim.clients}
    for r in range(2):
        start_headers = {}

        def at_phase_start(info):
            for cid in info["clients"]:
                start_headers[cid] = snapshot(sim.clients[cid].state["model"].header)

        spy = AtStart("phase", at_phase_start)
        sim.observers.add(spy)
        global_before = snapshot(sim.algo.global_header)
        metrics = sim.run_round(r)
        sim.observers.remove(spy)
        for cid in sampled[r]:  # every round starts from the global header (downloaded, then broadcast)
            assert same(start_headers[cid], global_before), (r, cid, sampled)
        glob = snapshot(sim.algo.global_header)
        correct = total = 0
        for c in sim.clients:  # every client now holds the new header and was evaluated with it
            assert same(snapshot(c.state["model"].header), glob)
            right = assert_evaluated_as(sim, c, glob)
            correct, total = correct + right, total + len(c.split.test)
        assert metrics["acc_mean"] == pytest.approx(correct / total)
        # Bytes by hand: round 0 sends the initial header to the 2 sampled clients; every round broadcasts the
        # new one to all 5; from round 1 on a client already holds the current header, so nothing else.
        for c in sim.clients:
            down[c.id] += HEADER_BYTES * (1 + (r == 0 and c.id in sampled[r]))
        assert sim.bytes_down == down
        assert metrics["bytes_down"] == HEADER_BYTES * (5 + 2 * (r == 0))
        assert metrics["bytes_up"] == HEADER_BYTES * 2


def test_local_header_init_sends_nothing_in_round_zero():
    sim = make_sim(hp={"header_init": "local"})
    client = sim.clients[0]
    header0 = snapshot(client.state["model"].header)
    assert sim.algo.server_payload(client, 0) == {}
    first = sim.run_round(0)
    assert first["bytes_down"] == 0 and first["bytes_up_per_client"] == 4 * 5_010
    assert not same(snapshot(client.state["model"].header), header0)  # trained from its own header
    second = sim.run_round(1)
    assert second["bytes_down_per_client"] == 4 * 5_010


def test_profiles_select_the_reference_options():
    spec = make_simulation("lgfedavg").algo
    assert (spec.hp.eval_header, spec.hp.aggregation, spec.hp.header_init) == ("local", "samples", "server")
    assert not spec.broadcast_after_aggregation and not spec.prediction_uses_server_state
    official = make_simulation("lgfedavg", profile="official").algo
    assert (official.hp.eval_header, official.hp.aggregation) == ("global", "uniform")
    assert official.broadcast_after_aggregation and official.prediction_uses_server_state
    htfllib = make_simulation("lgfedavg", profile="htfllib").algo.hp
    assert (htfllib.eval_header, htfllib.aggregation, htfllib.header_init) == ("global", "samples", "server")


def test_needs_one_representation_size():
    cfg = RunConfig(dataset="synthetic", num_clients=3, rounds=1, classes_per_client=2, device="cpu",
                    model_group="tv-hetero", algorithms=["lgfedavg"])
    ds, data = dataset(10)
    with pytest.raises(UserError, match="representation size"):
        Simulation(cfg, LGFedAvg, 0, data, hand_splits(ds, 3, 2, 3), CPU)


@pytest.mark.parametrize("overrides", [{"header_init": "random"}, {"aggregation": "median"},
                                       {"eval_header": "both"}])
def test_bad_hyperparameters_are_user_errors(overrides):
    with pytest.raises(UserError):
        LGFedAvg.make_hparams(overrides)


def test_defaults_are_spec():
    hp = LGFedAvg.make_hparams()
    assert (hp.header_init, hp.aggregation, hp.eval_header) == ("server", "samples", "local")
