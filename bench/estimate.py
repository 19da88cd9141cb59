"""The up-front time estimate: a few real steps of each algorithm's actual run, scaled to the whole run.

For each algorithm, the run's own Simulation is built (same config, hyper-parameters, data and first seed)
and one client per architecture does its real local update twice with every phase cut to STEPS batches: the
first pass warms up (and counts the FLOPs of new step shapes, as the run's first round does), the second is
timed through an observer. Phases are scaled to their full number of batches; the rest of the update
(downloads, uploads, code between phases) is taken as measured. One evaluation of the same clients and one
aggregation of their uploads are timed as well. Rough by design: `bench run` prints the measured time per
round from round 1 on."""
from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from typing import Any, Iterator

import torch

from bench.config import RunConfig
from bench.observe import Observer
from data.device_data import DeviceData
from data.partition import ClientSplit

STEPS = 2  # batches per phase in each timed pass


class CappedData:
    """The run's data, with each pass over a client's training batches cut to `steps` batches; remembers how
    many batches the full passes would have had."""

    def __init__(self, data: DeviceData, steps: int):
        self._data, self.steps = data, steps
        self.full = self.taken = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._data, name)

    def train_batches(self, idx: torch.Tensor, batch_size: int, generator=None):
        self.full += math.ceil(len(idx) / batch_size)
        for i, batch in enumerate(self._data.train_batches(idx, batch_size, generator)):
            if i == self.steps:
                return
            self.taken += 1
            yield batch


class Stopwatch(Observer):
    """Seconds per event (phases: their own; the rest: outside phases), synchronising CUDA at the edges."""

    def __init__(self, device: torch.device):
        self.sync = device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def span(self, event: str, info: dict[str, Any]) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self.seconds[event] += time.perf_counter() - start


def estimate_seconds(cfg: RunConfig, data: DeviceData, splits: list[ClientSplit], device: torch.device,
                     runs: list) -> dict[str, float]:
    """Estimated wall time per algorithm of `runs` (RunSpecs: its runs there, e.g. only the pending ones)."""
    count: dict[str, int] = defaultdict(int)
    specs = {}
    for spec in runs:
        count[spec.name] += 1
        specs.setdefault(spec.name, spec)
    return {name: estimate_run(cfg, spec, data, splits, device) * count[name] for name, spec in specs.items()}


def estimate_run(cfg: RunConfig, spec: Any, data: DeviceData, splits: list[ClientSplit],
                 device: torch.device) -> float:
    """Estimated seconds of one run of `spec` (a RunSpec) on `splits`."""
    from bench.simulator import Simulation
    from bench.training import run_updates

    capped = CappedData(data, STEPS)
    watch = Stopwatch(device)
    sim = Simulation(cfg, spec.algorithm, spec.seed, capped, splits, device, hparams=spec.hparams, observers=[watch])
    samples = {}  # one client per architecture
    for client in sim.clients:
        samples.setdefault(client.arch, client)
    ids = [c.id for c in samples.values()]
    for timed in (False, True):
        watch.seconds.clear()
        capped.full = capped.taken = 0
        start = time.perf_counter()
        uploads = {}
        for cid in ids:
            client = sim.clients[cid]
            client.state = sim.store.checkout(cid)
            update = run_updates(sim.ctx, sim.algo, [client], {cid: sim.download(cid, 0)}, 0)
            uploads[cid] = sim.upload(cid, update.uploads[cid], 0)
        updates = time.perf_counter() - start
    scale = capped.full / max(capped.taken, 1)
    per_update = (updates + watch.seconds["phase"] * (scale - 1)) / len(ids)
    start = time.perf_counter()
    sim.aggregate(uploads, 0)
    per_upload = (time.perf_counter() - start) / len(ids)
    start = time.perf_counter()
    sim.evaluate(ids)
    per_eval = (time.perf_counter() - start) / len(ids)
    per_round = cfg.clients_per_round * (per_update + per_upload)
    evaluated = cfg.num_clients if sim.algo.prediction_uses_server_state else cfg.clients_per_round
    eval_rounds = math.ceil(cfg.rounds / cfg.eval_every)
    return cfg.rounds * per_round + (eval_rounds * evaluated + cfg.num_clients) * per_eval
