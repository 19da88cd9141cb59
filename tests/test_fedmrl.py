"""FedMRL: one local step against the Matryoshka loss written out by hand (fused representation, coarse slice to
the small header, full one to the local header, each module clipped on its own); exactly the homogeneous
small model (or, with share="extractor", its extractor) travels, the local model and projector never do; the
server's n_k-weighted mean; the prediction; bytes by hand on the 5-CNN group (10 and 100 classes); the
torchvision group; bad values."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from algorithms.base import state_payload
from algorithms.fedmrl import FedMRL
from bench.errors import UserError
from bench.testing import check_algorithm
from tests.conftest import bench_main, client_update, make_hand_simulation
from tests.handcalc import clipped, record_train_batches

pytestmark = pytest.mark.usefixtures("one_thread")


def make_sim(**kwargs):
    return make_hand_simulation("fedmrl", **kwargs)


def params_of(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def small_params(d1: int, k: int, extractor_only: bool = False) -> int:
    """The small model by hand: CNN-5's conv1, conv2, fc1 (800 -> 500), then fc2 500 -> d1, header d1 -> k."""
    extractor = (3 * 16 * 25 + 16) + (16 * 32 * 25 + 32) + (800 * 500 + 500) + (500 * d1 + d1)
    return extractor if extractor_only else extractor + d1 * k + k


def test_conformance():
    check_algorithm(FedMRL)
    check_algorithm(FedMRL, profile="htfllib", hparams={"share": "extractor"})


def hand_loss(model, small, proj, fp, sp, pp, x, y, d1, m1, m2):
    """m1 CE(G_hd(r[:, :d1])) + m2 CE(F_hd(r)), r = P([G_ex(x), F_ex(x)]), through the given parameters."""
    def sub(params, prefix):
        return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}

    g = functional_call(small.extractor, sub(sp, "extractor."), (x,))
    f = functional_call(model.extractor, sub(fp, "extractor."), (x,))
    r = torch.cat([g, f], 1) @ pp["weight"].T + pp["bias"]
    coarse = r[:, :d1] @ sp["header.weight"].T + sp["header.bias"]
    full = r @ fp["header.weight"].T + fp["header.bias"]
    return m1 * F.cross_entropy(coarse, y) + m2 * F.cross_entropy(full, y)


@pytest.mark.parametrize("clip, hp", [(0.0, {}), (0.05, {"m1": 0.3, "m2": 1.7, "homo_rep_dim": 40})])
def test_one_step_descends_the_matryoshka_loss_with_each_module_clipped_on_its_own(monkeypatch, clip, hp):
    sim = make_sim(batch_size=64, lr=0.05, grad_clip=clip, hp=hp)  # one batch: one step
    algo, client = sim.algo, sim.clients[2]  # CNN-3
    payload = {k: v + 0.01 * torch.randn_like(v) for k, v in algo.server_payload(client, 0).items()}
    model, small, proj = (client.state[k] for k in ("model", "small", "projector"))
    fp, pp = params_of(model), params_of(proj)
    sp = {k: payload[k] for k in params_of(small)}  # the download replaces the client's small model
    calls = record_train_batches(monkeypatch, sim.ctx.data)
    upload, _ = client_update(sim, client, payload, 0)
    (x, y), = calls[0]
    leaves = [{k: v.clone().requires_grad_() for k, v in p.items()} for p in (fp, sp, pp)]
    loss = hand_loss(model, small, proj, *leaves, x, y, algo.hp.homo_rep_dim, algo.hp.m1, algo.hp.m2)
    grads = torch.autograd.grad(loss, [v for p in leaves for v in p.values()])
    lr, wd = sim.cfg.lr, sim.cfg.weight_decay
    start = 0
    for before, after in ((fp, params_of(model)), (sp, upload), (pp, params_of(proj))):
        group = clipped(grads[start:start + len(before)], clip)
        start += len(before)
        for (name, value), grad in zip(before.items(), group):
            torch.testing.assert_close(after[name], value - lr * (grad + wd * value), rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("share", ["model", "extractor"])
def test_exactly_the_homogeneous_part_travels_and_is_averaged_by_n_k(share):
    sim = make_sim(batch_size=64, hp={"share": share})
    small = sim.algo.global_small
    part = small if share == "model" else small.extractor
    down = sim.algo.server_payload(sim.clients[0], 0)
    assert list(down) == list(part.state_dict())  # the federated part, nothing else
    uploads = {}
    original = sim.algo.client_update

    def spy(client, payload, round_index):
        up = yield from original(client, payload, round_index)
        uploads[client.id] = {k: v.clone() for k, v in up.items()}
        return up

    sim.algo.client_update = spy
    private = {c.id: (params_of(c.state["model"]), params_of(c.state["projector"]), params_of(c.state["small"].header))
               for c in sim.clients}
    sim.run_round(0)
    for cid, up in uploads.items():
        client_part = sim.clients[cid].state["small"] if share == "model" else sim.clients[cid].state["small"].extractor
        assert all(torch.equal(up[k], v) for k, v in state_payload(client_part).items())  # its trained copy
    n = {cid: float(sim.clients[cid].num_train) for cid in uploads}
    assert len(set(n.values())) == len(n)
    for name, tensor in state_payload(part).items():
        want = sum(n[c] * uploads[c][name].double() for c in uploads) / sum(n.values())
        torch.testing.assert_close(tensor.double(), want, rtol=1e-5, atol=1e-6)
    if share == "extractor":  # the small header stays personal: trained locally, never replaced by an average
        headers = [params_of(sim.clients[c].state["small"].header)["weight"] for c in uploads]
        assert not torch.allclose(headers[0], headers[1])
        assert not torch.equal(headers[0], private[0][2]["weight"])


def test_prediction_is_the_local_header_on_the_fused_representation():
    sim = make_sim(batch_size=64)
    sim.run_round(0)
    client = sim.clients[3]
    model, small, proj = (client.state[k] for k in ("model", "small", "projector"))
    x, y = next(sim.ctx.data.eval_batches("test", client.split.test, 64))
    with torch.no_grad():
        r = proj(torch.cat([small.extractor(x), model.extractor(x)], 1))
        z = model.header(r)
        torch.testing.assert_close(sim.algo.predict(client, x), z)
    assert sim.test_evals[client.id].correct == int((z.argmax(1) == y).sum())
    assert sim.test_evals[client.id].loss == pytest.approx(float(F.cross_entropy(z, y, reduction="sum")), rel=1e-5)


def test_global_eval_extractor_gives_every_client_the_new_small_model():
    sim = make_sim(participation=0.4, batch_size=64, hp={"eval_extractor": "global"})
    first = sim.run_round(0)
    size = 4 * small_params(100, 10)
    assert first["bytes_down"] == 2 * size + 5 * size  # round 0's download to the two, then the broadcast to all
    glob = state_payload(sim.algo.global_small)
    for client in sim.clients:
        assert all(torch.equal(state_payload(client.state["small"])[k], v) for k, v in glob.items())
    assert len(sim.test_evals) == 5 and sim.algo.server_payload(sim.clients[0], 1) == {}


@pytest.mark.parametrize("num_classes, cpc", [(10, 2), (100, 20)])
@pytest.mark.parametrize("share", ["model", "extractor"])
def test_bytes_per_client_and_round_match_a_hand_count_on_the_five_cnns(num_classes, cpc, share):
    sim = make_sim(num_classes=num_classes, classes_per_client=cpc, per_class=1, batch_size=64, hp={"share": share})
    assert sim.ctx.client_archs == ["cnn1", "cnn2", "cnn3", "cnn4", "cnn5"]
    metrics = sim.run_round(0)
    expected = 4 * small_params(100, num_classes, extractor_only=share == "extractor")
    for cid in range(5):  # the same for every local architecture
        assert sim.bytes_up[cid] == sim.bytes_down[cid] == expected
    assert metrics["bytes_up_per_client"] == metrics["bytes_down_per_client"] == expected


def test_torchvision_group_runs():
    sim = make_sim(model_group="tv-hetero", num_clients=3, per_class=1, batch_size=64)
    assert [c.state["projector"].out_features for c in sim.clients] == [512, 512, 1280]
    metrics = sim.run_round(0)
    assert metrics["bytes_up_per_client"] == 4 * small_params(100, 10) and 0 <= metrics["acc_mean"] <= 1


def test_profiles_and_defaults():
    hp = FedMRL.make_hparams()
    assert (hp.homo_arch, hp.homo_rep_dim, hp.m1, hp.m2, hp.share, hp.aggregation, hp.eval_extractor) == \
        ("cnn5", 100, 1.0, 1.0, "model", "samples", "local")
    assert make_sim(profile="official").algo.hp.homo_rep_dim == 500
    htfllib = make_sim(profile="htfllib").algo
    assert (htfllib.hp.homo_rep_dim, htfllib.hp.aggregation, htfllib.hp.eval_extractor) == (128, "uniform", "global")
    assert htfllib.broadcast_after_aggregation and htfllib.prediction_uses_server_state


def test_coarse_representation_must_nest_in_every_clients_representation():
    with pytest.raises(UserError, match=r"fedmrl.homo_rep_dim must be <= every client's representation size "
                                        r"\(here 500\), got 600"):
        make_sim(hp={"homo_rep_dim": 600})


@pytest.mark.parametrize("key, value, message", [
    ("homo_arch", "resnet18", "fedmrl.homo_arch must be one of cnn1, cnn2, cnn3, cnn4, cnn5, got 'resnet18'"),
    ("homo_rep_dim", 0, "fedmrl.homo_rep_dim must be >= 1, got 0"),
    ("m1", -1.0, "fedmrl.m1 must be >= 0, got -1.0"),
    ("share", "header", "fedmrl.share must be one of model, extractor, got 'header'"),
    ("aggregation", "median", "fedmrl.aggregation must be one of samples, uniform, got 'median'"),
    ("eval_extractor", "server", "fedmrl.eval_extractor must be one of local, global, got 'server'"),
])
def test_bad_values_are_one_line_user_errors(key, value, message):
    with pytest.raises(UserError) as err:
        FedMRL.make_hparams({key: value})
    assert str(err.value) == message


def test_cli_refuses_a_bad_value_in_one_line(monkeypatch, capsys, tmp_path):
    code, _, err = bench_main(monkeypatch, capsys, "run", "--algo", "fedmrl", "--dataset", "synthetic",
                              "--set", "fedmrl.homo_rep_dim=0", "--output-dir", str(tmp_path))
    assert code == 2 and err.strip().splitlines() == ["error: fedmrl.homo_rep_dim must be >= 1, got 0"]
