"""`bench ui`: MLflow's tracking server, started light and stopped whole.

Light: one worker, and MLflow's job execution off (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false): the UI only
reads runs, and the job runner would start a huey consumer per job type (about ten processes) that outlive a
stopped server. Whole: the server runs in its own session, hence its own process group, and stopping it
signals that group (SIGINT, then SIGTERM, then SIGKILL, each after a grace period) until no process of it
is left, so its uvicorn worker never keeps the port bound."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.errors import UserError

HOST = "127.0.0.1"


def runs_view_url(experiment_id: str, port: int, host: str = HOST) -> str:
    """The experiment's runs table (MLflow 3 otherwise opens an experiment on its GenAI overview of traces)."""
    return f"http://{host}:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def runs_view_lines(tracking_uri: str, host: str, port: int) -> list[str]:
    """One line per experiment of a sqlite store with the URL of its runs view (none when the store cannot
    be read: the server then says why). MLflow's 'Default' experiment is left out unless it is the only one."""
    from bench.callbacks.mlflow_client import MlflowConnection, sqlite_path

    db = sqlite_path(tracking_uri)
    if db is None or not db.exists() or db.stat().st_size == 0:
        return []  # a server store (asked over HTTP, slowly when down) or no store yet: the plain URL above
    try:
        experiments = MlflowConnection(tracking_uri).client.search_experiments()
    except Exception:  # the server reports a broken store itself; the URL is a convenience
        return []
    shown = [e for e in experiments if not (e.experiment_id == "0" and e.name == "Default")] or experiments
    return [f"  runs of {e.name}: {runs_view_url(e.experiment_id, port, host)}"
            for e in sorted(shown, key=lambda e: e.name)]


def check_port_free(port: int, host: str = HOST) -> None:
    """Refuse a port something already listens on (the server would fail after its slow start). Bound as the
    server binds it (SO_REUSEADDR): connections of a server just stopped, closing (TIME_WAIT), do not count."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise UserError(f"port {port} on {host} is in use ({err.strerror or err}); valid: a free port, "
                            f"e.g. --port {port + 1 if port < 65535 else 5000}") from None


def server_command(tracking_uri: str, port: int, host: str = HOST) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri, "--host", host,
            "--port", str(port), "--workers", "1"]


def start_server(tracking_uri: str, port: int, host: str = HOST, **popen) -> subprocess.Popen:
    """The server, in a new session (its own process group, which Ctrl-C in our terminal does not reach:
    stop_server stops it)."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return subprocess.Popen(server_command(tracking_uri, port, host), env=env, start_new_session=True, **popen)


def group_alive(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group `pgid`, from /proc; elsewhere [pgid] while the group
    exists."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    alive = []
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        if fields[0] != "Z" and int(fields[2]) == pgid:
            alive.append(int(stat.parent.name))
    return alive


def stop_server(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Stop the server's whole process group: SIGINT (a clean shutdown), then SIGTERM, then SIGKILL, each
    after `grace` seconds, until none of its processes is left."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, so that it does not linger as a zombie
            if not group_alive(proc.pid):
                break
            time.sleep(0.1)
        else:
            continue
        break
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass


def serve(tracking_uri: str, port: int) -> int:
    """Run the UI until it exits or we are interrupted (Ctrl-C, SIGTERM); returns the server's exit code
    (0 when we stopped it). Nothing of it is left running afterwards."""
    check_port_free(port)
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C stops the UI even when this process started with SIGINT ignored (a parent that ignores it, such
        # as a test runner's worker: Python then leaves it ignored and proc.wait() below would never end)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    proc = start_server(tracking_uri, port)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the CLI raises bench.errors.Terminated)
        return 0
    finally:
        with signals_ignored():  # a second Ctrl-C must not cut the stopping short and orphan the workers
            stop_server(proc)


@contextlib.contextmanager
def signals_ignored():
    """SIGINT and SIGTERM ignored for the block (in the main thread, the only one that may set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
