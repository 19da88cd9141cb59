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
        assert run.data.params["hparams.rank" if key.startswith("pfedlora") else "seed"] == ("8" if key.startswith("pfedlora") else "3")
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
