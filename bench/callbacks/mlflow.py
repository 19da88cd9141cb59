"""MLflow as a callback: one parent run per invocation, one child run per (algorithm, seed); params = the
resolved config; metrics per round (step = round) in one batch call; artifacts = the run's files and the plots.

The results folder is the source of truth and MLflow mirrors it. Run ids and the sync state live in the
results folder (mlflow.json, through bench/store.py), so a resumed invocation continues the same runs and a
metric step MLflow already holds is never logged again (no duplicated steps after a resume or a sync).
MLflow never stops a run: if the store cannot be opened, or a call fails mid-run, the callback warns once,
stops using MLflow for the rest of the invocation and marks the folder unsynced; `bench sync <root>`
(`sync_results`) later uploads what MLflow missed, and only that."""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Callable

from bench.callbacks.base import Callback, InvocationInfo, RunInfo
from bench.callbacks.mlflow_client import MlflowConnection, fast_failure, one_line
from bench.callbacks.mlflow_meta import (dataset_input, flatten, invocation_params, invocation_tags,  # noqa: F401
                                         parent_metrics, run_params, run_tags, setting_of)
from bench.errors import UserError
from bench.store import ResultsStore, default_tracking_uri


def metric_batch(row: dict[str, Any], last: dict[str, int], step: int) -> list:
    """MLflow metrics of one round, those beyond the step MLflow holds of each metric."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(name, float(value), now, step) for name, value in row.items()
            if name != "step" and value not in ("", None) and step > last.get(name, -1)]


class MlflowCallback(Callback):
    """`strict=False` (a run): the first failure warns once and turns the callback off. `strict=True`
    (`bench sync`): failures raise."""

    def __init__(self, conn: MlflowConnection, experiment_id: str, store: ResultsStore, *, strict: bool = False,
                 system_metrics: bool = False):
        self.conn, self.client, self.experiment_id = conn, conn.client, experiment_id
        self.tracking_uri = conn.tracking_uri
        self.store, self.strict = store, strict
        self.disabled = False
        self.parent_id: str | None = None
        self.invocation = store.root.name
        self.summaries: dict[str, tuple[str, dict[str, Any]]] = {}  # run key -> (algorithm, summary): the parent's
        self.system_metrics = system_metrics
        self.monitors: dict[str, Any] = {}  # run key -> MLflow's system metrics monitor (system_metrics=True)
        self.run_ids: dict[str, str] = {}
        self.logged: dict[str, dict[str, int]] = {}  # run key -> metric -> last step MLflow holds (resumed runs)

    # ---- robustness ----
    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.disabled:
            return None
        try:
            return self.conn.retry(fn, *args)
        except Exception as err:
            if self.strict:
                raise
            self.disable(err)
            return None

    def disable(self, err: BaseException) -> None:
        """Warn once and stop using MLflow; the results folder is marked for `bench sync`."""
        self.disabled = True
        root = self.store.root
        self.store.record_mlflow(tracking_uri=self.tracking_uri, unsynced=True, reason=one_line(err))
        warnings.warn(f"MLflow logging to {self.tracking_uri} failed ({one_line(err)}); continuing without "
                      f"MLflow, the results folder {root} is complete: upload it later with `bench sync {root}`",
                      stacklevel=3)

    def _recorded(self, key: str | None) -> str | None:
        info = self.store.mlflow_info(key)
        if info.get("tracking_uri") not in (None, self.tracking_uri):
            return None  # recorded in another store (e.g. `bench sync --tracking-uri` elsewhere)
        return info.get("parent_run_id" if key is None else "run_id")

    # ---- events ----
    def on_invocation_start(self, info: InvocationInfo, resumed: bool) -> None:
        self._call(self._resume_invocation if resumed else self._start_invocation, info)

    def _start_invocation(self, info: InvocationInfo) -> None:
        self.invocation = info.name
        tags = invocation_tags(info.name, info.config, setting_of(info.config))
        run = self.client.create_run(self.experiment_id, run_name=info.name, tags=tags)
        self.parent_id = run.info.run_id
        self.store.record_mlflow(tracking_uri=self.tracking_uri, experiment_id=self.experiment_id,
                                 parent_run_id=self.parent_id)
        self.conn.log_params(self.parent_id, invocation_params(info.config))

    def _resume_invocation(self, info: InvocationInfo) -> None:
        parent = self.conn.existing(self._recorded(None))
        if parent is None:
            self._start_invocation(info)
        else:
            self.parent_id, self.invocation = parent, info.name
            self.client.update_run(parent, status="RUNNING")

    def on_run_kept(self, key: str, summary: dict[str, Any]) -> None:
        self.sync_run(key)  # e.g. killed after the folder had the run's end but before MLflow did

    def on_run_start(self, run: RunInfo, resumed_from: int | None) -> None:
        if resumed_from is None:
            self._call(self._start_run, run.key, run.params, run.tags)
            self._call(self._start_monitor, run.key)
        else:
            self._call(self._reopen_run, run.key, run.params, run.tags, run.history)

    def _start_run(self, key: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        mlflow_tags = run_tags(key, params, tags, self.invocation)
        if self.parent_id:
            mlflow_tags["mlflow.parentRunId"] = self.parent_id
        run = self.client.create_run(self.experiment_id, run_name=key, tags=mlflow_tags)
        run_id = self.run_ids[key] = run.info.run_id
        self.store.record_mlflow(key, tracking_uri=self.tracking_uri, run_id=run_id)
        self.conn.log_params(run_id, run_params(params))
        self.client.log_inputs(run_id, datasets=[dataset_input(params, tags)])

    def _reopen_run(self, key: str, params: dict[str, Any], tags: dict[str, str], rows: list[dict[str, Any]]) -> None:
        """Reopen the run MLflow already has (or create it), then upload the rows it misses; later steps are
        logged as they come, each metric at most once per step."""
        run_id = self.conn.existing(self._recorded(key))
        if run_id is None:
            self._start_run(key, params, tags)
            run_id = self.run_ids[key]
        else:
            self.run_ids[key] = run_id
            self.conn.flush(run_id)  # rounds still queued from before (a retried Ray run) count as held
            self.client.update_run(run_id, status="RUNNING")
        self._start_monitor(key)
        last = self.conn.last_steps(run_id)
        missing = [m for row in rows for m in metric_batch(row, last, int(row["step"]))]
        self.conn.log_metrics(run_id, missing)
        for metric in missing:
            last[metric.key] = max(last.get(metric.key, -1), metric.step)
        self.logged[key] = last

    def on_round_end(self, run: RunInfo, step: int, metrics: dict[str, float]) -> None:
        if run.key not in self.run_ids:
            return
        batch = metric_batch(metrics, self.logged.get(run.key, {}), step)
        self._call(self.conn.log_metrics, self.run_ids[run.key], batch, False)

    def on_run_end(self, run: RunInfo, summary: dict[str, Any], clients: list[dict[str, Any]], status: str) -> None:
        self._end(run.key, summary, status)

    def _end(self, key: str, summary: dict[str, Any], status: str) -> None:
        algorithm = self.store.run_config(key).get("tags", {}).get("algorithm") or key.rsplit("-seed", 1)[0]
        if status == "FINISHED":
            self.summaries[key] = (algorithm, summary)
        self._stop_monitor(key)
        if key in self.run_ids:
            self._call(self._end_run, key, summary, status)

    def _start_monitor(self, key: str) -> None:
        """MLflow's system metrics (CPU, memory, GPU; `system/...`) for the run, when asked for."""
        if self.system_metrics and key in self.run_ids and key not in self.monitors:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(self.run_ids[key], resume_logging=key in self.logged,
                                           tracking_uri=self.tracking_uri)
            monitor.start()
            self.monitors[key] = monitor

    def _stop_monitor(self, key: str) -> None:
        monitor = self.monitors.pop(key, None)
        if monitor is not None:
            self._call(monitor.finish)

    def _end_run(self, key: str, summary: dict[str, Any], status: str) -> None:
        from mlflow.entities import Metric

        run_id = self.run_ids[key]
        self.conn.flush(run_id)  # the queued rounds first: their errors surface here, retried or disabling
        held = self.client.get_run(run_id).data.metrics if key in self.logged else {}
        now = int(time.time() * 1000)
        finals = [Metric(f"summary.{k}", float(v), now, 0) for k, v in summary.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)
                  and held.get(f"summary.{k}") != float(v)]
        if finals:
            self.conn.log_metrics(run_id, finals)
        if "error" in summary:
            self.client.set_tag(run_id, "error", str(summary["error"])[:5000])
        for path in self.store.run_files(key):  # the run's files, not its checkpoint
            self.client.log_artifact(run_id, str(path))
        self.client.set_terminated(run_id, status=status)

    def on_invocation_end(self, artifacts: list[Path], status: str) -> None:
        if self.parent_id is None:
            self._call(self.conn.flush_all)
        else:
            self._call(self._end_invocation, artifacts, status)

    def _end_invocation(self, artifacts: list[Path], status: str) -> None:
        from mlflow.entities import Metric

        for key in list(self.monitors):
            self._stop_monitor(key)
        self.conn.flush_all()  # rounds of runs that never reached their end
        now = int(time.time() * 1000)
        held = self.client.get_run(self.parent_id).data.metrics
        summary = [Metric(name, value, now, 0) for name, value in parent_metrics(self.summaries).items()
                   if held.get(name) != value]
        if summary:
            self.conn.log_metrics(self.parent_id, summary)
        for path in artifacts:
            if Path(path).exists():
                self.client.log_artifact(self.parent_id, str(path))
        self.client.set_terminated(self.parent_id, status=status)

    def sync_run(self, key: str) -> str:
        """Bring MLflow's run `key` up to what the results folder holds (rows, summary, files, status), e.g.
        a run that finished in the folder while MLflow was down, or was killed before MLflow heard of its
        end. Returns the run's status (KILLED for a run that never finished)."""
        run_config = self.store.run_config(key)
        self._call(self._reopen_run, key, run_config.get("params", {}), run_config.get("tags", {}),
                   self.store.rows(key))
        summary = self.store.summary(key)
        if not summary:
            if key in self.run_ids:
                self._call(self.conn.flush, self.run_ids[key])
                self._call(self.client.set_terminated, self.run_ids[key], "KILLED")
            return "KILLED"
        status = summary.pop("status", "FINISHED")
        self._end(key, summary, status)
        return status


def make_mlflow_callback(tracking_uri: str, experiment: str, output_dir: Path, store: ResultsStore, *,
                         strict: bool = False, system_metrics: bool = False) -> MlflowCallback | None:
    """The MLflow callback, or (not strict) None with one warning if the store cannot be opened: the results
    folder is still written, and marked for `bench sync`. `system_metrics`: MLflow's CPU/memory/GPU metrics
    per run (needs psutil)."""
    if system_metrics:
        check_system_metrics()
    try:
        with fast_failure():
            conn = MlflowConnection(tracking_uri)  # opens (and on first use migrates) the store
            experiment_id = conn.retry(conn.experiment, experiment, (Path(output_dir) / "mlartifacts").resolve())
        return MlflowCallback(conn, experiment_id, store, strict=strict, system_metrics=system_metrics)
    except Exception as err:  # the results folder must not depend on the store being up
        if strict:
            raise
        root = store.root
        store.record_mlflow(tracking_uri=tracking_uri, unsynced=True, reason=one_line(err))
        warnings.warn(f"MLflow store {tracking_uri} unavailable ({one_line(err)}); the run continues and writes "
                      f"its results folder {root}: upload it later with `bench sync {root}`", stacklevel=2)
        return None


def check_system_metrics() -> None:
    """System metrics need psutil (not a dependency of bench): refuse the option, before the run, without it."""
    try:
        import psutil  # noqa: F401
    except ImportError:
        raise UserError("system_metrics needs the psutil package (pip install psutil); valid: install it, or "
                        "run without --system-metrics / system_metrics=true") from None


def sync_results(root: Path, tracking_uri: str | None = None) -> dict[str, Any]:
    """Upload to MLflow whatever of a results folder it misses: runs, params, metric steps, summaries,
    artifacts, statuses. Idempotent: a step MLflow holds is not logged again."""
    store = ResultsStore(root)
    config = store.require_config()
    store.acquire()
    try:
        uri = tracking_uri or store.mlflow_info().get("tracking_uri") or default_tracking_uri(store.root.parent)
        try:
            callback = make_mlflow_callback(uri, config.get("experiment", "mhpfl-bench"), store.root.parent, store,
                                            strict=True)
            return _sync(callback, store, config)
        except UserError:
            raise
        except Exception as err:
            raise UserError(f"cannot sync {store.root} to MLflow store {uri} ({one_line(err)}); "
                            "check the store or pass --tracking-uri") from None
    finally:
        store.release()


def _sync(callback: MlflowCallback, store: ResultsStore, config: dict[str, Any]) -> dict[str, Any]:
    callback.on_invocation_start(InvocationInfo(store.root.name, config), resumed=True)
    statuses = {key: callback.sync_run(key) for key in store.run_keys()}
    expected = len(config.get("algorithms") or []) * len(config.get("seeds") or [])
    if "FAILED" in statuses.values():
        status = "FAILED"
    elif "KILLED" in statuses.values() or len(statuses) < expected:
        status = "KILLED"
    else:
        status = "FINISHED"
    callback.on_invocation_end([store.summary_table_path, *store.plot_files()], status)
    store.record_mlflow(tracking_uri=callback.tracking_uri, experiment_id=callback.experiment_id,
                        parent_run_id=callback.parent_id, unsynced=False, reason=None)
    return {"tracking_uri": callback.tracking_uri, "runs": len(statuses), "metric_values": callback.conn.values_logged,
            "status": status}
