"""The progress display as a callback: one line per round with accuracy, loss and ETA (bench/progress.py),
a note when a run resumes from its checkpoint, and a failed run's reason (with its traceback, where it ran
here). Each round is shown once, also when a retried Ray run sends it again."""
from __future__ import annotations

import math
import sys
import traceback
from typing import Any

from bench.callbacks.base import Callback, RunInfo
from bench.errors import UserError
from bench.progress import Progress


class ProgressCallback(Callback):
    def __init__(self, progress: Progress):
        self.progress = progress
        self.best: dict[str, float] = {}    # run key -> best mean accuracy so far
        self.shown: dict[str, int] = {}     # run key -> last round shown

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
        if status == "FINISHED" or isinstance(run.error, UserError):  # a UserError stops the invocation: said once
            return
        self.progress.echo(f"{run.key}: FAILED ({summary.get('error', status)})")
        if self.progress.enabled and run.error is not None:
            traceback.print_exception(run.error, file=sys.stderr)
