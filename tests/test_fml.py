"""FML: the private model and the meme train together, each on exactly its own mutual-learning loss; the
server's meme is the n_k-weighted mean of the uploaded memes; only the meme travels (SPEC bytes)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from algorithms.base import state_payload
from algorithms.fml import FML, mutual_losses
from bench.config import RunConfig
from bench.errors import UserError
from bench.runner import client_splits
from bench.simulator import Simulation
from tests.conftest import hand_dataset as dataset, make_hand_simulation
from models.cnn import CNN

CPU = torch.device("cpu")
MEME_PARAMS = {("cnn5", 10): 670_058, ("cnn5", 100): 715_148, ("cnn1", 10): 2_621_558, ("cnn1", 100): 2_666_648}


def make_sim(**kwargs) -> Simulation:
    return make_hand_simulation("fml", **kwargs)


def params_of(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def test_mutual_losses_send_each_gradient_to_its_own_model():
    torch.manual_seed(0)
    private, meme = CNN("cnn3", 10), CNN("cnn5", 10)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))

    def grads(which):
        private.zero_grad(set_to_none=True)
        meme.zero_grad(set_to_none=True)
        loss_p, loss_m = mutual_losses(private(x), meme(x), y, 0.5, 0.5)
        {"p": loss_p, "m": loss_m, "sum": loss_p + loss_m}[which].backward()
        return ({k: p.grad for k, p in private.named_parameters()},
                {k: p.grad for k, p in meme.named_parameters()})

    gp_p, gm_p = grads("p")
    assert all(g is None for g in gm_p.values())  # L_P sends nothing into M
    assert all(g is not None and g.abs().sum() > 0 for g in gp_p.values())
    gp_m, gm_m = grads("m")
    assert all(g is None for g in gp_m.values())  # L_M sends nothing into P
    gp_s, gm_s = grads("sum")
    for k in gp_s:
        torch.testing.assert_close(gp_s[k], gp_p[k])
    for k in gm_s:
        torch.testing.assert_close(gm_s[k], gm_m[k])


def test_mutual_losses_formula():
    torch.manual_seed(1)
    p, m, y = torch.randn(5, 4), torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    loss_p, loss_m = mutual_losses(p, m, y, 0.3, 0.8)

    def kl(teacher, student):  # KL(softmax(teacher) || softmax(student)), mean over the batch
        q = F.softmax(teacher, 1)
        return (q * (q.log() - F.log_softmax(student, 1))).sum(1).mean()

    torch.testing.assert_close(loss_p, 0.3 * F.cross_entropy(p, y) + 0.7 * kl(m, p))
    torch.testing.assert_close(loss_m, 0.8 * F.cross_entropy(m, y) + 0.2 * kl(p, m))


def clipped(grads, max_norm):
    """Gradient-norm clipping of one group, as torch's clip_grad_norm_ does it."""
    if max_norm <= 0:
        return grads
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return [g * torch.clamp(max_norm / (norm + 1e-6), max=1.0) for g in grads]


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_one_step_moves_both_models_each_by_its_own_loss(clip):
    # One batch per epoch (batch >= n_k): SGD's first step is w - lr * (clipped grad + wd * w). With clip > 0
    # each model is clipped on its own gradient norm (its own optimizer and clipping).
    sim = make_sim(batch_size=64, grad_clip=clip, lr=0.05, hp={"alpha": 0.3, "beta": 0.7})
    algo, client = sim.algo, sim.clients[0]  # CNN-1 private, CNN-5 meme
    payload = algo.server_payload(client, 0)
    private = client.state["model"]
    p_before = params_of(private)
    m_before = params_of(algo.global_meme)
    gen_state = sim.ctx.generator.get_state()
    upload = algo.client_update(client, payload, 0)

    # Reference gradients on copies of the starting models, same augmented batch.
    ref_p, ref_m = CNN("cnn1", 10), CNN("cnn5", 10)
    ref_p.load_state_dict(p_before)
    ref_m.load_state_dict(m_before)
    gen = torch.Generator().set_state(gen_state)
    (x, y), = list(sim.ctx.data.train_batches(client.split.train, 64, gen))
    loss_p, loss_m = mutual_losses(ref_p(x), ref_m(x), y, 0.3, 0.7)
    gp = clipped(torch.autograd.grad(loss_p, list(ref_p.parameters())), clip)
    gm = clipped(torch.autograd.grad(loss_m, list(ref_m.parameters())), clip)
    lr, wd = sim.cfg.lr, sim.cfg.weight_decay
    for (name, after), g in zip(private.named_parameters(), gp):
        assert not torch.equal(after, p_before[name])
        torch.testing.assert_close(after.detach(), p_before[name] - lr * (g + wd * p_before[name]),
                                   rtol=1e-4, atol=1e-6)
    for (name, before), g in zip(m_before.items(), gm):
        assert not torch.equal(upload[name], before)
        torch.testing.assert_close(upload[name], before - lr * (g + wd * before), rtol=1e-4, atol=1e-6)
    # The global meme is untouched by local training.
    for name, before in m_before.items():
        assert torch.equal(dict(algo.global_meme.named_parameters())[name].detach(), before)


def test_server_meme_is_the_sample_weighted_mean_of_the_uploads():
    sim = make_sim()
    captured = {}
    aggregate = sim.algo.aggregate
    sim.algo.aggregate = lambda uploads, r: (captured.update(uploads), aggregate(uploads, r))
    sim.run_round(0)
    weights = {cid: sim.ctx.client_weights[cid] for cid in captured}
    assert len(captured) == 5 and len(set(weights.values())) == 5  # n_k all differ
    total = sum(weights.values())
    glob = state_payload(sim.algo.global_meme)
    for name, tensor in glob.items():
        want = sum(weights[cid] / total * captured[cid][name].double() for cid in captured)
        torch.testing.assert_close(tensor.double(), want, rtol=1e-5, atol=1e-6)
        unweighted = sum(captured[cid][name].double() for cid in captured) / len(captured)
        if name.endswith("weight"):
            assert not torch.allclose(tensor.double(), unweighted, rtol=1e-7, atol=1e-9)
    # Next round every client starts from that meme.
    down = sim.algo.server_payload(sim.clients[3], 1)
    for name, tensor in glob.items():
        assert torch.equal(down[name], tensor)


@pytest.mark.parametrize("num_classes, meme_arch", [(10, "cnn5"), (100, "cnn5"), (10, "cnn1")])
def test_only_the_meme_travels(num_classes, meme_arch):
    cpc = 2 if num_classes == 10 else 20
    sim = make_sim(num_classes=num_classes, classes_per_client=cpc, per_class=1, batch_size=64,
                   hp={"meme_arch": meme_arch})
    assert sim.ctx.client_archs == ["cnn1", "cnn2", "cnn3", "cnn4", "cnn5"]
    assert sum(p.numel() for p in sim.algo.global_meme.parameters()) == MEME_PARAMS[meme_arch, num_classes]
    metrics = sim.run_round(0)
    expected = 4 * MEME_PARAMS[meme_arch, num_classes]
    for cid in range(5):  # the same for every private architecture
        assert sim.bytes_up[cid] == sim.bytes_down[cid] == expected
    assert metrics["bytes_up_per_client"] == metrics["bytes_down_per_client"] == expected


def test_prediction_is_the_private_model_only():
    cfg = RunConfig(dataset="synthetic", num_clients=5, rounds=2, batch_size=32, classes_per_client=2,
                    eval_batch_size=256, device="cpu", algorithms=["fml"])
    ds, data = dataset(10)
    sim = Simulation(cfg, FML, 0, data, client_splits(cfg, ds, 0, CPU), CPU)
    sim.initial_metrics()
    for r in range(2):
        metrics = sim.run_round(r)
        assert math.isfinite(metrics["train_loss"])
    assert 0.0 <= metrics["acc_mean"] <= 1.0
    client = sim.clients[2]
    x = data.normalise(data.x_test[:8])
    before = sim.algo.predict(client, x)
    with torch.no_grad():
        for p in sim.algo.global_meme.parameters():
            p.add_(1.0)
        for p in sim.algo.work_meme.parameters():
            p.add_(1.0)
        torch.testing.assert_close(sim.algo.predict(client, x), before)
        torch.testing.assert_close(before, client.state["model"](x))
    assert set(client.state) == {"model"}


@pytest.mark.parametrize("overrides", [{"alpha": 1.5}, {"beta": -0.1}, {"meme_arch": "cnn9"}])
def test_bad_hyperparameters_are_user_errors(overrides):
    with pytest.raises(UserError):
        FML.make_hparams(overrides)


def test_defaults_are_spec():
    hp = FML.make_hparams()
    assert (hp.alpha, hp.beta, hp.meme_arch) == (0.5, 0.5, "cnn5")
