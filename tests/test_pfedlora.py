"""pFedLoRA mechanism tests. Every expected value is computed here, independently: the adapter's forward pass
written out with plain torch ops, F_k through its parameters (torch.func.functional_call), and the SGD steps
(clipping, weight decay, momentum) done by hand on copies of the parameters. Rounds use one full batch per
epoch and no augmentation, so a round is a known, short sequence of steps."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from bench.errors import UserError
from tests.conftest import make_simulation

pytestmark = pytest.mark.usefixtures("one_thread")

FULL = 100_000  # a batch size above every client's n_k: one full batch per epoch
# lr 0.05 and clipping at 2 make the steps large and the clipping active in some phases.
SGD = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, grad_clip=2.0)


# ---- the hand computation ---------------------------------------------------------------------------

def params_of(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def adapter_out(a: dict, inp: torch.Tensor, placement: str) -> torch.Tensor:
    """G by hand: the CNN-5 conv part, then A (bias), then B (bias); header-lora: B A h without biases."""
    if placement == "header-lora":
        return inp @ a["A.weight"].T @ a["B.weight"].T
    h = F.max_pool2d(F.relu(F.conv2d(inp, a["trunk.0.weight"], a["trunk.0.bias"])), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, a["trunk.3.weight"], a["trunk.3.bias"])), 2).flatten(1)
    return (h @ a["A.weight"].T + a["A.bias"]) @ a["B.weight"].T + a["B.bias"]


def representation(model, f: dict, x: torch.Tensor) -> torch.Tensor:
    sub = {k[len("extractor."):]: v for k, v in f.items() if k.startswith("extractor.")}
    return functional_call(model.extractor, sub, (x,))


def header(f: dict, h: torch.Tensor) -> torch.Tensor:
    return h @ f["header.weight"].T + f["header.bias"]


def local_logits(model, f, x):
    return header(f, representation(model, f, x))


def sum_logits(model, f, a, x, placement):
    """F_k (+) G as the adapters' docstring defines each placement."""
    h = representation(model, f, x)
    if placement == "model":
        return header(f, h) + adapter_out(a, x, placement)
    if placement == "representation":
        return header(f, h + adapter_out(a, x, placement))
    return header(f, h) + adapter_out(a, h, placement)


def sgd(params: dict, loss_of, steps: int, momentum: dict | None = None):
    """`steps` SGD steps as the run sets them: gradient total norm clipped to grad_clip, then weight decay,
    momentum (a buffer starting at zero gives the first step d itself), p -= lr * buffer.
    Returns (parameters, momentum buffers)."""
    params = {k: v.clone() for k, v in params.items()}
    buf = {k: torch.zeros_like(v) for k, v in params.items()} if momentum is None else dict(momentum)
    for _ in range(steps):
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        grads = dict(zip(leaves, torch.autograd.grad(loss_of(leaves), list(leaves.values()))))
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))
        scale = min(1.0, SGD["grad_clip"] / (norm + 1e-6))
        for k in params:
            buf[k] = SGD["momentum"] * buf[k] + grads[k] * scale + SGD["weight_decay"] * params[k]
            params[k] = params[k] - SGD["lr"] * buf[k]
    return params, buf


def train_batch(sim, cid):
    split = sim.clients[cid].split
    return next(sim.ctx.data.eval_batches("train", split.train, FULL))


def held_out(sim, cid):
    split = sim.clients[cid].split
    return next(sim.ctx.data.eval_batches("test", split.test, FULL))


def hand_client(sim, cid, f0, a0, placement, e_local=1, e_adapter=1, mu=0.0, momentum=None):
    """One client's round by hand: phase 1 trains F_k on CE(F_k + G) (mixed with mu CE(F_k)) with G = a0
    fixed, phase 2 trains G on CE(F_k + G) with F_k fixed. Returns (F_k, G, G's momentum)."""
    model = sim.clients[cid].state["model"]  # its structure only: the parameters come from f
    x, y = train_batch(sim, cid)

    def phase1(f):
        loss = F.cross_entropy(sum_logits(model, f, a0, x, placement), y)
        return (1 - mu) * loss + mu * F.cross_entropy(local_logits(model, f, x), y) if mu else loss

    f1, _ = sgd(f0, phase1, e_local)
    a1, buf = sgd(a0, lambda a: F.cross_entropy(sum_logits(model, f1, a, x, placement), y), e_adapter, momentum)
    return f1, a1, buf


def assert_update(before: dict, after: dict, expected: dict, rel: float = 2e-3) -> None:
    """after equals expected, to `rel` of the size of the update expected - before (all tensors together)."""
    err = sum(((after[k] - expected[k]).double() ** 2).sum() for k in before)
    size = sum(((expected[k] - before[k]).double() ** 2).sum() for k in before)
    assert size > 0
    assert float((err / size).sqrt()) < rel, float((err / size).sqrt())


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- simulations ----------------------------------------------------------------------------------

def hand_sim(hp=None, **overrides):
    """5 clients (unequal n_k), 3 sampled, one full batch per epoch, no augmentation."""
    settings = dict(num_clients=5, participation=0.6, batch_size=FULL, augment=False, **SGD)
    settings.update(overrides)
    return make_simulation("pfedlora", algo={"pfedlora": {"rank": 8, **(hp or {})}}, **settings)


def randomise(sim, seed=0):
    """Non-zero B everywhere (so G matters), a global adapter unlike every client's own one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in [sim.algo.global_adapter] + [c.state["adapter"] for c in sim.clients]:
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def watch_evaluations(sim) -> list[dict]:
    """Record every ctx.evaluate call: tag, client, result, and the client's parameters at that moment."""
    seen = []
    original = sim.ctx.evaluate

    def evaluate(client, predict, split="test", tag="eval"):
        correct, count, loss = original(client, predict, split, tag)
        seen.append(dict(tag=tag, split=split, cid=client.id, correct=int(correct), count=count,
                         loss=float(loss), model=params_of(client.state["model"]),
                         adapter=params_of(client.state["adapter"])))
        return correct, count, loss

    sim.ctx.evaluate = evaluate
    return seen


def the_call(seen, tag, cid, split="test"):
    calls = [s for s in seen if s["tag"] == tag and s["cid"] == cid and s["split"] == split]
    assert len(calls) == 1, (tag, cid, len(calls))
    return calls[0]


def ce_sum_and_correct(model, f, a, x, y, placement):
    with torch.no_grad():
        logits = sum_logits(model, f, a, x, placement)
    return float(F.cross_entropy(logits, y, reduction="sum")), int((logits.argmax(1) == y).sum())


# ---- the adapter --------------------------------------------------------------------------------

@pytest.mark.parametrize("placement", ["model", "representation", "header-lora"])
def test_adapter_placements_compute_the_documented_formulas(placement):
    from models.adapters import LoRAAdapter, local_and_personalised_logits, personalised_logits
    from models.groups import build_model

    torch.manual_seed(0)
    model = build_model("cnn3", 10)
    adapter = LoRAAdapter(placement, 10, rank=4)
    x = torch.randn(6, 3, 32, 32)
    f, a = params_of(model), params_of(adapter)
    # B = 0 at init (weight and bias), so F_k (+) G is F_k exactly; A is not zero
    assert not a["B.weight"].any() and ("B.bias" not in a or not a["B.bias"].any()) and a["A.weight"].any()
    with torch.no_grad():
        assert torch.equal(personalised_logits(model, adapter, x), model(x))
    # the shapes of the docstring: A 800->r (bias), B r->classes / r->500 (bias); header-lora 500->r->classes
    shapes = {"model": ((4, 800), (10, 4)), "representation": ((4, 800), (500, 4)),
              "header-lora": ((4, 500), (10, 4))}[placement]
    assert (a["A.weight"].shape, a["B.weight"].shape) == shapes
    assert ("A.bias" in a) == ("B.bias" in a) == (placement != "header-lora")
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
        a = params_of(adapter)
        torch.testing.assert_close(personalised_logits(model, adapter, x), sum_logits(model, f, a, x, placement))
        local, both = local_and_personalised_logits(model, adapter, x)  # phase1_mix's pair
        torch.testing.assert_close(local, local_logits(model, f, x))
        torch.testing.assert_close(both, sum_logits(model, f, a, x, placement))


# ---- one round by hand ---------------------------------------------------------------------------

@pytest.mark.parametrize("placement, batched", [("model", False), ("representation", False),
                                                ("header-lora", False), ("model", True)])
def test_round_is_phase1_then_phase2_on_the_downloaded_adapter(placement, batched):
    """Load theta^t; phase 1 trains F_k on CE(F_k + G) with G frozen; phase 2 trains G on the same loss with
    F_k frozen (E_adapter = 2 steps: momentum within the phase); upload G; the server takes the
    n_k-weighted mean; each client is evaluated on F_k + its own trained G, after its training."""
    overrides = dict(model_group="cnn5-homo", batched_training=True) if batched else {}
    sim = hand_sim({"placement": placement, "adapter_epochs": 2}, **overrides)
    randomise(sim)
    seen = watch_evaluations(sim)
    g0 = params_of(sim.algo.global_adapter)
    before = {c.id: (params_of(c.state["model"]), params_of(c.state["adapter"])) for c in sim.clients}
    metrics = sim.run_round(0)
    sampled = sorted({s["cid"] for s in seen if s["tag"] == "eval-phase1"})
    assert len(sampled) == 3
    n = {cid: sim.clients[cid].num_train for cid in sampled}
    assert len(set(n.values())) == 3  # unequal weights: a plain mean would differ
    expected_avg = {k: 0 for k in g0}
    correct = {"eval-phase1": 0, "eval-phase2": 0}
    count = 0
    for cid in sampled:
        state = sim.clients[cid].state
        f1, a1, _ = hand_client(sim, cid, before[cid][0], g0, placement, e_adapter=2)
        assert_update(before[cid][0], params_of(state["model"]), f1)
        assert_update(g0, params_of(state["adapter"]), a1)
        for k in g0:
            expected_avg[k] = expected_avg[k] + n[cid] * a1[k] / sum(n.values())
        # at the phase boundary: G still exactly theta^t (frozen in phase 1), F_k already final (frozen in phase 2)
        p1, p2 = the_call(seen, "eval-phase1", cid), the_call(seen, "eval-phase2", cid)
        assert_same(p1["adapter"], g0)
        assert_same(p1["model"], params_of(state["model"]))
        assert_same(p2["adapter"], params_of(state["adapter"]))
        # evaluations: after phase 1 on (F_k, theta^t); after phase 2 and at the round's end on (F_k, own G)
        x, y = held_out(sim, cid)
        model = state["model"]
        for call, adapter in ((p1, g0), (p2, a1), (the_call(seen, "eval", cid), a1)):
            loss, right = ce_sum_and_correct(model, f1, adapter, x, y, placement)
            assert call["loss"] == pytest.approx(loss, rel=1e-3)
            if call["tag"] != "eval":
                correct[call["tag"]] += right
        count += len(y)
    assert metrics["acc_phase1_sampled"] == pytest.approx(correct["eval-phase1"] / count, abs=1e-6)
    assert metrics["acc_phase2_sampled"] == pytest.approx(correct["eval-phase2"] / count, abs=1e-6)
    assert "acc_phase1" not in metrics
    if placement == "model" and not batched:  # here the two differ, so a swap of the names cannot pass
        assert correct["eval-phase1"] != correct["eval-phase2"]
    assert_update(g0, params_of(sim.algo.global_adapter), expected_avg)
    for c in sim.clients:  # clients not sampled: untouched
        if c.id not in sampled:
            assert_same(params_of(c.state["model"]), before[c.id][0])
            assert_same(params_of(c.state["adapter"]), before[c.id][1])


@pytest.mark.parametrize("aggregation", ["samples", "uniform"])
def test_aggregation_weights(aggregation):
    sim = hand_sim({"aggregation": aggregation})
    randomise(sim)
    uploads = {}
    original = sim.algo.client_update

    def client_update(client, payload, round_index):
        up = yield from original(client, payload, round_index)
        uploads[client.id] = {k: v.clone() for k, v in up.items()}
        return up

    sim.algo.client_update = client_update
    g0 = params_of(sim.algo.global_adapter)
    sim.run_round(0)
    w = {cid: sim.clients[cid].num_train if aggregation == "samples" else 1.0 for cid in uploads}
    expected = {k: sum(w[c] * uploads[c][k] for c in uploads) / sum(w.values()) for k in g0}
    assert_update(g0, params_of(sim.algo.global_adapter), expected, rel=1e-4)


def test_joint_training_steps_both_on_the_sum_with_their_own_clipping():
    sim = hand_sim({"training": "joint"})
    randomise(sim)
    g0 = params_of(sim.algo.global_adapter)
    before = {c.id: params_of(c.state["model"]) for c in sim.clients}
    seen = watch_evaluations(sim)
    sim.run_round(0)
    sampled = sorted({s["cid"] for s in seen if s["tag"] == "eval"})
    assert not any(s["tag"].startswith("eval-phase") for s in seen)
    for cid in sampled:
        state = sim.clients[cid].state
        x, y = train_batch(sim, cid)
        model = state["model"]
        # one step on the sum, each part's gradient clipped on its own (two optimizers)
        f1, _ = sgd(before[cid], lambda f: F.cross_entropy(sum_logits(model, f, g0, x, "model"), y), 1)
        a1, _ = sgd(g0, lambda a: F.cross_entropy(sum_logits(model, before[cid], a, x, "model"), y), 1)
        assert_update(before[cid], params_of(model), f1)
        assert_update(g0, params_of(state["adapter"]), a1)


# ---- options -------------------------------------------------------------------------------------

@pytest.mark.parametrize("batched", [False, True])
def test_phase1_mix_adds_mu_ce_of_the_local_model(batched):
    """phase1_mix = mu: phase 1 minimises (1 - mu) CE(F_k + G) + mu CE(F_k); phase 2 unchanged. The batched
    path cannot mix, so it must fall back to the sequential one."""
    overrides = dict(model_group="cnn5-homo", batched_training=True) if batched else {}
    sim = hand_sim({"phase1_mix": 0.7}, **overrides)
    randomise(sim)
    g0 = params_of(sim.algo.global_adapter)
    before = {c.id: params_of(c.state["model"]) for c in sim.clients}
    seen = watch_evaluations(sim)
    sim.run_round(0)
    for cid in sorted({s["cid"] for s in seen if s["tag"] == "eval"}):
        state = sim.clients[cid].state
        f1, a1, _ = hand_client(sim, cid, before[cid], g0, "model", mu=0.7)
        assert_update(before[cid], params_of(state["model"]), f1)
        assert_update(g0, params_of(state["adapter"]), a1)


def test_local_inference_predicts_with_the_private_model_alone():
    sim = hand_sim({"inference": "local"})
    randomise(sim)
    seen = watch_evaluations(sim)
    sim.run_round(0)
    for cid in sorted({s["cid"] for s in seen if s["tag"] == "eval"}):
        model = sim.clients[cid].state["model"]
        x, y = held_out(sim, cid)
        with torch.no_grad():
            loss = float(F.cross_entropy(local_logits(model, params_of(model), x), y, reduction="sum"))
        assert the_call(seen, "eval", cid)["loss"] == pytest.approx(loss, rel=1e-4)


@pytest.mark.parametrize("mode, batched", [("client", True), ("shared", False), ("shared", True)])
def test_persistent_optimizer_keeps_the_adapters_momentum(mode, batched):
    """Two rounds: the adapter's SGD starts from the momentum that phase 2 left, the client's own (client;
    zero until its first round) or the previous trained client's (shared, in training order). Phase 2 with a
    kept momentum is not a plain phase, so batched_training runs it sequentially; with "shared" the clients
    also run one after the other (each starts from the momentum the previous one left)."""
    overrides = dict(batched_training=True) if batched else {}
    sim = hand_sim({"persistent_optimizer": mode}, model_group="cnn5-homo", **overrides)
    randomise(sim)
    bufs: dict = {}
    shared = None
    trained = []
    for round_index in range(2):
        g0 = params_of(sim.algo.global_adapter)
        f0 = {c.id: params_of(c.state["model"]) for c in sim.clients}
        seen = watch_evaluations(sim)
        sim.run_round(round_index)
        sampled = sorted({s["cid"] for s in seen if s["tag"] == "eval"})  # trained in id order
        for cid in sampled:
            start = shared if mode == "shared" else bufs.get(cid)
            f1, a1, buf = hand_client(sim, cid, f0[cid], g0, "model", momentum=start)
            bufs[cid] = shared = buf
            trained.append(cid)
            assert_update(f0[cid], params_of(sim.clients[cid].state["model"]), f1)
            assert_update(g0, params_of(sim.clients[cid].state["adapter"]), a1)
    assert len(set(trained)) < len(trained)  # some client trained in both rounds, on its kept momentum


@pytest.mark.parametrize("mode", ["client", "shared"])
def test_persistent_momentum_survives_a_checkpoint(mode):
    def build():
        return hand_sim({"persistent_optimizer": mode, "eval_phase1": False}, model_group="cnn5-homo")

    sim = build()
    sim.run_round(0)
    tensors, meta = sim.state_dict()
    resumed = build()
    resumed.load_state_dict({k: v.clone() for k, v in tensors.items()}, meta)  # as if read back from disk
    sim.run_round(1)
    resumed.run_round(1)
    for a, b in zip(sim.clients, resumed.clients):
        assert_same(params_of(a.state["adapter"]), params_of(b.state["adapter"]))


def test_official_profile_keeps_one_adapter_optimizer_and_htfllib_is_the_spec():
    official = make_simulation("pfedlora", profile="official", model_group="cnn5-homo", batch_size=FULL)
    assert official.algo.hp.persistent_optimizer == "shared"
    official.run_round(0)
    assert official.algo.adapter_momentum.abs().sum() > 0  # the kept momentum is the one phase 2 used
    spec = make_simulation("pfedlora").algo.hp
    assert make_simulation("pfedlora", profile="htfllib").algo.hp == spec
    assert make_simulation("pfedlora", profile="official",
                           algo={"pfedlora": {"persistent_optimizer": "none"}}).algo.hp == spec


@pytest.mark.parametrize("key, value, message", [
    ("phase1_mix", 1.5, "pfedlora.phase1_mix must be in [0, 1], got 1.5"),
    ("inference", "both", "pfedlora.inference must be one of sum, local, got 'both'"),
    ("persistent_optimizer", "yes", "pfedlora.persistent_optimizer must be one of none, client, shared, got 'yes'"),
    ("aggregation", "mean", "pfedlora.aggregation must be one of samples, uniform, got 'mean'"),
])
def test_bad_option_values_are_one_line_user_errors(key, value, message):
    from algorithms.pfedlora import PFedLoRA

    with pytest.raises(UserError) as err:
        PFedLoRA.make_hparams({key: value})
    assert str(err.value) == message
    with pytest.raises(UserError, match="needs training='iterative'"):
        PFedLoRA.make_hparams({"phase1_mix": 0.5, "training": "joint"})


# ---- costs, and a sanity check that it learns ---------------------------------------------------

def hand_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("placement", ["model", "representation"])
def test_training_flops_are_the_forward_and_only_the_backward_each_phase_needs(placement):
    """A frozen part costs its forward and no weight gradients: phase 1 differentiates F_k only, phase 2 G
    only (through F_k's header for the representation placement)."""
    sim = hand_sim({"placement": placement, "eval_phase1": False})
    randomise(sim)
    seen = watch_evaluations(sim)
    metrics = sim.run_round(0)
    total = 0
    for cid in sorted({s["cid"] for s in seen if s["tag"] == "eval"}):
        model = sim.clients[cid].state["model"]
        f, a = params_of(model), params_of(sim.clients[cid].state["adapter"])
        x, y = train_batch(sim, cid)
        for trained in (f, a):
            leaves = {k: v.requires_grad_() for k, v in trained.items()}
            total += hand_flops(lambda: torch.autograd.grad(
                F.cross_entropy(sum_logits(model, f, a, x, placement), y), list(leaves.values())))
            for v in trained.values():
                v.requires_grad_(False)
    assert metrics["train_flops"] == total


def test_pfedlora_learns_on_synthetic_data():
    sim = make_simulation("pfedlora", model_group="cnn5-homo", local_epochs=2, algo={"pfedlora": {"rank": 16}})
    start = sim.initial_metrics()["acc_mean"]
    for t in range(2):
        metrics = sim.run_round(t)
    assert metrics["acc_mean"] > max(0.75, start + 0.2)
