"""The progress display as a callback: one line per round with accuracy, loss and ETA (bench/progress.py),
a note when a run resumes from its checkpoint, and a failed run's reason (with its traceback, where it ran
here). Each round is shown once, also when a retried Ray run sends it again. On a terminal, a live line
within each round (clients done, training samples/s) comes from an observer of the run's Simulation
(LiveRound), attached once the run's Simulation exists; logs get the round lines only.

At the end of an invocation it prints what happened: a compact table per algorithm (final, best and
validation-selected accuracy, total client training FLOPs, total bytes up + down, wall time; the mean over
the algorithm's seeds), then where the report is and the command that opens MLflow on these runs."""
from __future__ import annotations

import contextlib
import math
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Iterator

from bench.callbacks.base import Callback, InvocationInfo, RunInfo
from bench.errors import UserError
from bench.observe import Observer
from bench.progress import Progress, fmt_duration
from bench.store import MLFLOW_DB, parse_run_key

SI = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


class ProgressCallback(Callback):
    def __init__(self, progress: Progress):
        self.progress = progress
        self.best: dict[str, float] = {}    # run key -> best mean accuracy so far
        self.shown: dict[str, int] = {}     # run key -> last round shown
        self.config: dict[str, Any] = {}    # the invocation's resolved config
        self.ended: dict[str, tuple[dict[str, Any], str]] = {}  # run key -> (summary, status), kept runs too
        self.watching: dict[str, tuple[Any, LiveRound]] = {}   # run key -> (its Simulation, the live observer)

    def on_invocation_start(self, info: InvocationInfo, resumed: bool) -> None:
        self.config = dict(info.config)

    def on_run_kept(self, key: str, summary: dict[str, Any]) -> None:
        self.ended[key] = (summary, "FINISHED")

    def on_run_start(self, run: RunInfo, resumed_from: int | None) -> None:
        self.best[run.key] = max((h.get("acc_mean", -math.inf) for h in run.history), default=-math.inf)
        self.shown.setdefault(run.key, 0)
        if run.key not in self.progress.runs:  # a Ray retry continues the run already timed
            self.progress.run_started(run.key, run.rounds, max(resumed_from or 0, 0))
        if run.restored_from is not None:
            self.progress.echo(f"{run.key}: resuming after round {resumed_from} from {run.restored_from}")
        self.watch(run)

    def on_round_end(self, run: RunInfo, step: int, metrics: dict[str, float]) -> None:
        best = self.best[run.key] = max(self.best[run.key], metrics.get("acc_mean", -math.inf))
        self.watch(run)
        if step == 0 and run.key in self.progress.runs:  # the untrained model's evaluation: rounds timed from here
            self.progress.rounds_start(run.key, 0)
        if step <= self.shown[run.key]:  # step 0 (before training), or a round shown before a Ray retry
            return
        self.shown[run.key] = step
        self.progress.round_done(run.key, step, run.rounds, metrics, best)

    def watch(self, run: RunInfo) -> None:
        """Attach the live line's observer to the run's Simulation, once it exists (here, on a terminal)."""
        if (run.sim is None or not (self.progress.enabled and self.progress.tty)
                or self.watching.get(run.key, (None,))[0] is run.sim or not hasattr(run.sim, "observers")):
            return
        observer = LiveRound(self.progress, run.key, run.rounds, samples_counter(run.sim))
        run.sim.observers.add(observer)
        self.watching[run.key] = (run.sim, observer)

    def on_run_end(self, run: RunInfo, summary: dict[str, Any], clients: list[dict[str, Any]], status: str) -> None:
        self.ended[run.key] = (summary, status)
        self.progress.run_ended(run.key)
        if run.key in self.watching:
            sim, observer = self.watching.pop(run.key)
            sim.observers.remove(observer)
        if status in ("FINISHED", "KILLED") or isinstance(run.error, UserError):  # the CLI says these once
            return
        self.progress.echo(f"{run.key}: FAILED ({summary.get('error', status)})")
        if self.progress.enabled and run.error is not None:
            traceback.print_exception(run.error, file=sys.stderr)

    def on_invocation_end(self, artifacts: list[Path], status: str) -> None:
        if not self.ended or status == "KILLED":  # interrupted: the CLI says where the finished rounds are
            return
        for line in final_table(self.ended, self.config.get("dataset_split")):
            self.progress.echo(line)
        report = next((Path(a) for a in artifacts if Path(a).name == "report.md"), None)
        if report is not None:
            self.progress.echo(f"report: {report}")
        ui = ui_command(self.config)
        if ui:
            self.progress.echo(f"MLflow: {ui}")


# ---- the live line within a round -------------------------------------------------------------------------
def samples_counter(sim: Any):
    """Training samples of a phase for one client: its epochs over its indices (or its training split)."""
    def samples(cid: int, phase: Any) -> int:
        idx = phase.indices if phase.indices is not None else sim.clients[cid].split.train
        return phase.epochs * len(idx)
    return samples


class LiveRound(Observer):
    """Counts a round's training samples (its phases, possibly in worker threads: hence the lock) and clients
    done, and redraws the progress's live line at each. A client is done at its upload or, as clients trained
    together or in parallel upload only at the round's end, once it trained as many samples as in its
    previous round; the share trained compares the round's samples with those of its clients' previous
    rounds (a client not seen before counted at the mean)."""

    def __init__(self, progress: Progress, key: str, rounds: int, samples):
        self.progress, self.key, self.rounds, self.samples = progress, key, rounds, samples
        self.lock = threading.Lock()
        self.step = 0
        self.clients: list[int] = []       # this round's (none between rounds: no live line)
        self.uploaded: set[int] = set()
        self.seen: dict[int, int] = {}     # client -> training samples this round
        self.before: dict[int, int] = {}   # client -> training samples in its last round
        self.began = 0.0

    @contextlib.contextmanager
    def span(self, event: str, info: dict[str, Any]) -> Iterator[None]:
        if event == "round":
            with self.lock:
                self.step, self.clients, self.uploaded, self.seen = info["round"] + 1, list(info["clients"]), set(), {}
                self.began = self.progress.clock()
            self.show()
        elif event == "evaluation" and self.clients:
            self.show(evaluating=True)
        yield
        if event == "phase":
            with self.lock:
                for cid in info["clients"]:
                    self.seen[cid] = self.seen.get(cid, 0) + self.samples(cid, info["phase"])
            self.show()
        elif event == "upload":
            with self.lock:
                self.uploaded.add(info["client"])
            self.show()
        elif event == "round":
            with self.lock:
                self.before.update(self.seen)
                self.clients = []

    def show(self, evaluating: bool = False) -> None:
        with self.lock:
            if not self.clients:
                return
            done = sum(1 for c in self.clients
                       if c in self.uploaded or 0 < self.before.get(c, 0) <= self.seen.get(c, 0))
            mean = sum(self.before.values()) / len(self.before) if self.before else 0
            expected = sum(self.before.get(c, mean) for c in self.clients)
            self.progress.within_round(self.key, self.step, self.rounds, done, len(self.clients),
                                       sum(self.seen.values()), self.progress.clock() - self.began, evaluating,
                                       expected)


# ---- the end-of-run table ---------------------------------------------------------------------------------
def si(value: float | None, unit: str) -> str:
    """205 GFLOP, 1.23 MB: three significant figures with an SI prefix; '—' when missing."""
    if value is None or not isinstance(value, (int, float)) or value != value:
        return "—"
    for scale, prefix in SI:
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def percent(value: float | None) -> str:
    return "—" if value is None or value != value else f"{100 * value:.2f}"


def mean_of(summaries: list[dict[str, Any]], *keys: str) -> float | None:
    """The mean over runs of the sum of `keys` (runs missing one are left out); None when no run has them."""
    values = [sum(float(s[k]) for k in keys) for s in summaries
              if all(isinstance(s.get(k), (int, float)) for k in keys)]
    return sum(values) / len(values) if values else None


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds:.1f} s" if seconds < 60 else fmt_duration(seconds)


def algorithm_rows(ended: dict[str, tuple[dict[str, Any], str]]) -> list[dict[str, Any]]:
    """One row per algorithm (registry order): means over its finished seeds, and how many seeds failed."""
    from bench.registry import find_algorithm

    by_algo: dict[str, list[tuple[dict[str, Any], str]]] = {}
    for key, entry in ended.items():
        by_algo.setdefault(parse_run_key(key)[0], []).append(entry)

    def order(name: str) -> tuple[int, str]:
        cls = find_algorithm(name)
        return (cls.table_order if cls is not None else 1000, name)

    rows = []
    for name in sorted(by_algo, key=order):
        done = [s for s, status in by_algo[name] if status == "FINISHED"]
        cls = find_algorithm(name)
        rows.append({"name": (cls.display_name if cls is not None and cls.display_name else name),
                     "seeds": len(done), "failed": len(by_algo[name]) - len(done),
                     "final": mean_of(done, "final_acc"), "best": mean_of(done, "best_acc"),
                     "selected": mean_of(done, "val_selected_acc"), "flops": mean_of(done, "total_train_flops"),
                     "bytes": mean_of(done, "total_bytes_up", "total_bytes_down"), "wall": mean_of(done, "wall_time")})
    return rows


def final_table(ended: dict[str, tuple[dict[str, Any], str]], split: str | None = None) -> list[str]:
    """The lines of the end-of-run table."""
    rows = algorithm_rows(ended)
    seeds = sorted({r["seeds"] for r in rows})
    over = (f"mean over {seeds[0]} seed{'s' if seeds[0] != 1 else ''}" if len(seeds) == 1
            else "mean over each algorithm's finished seeds")
    header = ["algorithm", "final %", "best %", "val-sel. %", "train FLOPs", "bytes up+down", "wall"]
    body = [[r["name"] + (f" ({r['failed']} failed)" if r["failed"] else ""), percent(r["final"]),
             percent(r["best"]), percent(r["selected"]), si(r["flops"], "FLOP"), si(r["bytes"], "B"),
             duration(r["wall"])] for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    title = f"results ({over}; test accuracy; totals per run"
    title += f"; data split: {split})" if split else ")"
    return [title, fmt(header), *(fmt(line) for line in body)]


def ui_command(config: dict[str, Any]) -> str | None:
    """The command that opens MLflow on this invocation's store (None when there is no store to show)."""
    uri = config.get("tracking_uri")
    if uri:
        return f"bench ui --tracking-uri {uri}"
    output_dir = Path(config.get("output_dir") or "results")
    if not (output_dir / MLFLOW_DB).exists():
        return None
    return f"bench ui --output-dir {output_dir}"
