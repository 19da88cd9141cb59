"""Trackers: callbacks that receive the same events and write them somewhere. The results folder is the
source of truth (written as rounds finish, so a crash loses no finished round); MLflow mirrors it.

MLflow never stops a run: if the store cannot be opened, or a call fails mid-run, the tracker warns once,
stops using MLflow for the rest of the invocation and marks the results folder unsynced
(`<root>/mlflow.json`); `bench sync <root>` later uploads what MLflow missed (and only that). Writes to a
sqlite store are serialised between bench processes with a file lock and retried with backoff while the
database is locked, so concurrent `bench run`s share one store."""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from bench.errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: no inter-process locks (concurrent runs then rely on sqlite's own locking)
    fcntl = None

# Before mlflow is imported anywhere: no telemetry from a benchmark harness.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
# MLflow's HTTP default retries a dead server for about 4 minutes per call; a benchmark gives up sooner
# (the results folder has everything, `bench sync` uploads it later). The user's own settings win.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

MLFLOW_FILE = "mlflow.json"      # <root>/mlflow.json and <root>/runs/<key>/mlflow.json: run ids, sync state


class Tracker:
    """No-op base: override what you need. A `durable` tracker (the results folder) receives each round
    before the run's checkpoint is written; the others after it."""

    durable = False

    def start_invocation(self, name: str, config: dict[str, Any]) -> None: ...
    def start_run(self, key: str, params: dict[str, Any], tags: dict[str, str]) -> None: ...
    def log_round(self, key: str, step: int, metrics: dict[str, float]) -> None: ...
    def end_run(self, key: str, summary: dict[str, Any], clients: list[dict[str, Any]], status: str) -> None: ...
    def end_invocation(self, artifacts: list[Path], status: str) -> None: ...

    def resume_invocation(self, name: str, config: dict[str, Any]) -> None:
        """Continue an invocation whose results folder exists (default: as a new one)."""
        self.start_invocation(name, config)

    def resume_run(self, key: str, params: dict[str, Any], tags: dict[str, str], step: int) -> None:
        """Continue run `key` from its checkpoint after round `step` (-1: from scratch); rounds after `step`
        will be sent again. Default: as a new run."""
        self.start_run(key, params, tags)


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
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)  # atomic: readers never see half a file


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)  # atomic: readers never see half a file


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def results_config(root: Path) -> dict[str, Any]:
    """The config.json of a results folder a user named (`bench resume`, `bench sync`); a clear error if the
    folder is not one."""
    config = read_json(root / "config.json")
    if not config:
        raise UserError(f"{root} is not a bench results folder (no config.json); give the folder that "
                        "`bench run` printed, e.g. results/<run-name>")
    return config


class ResultsFolder(Tracker):
    """<root>/config.json, summary.csv, runs/<algo>-seed<k>/{config.json, metrics.csv, clients.csv, summary.json}."""

    durable = True

    def __init__(self, root: Path):
        self.root = root
        self.rounds: dict[str, list[dict[str, Any]]] = {}
        self.summaries: list[dict[str, Any]] = []
        self._lock = None

    def run_dir(self, key: str) -> Path:
        return self.root / "runs" / key

    # ---- exclusive use of the folder by one process ----
    def acquire(self) -> None:
        """Hold <root>/.lock for this process's lifetime (or until release): a second `bench run`/`resume`/
        `sync` on the same folder is refused instead of interleaving its writes."""
        self.root.mkdir(parents=True, exist_ok=True)
        if fcntl is None or self._lock is not None:
            return
        handle = open(self.root / ".lock", "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UserError(f"another bench process is using {self.root}; wait for it to finish") from None
        except OSError:  # a filesystem without locks (some network mounts): go on unlocked
            handle.close()
            return
        self._lock = handle

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing drops the flock
            self._lock = None

    # ---- events ----
    def start_invocation(self, name: str, config: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(self.root / "config.json", config)

    def resume_invocation(self, name: str, config: dict[str, Any]) -> None:
        if not (self.root / "config.json").exists():
            self.start_invocation(name, config)

    def start_run(self, key: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        run_dir = self.run_dir(key)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", {"params": params, "tags": tags})
        self.rounds[key] = []

    def resume_run(self, key: str, params: dict[str, Any], tags: dict[str, str], step: int) -> None:
        """Keep the rows up to `step` (those the checkpoint covers); later rows are dropped, since the
        resumed run writes them again."""
        kept = [row for row in self.read_rows(key) if int(row["step"]) <= step]
        self.start_run(key, params, tags)
        self.rounds[key] = kept
        path = self.run_dir(key) / "metrics.csv"
        if kept:
            write_csv(path, kept)
        else:
            path.unlink(missing_ok=True)

    def read_rows(self, key: str) -> list[dict[str, str]]:
        """metrics.csv rows; a torn last line (a kill mid-append) and repeated steps are dropped."""
        rows, last = [], -1
        for row in read_csv(self.run_dir(key) / "metrics.csv"):
            step = row.get("step") or ""
            if None in row.values() or None in row or not step.isdigit() or int(step) <= last:
                continue
            rows.append(row)
            last = int(step)
        return rows

    def log_round(self, key: str, step: int, metrics: dict[str, float]) -> None:
        rows = self.rounds[key]
        if rows and step <= int(rows[-1]["step"]):
            return  # a resumed run re-sends the rounds its checkpoint holds: each step is written once
        row = {"step": step, **metrics}
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
        self.record_summary(key, summary, status)

    def record_summary(self, key: str, summary: dict[str, Any], status: str) -> None:
        """Add (or replace) a run's line of <root>/summary.csv."""
        entry = {"run": key, **{k: v for k, v in summary.items() if k != "status"}, "status": status}
        self.summaries = [s for s in self.summaries if s["run"] != key] + [entry]
        write_csv(self.root / "summary.csv", self.summaries)

    def finished_summary(self, key: str) -> dict[str, Any] | None:
        """The summary of a run that already finished in this folder (None if it did not)."""
        summary = read_json(self.run_dir(key) / "summary.json")
        return summary if summary.get("status") == "FINISHED" else None

    # ---- what MLflow holds of this folder ----
    def mlflow_info(self, key: str | None = None) -> dict[str, Any]:
        return read_json((self.root if key is None else self.run_dir(key)) / MLFLOW_FILE)

    def record_mlflow(self, key: str | None = None, **fields: Any) -> None:
        folder = self.root if key is None else self.run_dir(key)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / MLFLOW_FILE, {**self.mlflow_info(key), **fields})


def sqlite_path(tracking_uri: str) -> Path | None:
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///"):]
    return None if path in ("", ":memory:") else Path(path)


def one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


TRANSIENT = ("database is locked", "database table is locked", "duplicate column name", "already exists",
             "unique constraint failed", "migration")


def is_transient(err: BaseException) -> bool:
    """Errors of two processes meeting in one sqlite store (lock contention, concurrent creation or schema
    migration of a new store)."""
    return any(s in str(err).lower() for s in TRANSIENT)


@contextlib.contextmanager
def quiet_mlflow_logs() -> Iterator[None]:
    """MLflow logs its own retries (multi-line); we report a failure once, in our words."""
    loggers = [logging.getLogger(n) for n in ("mlflow", "alembic", "sqlalchemy")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class MlflowTracker(Tracker):
    """One parent run per invocation, one child run per (algorithm, seed); params = resolved config;
    metrics per round (step = round) in one batch call; artifacts = the run's files and the plots.

    Run ids go to the results folder (mlflow.json), so a resumed invocation continues the same runs, and
    a metric step MLflow already holds is never logged again (no duplicated steps after a resume/sync).
    `strict=False` (a run): the first failure warns once and turns the tracker off. `strict=True`
    (`bench sync`): failures raise."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: Path, results: ResultsFolder,
                 *, strict: bool = False):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.results = results
        self.strict = strict
        self.disabled = False
        self.retry_seconds = float(os.environ.get("BENCH_MLFLOW_RETRY_SECONDS", "60"))
        self.parent_id: str | None = None
        self.run_ids: dict[str, str] = {}
        self.logged: dict[str, dict[str, int]] = {}  # run key -> metric -> last step MLflow holds (resumed runs)
        self.values_logged = 0
        # run id -> [(future or None, batch)]: round metrics queued on MLflow's logging thread, not yet
        # confirmed; a batch whose future failed is kept with None and re-sent synchronously by _flush
        self.pending: dict[str, list[tuple[Any, list]]] = {}
        db = sqlite_path(tracking_uri)
        self._lock_path = db.with_name(db.name + ".lock") if db is not None and fcntl is not None else None
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        self.client = self._retry(MlflowClient, tracking_uri)  # opens (and on first use migrates) the store
        self.experiment_id = self._retry(self._experiment, experiment, artifact_root)

    # ---- robustness ----
    @contextlib.contextmanager
    def _store_lock(self) -> Iterator[None]:
        """Serialise this store's writes with other bench processes (sqlite allows one writer)."""
        if self._lock_path is None:
            yield
            return
        with open(self._lock_path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX)
            except OSError:  # a filesystem without locks: sqlite's own locking and the retries remain
                pass
            yield

    def _retry(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.05
        while True:
            try:
                with self._store_lock():
                    return fn(*args, **kwargs)
            except Exception as err:
                if not is_transient(err) or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.disabled:
            return None
        try:
            return self._retry(fn, *args, **kwargs)
        except Exception as err:
            if self.strict:
                raise
            self.disable(err)
            return None

    def disable(self, err: BaseException) -> None:
        """Warn once and stop using MLflow; the results folder is marked for `bench sync`."""
        self.disabled = True
        root = self.results.root
        self.results.record_mlflow(tracking_uri=self.tracking_uri, unsynced=True, reason=one_line(err))
        warnings.warn(f"MLflow logging to {self.tracking_uri} failed ({one_line(err)}); continuing without "
                      f"MLflow, the results folder {root} is complete: upload it later with `bench sync {root}`",
                      stacklevel=3)

    # ---- store helpers ----
    def _experiment(self, name: str, artifact_root: Path) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        artifact_root.mkdir(parents=True, exist_ok=True)
        return self.client.create_experiment(name, artifact_location=artifact_root.as_uri())

    def _existing(self, run_id: str | None) -> str | None:
        """run_id if that run is in this store and not deleted."""
        if not run_id:
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(err).lower():
                return None
            raise
        return run_id if run.info.lifecycle_stage == "active" else None

    def _recorded(self, key: str | None) -> str | None:
        info = self.results.mlflow_info(key)
        if info.get("tracking_uri") not in (None, self.tracking_uri):
            return None  # recorded in another store (e.g. `bench sync --tracking-uri` elsewhere)
        return info.get("parent_run_id" if key is None else "run_id")

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100], synchronous=True)

    def _log_metrics(self, run_id: str, metrics: list, wait: bool = True) -> None:
        """Log metrics in batches. wait=False (each round's metrics): queue them on MLflow's logging thread
        and return (a synchronous sqlite write is 15-40 ms, a few % of a short round); _flush waits for them,
        so their errors surface inside _call's retry/disable logic at the end of the run."""
        for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
            batch = metrics[i:i + 1000]
            if wait:
                self.client.log_batch(run_id, metrics=batch, synchronous=True)
                continue
            future = self.client.log_batch(run_id, metrics=batch, synchronous=False)
            self.pending.setdefault(run_id, []).append((future, batch))
        self.values_logged += len(metrics)

    def _flush(self, run_id: str) -> None:
        """Wait for the run's queued batches. A failed one raises here (so _call retries or disables) and
        stays queued without its future, so that a retry sends it again, synchronously."""
        queue = self.pending.get(run_id, [])
        while queue:
            future, batch = queue[0]
            if future is None:
                self.client.log_batch(run_id, metrics=batch, synchronous=True)
            else:
                try:
                    future.wait()
                except Exception:
                    queue[0] = (None, batch)
                    raise
            queue.pop(0)
        self.pending.pop(run_id, None)

    def _flush_all(self) -> None:
        for run_id in list(self.pending):
            self._flush(run_id)

    def _last_steps(self, run_id: str) -> dict[str, int]:
        """Metric -> the last step the run holds, for every metric it holds (also steps beyond the
        checkpoint a resumed run goes back to: those are not logged again)."""
        return {name: max((m.step for m in self.client.get_metric_history(run_id, name)), default=-1)
                for name in self.client.get_run(run_id).data.metrics}

    # ---- events ----
    def start_invocation(self, name: str, config: dict[str, Any]) -> None:
        self._call(self._start_invocation, name, config)

    def _start_invocation(self, name: str, config: dict[str, Any]) -> None:
        run = self.client.create_run(self.experiment_id, run_name=name, tags={"bench.kind": "invocation"})
        self.parent_id = run.info.run_id
        self.results.record_mlflow(tracking_uri=self.tracking_uri, experiment_id=self.experiment_id,
                                   parent_run_id=self.parent_id)
        self._log_params(self.parent_id, flatten(config))

    def resume_invocation(self, name: str, config: dict[str, Any]) -> None:
        self._call(self._resume_invocation, name, config)

    def _resume_invocation(self, name: str, config: dict[str, Any]) -> None:
        parent = self._existing(self._recorded(None))
        if parent is None:
            self._start_invocation(name, config)
        else:
            self.parent_id = parent
            self.client.update_run(parent, status="RUNNING")

    def start_run(self, key: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        self._call(self._start_run, key, params, tags)

    def _start_run(self, key: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        run_tags = {**tags, "mlflow.parentRunId": self.parent_id} if self.parent_id else dict(tags)
        run = self.client.create_run(self.experiment_id, run_name=key, tags=run_tags)
        self.run_ids[key] = run.info.run_id
        self.results.record_mlflow(key, tracking_uri=self.tracking_uri, run_id=run.info.run_id)
        self._log_params(run.info.run_id, flatten(params))

    def resume_run(self, key: str, params: dict[str, Any], tags: dict[str, str], step: int) -> None:
        self._call(self._resume_run, key, params, tags, step)

    def _resume_run(self, key: str, params: dict[str, Any], tags: dict[str, str], step: int) -> None:
        """Reopen the run MLflow already has (or create it), then upload the results-folder rows up to
        `step` that it misses; later steps are logged as they come, each metric at most once per step."""
        run_id = self._existing(self._recorded(key))
        if run_id is None:
            self._start_run(key, params, tags)
            run_id = self.run_ids[key]
        else:
            self.run_ids[key] = run_id
            self.client.update_run(run_id, status="RUNNING")
        rows = [r for r in self.results.rounds.get(key, []) if int(r["step"]) <= step]
        last = self._last_steps(run_id)
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        missing = [Metric(name, float(value), now, int(row["step"])) for row in rows
                   for name, value in row.items()
                   if name != "step" and value not in ("", None) and int(row["step"]) > last.get(name, -1)]
        self._log_metrics(run_id, missing)
        for metric in missing:
            last[metric.key] = max(last.get(metric.key, -1), metric.step)
        self.logged[key] = last

    def log_round(self, key: str, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if key not in self.run_ids:
            return
        last = self.logged.get(key, {})
        now = int(time.time() * 1000)
        batch = [Metric(name, float(value), now, step) for name, value in metrics.items()
                 if step > last.get(name, -1)]
        self._call(self._log_metrics, self.run_ids[key], batch, wait=False)

    def end_run(self, key: str, summary: dict[str, Any], clients: list[dict[str, Any]], status: str) -> None:
        if key in self.run_ids:
            self._call(self._end_run, key, summary, status)

    def _end_run(self, key: str, summary: dict[str, Any], status: str) -> None:
        from mlflow.entities import Metric

        run_id = self.run_ids[key]
        self._flush(run_id)  # the queued rounds first: their errors surface here, retried or disabling
        held = self.client.get_run(run_id).data.metrics if key in self.logged else {}
        now = int(time.time() * 1000)
        finals = [Metric(f"summary.{k}", float(v), now, 0) for k, v in summary.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)
                  and held.get(f"summary.{k}") != float(v)]
        if finals:
            self._log_metrics(run_id, finals)
        if "error" in summary:
            self.client.set_tag(run_id, "error", str(summary["error"])[:5000])
        for path in sorted(self.results.run_dir(key).iterdir()):  # the run's files, not its checkpoint
            if path.is_file() and not path.name.startswith(".") and path.name != MLFLOW_FILE:
                self.client.log_artifact(run_id, str(path))
        self.client.set_terminated(run_id, status=status)

    def end_invocation(self, artifacts: list[Path], status: str) -> None:
        if self.parent_id is None:
            self._call(self._flush_all)
        else:
            self._call(self._end_invocation, artifacts, status)

    def _end_invocation(self, artifacts: list[Path], status: str) -> None:
        self._flush_all()  # rounds of runs that never reached end_run
        for path in artifacts:
            if Path(path).exists():
                self.client.log_artifact(self.parent_id, str(path))
        self.client.set_terminated(self.parent_id, status=status)

    def terminate(self, key: str, status: str) -> None:
        if key in self.run_ids:
            self._call(self._flush, self.run_ids[key])
            self._call(self.client.set_terminated, self.run_ids[key], status=status)

    def sync_run(self, key: str) -> str:
        """Bring MLflow's run `key` up to what the results folder holds (rows, summary, files, status), e.g.
        a run that finished in the folder while MLflow was down, or was killed before MLflow heard of its
        end. Returns the run's status (KILLED for a run that never finished)."""
        run_dir = self.results.run_dir(key)
        run_config = read_json(run_dir / "config.json")
        rows = self.results.read_rows(key)
        self.results.rounds[key] = rows
        self.resume_run(key, run_config.get("params", {}), run_config.get("tags", {}),
                        int(rows[-1]["step"]) if rows else -1)
        summary = read_json(run_dir / "summary.json")
        if not summary:
            self.terminate(key, "KILLED")
            return "KILLED"
        status = summary.pop("status", "FINISHED")
        self.end_run(key, summary, [], status)
        return status


def default_tracking_uri(output_dir: Path) -> str:
    return f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"


@contextlib.contextmanager
def fast_failure() -> Iterator[None]:
    """For the first contact with a store: a dead HTTP server fails in seconds, not minutes."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"
    try:
        with quiet_mlflow_logs():
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_mlflow_tracker(tracking_uri: str, experiment: str, output_dir: Path,
                        results: ResultsFolder) -> MlflowTracker | None:
    """The MLflow tracker, or None with one warning if the store cannot be opened (results still written,
    and the folder is marked for `bench sync`)."""
    try:
        with fast_failure():
            return MlflowTracker(tracking_uri, experiment, (output_dir / "mlartifacts").resolve(), results)
    except Exception as err:  # the results folder must not depend on the store being up
        root = results.root
        results.record_mlflow(tracking_uri=tracking_uri, unsynced=True, reason=one_line(err))
        warnings.warn(f"MLflow store {tracking_uri} unavailable ({one_line(err)}); the run continues and writes "
                      f"its results folder {root}: upload it later with `bench sync {root}`", stacklevel=2)
        return None


def sync_results(root: Path, tracking_uri: str | None = None) -> dict[str, Any]:
    """Upload to MLflow whatever of a results folder it misses: runs, params, metric steps, summaries,
    artifacts, statuses. Idempotent: a step MLflow holds is not logged again."""
    root = Path(root)
    config = results_config(root)
    results = ResultsFolder(root)
    results.acquire()
    try:
        uri = tracking_uri or results.mlflow_info().get("tracking_uri") or default_tracking_uri(root.parent)
        try:
            with fast_failure():
                tracker = MlflowTracker(uri, config.get("experiment", "mhpfl-bench"),
                                        (root.parent / "mlartifacts").resolve(), results, strict=True)
            return _sync(tracker, results, config, uri)
        except UserError:
            raise
        except Exception as err:
            raise UserError(f"cannot sync {root} to MLflow store {uri} ({one_line(err)}); "
                            "check the store or pass --tracking-uri") from None
    finally:
        results.release()


def _sync(tracker: MlflowTracker, results: ResultsFolder, config: dict[str, Any], uri: str) -> dict[str, Any]:
    root = results.root
    tracker.resume_invocation(root.name, config)
    run_dirs = sorted(p for p in (root / "runs").iterdir() if p.is_dir()) if (root / "runs").is_dir() else []
    statuses = {run_dir.name: tracker.sync_run(run_dir.name) for run_dir in run_dirs}
    expected = len(config.get("algorithms") or []) * len(config.get("seeds") or [])
    if "FAILED" in statuses.values():
        status = "FAILED"
    elif "KILLED" in statuses.values() or len(statuses) < expected:
        status = "KILLED"
    else:
        status = "FINISHED"
    plots = sorted(p for p in (root / "plots").glob("*") if p.is_file()) if (root / "plots").is_dir() else []
    tracker.end_invocation([root / "summary.csv", *plots], status)
    results.record_mlflow(tracking_uri=uri, experiment_id=tracker.experiment_id, parent_run_id=tracker.parent_id,
                          unsynced=False, reason=None)
    return {"tracking_uri": uri, "runs": len(statuses), "metric_values": tracker.values_logged, "status": status}
