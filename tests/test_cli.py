"""End-to-end: the real `bench` CLI on synthetic data, checked against the real MLflow store it writes."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench.cli import cli

BENCH = [sys.executable, "-m", "bench.cli"]
REPO = Path(__file__).resolve().parents[1]


def bench(*args, env=None, cwd=None):
    return subprocess.run([*BENCH, *args], capture_output=True, text=True, env={**os.environ, **(env or {})},
                          cwd=cwd or REPO, timeout=300)


def test_run_logs_parent_and_children_to_mlflow_and_results_folder(tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "results"
    result = CliRunner().invoke(cli, [
        "run", "--algo", "pfedlora", "--algo", "standalone", "--dataset", "synthetic", "--clients", "5",
        "--rounds", "2", "--batch-size", "64", "--output-dir", str(out), "--run-name", "e2e", "--quiet",
        "--set", "pfedlora.rank=8", "--seed", "3"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mhpfl-bench")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("bench.kind") == "invocation"]
    assert len(parents) == 1 and parents[0].info.run_name == "e2e"
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == {"pfedlora-seed3", "standalone-seed3"}
    for key, run in children.items():
        assert run.info.status == "FINISHED"
        assert run.data.params["pfedlora.rank" if key.startswith("pfedlora") else "seed"] == ("8" if key.startswith("pfedlora") else "3")
        assert run.data.tags["algorithm"] == key.split("-")[0]
        rows = list(csv.DictReader(open(out / "e2e" / "runs" / key / "metrics.csv")))
        assert [int(r["step"]) for r in rows] == [0, 1, 2]
        for metric in ("acc_mean", "train_flops", "cum_bytes_up", "round_time"):
            history = client.get_metric_history(run.info.run_id, metric)
            assert [m.step for m in history] == [0, 1, 2]
            assert [m.value for m in history] == pytest.approx([float(r[metric]) for r in rows])
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"metrics.csv", "clients.csv", "summary.json", "config.json"} <= artifacts
        summary = json.loads((out / "e2e" / "runs" / key / "summary.json").read_text())
        assert summary["final_acc"] == pytest.approx(float(rows[-1]["acc_mean"]))
    assert children["standalone-seed3"].data.metrics["cum_bytes_up"] == 0
    assert children["pfedlora-seed3"].data.metrics["cum_bytes_up"] > 0
    parent_artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"accuracy_vs_round.png", "summary.csv"} <= parent_artifacts
    clients = list(csv.DictReader(open(out / "e2e" / "runs" / "pfedlora-seed3" / "clients.csv")))
    assert [r["arch"] for r in clients] == ["cnn1", "cnn2", "cnn3", "cnn4", "cnn5"]


def test_toml_config_and_set_overrides(tmp_path):
    from bench.config import load_config

    path = tmp_path / "c.toml"
    path.write_text('algorithms = ["pfedlora", "LG-FedAvg"]\nrounds = 7\n[pfedlora]\nrank = 16\n')
    cfg = load_config(path, "quick", ["rounds=9", "pfedlora.placement=\"header-lora\""], {"num_clients": 20})
    assert cfg.rounds == 9 and cfg.num_clients == 20
    assert cfg.algorithms == ["pfedlora", "lgfedavg"]
    assert cfg.algo["pfedlora"] == {"rank": 16, "placement": "header-lora"}
    paper = load_config(None, "paper")
    assert (paper.rounds, paper.local_epochs, paper.batch_size) == (500, 10, 512)


# Bad input (one line, exit 2, nothing written): the table in tests/test_reliability.py, run in-process.


def test_list_shows_every_kind_of_component():
    result = CliRunner().invoke(cli, ["list"])
    assert result.exit_code == 0
    for name in ("pfedlora", "standalone", "fedavg", "cnn-hetero", "cnn1-homo", "cifar10", "synthetic",
                 "label-skew", "dirichlet", "iid"):
        assert name in result.output


def test_fedavg_refuses_a_heterogeneous_group_and_runs_homogeneous(tmp_path):
    bad = bench("run", "--algo", "fedavg", "--dataset", "synthetic", "--rounds", "1", "--output-dir", str(tmp_path))
    assert bad.returncode == 2 and "needs a model-homogeneous group" in bad.stderr
    ok = CliRunner().invoke(cli, ["run", "--algo", "fedavg", "--dataset", "synthetic", "--rounds", "1", "--clients", "5",
                                  "--model-group", "cnn5-homo", "--output-dir", str(tmp_path), "--quiet"])
    assert ok.exit_code == 0, ok.output


def test_plugin_installed_through_an_entry_point(tmp_path):
    """A third-party package, really pip-installed, adds an algorithm with no change to this project."""
    src = tmp_path / "src"
    (src / "myplugin").mkdir(parents=True)
    (src / "myplugin" / "__init__.py").write_text(textwrap.dedent('''
        from algorithms.standalone import Standalone

        class Copycat(Standalone):
            name = "copycat"
            description = "third-party test plugin"
    '''))
    (src / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "myplugin"
        version = "0.1"
        [project.entry-points."bench.algorithms"]
        copycat = "myplugin:Copycat"
        broken = "myplugin_missing:Nope"
    '''))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(src)], check=True, capture_output=True)
    env = {"PYTHONPATH": f"{site}{os.pathsep}{REPO}"}
    listed = bench("list", env=env)
    assert "copycat" in listed.stdout and "third-party test plugin" in listed.stdout
    assert "broken" in listed.stderr and "failed to import" in listed.stderr  # warned, not fatal
    run = bench("run", "--algo", "CopyCat", "--dataset", "synthetic", "--clients", "5", "--rounds", "1",
                "--output-dir", str(tmp_path / "out"), "--run-name", "p", "--quiet", env=env)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / "p" / "runs" / "copycat-seed0" / "metrics.csv").exists()


# ---- label skew for any N, dataset-aware defaults ------------------------------------------------------------------


def test_list_says_how_uneven_label_skew_is_dealt():
    result = CliRunner().invoke(cli, ["list"])
    assert result.exit_code == 0
    assert "floor or ceil" in result.output and "file:PATH.json" in result.output


def test_dataset_aware_defaults_follow_the_protocol():
    from bench.config import RunConfig, default_classes_per_client, default_target_accuracy, resolve_dataset_defaults

    assert [default_classes_per_client(k) for k in (2, 10, 11, 100)] == [2, 2, 10, 10]
    assert {default_target_accuracy(10, n) for n in (5, 10, 50, 100)} == {0.9}  # CIFAR-10: 90% (SPEC section 3)
    assert [default_target_accuracy(100, n) for n in (10, 50, 100)] == [0.7, 0.6, 0.5]  # CIFAR-100, pFedES
    # Other N: the nearest of 10, 50, 100, ties to the smaller N.
    assert [default_target_accuracy(100, n) for n in (1, 30, 31, 75, 76, 1000)] == [0.7, 0.7, 0.6, 0.6, 0.5, 0.5]
    resolved = resolve_dataset_defaults(RunConfig(num_clients=50), 100)
    assert (resolved.classes_per_client, resolved.target_accuracy) == (10, 0.6)
    explicit = resolve_dataset_defaults(RunConfig(num_clients=50, classes_per_client=30, target_accuracy=0.4), 100)
    assert (explicit.classes_per_client, explicit.target_accuracy) == (30, 0.4)  # an explicit value wins
    assert RunConfig().classes_per_client is None and RunConfig().target_accuracy is None


def test_an_old_folder_without_resolved_defaults_compares_by_the_target_it_used():
    from bench.config import RunConfig, config_differences, from_results, resolve_dataset_defaults

    old = {**RunConfig(dataset="cifar100", algorithms=["standalone"]).to_dict(), "classes_per_client": 10,
           "target_accuracy": None, "target_acc": 0.5}  # written when CIFAR-100's target was 0.5 at every N
    assert from_results(old).target_accuracy == 0.5  # `bench resume` keeps the folder's target
    now = resolve_dataset_defaults(RunConfig(dataset="cifar100", algorithms=["standalone"]), 100)
    assert config_differences(old, now) == ["target_accuracy: 0.5 there, 0.7 here"]
    assert config_differences({**old, "target_acc": None}, now) == []  # unknown target: the default stands


def test_cifar100_like_run_records_the_resolved_defaults_and_resumes(tmp_path, monkeypatch, capsys):
    from tests.conftest import bench_main

    out = tmp_path / "results"
    args = ["run", "--algo", "standalone", "--dataset", "synthetic:20", "--clients", "5", "--model-group", "cnn5-homo",
            "--rounds", "1", "--batch-size", "64", "--output-dir", str(out), "--run-name", "many", "--quiet"]
    code, _, err = bench_main(monkeypatch, capsys, *args)
    assert code == 0, err
    config = json.loads((out / "many" / "config.json").read_text())
    # 20 classes: label skew with 10 classes per client (5 x 10 = 50 slots dealt over 20 classes), target 70% at N=5.
    assert (config["classes_per_client"], config["target_accuracy"], config["target_acc"]) == (10, 0.7, 0.7)
    assert json.loads((out / "many" / "runs" / "standalone-seed0" / "summary.json").read_text())["target_acc"] == 0.7
    # The recorded config resumes, as is and from the same command line (unresolved: resolved to the same).
    code, stdout, err = bench_main(monkeypatch, capsys, "resume", str(out / "many"))
    assert code == 0 and "already finished" in stdout + err, err
    code, _, err = bench_main(monkeypatch, capsys, *args, "--resume", "--classes-per-client", "10")
    assert code == 0, err  # a config difference would refuse with exit 2
    code, _, err = bench_main(monkeypatch, capsys, *args, "--resume", "--set", "target_accuracy=0.5")
    assert code == 2 and "target_accuracy: 0.7 there, 0.5 here" in err
