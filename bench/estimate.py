"""The up-front time estimate: a few real steps of each algorithm's actual run, scaled to the whole run.

For each algorithm, the run's own Simulation is built (same config, hyper-parameters, data and first seed)
and the local updates of one round's sampled clients (at most CLIENTS of them) run three times through the
simulator's own path, so that clients trained together or in parallel cost what they cost in the run. Every
phase is cut short: to STEPS batches in the first pass, which warms up (and counts the FLOPs of new step
shapes, as the run's first round does), to 2 x STEPS and 4 x STEPS in the two timed ones. Their difference
gives the cost of one more batch without the set-up of a phase's first steps (wall time in phases, those of
parallel clients overlapping counted once); the last pass is scaled up by it to the full number of batches,
its rest (downloads, uploads, code between phases) taken as measured. The round's aggregation and one
evaluation of the timed clients are timed as well. A resumed run is estimated for its rounds after its
checkpoint only.
Rough by design: `bench run` prints the measured time per round from round 1 on, and its "ETA all"
rescales this estimate by how far off it was on the runs so far (bench/progress.py)."""
from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from bench.config import RunConfig
from bench.observe import Observer
from data.device_data import DeviceData
from data.partition import ClientSplit

STEPS = 2     # batches per phase in each timed pass
CLIENTS = 20  # of a round's sampled clients, at most this many are timed (enough to fill batches and workers)


class CappedData:
    """The run's data, with each pass over a client's training batches cut to `steps` batches; remembers how
    many batches the full passes would have had (counted under a lock: parallel clients draw batches in
    threads)."""

    def __init__(self, data: DeviceData, steps: int):
        self._data, self.steps = data, steps
        self.full = self.taken = 0
        self.lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._data, name)

    def train_batches(self, idx: torch.Tensor, batch_size: int, generator=None):
        with self.lock:
            self.full += math.ceil(len(idx) / batch_size)
        for i, batch in enumerate(self._data.train_batches(idx, batch_size, generator)):
            if i == self.steps:
                return
            with self.lock:
                self.taken += 1
            yield batch


class Stopwatch(Observer):
    """Wall seconds during which at least one `event` span is open (spans overlapping in threads count once),
    synchronising CUDA at the edges."""

    def __init__(self, device: torch.device, event: str = "phase", clock: Callable[[], float] = time.perf_counter):
        self.sync, self.event, self.clock = device.type == "cuda", event, clock
        self.seconds = 0.0
        self.open = 0
        self.since = 0.0
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def span(self, event: str, info: dict[str, Any]) -> Iterator[None]:
        if event != self.event:
            yield
            return
        with self.lock:
            if self.open == 0:
                self.synchronize()
                self.since = self.clock()
            self.open += 1
        try:
            yield
        finally:
            with self.lock:
                self.open -= 1
                if self.open == 0:
                    self.synchronize()
                    self.seconds += self.clock() - self.since

    def synchronize(self) -> None:
        if self.sync:
            torch.cuda.synchronize()


def estimate_seconds(cfg: RunConfig, data: DeviceData, splits: list[ClientSplit], device: torch.device,
                     runs: list) -> dict[str, float]:
    """Estimated wall time per algorithm of `runs` (RunSpecs: its runs there, e.g. only the pending ones)."""
    return per_algorithm(estimate_runs(cfg, data, splits, device, runs))


def per_algorithm(per_run: dict[str, float]) -> dict[str, float]:
    """Per-run estimates (run key -> seconds) summed per algorithm, in the runs' order."""
    from bench.store import parse_run_key

    total: dict[str, float] = {}
    for key, seconds in per_run.items():
        name = parse_run_key(key)[0]
        total[name] = total.get(name, 0.0) + seconds
    return total


def estimate_runs(cfg: RunConfig, data: DeviceData, splits: list[ClientSplit], device: torch.device,
                  runs: list) -> dict[str, float]:
    """Estimated seconds of each of `runs` (RunSpecs; run key -> seconds): of its rounds still to run, i.e.
    after its checkpoint's round where it has one (a resumed run), else of the whole run. Each algorithm is
    timed once (on the first of its runs)."""
    costs: dict[str, RunCost] = {}
    out = {}
    for spec in runs:
        if spec.name not in costs:
            costs[spec.name] = time_run(cfg, spec, data, splits, device)
        out[spec.key] = costs[spec.name].seconds(cfg, checkpoint_step(spec.checkpoint))
    return out


def checkpoint_step(directory: Path | None) -> int:
    """The round a run's checkpoint was taken after (0 without one), from its small note (checkpoint.json:
    reading state.pt is the resumed run's job; an estimate needs only the round)."""
    note = directory / "checkpoint.json" if directory is not None else None
    if note is None or not note.exists() or not (directory / "state.pt").exists():
        return 0
    try:
        return max(int(json.loads(note.read_text()).get("step") or 0), 0)
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


@dataclass
class Pass:
    """One timed pass over a round's local updates with every phase cut short."""

    seconds: float          # wall time of the whole updates
    phase_seconds: float    # of which inside phases (training batches)
    batches: int            # training batches the phases took


def full_updates_seconds(short: Pass, long: Pass, full_batches: int) -> float:
    """The updates' seconds with every phase run to its `full_batches` in all, from two cut passes (`long` takes
    more batches per phase): a batch costs the difference of their phase times per extra batch, since a
    phase's first steps also pay its set-up (optimizer state, gradients), which scaling one pass up would
    count once per batch; the long pass's time outside the phases is kept as measured. Noise may make the
    difference exceed the long pass's plain average, which includes the set-up: that average then."""
    average = long.phase_seconds / max(long.batches, 1)  # set-up included: an upper bound of a batch's cost
    per_batch = (long.phase_seconds - short.phase_seconds) / max(long.batches - short.batches, 1)
    if not 0 < per_batch < average:  # timing noise on short passes (a difference amplifies it)
        per_batch = average
    return long.seconds + per_batch * (full_batches - long.batches)


@dataclass
class RunCost:
    """The estimated cost of one run's parts: a round's training and aggregation, one evaluation of the
    clients a round evaluates, and the evaluation of every client before round 1."""

    per_round: float
    per_evaluation: float
    initial: float

    def seconds(self, cfg: RunConfig, done: int = 0) -> float:
        """Seconds of rounds done+1..cfg.rounds (the initial evaluation only in a run from scratch)."""
        rounds = range(done + 1, cfg.rounds + 1)
        evaluated = sum(1 for r in rounds if r % cfg.eval_every == 0 or r == cfg.rounds)
        return len(rounds) * self.per_round + evaluated * self.per_evaluation + (self.initial if done == 0 else 0.0)


def time_run(cfg: RunConfig, spec: Any, data: DeviceData, splits: list[ClientSplit],
             device: torch.device) -> RunCost:
    """Time the parts of one run of `spec` (a RunSpec) on `splits`."""
    from bench.simulator import Simulation

    capped = CappedData(data, STEPS)
    watch = Stopwatch(device)
    sim = Simulation(cfg, spec.algorithm, spec.seed, capped, splits, device, hparams=spec.hparams, observers=[watch])
    sampled = sim.sample_clients()[:CLIENTS]
    share = cfg.clients_per_round / len(sampled)  # per round: the clients timed stand for all sampled
    passes = {}
    with sim.pool.threads():  # as run_round: the thread settings of the run's client pool
        for name, steps in (("warm-up", STEPS), ("short", 2 * STEPS), ("long", 4 * STEPS)):
            watch.seconds = 0.0
            capped.full = capped.taken = 0
            capped.steps = steps
            start = time.perf_counter()
            uploads, _ = sim.local_updates(sampled, 0)
            passes[name] = Pass(time.perf_counter() - start, watch.seconds, capped.taken)
        training = full_updates_seconds(passes["short"], passes["long"], capped.full)
        start = time.perf_counter()
        sim.aggregate(uploads, 0)
        sim.after_aggregation(sampled, 0)
        server = time.perf_counter() - start
    start = time.perf_counter()
    sim.evaluate(sampled)
    per_client = (time.perf_counter() - start) / len(sampled)
    evaluated = cfg.num_clients if sim.algo.prediction_uses_server_state else cfg.clients_per_round
    return RunCost(per_round=(training + server) * share,
                   per_evaluation=evaluated * per_client, initial=cfg.num_clients * per_client)
