"""Interrupts: SIGTERM stops a run as Ctrl-C does (the current step abandoned, the checkpoint kept, the MLflow
runs marked KILLED) and exits 143 (130 for Ctrl-C), saying how to continue; a resumed run sets its MLflow
runs RUNNING again, counts only the pending runs in its estimate, and ends FINISHED."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.callbacks.results import ResultsFolderCallback
from tests.conftest import bench_main

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One MLflow store for the in-process runs (a new store's migrations take seconds)."""
    from bench.callbacks.mlflow_client import MlflowConnection

    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    MlflowConnection(uri).experiment("mhpfl-bench", folder / "mlartifacts")
    return uri


def run_args(npz: Path, out: Path, name: str, rounds: int, *algos: str) -> list[str]:
    return ["run", *[a for algo in algos for a in ("--algo", algo)], "--dataset", str(npz), "--clients", "3",
            "--rounds", str(rounds), "--model-group", "cnn5-homo", "--batch-size", "64", "--output-dir", str(out),
            "--run-name", name]


def mlflow_status(root: Path, key: str | None = None) -> str:
    from mlflow.tracking import MlflowClient

    info = json.loads((root / "mlflow.json").read_text())
    run_id = info["parent_run_id"] if key is None else \
        json.loads((root / "runs" / key / "mlflow.json").read_text())["run_id"]
    return MlflowClient(info["tracking_uri"]).get_run(run_id).info.status


def steps(root: Path, key: str) -> list[int]:
    return [int(r["step"]) for r in csv.DictReader(open(root / "runs" / key / "metrics.csv"))]


def test_sigterm_stops_like_ctrl_c_and_the_run_resumes(small_npz, tmp_path, monkeypatch, capsys):
    """A real process, a real SIGTERM after round 2 of 12 (a fresh output dir: the first use of its MLflow
    store, whose set-up notes must not reach the terminal)."""
    out, root = tmp_path / "out", tmp_path / "out" / "term"
    proc = subprocess.Popen([sys.executable, "-m", "bench.cli", *run_args(small_npz, out, "term", 12, "standalone")],
                            cwd=REPO, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if re.search(r"round\s+2/12\b", line):
            proc.send_signal(signal.SIGTERM)
            break
    err = "".join(seen) + proc.stderr.read()
    assert proc.wait(timeout=120) == 143, err
    assert "Traceback" not in err and "INFO" not in err and "mlflow.store.db.utils" not in err, err
    assert err.strip().splitlines()[-1] == (f"aborted (SIGTERM); the finished rounds are kept in {root}: continue "
                                            f"with `bench resume {root}`")
    assert (root / "runs" / "standalone-seed0" / "checkpoint").is_dir()  # kept for the resume
    assert mlflow_status(root) == "KILLED" and mlflow_status(root, "standalone-seed0") == "KILLED"
    done = steps(root, "standalone-seed0")
    assert 2 <= done[-1] < 12

    code, _, err = bench_main(monkeypatch, capsys, "resume", str(root), "--quiet")
    assert code == 0, err
    assert steps(root, "standalone-seed0") == list(range(13))
    assert mlflow_status(root) == "FINISHED" and mlflow_status(root, "standalone-seed0") == "FINISHED"


def interrupt_at(monkeypatch, key: str, step: int, sig: int) -> None:
    """Send `sig` to this process once the results folder holds round `step` of run `key`."""
    original = ResultsFolderCallback.on_round_end

    def on_round_end(self, run, at, metrics):
        original(self, run, at, metrics)
        if run.key == key and at == step:
            os.kill(os.getpid(), sig)
    monkeypatch.setattr(ResultsFolderCallback, "on_round_end", on_round_end)


@pytest.mark.skipif(signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
                    reason="SIGINT is handled by something else in this process")
def test_ctrl_c_kills_the_current_run_and_resume_continues_only_the_pending_one(small_npz, store, tmp_path,
                                                                                 monkeypatch, capsys):
    out, root = tmp_path / "out", tmp_path / "out" / "int"
    args = [*run_args(small_npz, out, "int", 3, "standalone", "lgfedavg"), "--tracking-uri", store]
    with monkeypatch.context() as patch:
        interrupt_at(patch, "lgfedavg-seed0", 2, signal.SIGINT)
        code, _, err = bench_main(monkeypatch, capsys, *args, "--quiet")
    assert code == 130, err
    assert err.strip().splitlines()[-1] == (f"aborted (SIGINT); the finished rounds are kept in {root}: continue "
                                            f"with `bench resume {root}`")
    assert mlflow_status(root, "standalone-seed0") == "FINISHED"
    assert mlflow_status(root, "lgfedavg-seed0") == "KILLED" and mlflow_status(root) == "KILLED"
    statuses = {r["run"]: r["status"] for r in csv.DictReader(open(root / "summary.csv"))}
    assert statuses == {"standalone-seed0": "FINISHED", "lgfedavg-seed0": "KILLED"}

    during = []
    original = ResultsFolderCallback.on_round_end

    def spy(self, run, step, metrics):  # MLflow's statuses while the resumed run runs
        original(self, run, step, metrics)
        during.append((mlflow_status(root), mlflow_status(root, run.key)))
    monkeypatch.setattr(ResultsFolderCallback, "on_round_end", spy)
    code, _, err = bench_main(monkeypatch, capsys, "resume", str(root))
    assert code == 0, err
    assert during and set(during) == {("RUNNING", "RUNNING")}
    (estimate,) = [line for line in err.splitlines() if line.startswith("estimated time:")]
    assert "lgfedavg" in estimate and "standalone" not in estimate  # the finished run costs nothing
    assert f"standalone-seed0: already finished in {root}; kept" in err
    assert steps(root, "lgfedavg-seed0") == [0, 1, 2, 3]
    assert {mlflow_status(root), mlflow_status(root, "lgfedavg-seed0"), mlflow_status(root, "standalone-seed0")} \
        == {"FINISHED"}


def test_sigterm_in_process_exits_143_and_restores_the_handler(small_npz, store, tmp_path, monkeypatch, capsys):
    before = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as patch:
        interrupt_at(patch, "standalone-seed0", 1, signal.SIGTERM)
        code, _, err = bench_main(monkeypatch, capsys, *run_args(small_npz, tmp_path, "t", 3, "standalone"),
                                  "--quiet", "--tracking-uri", store)
    assert code == 143 and "aborted (SIGTERM)" in err, err
    assert signal.getsignal(signal.SIGTERM) is before
    summary = json.loads((tmp_path / "t" / "runs" / "standalone-seed0" / "summary.json").read_text())
    assert summary["status"] == "KILLED" and summary["error"] == "interrupted (SIGTERM)"
