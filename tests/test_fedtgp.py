"""FedTGP: the adaptive margin and the server's contrastive step, written out by hand; the trained global
prototypes change and keep the margin; every class's prototype goes down (bytes by hand on the 5-CNN group,
10 and 100 classes); clients train towards them as in FedProto; bad values."""
from __future__ import annotations

import pytest
import torch

from algorithms.fedtgp import FedTGP, adaptive_margin, euclidean
from bench.errors import UserError
from bench.testing import check_algorithm
from tests.conftest import bench_main, make_hand_simulation
from tests.handcalc import REP, cross_entropy, features, logits, snapshot, use_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny(monkeypatch):
    use_tiny(monkeypatch)


def make_sim(**kwargs):
    return make_hand_simulation("fedtgp", **kwargs)


def upload(classes, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return {"protos": torch.rand(len(classes), dim, generator=g) * 2,
            "classes": torch.tensor(classes, dtype=torch.uint8)}


UPLOADS = {0: upload([0, 1], REP, 1), 2: upload([1, 2], REP, 2), 3: upload([0, 2, 5], REP, 3)}


def pairs(uploads):
    protos = torch.cat([uploads[i]["protos"] for i in sorted(uploads)])
    return protos, torch.cat([uploads[i]["classes"].long() for i in sorted(uploads)])


def hand_margin(uploads, tau):
    """min over {max over classes c of min over other classes c' of |Q_c - Q_c'|, tau}, by loops."""
    protos, labels = pairs(uploads)
    q = {c: protos[labels == c].mean(0) for c in sorted(set(labels.tolist()))}
    if len(q) < 2:
        return tau
    gaps = [min(float(torch.sqrt(((q[c] - q[o]) ** 2).sum())) for o in q if o != c) for c in q]
    return min(max(gaps), tau)


def test_conformance():
    check_algorithm(FedTGP, hparams={"server_epochs": 3})
    check_algorithm(FedTGP, profile="official", hparams={"server_epochs": 3})


@pytest.mark.parametrize("tau", [100.0, 1.0])
def test_adaptive_margin_is_the_largest_class_gap_capped_at_tau(tau):
    protos, labels = pairs(UPLOADS)
    got = adaptive_margin(protos, labels, 10, tau)
    assert float(got) == pytest.approx(hand_margin(UPLOADS, tau), rel=1e-5)
    assert hand_margin(UPLOADS, 1e9) > 1.0  # guard: the cap acts at tau = 1
    one_class = {0: upload([4], REP, 5), 1: upload([4], REP, 6)}
    assert float(adaptive_margin(*pairs(one_class), 10, tau)) == tau


def tgp_forward(p):
    """TGP(c) for every class, by hand: fc(ReLU(hidden(E)))."""
    hidden = (p["embedding.weight"] @ p["hidden.weight"].T + p["hidden.bias"]).clamp_min(0)
    return hidden @ p["fc.weight"].T + p["fc.bias"]


def test_one_server_step_descends_the_margin_contrastive_loss_by_hand(tiny):
    sim = make_sim(hp={"server_epochs": 1, "server_batch_size": 0, "server_lr": 0.5, "margin_threshold": 3.0})
    tgp = sim.algo.tgp
    start = {k: v.detach().clone() for k, v in tgp.named_parameters()}
    sim.algo.aggregate(UPLOADS, 0)
    protos, labels = pairs(UPLOADS)
    delta = hand_margin(UPLOADS, 3.0)
    assert float(sim.algo.margin) == pytest.approx(delta, rel=1e-5)
    leaves = {k: v.clone().requires_grad_() for k, v in start.items()}
    g = tgp_forward(leaves)
    dist = torch.sqrt(((protos.unsqueeze(1) - g.unsqueeze(0)) ** 2).sum(2))
    dist = dist + delta * torch.nn.functional.one_hot(labels, 10)
    z = -dist
    loss = (torch.logsumexp(z, 1) - z[torch.arange(len(labels)), labels]).mean()
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    expected = {k: start[k] - 0.5 * grads[k] for k in start}  # plain SGD: no momentum, no clipping
    for k, v in tgp.named_parameters():
        torch.testing.assert_close(v.detach(), expected[k], rtol=1e-4, atol=1e-6, msg=k)
    torch.testing.assert_close(sim.algo.protos, tgp_forward(expected), rtol=1e-4, atol=1e-5)
    assert sim.algo.held.all()  # every class gets a trained global prototype


def clustered_uploads():
    """Three clients' prototypes of classes 0, 1, 2: noisy copies of well-separated class centres."""
    g = torch.Generator().manual_seed(7)
    centres = 4 * torch.eye(REP)[:3]
    out = {}
    for cid, classes in ((0, [0, 1]), (2, [1, 2]), (3, [0, 2])):
        protos = centres[classes] + 0.3 * torch.randn(len(classes), REP, generator=g)
        out[cid] = {"protos": protos, "classes": torch.tensor(classes, dtype=torch.uint8)}
    return out


def test_server_prototypes_change_and_keep_the_margin(tiny):
    uploads = clustered_uploads()
    sim = make_sim(hp={"margin_threshold": 1.0, "server_batch_size": 0, "server_epochs": 300, "server_lr": 0.2})
    before = sim.algo.tgp().detach().clone()
    sim.algo.aggregate(uploads, 0)
    g = sim.algo.protos
    assert not torch.allclose(g, before, atol=1e-3)
    delta = float(sim.algo.margin)
    assert delta == 1.0 and hand_margin(uploads, 1e9) > 4  # the cap tau = 1 sets the margin
    protos, labels = pairs(uploads)
    d = euclidean(protos, g)
    own = d[torch.arange(len(labels)), labels].clone()
    d[torch.arange(len(labels)), labels] = float("inf")
    assert (d.min(1).values - own >= delta).all()  # each uploaded prototype: its class's is nearer by the margin


@pytest.mark.parametrize("num_classes, cpc", [(10, 2), (100, 20)])
def test_bytes_per_client_and_round_match_a_hand_count_on_the_five_cnns(num_classes, cpc):
    sim = make_sim(num_classes=num_classes, classes_per_client=cpc, per_class=1, batch_size=64,
                   hp={"server_epochs": 2})
    assert sim.ctx.client_archs == ["cnn1", "cnn2", "cnn3", "cnn4", "cnn5"]
    first = sim.run_round(0)
    assert first["bytes_down"] == 0 and first["bytes_up_per_client"] == cpc * (4 * 500 + 1)
    second = sim.run_round(1)
    assert second["bytes_down_per_client"] == num_classes * 4 * 500  # every class's prototype, no ids
    assert second["bytes_up_per_client"] == cpc * (4 * 500 + 1)


def test_clients_train_towards_the_downloaded_trainable_prototypes(tiny):
    sim = make_sim(hp={"server_epochs": 2})
    sim.algo.aggregate(UPLOADS, 0)
    client = sim.clients[1]
    payload = sim.algo.server_payload(client, 1)
    assert list(payload) == ["protos"] and torch.equal(payload["protos"], sim.algo.protos)
    targets, held = sim.algo.targets(client, payload)
    assert torch.equal(targets, sim.algo.protos) and held.all()
    phase = next(sim.algo.client_update(client, payload, 1))
    assert phase.name == "local-proto"
    x, y = next(sim.ctx.data.eval_batches("train", client.split.train, 64))
    p = snapshot(client.state["model"])
    with torch.no_grad():
        h = features(p, x, "train")
        expected = cross_entropy(logits(p, x, "train"), y) + 10.0 * ((h - sim.algo.protos[y]) ** 2).mean()
        torch.testing.assert_close(phase.loss(x, y), expected, rtol=1e-5, atol=1e-6)


def test_profiles_and_defaults():
    hp = FedTGP.make_hparams()
    assert (hp.lam, hp.margin_threshold, hp.server_epochs, hp.server_lr, hp.server_batch_size) == (10.0, 100.0, 100,
                                                                                                  0.01, -1)
    assert (hp.prototypes, hp.inference) == ("after", "model")
    for profile in ("official", "htfllib"):
        algo = make_sim(profile=profile).algo
        assert algo.hp.inference == "prototype" and algo.broadcast_after_aggregation


@pytest.mark.parametrize("key, value, message", [
    ("margin_threshold", -1.0, "fedtgp.margin_threshold must be >= 0, got -1.0"),
    ("server_epochs", 0, "fedtgp.server_epochs must be >= 1, got 0"),
    ("server_lr", 0.0, "fedtgp.server_lr must be > 0, got 0.0"),
    ("server_batch_size", -2, "fedtgp.server_batch_size must be >= -1 (-1 = the run's batch_size, 0 = all pairs), "
                              "got -2"),
    ("lam", -0.5, "fedtgp.lam must be >= 0, got -0.5"),
])
def test_bad_values_are_one_line_user_errors(key, value, message):
    with pytest.raises(UserError) as err:
        FedTGP.make_hparams({key: value})
    assert str(err.value) == message


def test_cli_refuses_a_bad_value_in_one_line(monkeypatch, capsys, tmp_path):
    code, _, err = bench_main(monkeypatch, capsys, "run", "--algo", "fedtgp", "--dataset", "synthetic",
                              "--set", "fedtgp.server_epochs=0", "--output-dir", str(tmp_path))
    assert code == 2 and err.strip().splitlines() == ["error: fedtgp.server_epochs must be >= 1, got 0"]
