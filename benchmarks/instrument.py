"""Where a harness round's time goes, observed from outside without patching anything: the simulator's
events through an observer (bench/observe.py), training/evaluation batches through a data wrapper and the
FLOP accountant's work through a subclass, both handed to the Simulation when it is built (RoundTimer); and host
memory readings.

Each timed section records its EXCLUSIVE time (its own time minus its timed children), keyed by the path
of enclosing sections, so the parts add up to the round. `categorise` folds the paths into the categories
the benchmark reports."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from bench.accounting import FlopAccountant
from bench.observe import Observer


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


class RoundTimer(Observer):
    """Times a Simulation's parts while recording. Build the Simulation with `data=timer.data`,
    `accountant=timer.accountant` and `observers=[timer]`; then `with timer.recording() as rec:` around the
    rounds to time. `rec` receives `sections`, `accounting_calls` [(kind, key, cached, body seconds)] and
    `counter` (samples, train_passes)."""

    # simulator events -> section names (evaluate/evaluation: everything under them counts as evaluation)
    SECTION = {"round": "round", "download": "transmit", "upload": "transmit", "update": "client_update",
               "phase": "train", "aggregate": "aggregate", "evaluation": "evaluate_clients", "evaluate": "evaluate"}

    def __init__(self, data, device: torch.device, flop_cache: bool = True):
        self.data = _TimedData(data, self)
        self.accountant = _TimedAccountant(self, cache=flop_cache)
        self.sync = device.type == "cuda"
        self.rec: dict[str, Any] | None = None

    @contextmanager
    def recording(self) -> Iterator[dict[str, Any]]:
        self.rec = {"sections": Sections(sync=self.sync), "accounting_calls": [],
                    "counter": {"samples": 0, "train_passes": 0}}
        try:
            yield self.rec
        finally:
            self.rec = None

    def section(self, name: str):
        from contextlib import nullcontext

        return self.rec["sections"](name) if self.rec is not None else nullcontext()

    @contextmanager
    def span(self, event: str, info: dict[str, Any]) -> Iterator[None]:
        if self.rec is not None and event == "phase":
            self.rec["counter"]["train_passes"] += info["phase"].epochs * len(info["clients"])
        with self.section(self.SECTION.get(event, event)):
            yield


def _counting_now() -> bool:
    """True while a FlopCounterMode is active (it pushes a dispatch mode named _FlopCounterMode)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return any("FlopCounter" in type(m).__name__ for m in _get_current_dispatch_mode_stack())


class _TimedAccountant(FlopAccountant):
    """The accountant's own code timed as "accounting", the counted block as "<kind>-body"."""

    def __init__(self, timer: RoundTimer, cache: bool = True):
        super().__init__(cache=cache)
        self.timer = timer

    @contextmanager
    def count(self, kind: str, key: tuple | None = None, client_id: int | None = None) -> Iterator[None]:
        timer = self.timer
        if timer.rec is None:
            with super().count(kind, key, client_id):
                yield
            return
        with timer.section("accounting"):
            cm = super().count(kind, key, client_id)
            cm.__enter__()
        cached = not _counting_now()  # whatever the accountant's caching rule: did it start a counter?
        start = time.perf_counter()
        try:
            with timer.section(f"{kind}-body"):
                yield
        finally:
            body = time.perf_counter() - start
            with timer.section("accounting"):
                cm.__exit__(None, None, None)
            timer.rec["accounting_calls"].append((kind, None if key is None else (kind, *key), cached, body))


class _TimedData:
    """The run's data; building each batch is timed as "data" (training samples counted)."""

    def __init__(self, data, timer: RoundTimer):
        self._data, self._timer = data, timer

    def __getattr__(self, name: str):
        return getattr(self._data, name)

    def _timed(self, iterable, count: bool):
        it = iter(iterable)
        while True:
            with self._timer.section("data"):
                try:
                    item = next(it)
                except StopIteration:
                    return
            if count and self._timer.rec is not None:
                self._timer.rec["counter"]["samples"] += len(item[1])
            yield item

    def train_batches(self, *args, **kwargs):
        return self._timed(self._data.train_batches(*args, **kwargs), count=True)

    def eval_batches(self, *args, **kwargs):
        return self._timed(self._data.eval_batches(*args, **kwargs), count=False)


CATEGORIES = ("compute", "data", "payload_aggregation", "evaluation", "flop_accounting", "algorithm_other",
              "harness_loop")


def categorise(sections: Sections, accounting_calls: list[tuple],
               cached_body: dict[tuple, list[float]] | None = None,
               counter_overhead: dict[str, float] | None = None) -> dict[str, float]:
    """Seconds per category of one instrumented round.

    compute: training forward/backward/optimizer steps (bodies of the FLOP-counted training blocks, which
      also hold the algorithms' own counted tensor work such as FedKD's SVDs);
    data: building training batches (gather, augmentation, normalisation) and algorithm passes' batches;
    payload_aggregation: the downloads (the server's payload hooks and the copies) and uploads, aggregate
      (incl. server training);
    evaluation: everything under evaluation (its batches and forwards), incl. pFedLoRA's phase-1 check;
    flop_accounting: the accountant's own code, plus the extra time a step takes while FlopCounterMode
      counts it (the first step of every new key), moved out of compute/evaluation;
    algorithm_other: the plugins' client-side code outside training steps;
    harness_loop: the round loop's own code (sampling, store, metrics) and the phase runner's loop code
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
        elif leaf in ("transmit", "aggregate", "server-body"):
            out["payload_aggregation"] += seconds
        elif leaf in ("client_update", "eval-body"):
            out["algorithm_other"] += seconds
        else:  # "round" and "train": the round loop's and the phase runner's own code
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
