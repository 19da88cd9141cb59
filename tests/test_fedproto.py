"""FedProto: prototypes are per-class means of the representations (checked against means taken here by hand on
the tiny model of tests/handcalc.py); the local step is CE + lam * MSE(h, P_y), written out by hand; the server
prototype is the plain per-class mean of the uploads; nearest-prototype inference; bytes by hand for the 5-CNN
group on 10 and 100 classes; the torchvision group through proto_dim; bad values."""
from __future__ import annotations

import pytest
import torch

from algorithms.fedproto import FedProto, nearest_prototype_logits
from bench.errors import UserError
from bench.testing import check_algorithm
from tests.conftest import bench_main, client_update, make_hand_simulation
from tests.handcalc import (REP, class_means, cross_entropy, features, logits, record_train_batches, sgd_step,
                            snapshot, trainable, use_tiny)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny(monkeypatch):
    use_tiny(monkeypatch)


def make_sim(**kwargs):
    return make_hand_simulation("fedproto", **kwargs)


def train_split(sim, client):
    idx = client.split.train
    return sim.ctx.data.normalise(sim.ctx.data.x_train[idx]), sim.ctx.data.y_train[idx]


def global_payload(classes, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"protos": torch.rand(len(classes), dim, generator=g) * 2,
            "classes": torch.tensor(classes, dtype=torch.uint8)}


def test_conformance():
    check_algorithm(FedProto)
    check_algorithm(FedProto, profile="htfllib")  # nearest-prototype inference, broadcast, recorded prototypes


# ---- the client ------------------------------------------------------------------------------------------------

def test_uploaded_prototypes_are_the_exact_class_means_of_the_trained_representations(tiny):
    sim = make_sim(batch_size=4)
    client = sim.clients[3]
    upload, _ = client_update(sim, client, {}, 0)
    x, y = train_split(sim, client)
    classes, means = class_means(features(snapshot(client.state["model"]), x, "eval"), y)
    assert upload["classes"].dtype == torch.uint8 and torch.equal(upload["classes"].long(), classes)
    assert upload["protos"].dtype == torch.float32
    torch.testing.assert_close(upload["protos"], means, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prototypes", ["all-epochs", "last-epoch"])
def test_recorded_prototypes_are_means_over_the_training_batches(tiny, monkeypatch, prototypes):
    # lr 0 and no weight decay: the parameters never move, so each batch's representation is the start model's
    # (BatchNorm in train mode: batch statistics).
    sim = make_sim(batch_size=4, lr=0.0, weight_decay=0.0, local_epochs=2, hp={"prototypes": prototypes})
    client = sim.clients[4]  # 14 samples: 4 batches per epoch
    p = snapshot(client.state["model"])
    calls = record_train_batches(monkeypatch, sim.ctx.data)
    upload, _ = client_update(sim, client, {}, 0)
    assert len(calls) == 2 and len(calls[0]) == len(calls[1]) == 4  # two epochs, nothing else drawn
    batches = calls[1] if prototypes == "last-epoch" else calls[0] + calls[1]
    h = torch.cat([features(p, x, "train") for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    classes, means = class_means(h, y)
    assert torch.equal(upload["classes"].long(), classes)
    torch.testing.assert_close(upload["protos"], means, rtol=1e-5, atol=1e-6)
    other = calls[0] if prototypes == "last-epoch" else calls[1]  # guard: the epochs give other means
    h_other = torch.cat([features(p, x, "train") for x, _ in other])
    assert not torch.allclose(class_means(h_other, torch.cat([y for _, y in other]))[1], means, atol=1e-4)


@pytest.mark.parametrize("lam", [0.0, 3.0])
def test_local_step_is_ce_plus_lam_mse_to_the_global_prototype_of_the_label(tiny, monkeypatch, lam):
    sim = make_sim(batch_size=64, lr=0.3, hp={"lam": lam})  # one batch: one SGD step
    client = sim.clients[1]  # classes 2 and 3; the download holds a prototype of class 2 only (and 7)
    payload = global_payload([2, 7], REP)
    start = snapshot(client.state["model"])
    calls = record_train_batches(monkeypatch, sim.ctx.data)
    client_update(sim, client, payload, 1)
    (x, y), = calls[0]
    targets = torch.zeros(10, REP)
    targets[payload["classes"].long()] = payload["protos"]

    def loss(q):
        h = features(q, x, "train")
        target = torch.where((y == 2).unsqueeze(1), targets[y], h.detach())  # class 3: no prototype, no pull
        return cross_entropy(logits(q, x, "train"), y) + lam * ((h - target) ** 2).mean()

    names = trainable(start)
    expected, _ = sgd_step(start, names, loss, sim.cfg.lr, sim.cfg.weight_decay, sim.cfg.grad_clip)
    trained = snapshot(client.state["model"])
    for name in names:
        torch.testing.assert_close(trained[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_distance_term_moves_representations_toward_the_global_prototype(monkeypatch):
    use_tiny(monkeypatch, batchnorm=False)  # h is then the same function in training and evaluation
    distances = {}
    for lam in (0.0, 10.0):
        sim = make_sim(batch_size=64, local_epochs=5, lr=1e-3, hp={"lam": lam})
        client = sim.clients[0]  # classes 0 and 1
        payload = global_payload([0, 1], REP, seed=3)
        x, y = train_split(sim, client)
        start = float(((features(snapshot(client.state["model"]), x) - payload["protos"][y]) ** 2).sum(1).mean())
        client_update(sim, client, payload, 1)
        h = features(snapshot(client.state["model"]), x)
        distances[lam] = float(((h - payload["protos"][y]) ** 2).sum(1).mean())
    # CE alone moves the representations away from the prototypes; the term pulls them closer than they started,
    # to less than half the distance CE alone leaves
    assert distances[10.0] < start < distances[0.0] and distances[10.0] < 0.5 * distances[0.0]


# ---- the server ------------------------------------------------------------------------------------------------

def test_global_prototype_is_the_plain_mean_over_the_clients_holding_the_class(tiny):
    sim = make_sim(hp={"lam": 1.0})
    uploads = {0: global_payload([0, 1], REP, 1), 1: global_payload([1, 2], REP, 2), 4: global_payload([1, 9], REP, 3)}
    sim.algo.aggregate(uploads, 0)
    payload = sim.algo.server_payload(sim.clients[0], 1)
    assert payload["classes"].tolist() == [0, 1, 2, 9]  # class ids sent as uint8, the classes somebody uploaded
    by_class = {}
    for up in uploads.values():
        for c, p in zip(up["classes"].tolist(), up["protos"]):
            by_class.setdefault(c, []).append(p)
    for c, proto in zip(payload["classes"].tolist(), payload["protos"]):
        torch.testing.assert_close(proto, torch.stack(by_class[c]).mean(0))  # unweighted: n_k plays no part
    sim.algo.aggregate({2: global_payload([4, 5], REP, 4)}, 1)  # a new round forgets the previous uploads
    assert sim.algo.server_payload(sim.clients[0], 2)["classes"].tolist() == [4, 5]


def test_prototype_inference_is_the_nearest_global_prototype_and_is_broadcast(tiny):
    sim = make_sim(participation=0.4, hp={"inference": "prototype"})
    metrics = sim.run_round(0)
    held = sim.algo.held
    down = int(held.sum()) * (4 * REP + 1)
    assert metrics["bytes_down"] == 5 * down  # after aggregation, to every client; nothing before (round 0)
    assert sim.algo.server_payload(sim.clients[0], 1) == {}  # the broadcast already delivered the round's prototypes
    for client in sim.clients:
        assert torch.equal(client.state["protos"][held], sim.algo.protos[held])
        idx = client.split.test
        x, y = sim.ctx.data.normalise(sim.ctx.data.x_test[idx]), sim.ctx.data.y_test[idx]
        h = features(snapshot(client.state["model"]), x, "eval")
        classes = torch.nonzero(held).flatten()
        d = ((h.unsqueeze(1) - sim.algo.protos[classes].unsqueeze(0)) ** 2).sum(2)
        expected = classes[d.argmin(1)]
        assert sim.test_evals[client.id].correct == int((expected == y).sum())


def test_nearest_prototype_logits_rank_absent_classes_last():
    h = torch.tensor([[0.0, 0.0], [3.0, 3.0]])
    protos = torch.tensor([[9.0, 9.0], [1.0, 0.0], [3.0, 2.0]])
    held = torch.tensor([False, True, True])
    z = nearest_prototype_logits(h, protos, held)
    assert z.argmax(1).tolist() == [1, 2] and torch.isfinite(z).all()
    assert (z[:, 0] < z[:, 1:].min(1).values).all()


# ---- costs, groups, options ------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_classes, cpc", [(10, 2), (100, 20)])
def test_bytes_per_client_and_round_match_a_hand_count_on_the_five_cnns(num_classes, cpc):
    sim = make_sim(num_classes=num_classes, classes_per_client=cpc, per_class=1, batch_size=64)
    assert sim.ctx.client_archs == ["cnn1", "cnn2", "cnn3", "cnn4", "cnn5"]
    first = sim.run_round(0)
    per_class = 4 * 500 + 1  # a float32 500-d prototype and its uint8 class id
    for cid in range(5):
        assert sim.bytes_down[cid] == 0 and sim.bytes_up[cid] == cpc * per_class
    assert first["bytes_up_per_client"] == cpc * per_class
    held = int(sim.algo.held.sum())
    assert held == min(num_classes, 5 * cpc)
    second = sim.run_round(1)
    assert second["bytes_down_per_client"] == held * per_class and second["bytes_up_per_client"] == cpc * per_class


def test_torchvision_group_runs_with_a_common_prototype_size():
    settings = dict(model_group="tv-hetero", num_clients=3, per_class=1, batch_size=64)
    with pytest.raises(UserError, match=r"needs one representation size across clients, got \[512, 1280\]; set "
                                        r"fedproto.proto_dim"):
        make_sim(**settings)
    sim = make_sim(hp={"proto_dim": 32, "inference": "prototype"}, **settings)
    metrics = sim.run_round(0)
    assert metrics["bytes_up_per_client"] == 2 * (4 * 32 + 1)
    assert 0.0 <= metrics["acc_mean"] <= 1.0


def test_profiles_select_the_reference_options():
    assert FedProto.make_hparams() == FedProto.Hyperparams(lam=1.0, prototypes="after", inference="model", proto_dim=0)
    official = make_sim(profile="official").algo.hp
    assert (official.lam, official.prototypes, official.inference) == (1.0, "last-epoch", "model")
    htfllib = make_sim(profile="htfllib").algo
    assert (htfllib.hp.lam, htfllib.hp.prototypes, htfllib.hp.inference) == (10.0, "all-epochs", "prototype")
    assert htfllib.broadcast_after_aggregation and htfllib.prediction_uses_server_state


@pytest.mark.parametrize("key, value, message", [
    ("lam", -1.0, "fedproto.lam must be >= 0, got -1.0"),
    ("prototypes", "mean", "fedproto.prototypes must be one of after, all-epochs, last-epoch, got 'mean'"),
    ("inference", "both", "fedproto.inference must be one of model, prototype, got 'both'"),
    ("proto_dim", -3, "fedproto.proto_dim must be >= 0 (0 = the models' representation size), got -3"),
])
def test_bad_values_are_one_line_user_errors(key, value, message):
    with pytest.raises(UserError) as err:
        FedProto.make_hparams({key: value})
    assert str(err.value) == message


def test_cli_refuses_a_bad_value_in_one_line(monkeypatch, capsys, tmp_path):
    code, _, err = bench_main(monkeypatch, capsys, "run", "--algo", "fedproto", "--dataset", "synthetic",
                              "--set", "fedproto.lam=-1", "--output-dir", str(tmp_path))
    assert code == 2 and err.strip().splitlines() == ["error: fedproto.lam must be >= 0, got -1.0"]
