"""Trackers: callbacks that receive the same events and write them somewhere. The results folder is the
source of truth (written as rounds finish, so a crash loses no finished round); MLflow mirrors it."""
from __future__ import annotations

import csv
import json
import os
import warnings
from pathlib import Path
from typing import Any

# Before mlflow is imported anywhere: no telemetry from a benchmark harness.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


class Tracker:
    """No-op base: override what you need."""

    def start_invocation(self, name: str, config: dict[str, Any]) -> None: ...
    def start_run(self, key: str, params: dict[str, Any], tags: dict[str, str]) -> None: ...
    def log_round(self, key: str, step: int, metrics: dict[str, float]) -> None: ...
    def end_run(self, key: str, summary: dict[str, Any], clients: list[dict[str, Any]], status: str) -> None: ...
    def end_invocation(self, artifacts: list[Path], status: str) -> None: ...


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)  # atomic: readers never see half a file


class ResultsFolder(Tracker):
    """<root>/config.json, summary.csv, runs/<algo>-seed<k>/{config.json, metrics.csv, clients.csv, summary.json}."""

    def __init__(self, root: Path):
        self.root = root
        self.rounds: dict[str, list[dict[str, Any]]] = {}
        self.summaries: list[dict[str, Any]] = []

    def run_dir(self, key: str) -> Path:
        return self.root / "runs" / key

    def start_invocation(self, name: str, config: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(self.root / "config.json", config)

    def start_run(self, key: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        run_dir = self.run_dir(key)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", {"params": params, "tags": tags})
        self.rounds[key] = []

    def log_round(self, key: str, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **metrics}
        rows = self.rounds[key]
        rows.append(row)
        path = self.run_dir(key) / "metrics.csv"
        # Columns can grow after step 0 (e.g. acc_phase1): rewrite then, else append one line.
        if len(rows) == 1 or set(row) - set(rows[0]) or list(row) != list(rows[-2]):
            write_csv(path, rows)
        else:
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r))).writerow(row)

    def end_run(self, key: str, summary: dict[str, Any], clients: list[dict[str, Any]], status: str) -> None:
        run_dir = self.run_dir(key)
        if clients:
            write_csv(run_dir / "clients.csv", clients)
        write_json(run_dir / "summary.json", {**summary, "status": status})
        self.summaries.append({"run": key, **summary, "status": status})
        write_csv(self.root / "summary.csv", self.summaries)


class MlflowTracker(Tracker):
    """One parent run per invocation, one child run per (algorithm, seed); params = resolved config;
    metrics per round (step = round) in one batch call; artifacts = the run's files and the plots."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: Path, results: ResultsFolder):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        self.results = results
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            artifact_root.mkdir(parents=True, exist_ok=True)
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_root.as_uri())
        else:
            self.experiment_id = exp.experiment_id
        self.parent_id: str | None = None
        self.run_ids: dict[str, str] = {}

    def start_invocation(self, name: str, config: dict[str, Any]) -> None:
        run = self.client.create_run(self.experiment_id, run_name=name, tags={"bench.kind": "invocation"})
        self.parent_id = run.info.run_id
        self._log_params(self.parent_id, flatten(config))

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100], synchronous=True)

    def start_run(self, key: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        run = self.client.create_run(self.experiment_id, run_name=key,
                                     tags={"mlflow.parentRunId": self.parent_id, **tags})
        self.run_ids[key] = run.info.run_id
        self._log_params(run.info.run_id, flatten(params))

    def log_round(self, key: str, step: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(name, float(value), now, step) for name, value in metrics.items()]
        self.client.log_batch(self.run_ids[key], metrics=batch, synchronous=True)

    def end_run(self, key: str, summary: dict[str, Any], clients: list[dict[str, Any]], status: str) -> None:
        from mlflow.entities import Metric

        run_id = self.run_ids[key]
        finals = [Metric(f"summary.{k}", float(v), 0, 0) for k, v in summary.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None]
        if finals:
            self.client.log_batch(run_id, metrics=finals, synchronous=True)
        if "error" in summary:
            self.client.set_tag(run_id, "error", str(summary["error"])[:5000])
        self.client.log_artifacts(run_id, str(self.results.run_dir(key)))
        self.client.set_terminated(run_id, status=status)

    def end_invocation(self, artifacts: list[Path], status: str) -> None:
        for path in artifacts:
            self.client.log_artifact(self.parent_id, str(path))
        self.client.set_terminated(self.parent_id, status=status)


def default_tracking_uri(output_dir: Path) -> str:
    return f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"


def make_mlflow_tracker(tracking_uri: str, experiment: str, output_dir: Path,
                        results: ResultsFolder) -> MlflowTracker | None:
    """The MLflow tracker, or None with one warning if the store cannot be opened (results still written)."""
    try:
        return MlflowTracker(tracking_uri, experiment, (output_dir / "mlartifacts").resolve(), results)
    except Exception as err:  # the results folder must not depend on the store being up
        warnings.warn(f"MLflow store {tracking_uri} unavailable ({type(err).__name__}: {err}); "
                      "results are still written to the results folder", stacklevel=2)
        return None
