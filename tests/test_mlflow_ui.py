"""The MLflow UI: `bench ui` starts it light and leaves nothing running once stopped (Ctrl-C or SIGTERM);
loaded in a real headless Chromium, it shows the runs of a small benchmark side by side
(scripts/ui_screenshot.py; skipped where Chromium is not installed: apt-get install chromium)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reports.synthetic import write_synthetic_results

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from ui_screenshot import find_chromium  # noqa: E402



@pytest.mark.skipif(find_chromium() is None, reason="Chromium not installed (apt-get install chromium)")
def test_mlflow_ui_shows_the_runs_side_by_side(tmp_path):
    methods = ("pfedlora", "fedgh", "standalone")
    write_synthetic_results(tmp_path / "results", "ui-demo", methods=methods, seeds=(0,), rounds=3, mlflow=True,
                            experiment="mhpfl-bench")
    out = tmp_path / "shots"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "ui_screenshot.py"), "--output-dir",
                             str(tmp_path / "results"), "--out", str(out), "--timeout", "150"],
                            capture_output=True, text=True, timeout=400)
    check = json.loads((out / "ui_check.json").read_text())
    assert result.returncode == 0, (result.stdout, result.stderr[-3000:], check)
    assert sorted(check["compared_runs"]) == sorted(f"{m}-seed0" for m in methods)
    assert all(check["checks"].values()) and not check["missing_in_page"]
    for name in ("mlflow_runs.png", "mlflow_compare.png"):
        img = np.asarray(Image.open(out / name).convert("L"))
        assert img.shape == (1200, 1900)
        assert img.std() > 10, f"{name} looks empty"  # text, tables and plots, not a blank page


# ---- `bench ui` stops whole ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Nothing listens on it, and a server could bind it now (as servers do, with SO_REUSEADDR: the closed
    connections of the stopped one, in TIME_WAIT, do not hold it)."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command line) of every process, from /proc."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[int(stat.parent.name)] = (int(fields[1]), fields[0], cmdline)
    return out


def descendants(pid: int) -> dict[int, str]:
    """The live processes below `pid` (children, grandchildren, ...): pid -> command line."""
    table, found, frontier = processes(), {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, state, cmdline) in table.items():
            if ppid == parent and child not in found and state != "Z":
                found[child] = cmdline
                frontier.append(child)
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped holds nothing and counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the server's processes")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_bench_ui_leaves_nothing_running(sig, tmp_path):
    from bench.callbacks.mlflow_client import MlflowConnection

    exp_id = MlflowConnection(f"sqlite:///{tmp_path / 'mlflow.db'}").experiment("mhpfl-bench",
                                                                                 tmp_path / "mlartifacts")
    port = free_port()
    log = open(tmp_path / "ui.log", "w")
    # Its own session, like a shell's foreground job: Ctrl-C reaches this group only (bench, not the server).
    # PYTHONFAULTHANDLER: a SIGABRT makes bench print every thread's stack into the log (see the timeout below)
    proc = subprocess.Popen([sys.executable, "-m", "bench.cli", "ui", "--output-dir", str(tmp_path), "--port",
                             str(port)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
                            # started with SIGINT ignored, as under a parent that ignores it (an xdist worker can):
                            # Python then keeps ignoring it, unless bench ui restores Ctrl-C itself
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "ui.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        started = descendants(proc.pid)
        assert started and not any("huey" in cmd for cmd in started.values()), started  # no job runner
        os.killpg(proc.pid, sig)
        try:  # stopping takes seconds; the bound is for a machine loaded by other tests (xdist)
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:  # where it hangs: the stacks faulthandler prints on SIGABRT
            os.kill(proc.pid, signal.SIGABRT)
            time.sleep(3)
            raise AssertionError("bench ui did not stop; its log ends:\n" + (tmp_path / "ui.log").read_text()[-6000:])
        assert code == 0, (tmp_path / "ui.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(0.5)
    survivors = {pid: cmd for pid, cmd in started.items() if alive(pid)}
    assert survivors == {}, survivors
    assert port_is_free(port)
    printed = (tmp_path / "ui.log").read_text()
    assert "MLflow UI stopped" in printed
    # The URL opens the runs table (not MLflow 3's GenAI overview of an experiment), one line per experiment.
    assert (f"runs of mhpfl-bench: http://127.0.0.1:{port}/#/experiments/{exp_id}/runs"
            "?workflowType=machine_learning") in printed


def test_bench_ui_refuses_a_port_in_use(tmp_path, monkeypatch, capsys):
    from tests.conftest import bench_main

    (tmp_path / "mlflow.db").write_bytes(b"")  # `bench ui` only looks for the file before the port
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = bench_main(monkeypatch, capsys, "ui", "--output-dir", str(tmp_path), "--port", str(port))
    assert code == 2 and err.strip() == (f"error: port {port} on 127.0.0.1 is in use (Address already in use); "
                                         f"valid: a free port, e.g. --port {port + 1}")
    code, _, err = bench_main(monkeypatch, capsys, "ui", "--output-dir", str(tmp_path), "--port", "70000")
    assert code == 2 and err.startswith("error: Invalid value for '--port': 70000 is not in the range 1<=x<=65535")
