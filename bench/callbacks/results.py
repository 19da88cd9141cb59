"""The results folder as a callback: the source of truth, written synchronously as rounds finish, so a crash
loses no finished round (layout, atomic writes and readers: bench/store.py)."""
from __future__ import annotations

from typing import Any

from bench.callbacks.base import Callback, InvocationInfo, RunInfo
from bench.store import ResultsStore


class ResultsFolderCallback(Callback):
    """<root>/config.json and summary.csv; runs/<key>/{config.json, metrics.csv, clients.csv, summary.json}."""

    def __init__(self, store: ResultsStore):
        self.store = store
        self.rounds: dict[str, list[dict[str, Any]]] = {}   # run key -> its metrics.csv rows
        self.summaries: list[dict[str, Any]] = []            # this invocation's summary.csv lines

    def on_invocation_start(self, info: InvocationInfo, resumed: bool) -> None:
        if not (resumed and self.store.has_config()):
            self.store.write_config(info.config)

    def on_run_kept(self, key: str, summary: dict[str, Any]) -> None:
        self._record_summary(key, summary, "FINISHED")

    def on_run_start(self, run: RunInfo, resumed_from: int | None) -> None:
        """A resumed run keeps the rows up to its checkpoint (later ones are dropped: it writes them again),
        plus those of its history the folder missed."""
        kept = [] if resumed_from is None else [r for r in self.store.rows(run.key) if int(r["step"]) <= resumed_from]
        self.store.write_run_config(run.key, run.params, run.tags)
        last = int(kept[-1]["step"]) if kept else -1
        rows = kept + [row for row in run.history if row["step"] > last]
        self.rounds[run.key] = rows
        if resumed_from is not None:
            self.store.write_rows(run.key, rows)

    def on_round_end(self, run: RunInfo, step: int, metrics: dict[str, float]) -> None:
        rows = self.rounds[run.key]
        if rows and step <= int(rows[-1]["step"]):
            return  # a round the folder holds (a retried Ray run sends it again): each step is written once
        row = {"step": step, **metrics}
        rows.append(row)
        # Columns can grow after step 0 (e.g. acc_phase1): rewrite then, else append one line.
        if len(rows) == 1 or set(row) - set(rows[0]) or list(row) != list(rows[-2]):
            self.store.write_rows(run.key, rows)
        else:
            self.store.append_row(run.key, row, list(dict.fromkeys(k for r in rows for k in r)))

    def on_run_end(self, run: RunInfo, summary: dict[str, Any], clients: list[dict[str, Any]], status: str) -> None:
        self.store.write_run_end(run.key, summary, clients, status)
        self._record_summary(run.key, summary, status)

    def _record_summary(self, key: str, summary: dict[str, Any], status: str) -> None:
        """Add (or replace) a run's line of <root>/summary.csv."""
        entry = {"run": key, **{k: v for k, v in summary.items() if k != "status"}, "status": status}
        self.summaries = [s for s in self.summaries if s["run"] != key] + [entry]
        self.store.write_summary_table(self.summaries)
