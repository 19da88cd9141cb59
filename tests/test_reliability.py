"""Reliability: bad input refused in one line (exit 2), one failing algorithm isolated (exit 1), an
unavailable MLflow store never stops a run (and `bench sync` uploads what it missed), concurrent runs on
one store and output root, broken plugins. Runs use a 300-image synthetic .npz, 5 clients, CNN-5."""
from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from algorithms.base import Phase
from algorithms.standalone import Standalone
from bench import cli, registry
from bench.config import load_config
from bench.errors import UserError
from tests.conftest import bench_main, small_arrays

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A small valid dataset and the broken ones of the bad-input table."""
    folder = tmp_path_factory.mktemp("data")
    arrays = small_arrays()
    np.savez(folder / "small.npz", **arrays)
    np.savez(folder / "no_y_test.npz", **{k: v for k, v in arrays.items() if k != "y_test"})
    np.savez(folder / "float_images.npz", **{**arrays, "x_train": arrays["x_train"].astype(np.float32)})
    np.savez(folder / "flat_images.npz", **{**arrays, "x_test": arrays["x_test"].reshape(100, -1, 3)})
    np.savez(folder / "negative_label.npz", **{**arrays, "y_train": np.where(np.arange(300) == 5, -1, arrays["y_train"])})
    np.savez(folder / "label_beyond_classes.npz", **arrays, classes=np.array(["a", "b", "c"]))
    (folder / "empty").mkdir()
    (folder / "typo.toml").write_text('roundz = 3\n')
    (folder / "hp_typo.toml").write_text('[pfedlora]\nrnk = 4\n')
    return folder


def small_run(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--dataset", str(data_dir / "small.npz"), "--clients", "5", "--model-group", "cnn5-homo",
            "--batch-size", "64", "--set", "eval_batch_size=256", "--output-dir", str(out), "--quiet", *extra]


BAD_INPUTS = [
    # (arguments after `bench`, text the one-line error must contain); {d} = data folder, {o} = output root
    (["run", "--algo", "fedfoo"], "unknown algorithm 'fedfoo'; valid: "),
    (["run", "--dataset", "mnist"], "unknown dataset 'mnist'; valid: cifar10, cifar100, synthetic"),
    (["run", "--model-group", "vit"], "unknown model group 'vit'; valid: cnn-hetero"),
    (["run", "--partition", "shards"], "unknown partitioner 'shards'; valid: label-skew"),
    (["run", "--preset", "fast"], "unknown preset 'fast'; valid: quick, paper"),
    (["run", "--device", "tpu"], "unknown device 'tpu'; valid: auto, cpu, cuda"),
    (["run", "--clients", "0"], "num_clients must be a positive integer, got 0"),
    (["run", "--rounds", "-3"], "rounds must be a positive integer, got -3"),
    (["run", "--clients", "2.5"], "'2.5' is not a valid integer"),
    (["run", "--set", "num_clients=2.5"], "num_clients must be an integer, got 2.5"),
    (["run", "--local-epochs", "abc"], "'abc' is not a valid integer"),
    (["run", "--participation", "0"], "participation must be in (0, 1], got 0.0"),
    (["run", "--participation", "1.5"], "participation must be in (0, 1], got 1.5"),
    (["run", "--set", "seeds=[-1]"], "seeds must be non-negative integers, got [-1]"),
    (["run", "--checkpoint-every", "-1"], "checkpoint_every must be a non-negative integer (0 = no checkpoints)"),
    (["run", "--dataset", "synthetic:4", "--classes-per-client", "5"],
     "classes_per_client=5 exceeds the 4 classes of synthetic:4; valid: 1..4"),
    (["run", "--partition", "file:{d}/nothing.json"], "partition file {d}/nothing.json does not exist"),
    (["run", "--partition", "iid", "--clients", "400"], "num_clients=400 exceeds the 240 training samples"),
    (["run", "--partition", "label-skew", "--clients", "200"], "partition leaves client"),
    (["run", "--dataset", "{d}/no_y_test.npz"], "missing key(s) y_test; an .npz dataset needs x_train, y_train, "
                                                "x_test, y_test"),
    (["run", "--dataset", "{d}/float_images.npz"], "x_train has dtype float32; expected uint8 images (0-255)"),
    (["run", "--dataset", "{d}/flat_images.npz"], "x_test has shape (100, 1024, 3); expected (N, H, W, C)"),
    (["run", "--dataset", "{d}/negative_label.npz"], "y_train has labels in [-1, 9]; expected non-negative labels"),
    (["run", "--dataset", "{d}/label_beyond_classes.npz"], "has labels in [0, 9]; expected [0, 3) labels"),
    (["run", "--dataset", "{d}/nothing.npz"], "does not exist; give the path to an existing .npz file"),
    (["run", "--dataset", "cifar10", "--data-dir", "{d}/empty"],
     "cifar10 is missing in {d}/empty and could not be loaded by torchvision"),
    (["run", "--config", "{d}/typo.toml"], "unknown key 'roundz' (did you mean 'rounds'?)"),
    (["run", "--set", "roundz=3"], "unknown key 'roundz' (did you mean 'rounds'?)"),
    (["run", "--set", "pfedlor.rank=3"], "unknown key 'pfedlor' (did you mean 'pfedlora'?)"),
    (["run", "--config", "{d}/hp_typo.toml"], "unknown hyper-parameter pfedlora.rnk (did you mean 'rank'?)"),
    (["run", "--set", "pfedlora.placement=\"x\""], "pfedlora.placement must be one of"),
    (["run", "--algo", "fedavg"], "fedavg needs a model-homogeneous group, got 'cnn-hetero'"),
    (["run", "--device", "cuda"], "--device cuda requested but no CUDA GPU is available here; valid: auto, cpu"),
    (["run", "--run-name", "other"], "{o}/other holds a different run's results (rounds: 99 there, 10 here)"),
    (["run", "--run-name", "same"], "{o}/same already holds the results of this run; pass --resume to continue it"),
    (["run", "--resume"], "--resume needs --run-name NAME"),
    (["resume", "{d}/empty"], "{d}/empty is not a bench results folder (no config.json)"),
    (["sync", "{d}/empty"], "{d}/empty is not a bench results folder (no config.json)"),
    (["run", "--bogus"], "No such option '--bogus'"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[" ".join(a[1:]) or a[0] for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2(args, message, data_dir, tmp_path, monkeypatch, capsys):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = tmp_path / "out"
    stored = load_config(None, "quick", [], {"dataset": str(data_dir / "small.npz")}).to_dict()
    for name, config in (("other", {**stored, "rounds": 99}), ("same", stored)):
        (out / name).mkdir(parents=True)
        (out / name / "config.json").write_text(json.dumps(config))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):  # offline: downloads fail at once
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    # urlopen keeps the opener (with these proxies) it builds on first use: without this, every later urlopen of
    # this process, 127.0.0.1 included, would go to the dead proxy (the tracking-server fixtures' "never answers")
    monkeypatch.setattr(urllib.request, "_opener", None)
    fill = lambda text: text.replace("{d}", str(data_dir)).replace("{o}", str(out))  # noqa: E731
    args = [fill(a) for a in args]
    if args[0] == "run":
        for flag, value in (("--dataset", str(data_dir / "small.npz")), ("--output-dir", str(out))):
            if flag not in args:
                args += [flag, value]
        args.append("--quiet")
    code, _, err = bench_main(monkeypatch, capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and fill(message) in lines[0], err
    assert "Traceback" not in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # refused before writing anything


def test_a_folder_in_use_is_refused(data_dir, tmp_path, monkeypatch, capsys):
    from bench.store import ResultsStore

    busy = ResultsStore(tmp_path / "out" / "busy")
    busy.acquire()  # as a running `bench run` does
    try:
        code, _, err = bench_main(monkeypatch, capsys, *small_run(data_dir, tmp_path / "out", "--algo", "standalone",
                                                                   "--run-name", "busy", "--resume"))
    finally:
        busy.release()
    assert code == 2 and err.strip() == f"error: another bench process is using {busy.root}; wait for it to finish"


def test_debug_shows_the_traceback(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench", "--debug", "run", "--algo", "fedfoo"])
    monkeypatch.setattr(cli, "DEBUG", False)
    with pytest.raises(UserError, match="unknown algorithm 'fedfoo'"):
        cli.main()


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.cli", "run", "--algo", "pfedlora", "--participation", "2",
                             "--output-dir", str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: participation must be in (0, 1], got 2.0"
    assert list(tmp_path.iterdir()) == []


# ---- one algorithm fails, the others finish -----------------------------------------------------------------

class Boom(Standalone):
    name = "boom"
    description = "raises in round 2 (test)"

    def client_update(self, client, payload, round_index):
        if round_index == 1:
            raise RuntimeError("boom in round 2")
        return super().client_update(client, payload, round_index)


class PoisonedPhase(Standalone):
    """Round 2: the model's loss turns NaN in a first phase, while the round's last phase (a separate
    parameter) stays finite, so only a check of every phase sees it in the round it appears."""

    name = "poisoned"
    description = "NaN loss in one phase of round 2 (test)"

    def init_client(self, client):
        super().init_client(client)
        client.state["aux"] = nn.Linear(1, 1).to(self.ctx.device)

    def client_update(self, client, payload, round_index):
        model, aux = client.state["model"].train(), client.state["aux"]
        scale = float("nan") if round_index == 1 else 1.0
        yield Phase("main", [model], 1, loss=lambda x, y: F.cross_entropy(model(x), y) * scale)
        yield Phase("aux", [aux], 1, loss=lambda x, y: aux(torch.ones(1, 1)).pow(2).mean())
        return {}


def test_failing_algorithms_are_isolated(data_dir, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    registry.algorithms()
    monkeypatch.setitem(registry._REGISTRY, "boom", Boom)
    monkeypatch.setitem(registry._REGISTRY, "poisoned", PoisonedPhase)
    out = tmp_path / "out"
    code, _, err = bench_main(monkeypatch, capsys, *small_run(
        data_dir, out, "--algo", "boom", "--algo", "poisoned", "--algo", "standalone", "--rounds", "3",
        "--run-name", "iso"))
    assert code == 1, err
    assert "error: 2 run(s) failed: boom-seed0: RuntimeError: boom in round 2; poisoned-seed0: FloatingPointError: " \
           "non-finite training loss (nan) in round 2, client" in err and "phase 'main'" in err
    root = out / "iso"
    steps = lambda key: [int(r["step"]) for r in csv.DictReader(open(root / "runs" / key / "metrics.csv"))]  # noqa: E731
    summary = lambda key: json.loads((root / "runs" / key / "summary.json").read_text())  # noqa: E731
    assert steps("standalone-seed0") == [0, 1, 2, 3] and summary("standalone-seed0")["status"] == "FINISHED"
    for key, reason in (("boom-seed0", "RuntimeError: boom in round 2"),
                        ("poisoned-seed0", "non-finite training loss (nan) in round 2")):
        assert steps(key) == [0, 1]  # the failing round is not logged
        assert summary(key)["status"] == "FAILED" and reason in summary(key)["error"]
    statuses = {r["run"]: r["status"] for r in csv.DictReader(open(root / "summary.csv"))}
    assert statuses == {"boom-seed0": "FAILED", "poisoned-seed0": "FAILED", "standalone-seed0": "FINISHED"}

    info = json.loads((root / "mlflow.json").read_text())
    client = MlflowClient(info["tracking_uri"])
    assert client.get_run(info["parent_run_id"]).info.status == "FAILED"
    for key in statuses:
        run = client.get_run(json.loads((root / "runs" / key / "mlflow.json").read_text())["run_id"])
        assert run.info.status == statuses[key]
        if statuses[key] == "FAILED":
            assert "round 2" in run.data.tags["error"]


# ---- MLflow store unavailable -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def locked_store(tmp_path):
    """A sqlite file another process holds an exclusive lock on for the whole test."""
    path = tmp_path / "locked.db"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sqlite3, time
        c = sqlite3.connect({str(path)!r}, isolation_level=None)
        c.execute("CREATE TABLE t (x)")
        c.execute("BEGIN EXCLUSIVE")
        print("locked", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    yield f"sqlite:///{path}"
    holder.kill()
    holder.wait()


def assert_synced(root: Path, uri: str) -> None:
    """MLflow holds every results-folder step exactly once, with its value; the runs are FINISHED."""
    from mlflow.tracking import MlflowClient

    info = json.loads((root / "mlflow.json").read_text())
    assert info["unsynced"] is False and info["tracking_uri"] == uri
    client = MlflowClient(uri)
    parent = client.get_run(info["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == root.name
    assert "summary.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    for run_dir in (root / "runs").iterdir():
        run = client.get_run(json.loads((run_dir / "mlflow.json").read_text())["run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        table = list(csv.DictReader(open(run_dir / "metrics.csv")))
        for metric in table[0]:
            if metric == "step":
                continue
            want = [(int(r["step"]), float(r[metric])) for r in table if r[metric] != ""]
            got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric))
            assert got == want, f"{run_dir.name} {metric}"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert run.data.metrics["summary.final_acc"] == pytest.approx(summary["final_acc"])
        assert {"metrics.csv", "summary.json", "clients.csv"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


STORES = {
    "bad-uri": lambda tmp_path: "foo://nowhere",
    "corrupt-db": lambda tmp_path: (tmp_path / "corrupt.db").write_bytes(b"not a database " * 100)
    or f"sqlite:///{tmp_path / 'corrupt.db'}",
    "server-down": lambda tmp_path: f"http://127.0.0.1:{free_port()}",
    "locked-db": None,  # the locked_store fixture
}


@pytest.mark.parametrize("store", list(STORES))
def test_unavailable_store_run_completes_then_sync_uploads(store, data_dir, good_store, tmp_path, monkeypatch,
                                                           capsys, request):
    monkeypatch.setenv("BENCH_MLFLOW_RETRY_SECONDS", "1")
    uri = request.getfixturevalue("locked_store") if store == "locked-db" else STORES[store](tmp_path)
    out = tmp_path / "out"
    code, _, err = bench_main(monkeypatch, capsys, *small_run(
        data_dir, out, "--algo", "standalone", "--rounds", "2", "--run-name", store, "--tracking-uri", uri))
    assert code == 0, err
    warned = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and f"MLflow store {uri} unavailable" in warned[0] and "bench sync" in warned[0], err
    root = out / store
    assert [int(r["step"]) for r in csv.DictReader(open(root / "runs" / "standalone-seed0" / "metrics.csv"))] == [0, 1, 2]
    assert json.loads((root / "runs" / "standalone-seed0" / "summary.json").read_text())["status"] == "FINISHED"
    assert json.loads((root / "mlflow.json").read_text())["unsynced"] is True

    if store == "bad-uri":  # syncing to the store that failed says so
        code, _, err = bench_main(monkeypatch, capsys, "sync", str(root))
        assert code == 2 and err.startswith(f"error: cannot sync {root} to MLflow store foo://nowhere"), err
    code, _, err = bench_main(monkeypatch, capsys, "sync", str(root), "--tracking-uri", good_store)
    assert code == 0, err
    assert_synced(root, good_store)
    code, said, err = bench_main(monkeypatch, capsys, "sync", str(root), "--tracking-uri", good_store)
    assert code == 0 and ": 0 metric value(s) uploaded" in said, said + err  # idempotent
    assert_synced(root, good_store)


def test_store_failing_mid_run_warns_once_and_sync_fills_the_gap(data_dir, good_store, tmp_path, monkeypatch,
                                                                 capsys):
    """The store goes away after round 1 (every later call fails): the run finishes, writes its folder and
    warns once; `bench sync` then uploads rounds 2-3, the summary and artifacts, without duplicating 0-1."""
    from mlflow.tracking import MlflowClient

    real_log_batch = MlflowClient.log_batch

    def dies_after_round_1(self, run_id, metrics=(), *args, **kwargs):
        if any(m.step >= 2 for m in metrics) or dies_after_round_1.dead:
            dies_after_round_1.dead = True
            raise ConnectionError("connection refused (test: store down)")
        return real_log_batch(self, run_id, metrics, *args, **kwargs)

    dies_after_round_1.dead = False
    monkeypatch.setattr(MlflowClient, "log_batch", dies_after_round_1)
    out = tmp_path / "out"
    code, _, err = bench_main(monkeypatch, capsys, *small_run(
        data_dir, out, "--algo", "standalone", "--rounds", "3", "--run-name", "midway", "--tracking-uri", good_store))
    assert code == 0, err
    warned = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "MLflow logging to" in warned[0] and "store down" in warned[0], err
    root = out / "midway"
    run_id = json.loads((root / "runs" / "standalone-seed0" / "mlflow.json").read_text())["run_id"]
    client = MlflowClient(good_store)
    assert [m.step for m in client.get_metric_history(run_id, "acc_mean")] == [0, 1]
    assert client.get_run(run_id).info.status == "RUNNING"
    monkeypatch.setattr(MlflowClient, "log_batch", real_log_batch)

    code, said, err = bench_main(monkeypatch, capsys, "sync", str(root))
    assert code == 0, err
    assert "synced 1 run(s)" in said
    assert json.loads((root / "runs" / "standalone-seed0" / "mlflow.json").read_text())["run_id"] == run_id
    assert_synced(root, good_store)


# ---- concurrent runs ------------------------------------------------------------------------------------------

def test_two_processes_share_the_default_store_and_output_root(data_dir, tmp_path):
    """Two `bench run`s started together (no run name: the same timestamp is likely), same output root and
    so the same fresh default sqlite store: both complete, in separate folders and MLflow runs, and each
    MLflow run holds exactly its own folder's metrics (different seeds, so mixing would show)."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "bench.cli", *small_run(data_dir, out, "--algo", "standalone",
                                                                           "--rounds", "2", "--seed", str(seed))],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for seed in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
    roots = sorted(p for p in out.iterdir() if p.is_dir() and (p / "config.json").exists())
    assert len(roots) == 2, roots
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mhpfl-bench")
    runs = client.search_runs([exp.experiment_id])
    parents = {r.info.run_name: r for r in runs if r.data.tags.get("bench.kind") == "invocation"}
    assert sorted(parents) == [r.name for r in roots]
    seeds = set()
    for root in roots:
        (run_dir,) = (root / "runs").iterdir()
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[root.name].info.run_id]
        assert [c.info.run_name for c in children] == [run_dir.name] and children[0].info.status == "FINISHED"
        seeds.add(children[0].data.params["seed"])
        table = list(csv.DictReader(open(run_dir / "metrics.csv")))
        for metric in ("acc_mean", "train_loss", "val_acc_mean", "cum_train_flops"):
            want = [(int(r["step"]), float(r[metric])) for r in table if r[metric] != ""]
            got = sorted((m.step, m.value) for m in client.get_metric_history(children[0].info.run_id, metric))
            assert got == want, f"{root.name} {metric}"
    assert seeds == {"0", "1"}


# ---- plugins ----------------------------------------------------------------------------------------------------

def test_broken_plugin_warns_and_the_rest_work(monkeypatch, capsys):
    from importlib.metadata import EntryPoint

    broken = EntryPoint(name="broken", value="no_such_plugin_module:Algo", group=registry.ENTRY_POINT_GROUP)
    installed = list(registry.entry_points(group=registry.ENTRY_POINT_GROUP))  # the built-ins' own
    monkeypatch.setattr(registry, "entry_points", lambda group: [*installed, broken])
    monkeypatch.setattr(registry, "_loaded", False)
    code, _, err = bench_main(monkeypatch, capsys, "list")
    assert code == 0
    (line,) = err.strip().splitlines()
    assert line.startswith("warning: algorithm plugin 'broken' (no_such_plugin_module:Algo) failed to import")
    assert {"pfedlora", "standalone", "fedavg"} <= set(registry.algorithms())


def test_without_the_builtin_entry_points_the_error_says_to_install(monkeypatch, capsys):
    monkeypatch.setattr(registry, "entry_points", lambda group: [])
    monkeypatch.setattr(registry, "_loaded", False)
    code, _, err = bench_main(monkeypatch, capsys, "list")
    assert code == 2
    assert err.strip().splitlines() == ["error: the built-in algorithms are not registered: install the package "
                                        "(pip install -e .) so that its 'bench.algorithms' entry points exist"]
