"""The progress display as a callback: one line per round with accuracy, loss and ETA (bench/progress.py),
a note when a run resumes from its checkpoint, and a failed run's reason (with its traceback, where it ran
here). Each round is shown once, also when a retried Ray run sends it again.

At the end of an invocation it prints what happened: a compact table per algorithm (final, best and
validation-selected accuracy, total client training FLOPs, total bytes up + down, wall time; the mean over
the algorithm's seeds), then where the report is and the command that opens MLflow on these runs."""
from __future__ import annotations

import math
import sys
import traceback
from pathlib import Path
from typing import Any

from bench.callbacks.base import Callback, InvocationInfo, RunInfo
from bench.errors import UserError
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

    def on_invocation_start(self, info: InvocationInfo, resumed: bool) -> None:
        self.config = dict(info.config)

    def on_run_kept(self, key: str, summary: dict[str, Any]) -> None:
        self.ended[key] = (summary, "FINISHED")

    def on_run_start(self, run: RunInfo, resumed_from: int | None) -> None:
        self.best[run.key] = max((h.get("acc_mean", -math.inf) for h in run.history), default=-math.inf)
        self.shown.setdefault(run.key, 0)
        if run.restored_from is not None:
            self.progress.echo(f"{run.key}: resuming after round {resumed_from} from {run.restored_from}")

    def on_round_end(self, run: RunInfo, step: int, metrics: dict[str, float]) -> None:
        best = self.best[run.key] = max(self.best[run.key], metrics.get("acc_mean", -math.inf))
        if step <= self.shown[run.key]:  # step 0 (before training), or a round shown before a Ray retry
            return
        self.shown[run.key] = step
        self.progress.round_done(run.key, step, run.rounds, metrics, best, metrics.get("cum_round_time", 0.0))

    def on_run_end(self, run: RunInfo, summary: dict[str, Any], clients: list[dict[str, Any]], status: str) -> None:
        self.ended[run.key] = (summary, status)
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
