"""bench/batched.py: same-architecture clients trained in lockstep through torch.func equal sequential
RunContext-style training (torch.optim.SGD + clip_grad_norm_) per client, within float tolerance."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bench.batched import SGDSettings, can_batch, group_by_architecture, train_same_arch, train_sequential
from models.adapters import LoRAAdapter
from models.groups import build_model

SGD = SGDSettings(lr=0.05, momentum=0.9, weight_decay=1e-3, grad_clip=50.0)


def client_batches(sizes: list[int], batch_size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One client's schedule: consecutive batches over `sizes` samples per epoch (epochs concatenated)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(n, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (n,), generator=gen)
        out += [(x[s:s + batch_size], y[s:s + batch_size]) for s in range(0, n, batch_size)]
    return out


def assert_models_close(a: nn.Module, b: nn.Module, atol: float = 2e-5, rtol: float = 1e-4) -> None:
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("arch", ["cnn1", "cnn5"])
def test_batched_equals_sequential_per_client(arch):
    torch.manual_seed(0)
    models = [build_model(arch, 10) for _ in range(3)]
    # Different sample counts: 3, 2 and 1 batches per epoch, uneven last batches, two epochs.
    batches = [client_batches([40, 40], 16, 1), client_batches([20, 20], 16, 2), client_batches([9, 9], 16, 3)]
    seq = [copy.deepcopy(m) for m in models]
    loss_b = train_same_arch(models, batches, SGD)
    loss_s = train_sequential(seq, batches, SGD)
    for k in range(3):
        assert_models_close(models[k], seq[k])
        torch.testing.assert_close(loss_b[k], loss_s[k], atol=1e-5, rtol=1e-4)


def test_clipping_is_per_client():
    """A tiny clip threshold makes clipping bind: each client's gradient is scaled by its own norm."""
    torch.manual_seed(1)
    models = [build_model("cnn5", 10) for _ in range(2)]
    batches = [client_batches([32], 16, 4), client_batches([32], 16, 5)]
    # Client 1's data is scaled up so its gradient norm differs from client 0's.
    batches[1] = [(x * 5, y) for x, y in batches[1]]
    sgd = SGDSettings(lr=0.1, momentum=0.9, weight_decay=1e-3, grad_clip=0.5)
    seq = [copy.deepcopy(m) for m in models]
    train_same_arch(models, batches, sgd)
    train_sequential(seq, batches, sgd)
    for k in range(2):
        assert_models_close(models[k], seq[k])


def test_no_momentum_no_clip_and_frozen_parameters():
    torch.manual_seed(2)
    models = [build_model("cnn4", 10) for _ in range(2)]
    for m in models:
        m.extractor.requires_grad_(False)  # only the header trains; the extractor is a constant
    before = [copy.deepcopy(m.extractor.state_dict()) for m in models]
    batches = [client_batches([24], 8, 6), client_batches([16], 8, 7)]
    sgd = SGDSettings(lr=0.1)
    seq = [copy.deepcopy(m) for m in models]
    train_same_arch(models, batches, sgd)
    train_sequential(seq, batches, sgd)
    for k in range(2):
        assert_models_close(models[k], seq[k])
        for name, t in models[k].extractor.state_dict().items():
            assert torch.equal(t, before[k][name]), name


def test_frozen_partner_logits_as_in_pfedlora_phase1():
    """Phase 1 of pFedLoRA: train F_k on CE(F_k(x) + G_k(x)) with the adapter G_k frozen."""
    torch.manual_seed(3)
    models = [build_model("cnn3", 10) for _ in range(2)]
    adapters = [LoRAAdapter("model", 10, rank=8).requires_grad_(False) for _ in range(2)]
    for a in adapters:
        nn.init.normal_(a.B.weight, std=0.1)  # non-zero so the extra logits matter
    batches = [client_batches([30], 16, 8), client_batches([16], 16, 9)]

    def extra(k, t, x):
        return adapters[k](x)

    seq = [copy.deepcopy(m) for m in models]
    train_same_arch(models, batches, SGD, extra_logits=extra)
    train_sequential(seq, batches, SGD, extra_logits=extra)
    for k in range(2):
        assert_models_close(models[k], seq[k])


def test_adapters_train_batched():
    """pFedLoRA phase 2 trains the homogeneous adapters: every client's adapter in one stack."""
    torch.manual_seed(4)
    adapters = [LoRAAdapter("model", 10, rank=8) for _ in range(4)]
    batches = [client_batches([20 + 8 * k], 16, 10 + k) for k in range(4)]
    seq = [copy.deepcopy(a) for a in adapters]
    train_same_arch(adapters, batches, SGD)
    train_sequential(seq, batches, SGD)
    for k in range(4):
        assert_models_close(adapters[k], seq[k])


def test_can_batch():
    assert can_batch([build_model("cnn2", 10), build_model("cnn2", 10)])
    assert not can_batch([build_model("cnn2", 10), build_model("cnn1", 10)])
    assert not can_batch([])
    bn = [nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)) for _ in range(2)]
    assert not can_batch(bn)
    with pytest.raises(ValueError):
        train_same_arch(bn, [[], []], SGD)


def test_group_by_architecture():
    assert group_by_architecture(["cnn1", "cnn2", "cnn1", "cnn3"]) == {"cnn1": [0, 2], "cnn2": [1], "cnn3": [3]}


def test_lazy_streams_with_step_counts():
    """The harness hands train_same_arch generators (no epoch materialised) plus their step counts."""
    torch.manual_seed(5)
    models = [build_model("cnn5", 10) for _ in range(2)]
    batches = [client_batches([40], 16, 20), client_batches([16], 16, 21)]
    seq = [copy.deepcopy(m) for m in models]
    train_same_arch(models, [iter(b) for b in batches], SGD, steps=[len(b) for b in batches])
    train_sequential(seq, batches, SGD)
    for k in range(2):
        assert_models_close(models[k], seq[k])


# ---- the simulator integration (bench/training.py, cfg.batched_training) ----
def _fixed_batches(sim) -> None:
    """Deterministic per-client batches (index order, no augmentation), so that sequential and batched
    rounds see identical batches whatever order they draw them in."""
    data = sim.ctx.data

    class Fixed:
        def __getattr__(self, name):
            return getattr(data, name)

        def train_batches(self, idx, batch_size, generator=None):
            for s in range(0, idx.numel(), batch_size):
                b = idx[s:s + batch_size]
                yield data.normalise(data.x_train[b]), data.y_train[b]

    sim.ctx.data = Fixed()


@pytest.mark.parametrize("algorithm,group", [("lgfedavg", "cnn-hetero"), ("pfedlora", "cnn-hetero"),
                                             ("fedgh", "cnn-hetero"), ("standalone", "cnn-hetero"),
                                             ("fedavg", "cnn5-homo")])
def test_batched_rounds_equal_sequential_rounds(simulation, algorithm, group):
    runs = {}
    for batched in (False, True):
        sim = simulation(algorithm, batched_training=batched, num_clients=10, rounds=2, batch_size=24,
                         model_group=group)
        _fixed_batches(sim)
        metrics = [sim.run_round(r) for r in range(2)]
        runs[batched] = (sim, metrics)
    (seq, m_seq), (bat, m_bat) = runs[False], runs[True]
    for c_seq, c_bat in zip(seq.clients, bat.clients):
        for key, value in c_seq.state.items():
            if isinstance(value, nn.Module):
                assert_models_close(c_bat.state[key], value, atol=5e-5, rtol=5e-4)
    for a, b in zip(m_seq, m_bat):
        for key in ("train_flops", "eval_flops", "bytes_up", "bytes_down"):
            assert a[key] == b[key], key
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4, abs=1e-5)
        assert a["acc_mean"] == pytest.approx(b["acc_mean"], abs=0.02)


def test_algorithms_without_a_batched_path_are_unchanged_by_the_option(simulation):
    """FML's phase trains two models on its own loss, which is never batched: with batched_training its clients
    advance in lockstep, each on its own working meme, with the same batches, so the round's numbers
    (train_loss included) are bitwise the sequential ones."""
    metrics = {}
    for batched in (False, True):
        sim = simulation("fml", batched_training=batched, rounds=1)
        metrics[batched] = sim.run_round(0)
    for key in ("train_loss", "train_flops", "eval_flops", "bytes_up", "bytes_down", "acc_mean"):
        assert metrics[True][key] == metrics[False][key], key
