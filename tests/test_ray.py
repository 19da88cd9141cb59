"""The Ray executor on a local Ray instance (2 CPUs): a grid run as Ray tasks gives the same per-round
metrics as the local executor, the same MLflow structure (one parent per setting, one child per run, every
step exactly once) and complete results folders; a killed worker's run is retried from its checkpoint, or
fails clearly while the rest of the grid completes."""
from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from bench.config import RunConfig  # noqa: E402
from bench.executors import ExecutorOptions  # noqa: E402
from bench.runner import run_invocations  # noqa: E402
from bench.store import read_csv, read_json  # noqa: E402
from tests import ray_faults  # noqa: E402
from tests.conftest import bench_main  # noqa: E402
from tests.test_paper import tiny  # noqa: E402,F401  (fixture)

TIME_KEYS = ("round_time", "cum_round_time")
ALGOS = ["standalone", "pfedlora"]
RAY = ExecutorOptions(kind="ray", cpus_per_run=1)


@pytest.fixture(scope="module")
def kill_dir(tmp_path_factory) -> Path:
    """Where a test puts a kill marker (tests/ray_faults.py) to make a worker die at a chosen round."""
    return tmp_path_factory.mktemp("kill")


@pytest.fixture(scope="module", autouse=True)
def local_ray(kill_dir):
    """One local Ray instance for the module (starting one takes seconds), its workers armed for faults."""
    ray.cloudpickle.register_pickle_by_value(ray_faults)  # workers cannot import the tests package
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, logging_level="WARNING",
             runtime_env={"worker_process_setup_hook": ray_faults.install,
                          "env_vars": {ray_faults.KILL_DIR: str(kill_dir)}})
    yield
    ray.shutdown()


def grid(small_npz: Path, out: Path, rounds: int = 2) -> list[RunConfig]:
    """Two settings (participation 1.0 and 0.6) x two algorithms x two seeds: eight runs."""
    return [RunConfig(algorithms=ALGOS, dataset=str(small_npz), num_clients=5, participation=c, rounds=rounds,
                      batch_size=64, seeds=[0, 1], device="cpu", model_group="cnn5-homo", eval_batch_size=256,
                      output_dir=str(out), run_name=f"C{c}", algo={"pfedlora": {"rank": 4}},
                      threads=1)  # as the Ray workers (1 CPU each): equal thread counts give bit-identical numbers
            for c in (1.0, 0.6)]


def rows(root: Path, key: str) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in read_csv(root / "runs" / key / "metrics.csv")]


def mlflow_runs(out: Path, uri: str | None = None) -> dict[str, dict]:
    """{parent name: {"status", "children": {child name: {"status", metric: [(step, value), ...]}}}}."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri or f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mhpfl-bench")
    runs = client.search_runs([exp.experiment_id])
    parents = {r.info.run_name: r for r in runs if r.data.tags.get("bench.kind") == "invocation"}
    tree = {}
    for name, parent in parents.items():
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        tree[name] = {"status": parent.info.status, "children": {
            c.info.run_name: {"status": c.info.status, **{
                m: [(h.step, h.value) for h in client.get_metric_history(c.info.run_id, m)]
                for m in c.data.metrics if m not in TIME_KEYS and not m.startswith("summary.")}}
            for c in children}}
    assert len(runs) == len(parents) + sum(len(t["children"]) for t in tree.values()), "orphan runs"
    return tree


@pytest.fixture(scope="module")
def local_and_ray(small_npz, tmp_path_factory):
    local, on_ray = tmp_path_factory.mktemp("local"), tmp_path_factory.mktemp("ray")
    threads = torch.get_num_threads()
    run_invocations(grid(small_npz, local), show_progress=False)
    assert torch.get_num_threads() == threads  # `threads` is per run: it does not leak into this process
    outcomes = run_invocations(grid(small_npz, on_ray), show_progress=False, executor=RAY)
    return local, on_ray, outcomes


def test_ray_grid_equals_local_per_round(local_and_ray):
    local, on_ray, outcomes = local_and_ray
    assert all(not o.failed for o in outcomes) and sum(len(o.summaries) for o in outcomes) == 8
    for setting in ("C1.0", "C0.6"):
        for algo in ALGOS:
            for seed in (0, 1):
                key = f"{algo}-seed{seed}"
                expected = rows(local / setting, key)
                assert len(expected) == 3 and rows(on_ray / setting, key) == expected, (setting, key)
    # The two settings really differ (the comparison is not vacuous).
    assert rows(local / "C1.0", "pfedlora-seed0") != rows(local / "C0.6", "pfedlora-seed0")


def test_ray_results_folders_are_complete(local_and_ray):
    _, on_ray, _ = local_and_ray
    for setting in ("C1.0", "C0.6"):
        root = on_ray / setting
        summary = read_csv(root / "summary.csv")
        assert sorted(r["run"] for r in summary) == sorted(f"{a}-seed{s}" for a in ALGOS for s in (0, 1))
        assert {r["status"] for r in summary} == {"FINISHED"}
        for r in summary:
            run_dir = root / "runs" / r["run"]
            for name in ("config.json", "metrics.csv", "clients.csv", "summary.json", "mlflow.json"):
                assert (run_dir / name).exists(), run_dir / name
            assert not (run_dir / "checkpoint").exists()  # removed when the run finished
        assert read_json(root / "config.json")["run_name"] == setting
        assert list((root / "plots").glob("*.png"))


def test_ray_mlflow_structure_equals_local(local_and_ray):
    local, on_ray, _ = local_and_ray
    expected, got = mlflow_runs(local), mlflow_runs(on_ray)
    assert set(got) == {"C1.0", "C0.6"} and all(p["status"] == "FINISHED" for p in got.values())
    for setting, parent in got.items():
        assert set(parent["children"]) == {f"{a}-seed{s}" for a in ALGOS for s in (0, 1)}
        for name, child in parent["children"].items():
            assert child["status"] == "FINISHED"
            for metric, history in child.items():
                if metric == "status":
                    continue
                steps = [s for s, _ in history]
                assert len(steps) == len(set(steps)), f"duplicated steps in {setting}/{name}/{metric}"
            assert child == expected[setting]["children"][name], (setting, name)


@pytest.fixture
def kill(kill_dir):
    """kill(key, step): the worker running `key` dies right after forwarding round `step`, once."""
    markers = []

    def arm(key: str, step: int) -> None:
        markers.append(ray_faults.kill_marker(kill_dir, key, step))
        markers[-1].touch()
    yield arm
    fired = [not m.exists() for m in markers]
    for m in markers:
        m.unlink(missing_ok=True)  # an unfired marker must not kill a later test's worker
    assert all(fired), "a kill marker was never reached"


def test_killed_worker_is_retried_from_its_checkpoint_with_identical_results(small_npz, tmp_path, capsys, kill):
    [cfg] = [dataclasses.replace(c, rounds=3, seeds=[0]) for c in grid(small_npz, tmp_path / "ray")[:1]]
    kill("pfedlora-seed0", 2)  # after round 2 reached the driver, before its checkpoint: round 1's is the last
    [outcome] = run_invocations([cfg], executor=ExecutorOptions(kind="ray", max_retries=1))
    assert not outcome.failed and len(outcome.summaries) == 2
    assert "pfedlora-seed0: continuing after round 1" in capsys.readouterr().err
    reference = dataclasses.replace(cfg, algorithms=["pfedlora"], output_dir=str(tmp_path / "local"))
    run_invocations([reference], show_progress=False)
    assert rows(tmp_path / "ray" / "C1.0", "pfedlora-seed0") == rows(tmp_path / "local" / "C1.0", "pfedlora-seed0")
    killed_run = mlflow_runs(tmp_path / "ray")["C1.0"]["children"]["pfedlora-seed0"]
    assert killed_run == mlflow_runs(tmp_path / "local")["C1.0"]["children"]["pfedlora-seed0"]  # each step once


def test_killed_worker_without_retries_fails_clearly_and_the_grid_completes(small_npz, tmp_path, capsys, kill):
    cfg = dataclasses.replace(grid(small_npz, tmp_path)[0], algorithms=["standalone"], seeds=[0, 1, 2], rounds=3)
    kill("standalone-seed1", 1)
    [outcome] = run_invocations([cfg], executor=ExecutorOptions(kind="ray", max_retries=0))
    assert set(outcome.failed) == {"standalone-seed1"}
    assert "worker died" in outcome.failed["standalone-seed1"]
    summary = {r["run"]: r["status"] for r in read_csv(tmp_path / "C1.0" / "summary.csv")}
    assert summary == {"standalone-seed0": "FINISHED", "standalone-seed1": "FAILED", "standalone-seed2": "FINISHED"}
    tree = mlflow_runs(tmp_path)["C1.0"]
    assert tree["status"] == "FAILED" and tree["children"]["standalone-seed1"]["status"] == "FAILED"
    assert "standalone-seed1: FAILED (Ray worker died" in capsys.readouterr().err


def test_resume_on_ray_keeps_finished_runs(small_npz, tmp_path, monkeypatch, capsys):
    """`bench run --executor ray --resume` after a failed run: only that run executes again."""
    args = ["run", "--algo", "standalone", "--algo", "pfedlora", "--dataset", str(small_npz), "--clients", "5",
            "--model-group", "cnn5-homo", "--rounds", "1", "--output-dir", str(tmp_path), "--run-name", "g",
            "--set", "pfedlora.rank=4", "--device", "cpu", "--executor", "ray"]
    code, _, err = bench_main(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "grid: 2/2 done, 0 running, 0 pending" in err
    (tmp_path / "g" / "runs" / "pfedlora-seed0" / "summary.json").unlink()  # as if it had been killed
    code, _, err = bench_main(monkeypatch, capsys, *args, "--resume")
    assert code == 0, err
    assert "standalone-seed0: already finished" in err and "grid: 1/1 done" in err


@pytest.mark.parametrize("extra, message", [
    (["--executor", "ray", "--gpus-per-run", "1"], "--gpus-per-run 1 but the Ray cluster has 0 GPU(s)"),
    (["--executor", "ray", "--gpus-per-run", "-1"], "--gpus-per-run must be >= 0"),
    (["--executor", "ray", "--cpus-per-run", "8"], "--cpus-per-run 8 exceeds the Ray cluster's 2 CPUs"),
    (["--gpus-per-run", "0.5"], "--ray-address and --gpus-per-run need --executor ray"),
    (["--executor", "dask"], "Invalid value for '--executor'"),
])
def test_bad_executor_options_are_one_line_errors(small_npz, tmp_path, monkeypatch, capsys, extra, message):
    code, _, err = bench_main(monkeypatch, capsys, "run", "--algo", "standalone", "--dataset", str(small_npz),
                           "--clients", "5", "--rounds", "1", "--output-dir", str(tmp_path), "--quiet", *extra)
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_missing_ray_is_a_one_line_error(small_npz, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # as if Ray were not installed
    code, _, err = bench_main(monkeypatch, capsys, "run", "--algo", "standalone", "--dataset", str(small_npz),
                           "--clients", "5", "--rounds", "1", "--output-dir", str(tmp_path), "--executor", "ray")
    assert code == 2 and "pip install 'mhpfl-bench[ray]'" in err, err


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on a free local port (about 10-20 s to start), started as `bench ui` starts it
    (one worker, no job runner, its own process group, stopped whole)."""
    from bench.ui import start_server, stop_server

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with open(tmp_path / "server.log", "w") as log:
        server = start_server(f"sqlite:///{tmp_path / 'server.db'}", port, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # a loaded CI machine (tests in parallel) starts it slowly
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError as err:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not answer (exit code {server.poll()}; last error {err!r}); its "
                                f"log ends:\n{(tmp_path / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield uri
    finally:
        stop_server(server)


def test_ray_grid_logs_to_a_tracking_server(small_npz, tmp_path, mlflow_server):
    cfg = dataclasses.replace(grid(small_npz, tmp_path)[0], algorithms=["standalone"], rounds=1,
                              tracking_uri=mlflow_server)
    [outcome] = run_invocations([cfg], show_progress=False, executor=RAY)
    assert not outcome.failed and not outcome.mlflow_unsynced
    tree = mlflow_runs(tmp_path, mlflow_server)
    assert set(tree) == {"C1.0"} and set(tree["C1.0"]["children"]) == {"standalone-seed0", "standalone-seed1"}
    for key, child in tree["C1.0"]["children"].items():
        folder = read_csv(tmp_path / "C1.0" / "runs" / key / "metrics.csv")
        assert child["acc_mean"] == [(int(r["step"]), float(r["acc_mean"])) for r in folder]  # every step once
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to the default store


def test_a_paper_recipe_runs_its_cells_as_ray_tasks_and_reuses_them(tiny, monkeypatch):
    """`bench paper t1 --executor ray`: every cell of the grid is submitted at once; a second call reuses them."""
    from reports import paper, plots

    monkeypatch.setattr(plots, "FORMATS", ("png",))
    tiny.executor = RAY
    manifest = paper.run_recipe("t1", tiny)
    assert manifest["counts"] == {"ran": 4, "reused": 0, "failed": 0}
    assert len({c["wall_s"] for c in manifest["cells"]}) == 1  # one grid: the cells share its wall time
    assert (tiny.out / "t1" / "t1_final_accuracy.csv").exists()
    assert paper.run_recipe("t1", tiny)["counts"] == {"ran": 0, "reused": 4, "failed": 0}
