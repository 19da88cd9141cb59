"""The speed levers keep the numbers. Clients in parallel threads (bench/parallel.py) and the per-(round, client)
batch streams that make it possible: a run's numbers do not depend on how many clients run at once, nor on which
other clients ran before a client (its batches come from its own stream). foreach SGD: bitwise the plain loop.
channels_last: equal to the default layout within float tolerance."""
from __future__ import annotations

import pytest
import torch

from bench.registry import algorithms
from tests.conftest import client_update, make_simulation

pytestmark = pytest.mark.usefixtures("one_thread")


def run(algorithm: str, rounds: int = 2, **overrides):
    group = algorithms()[algorithm].example_group()
    sim = make_simulation(algorithm, threads=1, participation=0.6, rounds=rounds, model_group=group, **overrides)
    history = [sim.initial_metrics()] + [sim.run_round(r) for r in range(rounds)]
    states = {f"{c.id}/{k}": t for c in sim.clients for k, t in _tensors(sim.store.checkout(c.id))}
    return sim, history, states


def _tensors(state, prefix=""):
    if isinstance(state, torch.Tensor):
        yield prefix, state
    elif isinstance(state, torch.nn.Module):
        for name, t in state.state_dict().items():
            yield f"{prefix}{name}", t
    elif isinstance(state, dict):
        for k, v in state.items():
            yield from _tensors(v, f"{prefix}{k}.")
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from _tensors(v, f"{prefix}{i}.")


@pytest.mark.parametrize("algorithm", sorted(algorithms()))
def test_parallel_clients_equal_sequential_bitwise(algorithm):
    """Two clients at once (one torch thread each) give bitwise the metrics, FLOPs, bytes and client states of
    one client after the other on one thread."""
    sequential, seq_history, seq_states = run(algorithm, parallel_clients=1)
    parallel, par_history, par_states = run(algorithm, parallel_clients=2)
    if algorithm in ("pfedlora", "feddistill", "fml", "fedkd", "lgfedavg", "fedgh", "fedapen", "standalone"):
        assert parallel.pool.workers == 2  # the paper's methods on CNNs do run in parallel
    if algorithm in ("flora", "fedsalora"):  # LoRA dropout (torch's global RNG)
        assert parallel.pool.workers == 1
    for before, after in zip(seq_history, par_history):
        before, after = dict(before), dict(after)
        before.pop("round_time"), after.pop("round_time")
        before.pop("cum_round_time"), after.pop("cum_round_time")
        assert after == pytest.approx(before, rel=0, abs=0, nan_ok=True)
    assert seq_states.keys() == par_states.keys()
    for key in seq_states:
        assert torch.equal(seq_states[key], par_states[key]), key


def test_parallel_threads_really_overlap():
    """The pool runs clients on several threads at once (not one after the other in disguise)."""
    import threading

    sim = make_simulation("standalone", threads=1, parallel_clients=2)
    seen: set[str] = set()
    barrier = threading.Barrier(2, timeout=30)

    def work(i):
        seen.add(threading.current_thread().name)
        barrier.wait()  # both workers must be inside at once, or this times out
        return torch.get_num_threads()

    assert sim.pool.map(work, [0, 1]) == [1, 1]  # one torch thread per worker
    assert len(seen) == 2


def test_client_batches_depend_on_seed_round_and_client_only(monkeypatch):
    """A client's batches in a round come from its own (seed, round, client) stream: the same whether or not
    another client trained before it, different in another round or for another client."""
    from tests.handcalc import record_train_batches

    def first_batch(sim, cid, round_index):
        calls = record_train_batches(monkeypatch, sim.ctx.data)
        client_update(sim, sim.clients[cid], sim.download(cid, round_index), round_index)
        monkeypatch.undo()
        return calls[0][0]

    alone = make_simulation("standalone", threads=1)
    after_other = make_simulation("standalone", threads=1)
    client_update(after_other, after_other.clients[0], after_other.download(0, 0), 0)
    x1, y1 = first_batch(alone, 1, 0)
    x2, y2 = first_batch(after_other, 1, 0)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = first_batch(make_simulation("standalone", threads=1), 1, 1)
    assert not torch.equal(x1, x3)
    ctx = alone.ctx
    assert not torch.equal(torch.rand(4, generator=ctx.client_generator(1, 0)),
                           torch.rand(4, generator=ctx.client_generator(2, 0)))


def test_foreach_sgd_is_bitwise_the_per_parameter_sgd():
    """ctx.optimizer's foreach SGD (one multi-tensor kernel) updates exactly as the per-parameter loop does."""
    from models.groups import build_model

    sim = make_simulation("standalone", threads=1)
    torch.manual_seed(0)
    a = build_model("cnn2", 10)
    b = build_model("cnn2", 10)
    b.load_state_dict(a.state_dict())
    fused = sim.ctx.optimizer(a.parameters())
    plain = torch.optim.SGD(b.parameters(), lr=sim.cfg.lr, momentum=sim.cfg.momentum,
                            weight_decay=sim.cfg.weight_decay, foreach=False)
    assert fused.defaults["foreach"] is True
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    for _ in range(3):
        for model, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_channels_last_equals_the_default_layout_within_float_tolerance():
    """channels_last (the CPU default) changes the order of the convolutions' sums only: after two rounds the
    metrics and every parameter equal a run in the default layout within float32 rounding (1e-4)."""
    runs = {}
    for layout in (True, False):
        sim = make_simulation("lgfedavg", threads=1, channels_last=layout)
        models = [c.state["model"] for c in sim.clients]
        conv = next(m for m in models[0].modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) is layout
        history = [sim.run_round(r) for r in range(2)]
        runs[layout] = history, {f"{i}.{k}": v for i, m in enumerate(models) for k, v in m.state_dict().items()}
    (h1, p1), (h0, p0) = runs[True], runs[False]
    for a, b in zip(h1, h0):
        for key in ("train_loss", "test_loss", "acc_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-4), key
        assert a["train_flops"] == b["train_flops"] and a["bytes_up"] == b["bytes_up"]
    for key in p0:
        torch.testing.assert_close(p1[key], p0[key], rtol=1e-4, atol=1e-5)


def test_channels_last_only_on_cpu_by_default():
    from bench.config import RunConfig
    from bench.context import channels_last

    assert channels_last(RunConfig(), torch.device("cpu")) is True
    assert channels_last(RunConfig(), torch.device("cuda")) is False
    assert channels_last(RunConfig(channels_last=True), torch.device("cuda")) is True
    assert channels_last(RunConfig(channels_last=False), torch.device("cpu")) is False
