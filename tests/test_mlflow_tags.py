"""MLflow as its users expect: read back from the real sqlite store that a tiny `bench run` writes, the runs carry
their tags (one setting format with the reports, colour, commit, description, dataset input), resolved and
namespaced params without noise, and the parent run per-method summary metrics (seed std under its own name)."""
from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench.callbacks.mlflow_meta import invocation_params, run_params
from bench.cli import cli
from reports.synthetic import tiny_npz

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One tiny invocation: pFedLoRA and Standalone, 2 clients, 1 round, E=2, seeds 0 and 1."""
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("tags")
    data = tiny_npz(tmp / "tiny.npz", train=60, test=40)
    out = tmp / "results"
    result = CliRunner().invoke(cli, [
        "run", "--algo", "pfedlora", "--algo", "standalone", "--dataset", str(data), "--clients", "2",
        "--rounds", "1", "--local-epochs", "2", "--batch-size", "32", "--output-dir", str(out), "--run-name",
        "tags", "--quiet", "--device", "cpu", "--seed", "0,1", "--set", "pfedlora.rank=4"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mhpfl-bench")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("bench.kind") == "invocation")
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    return client, exp, parent, children, out / "tags"


def head_commit() -> str | None:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def test_every_run_carries_its_tags(store):
    from bench.registry import find_algorithm
    from reports.results import group_label

    client, _, parent, children, root = store
    assert set(children) == {"pfedlora-seed0", "pfedlora-seed1", "standalone-seed0", "standalone-seed1"}
    config = json.loads((root / "config.json").read_text())
    setting = group_label(config)  # the reports' label of the setting: one format everywhere
    assert setting.startswith("tiny · N=2, C=100%, 2 classes/client")
    assert parent.data.tags["setting"] == setting
    for name, run in children.items():
        tags, algo = run.data.tags, name.split("-")[0]
        assert tags["algorithm"] == algo and tags["seed"] == name[-1]
        assert tags["role"] == ("proposed" if algo == "pfedlora" else "reference")
        assert tags["mlflow.runColor"] == find_algorithm(algo).colour
        assert tags["setting"] == setting
        assert tags["model_group"] == "cnn-hetero" and tags["dataset"].endswith("tiny.npz") and tags["split"]
        assert tags["partition_hash"] == config["partition_hashes"][name[-1]]
        assert tags["bench.invocation"] == "tags"
        assert algo in tags["mlflow.note.content"] and setting in tags["mlflow.note.content"]
        assert tags.get("mlflow.source.git.commit") == head_commit()
        inputs = run.inputs.dataset_inputs
        assert len(inputs) == 1 and inputs[0].dataset.name.startswith("tiny")
        assert {t.key: t.value for t in inputs[0].tags}["partition_hash"] == tags["partition_hash"]
    assert client.get_run(parent.info.run_id).data.tags["mlflow.note.content"]


def test_params_are_resolved_namespaced_and_without_noise(store):
    _, _, parent, children, _ = store
    params = children["pfedlora-seed0"].data.params
    assert params["pfedlora.rank"] == "4"
    assert params["pfedlora.local_epochs"] == params["pfedlora.adapter_epochs"] == params["local_epochs"] == "2"
    assert params["classes_per_client"] == "2" and "dirichlet_alpha" not in params
    for run in children.values():
        p = run.data.params
        assert not any(k.startswith("hparams") for k in p), p
        assert "tracking_uri" not in p and "algorithms" not in p and "partition_hashes" not in p
        assert not any(v == "None" for v in p.values()), p
        other = "standalone" if p["algorithm"] == "pfedlora" else "pfedlora"
        assert not any(k.startswith(f"{other}.") for k in p), p
    assert parent.data.params["algorithms"] == "pfedlora,standalone"
    assert "tracking_uri" not in parent.data.params and "dirichlet_alpha" not in parent.data.params
    assert parent.data.params["pfedlora.rank"] == "4"


def test_partition_params_follow_the_partition():
    base = {"algorithm": "fedavg", "seed": 0, "partition": "dirichlet", "dirichlet_alpha": 0.3,
            "classes_per_client": 2, "tracking_uri": None, "algorithms": ["fedavg", "pfedlora"],
            "algo": {"pfedlora": {"rank": 8}}, "hparams": {}}
    params = run_params(base)
    assert params["dirichlet_alpha"] == "0.3" and "classes_per_client" not in params
    assert not any(k.startswith("pfedlora") for k in params) and "tracking_uri" not in params
    parent = invocation_params({**base, "algorithms": ["fedavg"]})
    assert "pfedlora.rank" not in parent and parent["algorithms"] == "fedavg"


def test_parent_carries_per_method_means_and_seed_std(store, tmp_path):
    _, _, parent, _, root = store
    metrics = parent.data.metrics
    for algo in ("pfedlora", "standalone"):
        summaries = [json.loads((root / "runs" / f"{algo}-seed{s}" / "summary.json").read_text()) for s in (0, 1)]
        finals = [s["final_acc"] for s in summaries]
        assert metrics[f"{algo}.final_acc"] == pytest.approx(statistics.mean(finals))
        assert metrics[f"{algo}.final_acc_seed_std"] == pytest.approx(statistics.stdev(finals))
        assert metrics[f"{algo}.best_acc"] == pytest.approx(statistics.mean(s["best_acc"] for s in summaries))
        assert metrics[f"{algo}.val_selected_acc"] == pytest.approx(
            statistics.mean(s["val_selected_acc"] for s in summaries))
        assert metrics[f"{algo}.train_flops_total"] == pytest.approx(
            statistics.mean(s["total_train_flops"] for s in summaries))
        assert metrics[f"{algo}.bytes_total"] == pytest.approx(
            statistics.mean(s["total_bytes_up"] + s["total_bytes_down"] for s in summaries))
        assert metrics[f"{algo}.seeds"] == 2
    assert not any(k.endswith("_std") and not k.endswith("_seed_std") for k in metrics), metrics


def test_ui_prints_the_runs_view_of_each_experiment(store):
    from bench.callbacks.mlflow_client import MlflowConnection
    from bench.ui import runs_view_lines

    _, exp, _, _, root = store
    uri = f"sqlite:///{root.parent / 'mlflow.db'}"
    lines = runs_view_lines(uri, "127.0.0.1", 5123)
    assert lines == [f"  runs of mhpfl-bench: http://127.0.0.1:5123/#/experiments/{exp.experiment_id}/runs"
                     "?workflowType=machine_learning"]
    other = MlflowConnection(uri).experiment("zz-other", root.parent / "mlartifacts-other")
    lines = runs_view_lines(uri, "127.0.0.1", 5123)
    assert [re.search(r"experiments/(\d+)/runs", line).group(1) for line in lines] == [exp.experiment_id, other]


def test_system_metrics_without_psutil_is_refused_before_the_run(tmp_path, monkeypatch, capsys):
    from tests.conftest import bench_main

    # psutil may be importable (Ray puts its vendored copy on sys.path once imported): hide it, as on a machine
    # without it, so the refusal is checked whatever ran before in this process
    monkeypatch.setitem(sys.modules, "psutil", None)
    code, _, err = bench_main(monkeypatch, capsys, "run", "--algo", "standalone", "--dataset", "synthetic",
                              "--clients", "2", "--rounds", "1", "--output-dir", str(tmp_path), "--system-metrics")
    assert code == 2 and err.strip().startswith("error: system_metrics needs the psutil package")
    assert not any(tmp_path.iterdir())


def test_paper_logs_a_recipe_run_and_one_top_level_run_per_cell(tmp_path, monkeypatch):
    from dataclasses import replace

    from mlflow.tracking import MlflowClient

    from reports import paper, plots
    from tests.test_paper import fake_runner

    scale = replace(paper.SCALES["smoke"], name="tiny", base={"rounds": 1, "local_epochs": 1, "batch_size": 64},
                    datasets=("synthetic",), settings=((5, 1.0), (10, 0.5)), sweep_setting=(5, 1.0), subset=None,
                    methods=("pfedlora", "standalone"), ranks=(4,))
    ctx = paper.Context(out=tmp_path / "paper", scale=scale, seeds=(0,), progress=False, options={"device": "cpu"},
                        echo=lambda *_: None)
    calls: list[str] = []
    monkeypatch.setattr("bench.runner.run_invocations", fake_runner(calls))
    monkeypatch.setattr(plots, "FORMATS", ("png",))
    paper.run_recipe("t1", ctx)
    paper.run_recipe("t1", ctx)  # again: the recipe's run is replaced, the cells reused
    client = MlflowClient(ctx.tracking_uri)
    exp = client.get_experiment_by_name(ctx.experiment)
    runs = client.search_runs([exp.experiment_id])
    recipes = [r for r in runs if r.data.tags.get("bench.kind") == "recipe"]
    assert [r.info.run_name for r in recipes] == ["t1 · tiny"]
    logged = {a.path for a in client.list_artifacts(recipes[0].info.run_id)}
    assert {"manifest.json", "t1_final_accuracy.csv", "t1_final_accuracy.png"} <= logged
    assert recipes[0].data.metrics["ran"] == 0 and recipes[0].data.metrics["reused"] == 4
    cells = [r for r in runs if r.data.tags.get("bench.kind") != "recipe"]
    assert len(cells) == len(calls) == 4  # one run per cell: no parent repeating it
    assert all("mlflow.parentRunId" not in r.data.tags and r.data.tags["recipe"] == "t1" for r in cells)
    names = sorted(r.info.run_name for r in cells)
    assert names[0] == "pfedlora · N=10 · C=0.5 · k=2 · seed0 · synthetic"
    assert all(re.match(r"(pfedlora|standalone) · N=\d+ · C=[\d.]+ · k=2 · seed0", n) for n in names), names
