"""`bench paper`: every SPEC section 4 item has a recipe, the full scale is the SPEC protocol and smoke the same
grid shrunk, finished runs are reused (a recipe resumes and extends), unfinished ones are re-run, and the
reports folder holds an index of every output and a manifest."""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from click.testing import CliRunner

from bench.cli import cli
from reports import paper, plots
from reports.synthetic import tiny_npz, write_synthetic_results

ALL = ["pfedlora", "feddistill", "fml", "fedkd", "lgfedavg", "fedgh", "fedapen", "standalone"]


pytestmark = pytest.mark.usefixtures("one_thread")


def configs(cells):
    return [c.config for c in cells]


def test_every_spec_section_4_item_has_a_recipe():
    assert list(paper.RECIPES) == ["t1", "convergence", "cost", "noniid", "participation", "rank", "epochs",
                                   "ablation"]
    spec = Path(__file__).resolve().parents[2].joinpath("shared", "SPEC.md")
    if spec.exists():  # the items of section 4, as the SPEC names them
        section = spec.read_text().split("## 4.")[1]
        for item in ("T1", "Convergence", "Cost", "Non-IID degree", "Participation", "Sensitivity", "Ablation"):
            assert item in section
            assert any(r.spec.startswith(item) for r in paper.RECIPES.values()), item


def test_full_scale_is_the_spec_protocol():
    full = paper.SCALES["full"]
    t1 = paper.t1_grid(full, ALL)
    assert len(t1) == 2 * 3 * len(ALL) * 3
    assert {(c.dataset, c.config["num_clients"], c.config["participation"]) for c in t1} == {
        (d, n, c) for d in ("cifar10", "cifar100") for n, c in ((10, 1.0), (50, 0.2), (100, 0.1))}
    assert all((c.config["rounds"], c.config["local_epochs"], c.config["batch_size"]) == (500, 10, 512) for c in t1)
    assert {c.config["classes_per_client"] for c in t1 if c.dataset == "cifar100"} == {10}
    assert {c.config["classes_per_client"] for c in t1 if c.dataset == "cifar10"} == {2}
    assert {c.seed for c in t1} == {0, 1, 2} and full.subset is None
    noniid = paper.noniid_grid(full, ALL)
    assert sorted({c.x for c in noniid if c.dataset == "cifar10"}) == [2, 4, 6, 8, 10]
    assert sorted({c.x for c in noniid if c.dataset == "cifar100"}) == [10, 30, 50, 70, 90, 100]
    part = paper.participation_grid(full, ALL)
    assert sorted({c.x for c in part}) == [0.1, 0.3, 0.5, 0.7, 0.9, 1.0]
    assert {c.config["num_clients"] for c in part} == {100}
    rank = paper.rank_grid(full, ALL)
    assert {c.algorithm for c in rank} == {"pfedlora"}
    assert sorted({dict(c.hparams)["rank"] for c in rank}) == [8, 16, 32, 64, 128, 256]
    epochs = paper.epochs_grid(full, ALL)
    assert sorted({dict(c.hparams)["adapter_epochs"] - dict(c.hparams)["local_epochs"] for c in epochs}) == [-5, 0, 5, 10]
    assert {dict(c.hparams)["local_epochs"] for c in epochs} == {10}
    assert {dict(c.hparams)["training"] for c in paper.ablation_grid(full, ALL)} == {"iterative", "joint"}


def test_smoke_is_the_same_grid_shrunk():
    full, smoke = paper.SCALES["full"], paper.SCALES["smoke"]
    t1 = paper.t1_grid(smoke, ALL)
    assert smoke.settings == full.settings
    assert {c.dataset for c in t1} == {"cifar10"} and {c.seed for c in t1} == {0}
    assert all(c.config["rounds"] <= 3 and c.config["local_epochs"] == 1 for c in t1)
    assert set(smoke.methods) <= set(full.methods) and "pfedlora" in smoke.methods
    assert smoke.subset is not None
    for name, recipe in paper.RECIPES.items():
        assert 0 < len(recipe.grid(smoke, ALL)) < len(recipe.grid(full, ALL)), name


def test_cell_names_are_deterministic_and_shared_by_identical_runs():
    full = paper.SCALES["full"]
    recipes = ("t1", "noniid", "participation", "rank", "epochs", "ablation")
    cells = [c for name in recipes for c in paper.RECIPES[name].grid(full, ALL)]
    names = [c.name() for c in cells]
    identities = [json.dumps(c.identity(), sort_keys=True) for c in cells]
    # One name per resolved configuration: different runs never share a folder, identical ones always do.
    assert len(set(names)) == len(set(identities)) == len(set(zip(names, identities)))
    assert names == [c.name() for name in recipes for c in paper.RECIPES[name].grid(full, ALL)]
    t1 = paper.t1_grid(full, ALL)[0]
    assert re.fullmatch(r"cifar10-N10-C1-k2-pfedlora-s0-[0-9a-f]{8}", t1.name())
    assert t1.name(("lr=0.1",)) != t1.name()
    # T1, convergence and cost share their runs; the default rank (64) is T1's pFedLoRA run at N=100, C=10%.
    assert [c.name() for c in paper.t1_grid(full, ALL)] == [c.name() for c in paper.RECIPES["cost"].grid(full, ALL)]
    rank64 = [c for c in paper.rank_grid(full, ALL) if dict(c.hparams)["rank"] == 64]
    t1_names = {c.name() for c in paper.t1_grid(full, ALL)}
    assert rank64 and all(c.name() in t1_names for c in rank64)
    assert all("rank8" in c.name() for c in paper.rank_grid(full, ALL) if dict(c.hparams)["rank"] == 8)


@pytest.fixture
def tiny(tmp_path):
    npz = tiny_npz(tmp_path / "tiny.npz")
    scale = replace(paper.SCALES["smoke"], name="tiny", base={"rounds": 1, "local_epochs": 1, "batch_size": 64},
                    datasets=(str(npz),), settings=((5, 1.0), (10, 0.5)), sweep_setting=(5, 1.0), subset=None,
                    methods=("pfedlora", "standalone"), ranks=(4,))
    return paper.Context(out=tmp_path / "paper", scale=scale, progress=False, options={"device": "cpu"},
                         echo=lambda *_: None)


def fake_runner(calls: list):
    """Stands in for bench.runner.run_invocations: writes synthetic runs (real callbacks, real MLflow store)."""
    def run_invocations(cfgs, show_progress=True, use_mlflow=True, executor=None):
        for cfg in cfgs:
            calls.append(cfg.run_name)
            write_synthetic_results(Path(cfg.output_dir), cfg.run_name, methods=cfg.algorithms, seeds=cfg.seeds,
                                    rounds=cfg.rounds, clients=cfg.num_clients, participation=cfg.participation,
                                    dataset=cfg.dataset, mlflow=True, experiment=cfg.experiment,
                                    params={"classes_per_client": cfg.classes_per_client})
        return [SimpleNamespace(failed={}) for _ in cfgs]
    return run_invocations


def test_recipes_reuse_finished_runs_extend_and_rerun_unfinished(tiny, monkeypatch):
    from mlflow.tracking import MlflowClient

    calls: list[str] = []
    monkeypatch.setattr("bench.runner.run_invocations", fake_runner(calls))
    monkeypatch.setattr(plots, "FORMATS", ("png",))
    t1 = paper.run_recipe("t1", tiny)
    assert t1["counts"] == {"ran": 4, "reused": 0, "failed": 0} and len(calls) == 4
    cost = paper.run_recipe("cost", tiny)  # same grid: nothing runs again
    assert cost["counts"] == {"ran": 0, "reused": 4, "failed": 0} and len(calls) == 4

    # Extending the seeds runs only the new cells.
    tiny.seeds = (0, 1)
    calls.clear()
    assert paper.run_recipe("t1", tiny)["counts"] == {"ran": 4, "reused": 4, "failed": 0}
    assert all(name.split("-")[-2] == "s1" for name in calls)

    # An unfinished cell (no summary: crashed mid-run) is deleted, with its MLflow runs, and run again.
    client = MlflowClient(tiny.tracking_uri)
    exp = client.get_experiment_by_name(tiny.experiment)
    broken = calls[0]
    (tiny.runs_dir / broken / "summary.csv").unlink()
    calls.clear()
    assert paper.run_recipe("t1", tiny)["counts"] == {"ran": 1, "reused": 7, "failed": 0}
    assert calls == [broken]
    runs_of = paper.cell_runs(client, exp.experiment_id, broken)
    assert len(runs_of) == 1 and "mlflow.parentRunId" not in runs_of[0].data.tags  # old runs deleted; not nested

    # MLflow dashboards: tags say which recipes used a run; children are named by method and setting.
    runs = client.search_runs([exp.experiment_id], filter_string="tags.algorithm = 'pfedlora'")
    assert runs and all({"recipe", "scale", "cell", "setting", "seed", "dataset"} <= set(r.data.tags) for r in runs)
    assert {r.data.tags["recipe"] for r in runs} >= {"cost,t1"}
    assert all(r.info.run_name.startswith("pfedlora · N=") for r in runs)

    # Reports folder: the index shows every output of both recipes; manifests hold configs, seeds, versions, commit.
    index = (tiny.out / "index.md").read_text()
    for name in ("t1", "cost"):
        files = [f for f in (tiny.out / name).iterdir() if f.name not in ("outputs.json",)]
        assert files
        for f in files:
            assert f"({name}/{f.name})" in index, f
        manifest = json.loads((tiny.out / name / "manifest.json").read_text())
        assert manifest["git"]["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", manifest["git"]["commit"])
        assert {"torch", "mlflow", "python", "mhpfl-bench"} <= set(manifest["versions"])
        assert all(c["config"]["seeds"] == [c["seed"]] for c in manifest["cells"])
    assert "![" in index and "(t1/t1_final_accuracy.png)" in index and "(cost/cost_to_target-" in index
    t1_table = pd.read_csv(tiny.out / "t1" / "t1_final_accuracy.csv")
    assert set(t1_table["seeds"]) == {2} and set(t1_table["method"]) == {"pfedlora", "standalone"}
    # Not the full scale: every table and every setting (so every figure title) says so, once.
    for name in ("t1", "cost"):
        for section in json.loads((tiny.out / name / "outputs.json").read_text()):
            for item in section["items"]:
                if item["kind"] == "table":
                    assert item["title"].count("TINY scale (1 rounds)") == 1, item["title"]
    assert all(g.endswith("· TINY scale (1 rounds)") for g in t1_table["group"])
    head = (tiny.out / "cost" / "cost_headline.md").read_text()
    assert "Paper: computation" in head and "11.81" not in head.splitlines()[0]


def test_a_recipe_with_real_runs(tiny, monkeypatch):
    """One real cell through the real runner: hyper-parameters reach the run, the figure and table exist."""
    monkeypatch.setattr(plots, "FORMATS", ("png",))
    manifest = paper.run_recipe("rank", tiny)
    assert manifest["counts"] == {"ran": 1, "reused": 0, "failed": 0}
    cell = manifest["cells"][0]
    assert cell["config"]["algo"]["pfedlora"]["rank"] == 4 and cell["config"]["rounds"] == 1
    table = pd.read_csv(tiny.out / "rank" / "rank.csv")
    assert list(table["x"]) == [4] and 0 <= table["final_acc_mean"].iloc[0] <= 1
    summary = json.loads((tiny.runs_dir / cell["cell"] / "runs" / "pfedlora-seed0" / "summary.json").read_text())
    assert table["final_acc_mean"].iloc[0] == pytest.approx(summary["final_acc"])
    assert (tiny.out / "rank" / "rank.png").exists() and (tiny.out / "rank" / "rank_cost.png").exists()
    assert paper.run_recipe("rank", tiny)["counts"]["reused"] == 1


def test_bench_paper_cli(tmp_path):
    result = CliRunner().invoke(cli, ["paper", "list"])
    assert result.exit_code == 0
    for name in paper.RECIPES:
        assert name in result.output
    bad = CliRunner().invoke(cli, ["paper", "t9"], standalone_mode=False)
    assert "unknown recipe 't9'" in str(bad.exception)
    for flag in ("--seed", "--seeds"):  # --seeds: the old spelling, still accepted
        bad = CliRunner().invoke(cli, ["paper", "t1", flag, "a"], standalone_mode=False)
        assert "expected integers" in str(bad.exception)
    # The run vocabulary: --seed repeatable (or a list), --output-dir; the old --seeds 0,1 --out the same.
    for args in (["--seed", "0", "--seed", "1", "--output-dir", str(tmp_path)],
                 ["--seed", "0,1", "--output-dir", str(tmp_path)],
                 ["--seeds", "0,1", "--out", str(tmp_path)]):
        dry = CliRunner().invoke(cli, ["paper", "t1", "--dry-run", *args])
        assert dry.exit_code == 0, dry.output
        lines = dry.output.strip().splitlines()
        assert lines and all(line.startswith("missing") for line in lines)
        assert sum("-s1-" in line for line in lines) == len(lines) // 2
