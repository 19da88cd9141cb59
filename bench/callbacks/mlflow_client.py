"""A robust MLflow client for the MLflow callback: retries while two processes meet in one sqlite store
(writes serialised between bench processes with a file lock, retried with backoff while the database is
locked), round metrics queued on MLflow's logging thread and flushed at the end of a run, and a dead store
detected in seconds rather than minutes."""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

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

TRANSIENT = ("database is locked", "database table is locked", "duplicate column name", "already exists",
             "unique constraint failed", "migration")


def sqlite_path(tracking_uri: str) -> Path | None:
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///"):]
    return None if path in ("", ":memory:") else Path(path)


def one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def is_transient(err: BaseException) -> bool:
    """Errors of two processes meeting in one sqlite store (lock contention, concurrent creation or schema
    migration of a new store)."""
    return any(s in str(err).lower() for s in TRANSIENT)


def silence_store_setup() -> None:
    """Keep MLflow's notes on creating and migrating a new sqlite store ("Creating initial MLflow database
    tables...", INFO) off the user's terminal. mlflow configures its loggers when first imported, so it is
    imported first: set before, the level would be reset by that import."""
    import mlflow  # noqa: F401

    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def quiet_mlflow_logs() -> Iterator[None]:
    """MLflow logs its own retries (multi-line); we report a failure once, in our words."""
    silence_store_setup()  # imports mlflow first: its import would undo the levels set below
    loggers = [logging.getLogger(n) for n in ("mlflow", "alembic", "sqlalchemy")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


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


class MlflowConnection:
    """An MlflowClient on `tracking_uri` (opened, and on first use migrated, with retries) and the calls the
    callback makes through it. `retry` runs a call under the store lock until it succeeds or fails for good."""

    def __init__(self, tracking_uri: str):
        from mlflow.tracking import MlflowClient

        silence_store_setup()
        self.tracking_uri = tracking_uri
        self.retry_seconds = float(os.environ.get("BENCH_MLFLOW_RETRY_SECONDS", "60"))
        self.values_logged = 0
        # run id -> [(future or None, batch)]: round metrics queued on MLflow's logging thread, not yet
        # confirmed; a batch whose future failed is kept with None and re-sent synchronously by flush
        self.pending: dict[str, list[tuple[Any, list]]] = {}
        db = sqlite_path(tracking_uri)
        self._lock_path = db.with_name(db.name + ".lock") if db is not None and fcntl is not None else None
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        self.client = self.retry(MlflowClient, tracking_uri)

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

    def retry(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
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

    def experiment(self, name: str, artifact_root: Path) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        artifact_root.mkdir(parents=True, exist_ok=True)
        return self.client.create_experiment(name, artifact_location=artifact_root.as_uri())

    def existing(self, run_id: str | None) -> str | None:
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

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100], synchronous=True)

    def log_metrics(self, run_id: str, metrics: list, wait: bool = True) -> None:
        """Log metrics in batches. wait=False (each round's metrics): queue them on MLflow's logging thread
        and return (a synchronous sqlite write is 15-40 ms, a few % of a short round); flush waits for them,
        so their errors surface inside the callback's retry/disable logic at the end of the run."""
        for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
            batch = metrics[i:i + 1000]
            if wait:
                self.client.log_batch(run_id, metrics=batch, synchronous=True)
                continue
            future = self.client.log_batch(run_id, metrics=batch, synchronous=False)
            self.pending.setdefault(run_id, []).append((future, batch))
        self.values_logged += len(metrics)

    def flush(self, run_id: str) -> None:
        """Wait for the run's queued batches. A failed one raises here (so the caller retries or disables)
        and stays queued without its future, so that a retry sends it again, synchronously."""
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

    def flush_all(self) -> None:
        for run_id in list(self.pending):
            self.flush(run_id)

    def last_steps(self, run_id: str) -> dict[str, int]:
        """Metric -> the last step the run holds, for every metric it holds (also steps beyond the
        checkpoint a resumed run goes back to: those are not logged again)."""
        return {name: max((m.step for m in self.client.get_metric_history(run_id, name)), default=-1)
                for name in self.client.get_run(run_id).data.metrics}
