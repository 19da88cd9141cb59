"""A real Flower deployment on this machine: a SuperLink and two SuperNodes (one client's partition each) on
127.0.0.1, and `flwr run` of bench's Flower App (bench/flower/app), exactly as the README's recipe. Every process
is started in its own process group and stopped by it; only 127.0.0.1 is listened on.

Slow by nature: Flower starts a fresh ClientApp process for every message (a Python start and the torch import),
and a SuperNode with nothing to do polls its SuperLink every 3 s; the work itself is tiny (two clients, two rounds,
100 images). About 12 messages a run, a few seconds each; the killed SuperNode is noticed when its heartbeat
lapses (up to a minute)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

import bench.flower  # noqa: E402
from bench.config import resolve_dataset_defaults  # noqa: E402
from bench.plan import client_splits  # noqa: E402
from bench.registry import resolve_algorithms  # noqa: E402
from bench.simulator import Simulation  # noqa: E402
from data.device_data import DeviceData  # noqa: E402
from data.sources import load_dataset, synthetic_dataset  # noqa: E402

BIN = Path(sys.executable).parent
APP = Path(bench.flower.__file__).parent / "app"
CLIENTS, ROUNDS = 2, 2
WAIT = 900  # seconds a run may take on a busy 2-core machine

if not all((BIN / tool).exists() for tool in ("flower-superlink", "flower-supernode", "flwr")):
    pytest.skip("Flower's executables are not installed next to this Python", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Federation:
    root: Path
    env: dict
    port: int
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, *args: str) -> None:
        log = open(self.root / f"{name}.log", "w")
        self.processes[name] = subprocess.Popen([str(BIN / args[0]), *args[1:]], env=self.env, cwd=self.root,
                                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal the process group of `name` (the process and every child it started)."""
        proc = self.processes[name]
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        for name in self.processes:
            self.kill(name, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.processes.values():
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
        for name in self.processes:
            self.kill(name, signal.SIGKILL)
        for proc in self.processes.values():
            proc.wait(timeout=10)

    def groups(self) -> set[int]:
        return {proc.pid for proc in self.processes.values()}

    def flwr_run(self, run_name: str, config: Path) -> None:
        overrides = (f'config="{config}" run-name="{run_name}" output-dir="{self.root / "results"}" '
                     f'reply-timeout=600.0 connect-timeout=300.0')
        done = subprocess.run([str(BIN / "flwr"), "run", str(APP), "bench", "--run-config", overrides], env=self.env,
                              cwd=self.root, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "Successfully started run" in done.stdout, done.stdout + done.stderr

    def run_dir(self, run_name: str) -> Path:
        return self.root / "results" / run_name / "runs" / "pfedlora-seed0"


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def group_members(groups: set[int]) -> list[int]:
    """Every live process whose process group is one of `groups` (Linux /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] != "Z" and int(fields[2]) in groups:
                members.append(int(entry.name))
    return members


def listening_addresses(pids: list[int]) -> set[str]:
    """The local addresses the given processes listen on (TCP, from /proc/net/tcp{,6} and their socket fds)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and parts[9] in inodes:  # LISTEN
                found.add(parts[1].split(":")[0])
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1 (little-endian hex)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("federation")
    home = root / "flwr-home"
    home.mkdir()
    port = free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
           # each SuperNode's SuperExec looks for a ClientApp to start every 0.1 s instead of every second
           "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}
    fed = Federation(root, env, port)
    try:
        fed.start("superlink", "flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                  "--host", "127.0.0.1", "--port", str(port))
        wait_for(lambda: accepts(port), "the SuperLink to listen", fed, timeout=180)
        for k in range(CLIENTS):
            fed.start(f"supernode{k}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                      "--host", "127.0.0.1", "--port", str(free_port()),
                      "--node-config", f"partition-id={k} num-partitions={CLIENTS}")
        yield fed
    finally:
        groups = fed.groups()
        fed.stop_all()
        time.sleep(1)
        assert group_members(groups) == [], "a Flower process outlived the test"


@pytest.fixture(scope="module")
def bench_config(federation) -> Path:
    ds = synthetic_dataset(num_classes=10, train_size=100, test_size=50, seed=0)
    data = federation.root / "small.npz"
    np.savez(data, x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test)
    path = federation.root / "bench.toml"
    path.write_text(f'algorithms = ["pfedlora"]\ndataset = "{data}"\nnum_clients = {CLIENTS}\nrounds = {ROUNDS}\n'
                    'batch_size = 32\neval_batch_size = 128\ndevice = "cpu"\nthreads = 1\ncheckpoint_every = 0\n'
                    '[pfedlora]\nrank = 8\n')
    return path


def wait_for(condition, what: str, federation: Federation, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        for name, proc in federation.processes.items():
            if proc.poll() is not None and name == "superlink":
                pytest.fail(f"the SuperLink exited ({proc.returncode}): {(federation.root / 'superlink.log').read_text()[-2000:]}")
        time.sleep(2)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(federation.root.glob("*.log")))
    pytest.fail(f"timed out waiting for {what}\n{logs}")


def summary(run_dir: Path) -> dict | None:
    path = run_dir / "summary.json"
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except json.JSONDecodeError:  # being written
        return None


def builtin_rows(config: Path) -> list[dict]:
    """The built-in simulator's rounds for the same run."""
    from bench.config import load_config

    cfg = load_config(config)
    ds = load_dataset(cfg.dataset)
    cfg = resolve_dataset_defaults(cfg, ds.num_classes)
    splits = client_splits(cfg, ds, 0, torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sim = Simulation(cfg, resolve_algorithms(["pfedlora"])[0], 0, DeviceData(ds, torch.device("cpu")), splits,
                         torch.device("cpu"))
        return [sim.initial_metrics()] + [sim.run_round(r) for r in range(cfg.rounds)]
    finally:
        torch.set_num_threads(threads)


def test_superlink_two_supernodes_flwr_run(federation, bench_config):
    """Two rounds over two SuperNodes: the results folder and MLflow written by the ServerApp, the numbers the
    built-in simulator gives, and nothing listening beyond 127.0.0.1."""
    federation.flwr_run("deployed", bench_config)
    run_dir = federation.run_dir("deployed")
    result = wait_for(lambda: summary(run_dir), "the deployed run's summary.json", federation)
    assert result["status"] == "FINISHED", result
    rows = [r for r in csv_rows(run_dir / "metrics.csv")]
    assert [r["step"] for r in rows] == [str(s) for s in range(ROUNDS + 1)]
    for row, expected in zip(rows, builtin_rows(bench_config)):
        for key in ("bytes_up", "bytes_down", "train_flops", "eval_flops", "server_flops"):
            assert float(row[key]) == expected[key], key
        assert float(row["acc_mean"]) == pytest.approx(expected["acc_mean"], abs=1e-9)
    assert ended_mlflow_runs(federation, "deployed") == [("FINISHED", [0, 1, 2])]
    addresses = listening_addresses(group_members(federation.groups()))
    assert addresses and addresses <= LOOPBACK, addresses


def csv_rows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_supernode_killed_mid_round_fails_the_run_and_keeps_what_was_written(federation, bench_config):
    federation.flwr_run("killed", bench_config)
    run_dir = federation.run_dir("killed")
    wait_for(lambda: any(r["step"] == "1" for r in csv_rows(run_dir / "metrics.csv"))
             if (run_dir / "metrics.csv").exists() else False, "round 1 of the run to be killed", federation)
    before = csv_rows(run_dir / "metrics.csv")
    federation.kill("supernode1")  # SIGKILL to its process group: the SuperNode and its ClientApp process die
    result = wait_for(lambda: summary(run_dir), "the killed run's summary.json", federation)
    assert result["status"] == "FAILED"
    assert "client 1" in result["error"], result["error"]
    after = csv_rows(run_dir / "metrics.csv")
    assert after[:len(before)] == before and [r["step"] for r in after] == ["0", "1"]
    assert result["rounds"] == 1
    assert federation.processes["superlink"].poll() is None  # the federation itself goes on
    assert ended_mlflow_runs(federation, "killed") == [("FAILED", [0, 1])]


def ended_mlflow_runs(federation: Federation, invocation: str) -> list[tuple[str, list[int]]]:
    """mlflow_runs once none is RUNNING: MLflow hears of a run's end just after the results folder does."""
    def ended():
        try:
            found = mlflow_runs(federation.root / "results" / "mlflow.db", invocation)
        except Exception:  # noqa: BLE001 (the store being written: ask again)
            return None
        return found if found and all(status != "RUNNING" for status, _ in found) else None

    return wait_for(ended, f"MLflow to record the end of {invocation}", federation, timeout=120)


def mlflow_runs(store: Path, invocation: str) -> list[tuple[str, list[int]]]:
    """(status, acc_mean steps) of every pfedlora run the ServerApp of `invocation` logged to MLflow."""
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{store}")
    where = f"tags.algorithm = 'pfedlora' and tags.`bench.invocation` = '{invocation}'"
    found = client.search_runs([e.experiment_id for e in client.search_experiments()], filter_string=where)
    return [(r.info.status, [m.step for m in client.get_metric_history(r.info.run_id, "acc_mean")])
            for r in found if "mlflow.parentRunId" in r.data.tags]  # the (algorithm, seed) runs, not their parents
