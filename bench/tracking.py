"""Deprecated: the tracker API from before bench/callbacks and bench/store.py, kept as a thin adapter for
reports/synthetic.py and benchmarks/speed.py until they use the callbacks directly; delete it then.

A `Tracker` here is a callback (bench/callbacks) called with the old method names: start_invocation,
start_run, log_round, end_run, end_invocation."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.callbacks import Callback, InvocationInfo, RunInfo
from bench.callbacks.mlflow import make_mlflow_callback
from bench.callbacks.results import ResultsFolderCallback
from bench.store import ResultsStore, default_tracking_uri, read_csv, read_json  # noqa: F401  (re-exported)


class Tracker:
    def __init__(self, callback: Callback):
        self.callback = callback
        self.runs: dict[str, RunInfo] = {}

    def start_invocation(self, name: str, config: dict[str, Any]) -> None:
        self.callback.on_invocation_start(InvocationInfo(name, config), False)

    def start_run(self, key: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        self.runs[key] = RunInfo(key, params, tags)
        self.callback.on_run_start(self.runs[key], None)

    def log_round(self, key: str, step: int, metrics: dict[str, float]) -> None:
        run = self.runs[key]
        run.history.append({"step": step, **metrics})
        self.callback.on_round_end(run, step, metrics)

    def end_run(self, key: str, summary: dict[str, Any], clients: list[dict[str, Any]], status: str) -> None:
        self.callback.on_run_end(self.runs[key], summary, clients, status)

    def end_invocation(self, artifacts: list[Path], status: str) -> None:
        self.callback.on_invocation_end(artifacts, status)


class ResultsFolder(Tracker):
    def __init__(self, root: Path):
        self.store = ResultsStore(root)
        self.root = self.store.root
        super().__init__(ResultsFolderCallback(self.store))


class MlflowTracker(Tracker):
    @property
    def run_ids(self) -> dict[str, str]:
        return self.callback.run_ids

    @property
    def client(self):
        return self.callback.client

    def _flush(self, run_id: str) -> None:
        self.callback.conn.flush(run_id)


def make_mlflow_tracker(tracking_uri: str, experiment: str, output_dir: Path, results: ResultsFolder) -> MlflowTracker | None:
    callback = make_mlflow_callback(tracking_uri, experiment, output_dir, results.store)
    return None if callback is None else MlflowTracker(callback)
