"""Where a harness round's time goes: timers wrapped around the simulator's parts from the outside (no
edit of bench/), and host memory readings.

Each timed section records its EXCLUSIVE time (its own time minus its timed children), keyed by the path
of enclosing sections, so the parts add up to the round. `categorise` folds the paths into the categories
the benchmark reports."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Iterator

import torch

import bench.simulator as simulator_module


class Sections:
    def __init__(self, sync: bool = False):
        self.exclusive: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list[Any]] = []  # [path, child seconds]
        self.sync = sync  # CUDA: synchronise at section boundaries so device time lands in its section

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        path = f"{self._stack[-1][0]}/{name}" if self._stack else name
        self._stack.append([path, 0.0])
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            _, child = self._stack.pop()
            self.exclusive[path] += elapsed - child
            self.calls[path] += 1
            if self._stack:
                self._stack[-1][1] += elapsed

    def total(self) -> float:
        return sum(self.exclusive.values())


def _counting_now() -> bool:
    """True while a FlopCounterMode is active (it pushes a dispatch mode named _FlopCounterMode)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return any("FlopCounter" in type(m).__name__ for m in _get_current_dispatch_mode_stack())


def _timed_iter(sections: Sections, name: str, iterable, counter: dict | None = None):
    it = iter(iterable)
    while True:
        with sections(name):
            try:
                item = next(it)
            except StopIteration:
                return
        if counter is not None:
            counter["samples"] += len(item[1])
        yield item


class _TimedData:
    def __init__(self, data, sections: Sections, counter: dict):
        self._data, self._sections, self._counter = data, sections, counter

    def __getattr__(self, name: str):
        return getattr(self._data, name)

    def train_batches(self, *args, **kwargs):
        return _timed_iter(self._sections, "data", self._data.train_batches(*args, **kwargs), self._counter)

    def eval_batches(self, *args, **kwargs):
        return _timed_iter(self._sections, "data", self._data.eval_batches(*args, **kwargs))


@contextmanager
def instrumented(sim) -> Iterator[dict[str, Any]]:
    """Within the block, `sim.run_round` is timed part by part; the yielded dict receives
    `sections`, `accounting_calls` [(kind, key, cached, body seconds)], `samples`, `train_passes`."""
    sections = Sections(sync=sim.device.type == "cuda")
    counter = {"samples": 0, "train_passes": 0}
    calls: list[tuple] = []
    acc, ctx, algo = sim.accountant, sim.ctx, sim.algo
    original_count = acc.count
    original_transmit = simulator_module.transmit
    original_data = ctx.data
    patched_ctx = {"train": ctx.train, "evaluate": ctx.evaluate}
    patched_algo = {name: getattr(algo, name) for name in
                    ("server_payload", "client_update", "aggregate", "after_aggregation_payload",
                     "receive_after_aggregation")}
    patched_sim = {"run_round": sim.run_round, "evaluate": sim.evaluate}

    @contextmanager
    def count(kind, key=None, client_id=None):
        full = None if key is None else (kind, *key)
        with sections("accounting"):
            cm = original_count(kind, key, client_id)
            cm.__enter__()
        cached = not _counting_now()  # whatever the accountant's caching rule: did it start a counter?
        start = time.perf_counter()
        try:
            with sections(f"{kind}-body"):
                yield
        finally:
            body = time.perf_counter() - start
            with sections("accounting"):
                cm.__exit__(None, None, None)
            calls.append((kind, full, cached, body))

    def wrap(name, fn):
        def timed(*args, **kwargs):
            with sections(name):
                return fn(*args, **kwargs)
        return timed

    def transmit(*args, **kwargs):
        with sections("transmit"):
            return original_transmit(*args, **kwargs)

    def train(client, trainable, loss_fn, epochs, *args, **kwargs):
        counter["train_passes"] += epochs
        with sections("train"):
            return patched_ctx["train"](client, trainable, loss_fn, epochs, *args, **kwargs)

    acc.count = count
    simulator_module.transmit = transmit
    ctx.data = _TimedData(original_data, sections, counter)
    ctx.train = train
    ctx.evaluate = wrap("evaluate", patched_ctx["evaluate"])
    for name, fn in patched_algo.items():
        setattr(algo, name, wrap(name, fn))
    sim.run_round = wrap("round", patched_sim["run_round"])
    sim.evaluate = wrap("evaluate_clients", patched_sim["evaluate"])
    out: dict[str, Any] = {"sections": sections, "accounting_calls": calls, "counter": counter}
    try:
        yield out
    finally:
        del acc.count
        simulator_module.transmit = original_transmit
        ctx.data = original_data
        del ctx.train, ctx.evaluate
        for name in patched_algo:
            delattr(algo, name)
        del sim.run_round, sim.evaluate


CATEGORIES = ("compute", "data", "payload_aggregation", "evaluation", "flop_accounting", "algorithm_other",
              "harness_loop")


def categorise(sections: Sections, accounting_calls: list[tuple],
               cached_body: dict[tuple, list[float]] | None = None,
               counter_overhead: dict[str, float] | None = None) -> dict[str, float]:
    """Seconds per category of one instrumented round.

    compute: training forward/backward/optimizer steps (bodies of the FLOP-counted training blocks, which
      also hold the algorithms' own counted tensor work such as FedKD's SVDs);
    data: building training batches (gather, augmentation, normalisation) and algorithm passes' batches;
    payload_aggregation: payload copies (transmit), server_payload, aggregate (incl. server training),
      the post-aggregation download;
    evaluation: everything under evaluation (its batches and forwards), incl. pFedLoRA's phase-1 check;
    flop_accounting: the accountant's own code, plus the extra time a step takes while FlopCounterMode
      counts it (the first step of every new key), moved out of compute/evaluation;
    algorithm_other: the plugins' client-side code outside training steps;
    harness_loop: the round loop's own code (sampling, store, metrics) and RunContext.train's loop code
      (optimizer construction, loss accumulation)."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    for path, seconds in sections.exclusive.items():
        parts = path.split("/")
        leaf = parts[-1]
        if leaf == "accounting":
            out["flop_accounting"] += seconds
        elif "evaluate" in parts or "evaluate_clients" in parts:
            out["evaluation"] += seconds
        elif leaf == "train-body":
            out["compute"] += seconds
        elif leaf == "data":
            out["data"] += seconds
        elif leaf in ("transmit", "server_payload", "aggregate", "after_aggregation_payload", "server-body"):
            out["payload_aggregation"] += seconds
        elif leaf in ("client_update", "receive_after_aggregation", "eval-body"):
            out["algorithm_other"] += seconds
        else:  # "round" and "train": the round loop's and RunContext.train's own code
            out["harness_loop"] += seconds
    # Time spent counting FLOPs inside uncached steps moves from compute / evaluation to accounting.
    excess = counting_excess(accounting_calls, cached_body or {}, counter_overhead or {})
    for kind, category in (("train", "compute"), ("eval", "evaluation")):
        moved = min(excess.get(kind, 0.0), out[category])
        out[category] -= moved
        out["flop_accounting"] += moved
    return out


def cached_bodies(accounting_calls: list[tuple]) -> dict[tuple, list[float]]:
    table: dict[tuple, list[float]] = defaultdict(list)
    for kind, key, cached, body in accounting_calls:
        if cached and key is not None:
            table[key].append(body)
    return table


def counting_excess(accounting_calls: list[tuple], cached: dict[tuple, list[float]],
                    counter_overhead: dict[str, float]) -> dict[str, float]:
    """Extra seconds of train/eval steps run under FlopCounterMode, per kind: the body minus the median
    cached body of the same key when the run has one, else the separately measured FlopCounterMode
    overhead of one step of that kind (`counter_overhead`). Blocks without a key (FedKD's SVDs, counted
    every time by design) stay where they are."""
    excess: dict[str, float] = defaultdict(float)
    for kind, key, was_cached, body in accounting_calls:
        if was_cached or key is None or kind not in ("train", "eval"):
            continue
        if key in cached:
            excess[kind] += max(0.0, body - _median(cached[key]))
        else:
            excess[kind] += min(body, counter_overhead.get(kind, 0.0))
    return excess


def flop_counter_overhead(device: torch.device, batch_size: int) -> dict[str, float]:
    """Seconds FlopCounterMode adds to one training step (forward + backward) and to one evaluation forward
    of the paper's CNNs (median over CNN-1 and CNN-5 and three repetitions)."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from models.groups import build_model

    x = torch.randn(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    extra = {"train": [], "eval": []}
    for arch in ("cnn1", "cnn5"):
        model = build_model(arch, 10).to(device)

        def train_step():
            F.cross_entropy(model(x), y).backward()

        def eval_step():
            with torch.no_grad():
                model(x)

        for kind, step in (("train", train_step), ("eval", eval_step)):
            for _ in range(3):
                step()  # warm
                t0 = time.perf_counter()
                step()
                t1 = time.perf_counter()
                with FlopCounterMode(display=False):
                    step()
                t2 = time.perf_counter()
                extra[kind].append(max(0.0, (t2 - t1) - (t1 - t0)))
    return {kind: _median(v) for kind, v in extra.items()}


def _median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2] if s else 0.0


# ---- host memory ------------------------------------------------------------------------------------
def trim_heap() -> None:
    """glibc: return freed heap memory to the OS (malloc_trim), so RSS reflects live data. No-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb * 1024


def peak_rss_bytes() -> int | None:
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kb * 1024


def machine_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
