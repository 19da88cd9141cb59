"""FML: the private model and the meme train together, each on exactly its own mutual-learning loss
(checked against losses written out by hand); the meme comes from the download and goes back up after
training; the server's meme is the n_k-weighted (or uniform) mean; prediction and evaluation use the
trained private model; only the meme travels (SPEC bytes). Options: HtFLlib's undetached teachers and
mean-reduced KL, the profiles."""
from __future__ import annotations

import pytest
import torch

from algorithms.base import state_payload
from algorithms.fml import FML, mutual_losses
from bench.errors import UserError
from models.cnn import CNN
from tests.conftest import client_update, make_hand_simulation, make_simulation

pytestmark = pytest.mark.usefixtures("one_thread")
MEME_PARAMS = {("cnn5", 10): 670_058, ("cnn5", 100): 715_148, ("cnn1", 10): 2_621_558, ("cnn1", 100): 2_666_648}


def make_sim(**kwargs):
    return make_hand_simulation("fml", **kwargs)


def params_of(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


# ---- the losses, written out by hand ----------------------------------------------------------------------
def log_softmax(z):
    return z - z.logsumexp(1, keepdim=True)


def ce(z, y):
    return -log_softmax(z)[torch.arange(len(y)), y].mean()


def kl(teacher, student):
    """KL(softmax(teacher) || softmax(student)), summed over classes, mean over the batch (batchmean)."""
    t = log_softmax(teacher)
    return (t.exp() * (t - log_softmax(student))).sum(1).mean()


def hand_losses(p, m, y, alpha, beta, detach=True, classes_mean=False):
    scale = 1 / p.shape[1] if classes_mean else 1.0  # nn.KLDivLoss() "mean": over batch x classes
    tm, tp = (m.detach(), p.detach()) if detach else (m, p)
    loss_p = alpha * ce(p, y) + (1 - alpha) * scale * kl(tm, p)
    loss_m = beta * ce(m, y) + (1 - beta) * scale * kl(tp, m)
    return loss_p, loss_m


def clipped(grads, max_norm):
    """Gradient-norm clipping of one group, as torch's clip_grad_norm_ does it."""
    if max_norm <= 0:
        return grads
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return [g * torch.clamp(max_norm / (norm + 1e-6), max=1.0) for g in grads]


def test_mutual_losses_formula():
    torch.manual_seed(1)
    p, m, y = torch.randn(5, 4), torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    for detach, reduction in ((True, "batchmean"), (False, "mean")):
        got = mutual_losses(p, m, y, 0.3, 0.8, detach, reduction)
        want = hand_losses(p, m, y, 0.3, 0.8, detach, classes_mean=reduction == "mean")
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


def test_mutual_losses_send_each_gradient_to_its_own_model():
    torch.manual_seed(0)
    private, meme = CNN("cnn3", 10), CNN("cnn5", 10)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    private.zero_grad(set_to_none=True)
    meme.zero_grad(set_to_none=True)
    loss_p, loss_m = mutual_losses(private(x), meme(x), y, 0.5, 0.5)
    loss_p.backward()
    assert all(p.grad is None for p in meme.parameters())  # L_P sends nothing into M
    loss_m.backward()
    assert all(p.grad is not None for p in private.parameters())


# ---- one local step, against the hand-written losses ------------------------------------------------------
def replay_batch(sim, client, generator_state):
    (x, y), = list(sim.ctx.data.train_batches(client.split.train, sim.cfg.batch_size,
                                              torch.Generator().set_state(generator_state)))
    return x, y


@pytest.mark.parametrize("clip, hp", [
    (0.0, {"alpha": 0.3, "beta": 0.8}),
    (0.05, {"alpha": 0.3, "beta": 0.8}),           # each model clipped on its own gradient norm
    (0.0, {"alpha": 0.4, "beta": 0.7, "detach_teacher": False}),
    (0.0, {"alpha": 0.4, "beta": 0.7, "kl_reduction": "mean"}),
])
def test_one_step_moves_both_models_each_by_its_own_loss(clip, hp):
    # One batch per epoch (batch >= n_k): SGD's first step is w - lr * (clipped grad + wd * w).
    sim = make_sim(batch_size=64, grad_clip=clip, lr=0.05, hp=hp)
    algo, client = sim.algo, sim.clients[0]  # CNN-1 private, CNN-5 meme
    # The download differs from everything the algorithm holds: the client must train from it.
    payload = {k: v + 0.01 * torch.randn_like(v) for k, v in algo.server_payload(client, 0).items()}
    private = client.state["model"]
    p_before, global_before = params_of(private), params_of(algo.global_meme)
    gen_state = sim.ctx.client_generator(client.id, 0).get_state()
    upload, _ = client_update(sim, client, payload, 0)

    ref_p, ref_m = CNN("cnn1", 10), CNN("cnn5", 10)
    ref_p.load_state_dict(p_before)
    ref_m.load_state_dict(payload)
    x, y = replay_batch(sim, client, gen_state)
    p, m = ref_p(x), ref_m(x)
    loss_p, loss_m = hand_losses(p, m, y, hp["alpha"], hp["beta"], hp.get("detach_teacher", True),
                                 hp.get("kl_reduction") == "mean")
    if hp.get("detach_teacher", True):
        gp = torch.autograd.grad(loss_p, list(ref_p.parameters()), retain_graph=True)
        gm = torch.autograd.grad(loss_m, list(ref_m.parameters()))
    else:  # HtFLlib: both backward passes accumulate into both models
        params = list(ref_p.parameters()) + list(ref_m.parameters())
        grads = torch.autograd.grad(loss_p + loss_m, params)
        gp, gm = grads[:len(p_before)], grads[len(p_before):]
    gp, gm = clipped(gp, clip), clipped(gm, clip)
    lr, wd = sim.cfg.lr, sim.cfg.weight_decay
    for (name, after), g in zip(private.named_parameters(), gp):
        torch.testing.assert_close(after.detach(), p_before[name] - lr * (g + wd * p_before[name]),
                                   rtol=1e-4, atol=1e-6)
    for (name, start), g in zip(ref_m.named_parameters(), gm):  # the upload is the trained meme
        torch.testing.assert_close(upload[name], start.detach() - lr * (g + wd * start.detach()),
                                   rtol=1e-4, atol=1e-6)
    for name, before in global_before.items():  # the server's meme is untouched by local training
        assert torch.equal(dict(algo.global_meme.named_parameters())[name].detach(), before)


def test_undetached_teachers_differ_from_the_spec_step():
    # The HtFLlib option really changes the private model's update (it also gets dL_M/dP).
    moved = []
    for detach in (True, False):
        sim = make_sim(batch_size=64, lr=0.05, hp={"alpha": 0.4, "beta": 0.7, "detach_teacher": detach})
        client = sim.clients[0]
        client_update(sim, client, sim.algo.server_payload(client, 0), 0)
        moved.append(params_of(client.state["model"]))
    assert not torch.allclose(moved[0]["header.weight"], moved[1]["header.weight"], rtol=0, atol=1e-7)


# ---- the server ---------------------------------------------------------------------------------------------
def captured_round(sim):
    captured = {}
    aggregate = sim.algo.aggregate
    sim.algo.aggregate = lambda uploads, r: (captured.update(uploads), aggregate(uploads, r))
    sim.run_round(0)
    return captured


@pytest.mark.parametrize("aggregation", ["samples", "uniform"])
def test_server_meme_is_the_weighted_mean_of_the_uploads(aggregation):
    sim = make_sim(hp={"aggregation": aggregation})
    captured = captured_round(sim)
    n = {cid: float(len(sim.clients[cid].split.train)) for cid in captured}
    assert len(captured) == 5 and len(set(n.values())) == 5  # n_k all differ
    weights = n if aggregation == "samples" else {cid: 1.0 for cid in captured}
    other = {cid: 1.0 for cid in captured} if aggregation == "samples" else n
    glob = state_payload(sim.algo.global_meme)
    for name, tensor in glob.items():
        want = sum(weights[c] * captured[c][name].double() for c in captured) / sum(weights.values())
        torch.testing.assert_close(tensor.double(), want, rtol=1e-5, atol=1e-6)
        if name.endswith("weight"):
            wrong = sum(other[c] * captured[c][name].double() for c in captured) / sum(other.values())
            assert not torch.allclose(tensor.double(), wrong, rtol=1e-7, atol=1e-9)
    # Next round every client starts from that meme.
    down = sim.algo.server_payload(sim.clients[3], 1)
    for name, tensor in glob.items():
        assert torch.equal(down[name], tensor)


def test_upload_is_not_changed_by_the_next_client_training_the_same_meme():
    """The upload is a copy: the simulator transmits it after the update, and with clients in parallel threads
    another client may by then be training the working meme it came from."""
    sim = make_sim(lr=0.05)
    first, second = sim.clients[0], sim.clients[1]
    upload, _ = client_update(sim, first, sim.algo.server_payload(first, 0), 0)
    kept = {name: tensor.clone() for name, tensor in upload.items()}
    client_update(sim, second, sim.algo.server_payload(second, 0), 0)
    assert len(sim.algo.spare_memes) == 1  # one after the other: the second client trained the same meme
    trained = state_payload(sim.algo.spare_memes[0])
    assert not torch.equal(trained["header.weight"], kept["header.weight"])
    for name, tensor in kept.items():
        assert torch.equal(upload[name], tensor), name


def run_rounds(**overrides) -> tuple:
    sim = make_sim(threads=1, **overrides)
    history = [sim.initial_metrics()] + [sim.run_round(r) for r in range(2)]
    for metrics in history:
        metrics.pop("round_time"), metrics.pop("cum_round_time")
    return sim, history, torch.get_rng_state()  # Simulation seeds torch's global RNG: its draws since then


@pytest.mark.parametrize("lever", [{"parallel_clients": 2}, {"batched_training": True}])
def test_parallel_and_batched_clients_give_the_sequential_run_bitwise(lever):
    """Each client update takes its own working meme (a copy of the global one when none is spare): clients in
    threads or in lockstep compute bitwise what one client after the other does (in lockstep a shared meme
    would be trained by every client in turn, each starting from the previous one's)."""
    seq, seq_history, seq_rng = run_rounds(parallel_clients=1)
    other, other_history, other_rng = run_rounds(**lever)
    assert torch.equal(other_rng, seq_rng)  # extra memes are copies: building one would draw from the RNG
    assert len(seq.algo.spare_memes) == 1  # one after the other: one meme for every client
    if "parallel_clients" in lever:
        assert other.pool.workers == 2 and 1 <= len(other.algo.spare_memes) <= 2
    else:
        assert len(other.algo.spare_memes) == 5  # all five sampled clients at once
    assert other_history == seq_history
    for a, b in zip(seq.clients, other.clients):
        for name, tensor in params_of(a.state["model"]).items():
            assert torch.equal(params_of(b.state["model"])[name], tensor), (a.id, name)
    for name, tensor in state_payload(seq.algo.global_meme).items():
        assert torch.equal(state_payload(other.algo.global_meme)[name], tensor), name


def test_checkpoint_holds_the_global_meme_only():
    sim = make_sim()
    sim.run_round(0)
    assert set(sim.algo.state_dict()) == {"global_meme"}


def test_profiles_select_the_reference_options():
    assert make_simulation("fml").algo.hp.aggregation == "samples"
    official = make_simulation("fml", profile="official").algo.hp
    assert (official.aggregation, official.detach_teacher, official.kl_reduction) == ("uniform", True, "batchmean")
    htfllib = make_simulation("fml", profile="htfllib").algo.hp
    assert (htfllib.aggregation, htfllib.detach_teacher, htfllib.kl_reduction) == ("uniform", False, "mean")
    assert (htfllib.alpha, htfllib.beta) == (0.5, 0.5)  # HtFLlib's run script passes -al 0.5 -bt 0.5


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


# ---- prediction and evaluation --------------------------------------------------------------------------
def hand_eval(sim, client) -> tuple[int, float]:
    """(hits, summed CE) of the private model on the client's test set."""
    data = sim.ctx.data
    idx = client.split.test
    with torch.no_grad():
        z, y = client.state["model"](data.normalise(data.x_test[idx])), data.y_test[idx]
    return int((z.argmax(1) == y).sum()), float(-log_softmax(z)[torch.arange(len(y)), y].sum())


def test_evaluation_is_the_trained_private_model_after_the_round():
    sim = make_sim(per_class=4, lr=0.05, local_epochs=2)
    sim.initial_metrics()
    before = {c.id: params_of(c.state["model"]) for c in sim.clients}
    metrics = sim.run_round(0)
    correct = total = 0
    for c in sim.clients:
        assert not torch.equal(before[c.id]["header.weight"], c.state["model"].header.weight)  # P trained
        right, nll = hand_eval(sim, c)
        assert sim.test_evals[c.id].correct == right
        assert sim.test_evals[c.id].loss == pytest.approx(nll, rel=1e-5)  # few test samples: hits alone are weak
        correct, total = correct + right, total + len(c.split.test)
    assert metrics["acc_mean"] == pytest.approx(correct / total)


def test_prediction_is_the_private_model_only():
    sim = make_sim()
    sim.run_round(0)
    client = sim.clients[2]
    x = sim.ctx.data.normalise(sim.ctx.data.x_test[:8])
    with torch.no_grad():
        before = sim.algo.predict(client, x)
        torch.testing.assert_close(before, client.state["model"](x))
        for meme in (sim.algo.global_meme, *sim.algo.spare_memes):
            for p in meme.parameters():
                p.add_(1.0)
        torch.testing.assert_close(sim.algo.predict(client, x), before)
    assert set(client.state) == {"model"}


@pytest.mark.parametrize("overrides", [{"alpha": 1.5}, {"beta": -0.1}, {"meme_arch": "cnn9"},
                                       {"aggregation": "median"}, {"kl_reduction": "sum"},
                                       {"detach_teacher": "yes"}])
def test_bad_hyperparameters_are_user_errors(overrides):
    with pytest.raises(UserError):
        FML.make_hparams(overrides)


def test_defaults_are_spec():
    hp = FML.make_hparams()
    assert (hp.alpha, hp.beta, hp.meme_arch, hp.aggregation, hp.detach_teacher, hp.kl_reduction) == \
        (0.5, 0.5, "cnn5", "samples", True, "batchmean")
