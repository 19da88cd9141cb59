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
                                   "ablation", "transformer"]
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
    assert t1[0].identity()["config"]["subset"] == []  # every image: never the quick preset's subset
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
        small, big = paper.recipe_scale(recipe, smoke), paper.recipe_scale(recipe, full)
        methods = [*ALL, *paper.TRANSFORMER_METHODS]
        assert 0 < len(recipe.grid(small, methods)) < len(recipe.grid(big, methods)), name


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


# ---- the transformer recipe ---------------------------------------------------------------------------------------
LORA_METHODS = ("pfedlora", "hetlora", "flora", "fedsalora", "fedgh", "lgfedavg", "standalone")


def test_transformer_recipe_has_its_own_scales():
    recipe = paper.RECIPES["transformer"]
    full = paper.recipe_scale(recipe, paper.SCALES["full"])
    cells = recipe.grid(full, paper.methods_of(full, paper.registered_methods()))
    assert {c.algorithm for c in cells} == set(LORA_METHODS)  # every method registered, FedSA-LoRA by its name
    assert len(cells) == 2 * 2 * len(LORA_METHODS) * 3
    assert {(c.dataset, c.config["num_clients"], c.config["participation"]) for c in cells} == {
        (d, n, c) for d in ("cifar10", "cifar100") for n, c in ((10, 1.0), (50, 0.2))}
    assert {(c.config["model_group"], c.config["rounds"], c.config["local_epochs"], c.config["batch_size"])
            for c in cells} == {("vit-hetero", 100, 1, 64)}
    assert {c.seed for c in cells} == {0, 1, 2} and full.subset is None
    assert cells[0].identity()["config"]["subset"] == []  # every image: never the quick preset's subset
    assert {c.config["classes_per_client"] for c in cells if c.dataset == "cifar100"} == {10}
    assert all(c.group.endswith(", vit-hetero") for c in cells)

    smoke = paper.recipe_scale(recipe, paper.SCALES["smoke"])
    cells = recipe.grid(smoke, paper.methods_of(smoke, paper.registered_methods()))
    assert [c.algorithm for c in cells] == list(LORA_METHODS)
    assert {(c.dataset, c.subset, c.seed, c.config["num_clients"], c.config["participation"], c.config["rounds"],
             c.config["model_group"]) for c in cells} == {("cifar10", (3000, 1000), 0, 10, 1.0, 3, "vit-small-hetero")}
    assert smoke.subset == paper.SCALES["smoke"].subset  # the same CIFAR-10 subset file as the other smoke recipes
    # Its cells are its own (the model group is in the name and the hash); the CNN recipes' names keep no group.
    assert re.fullmatch(r"cifar10sub3000-vit-small-hetero-N10-C1-k2-hetlora-s0-[0-9a-f]{8}", cells[1].name())
    t1 = {c.name() for c in paper.t1_grid(paper.SCALES["smoke"], ALL)}
    assert not t1 & {c.name() for c in cells}
    # The command line's seeds and methods apply to the recipe's own scale.
    ctx = paper.Context(out=Path("unused"), scale=paper.SCALES["smoke"], seeds=(3,), algorithms=("hetlora",))
    (only,) = paper.recipe_cells(recipe, ctx)
    assert (only.algorithm, only.seed, only.config["model_group"]) == ("hetlora", 3, "vit-small-hetero")


def lora_ctx(tmp_path, methods=("hetlora", "fedsalora", "standalone")):
    npz = tiny_npz(tmp_path / "tiny.npz")
    scale = replace(paper.TRANSFORMER_SCALES["smoke"], name="tiny", datasets=(str(npz),), subset=None,
                    base={**paper.TRANSFORMER_SCALES["smoke"].base, "rounds": 2}, seeds=(0, 1),
                    settings=((5, 1.0), (10, 0.5)), methods=methods)
    return paper.Context(out=tmp_path / "paper", scale=scale, progress=False, options={"device": "cpu"},
                         echo=lambda *_: None)


def test_transformer_recipe_outputs_per_setting(tmp_path, monkeypatch):
    """On synthetic runs of known costs (reports/synthetic.py: per round F FLOPs (1 + seed / 100) and B bytes per
    client each way, for all N clients): the table's totals and bytes per sampled client per round are the hand
    counts, and each setting has its accuracy-vs-cost and accuracy-vs-round figures."""
    from reports.synthetic import PROFILES

    calls: list[str] = []
    monkeypatch.setattr("bench.runner.run_invocations", fake_runner(calls))
    monkeypatch.setattr(plots, "FORMATS", ("png",))
    ctx = lora_ctx(tmp_path)
    manifest = paper.run_recipe("transformer", ctx)
    assert manifest["counts"] == {"ran": 12, "reused": 0, "failed": 0}
    assert manifest["scale_settings"]["base"]["model_group"] == "vit-small-hetero"
    out = ctx.out / "transformer"
    overview = pd.read_csv(out / "transformer_final_accuracy.csv")
    assert set(overview["method"]) == {"hetlora", "fedsalora", "standalone"} and set(overview["seeds"]) == {2}
    rounds = 2
    for n, c, sampled in ((5, 1.0, 5), (10, 0.5, 5)):
        sfx = f"-tiny-n-{n}-c-{100 * c:g}-2-classes-client-vit-small-hetero"
        table = pd.read_csv(out / f"transformer_cost{sfx}.csv").set_index("method")
        for method in ("hetlora", "fedsalora", "standalone"):
            _, flops, nbytes = PROFILES.get(method, (0.6, 1e12, 1e5))
            row = table.loc[method]
            assert row["train_flops"] == pytest.approx(rounds * flops * (1 + 0.005))  # mean over seeds 0 and 1
            assert row["bytes"] == pytest.approx(rounds * 2 * nbytes * n)
            assert row["bytes_per_client_round"] == pytest.approx(2 * nbytes * n / sampled)
            assert row["seeds"] == 2 and 0 < row["final_acc_mean"] < 1 and row["final_acc_seed_std"] > 0
        md = (out / f"transformer_cost{sfx}.md").read_text()
        assert "TINY scale (2 rounds)" in md and "Bytes per client per round" in md and "FedSA-LoRA" in md
        for stem in ("accuracy_vs_cost", "accuracy_vs_round"):
            assert (out / f"{stem}{sfx}.png").exists(), stem
    index = (ctx.out / "index.md").read_text()
    assert "(transformer/accuracy_vs_cost-tiny-n-5-c-100-2-classes-client-vit-small-hetero.png)" in index


def test_bytes_per_client_per_round_count_the_clients_sampled():
    """run_totals divides the total bytes by the clients sampled over the rounds (the metric, where recorded)."""
    from reports import analysis
    from reports.results import Run

    metrics = pd.DataFrame({"step": [0, 1, 2], "acc_mean": [0.1, 0.5, 0.6], "clients_sampled": [0, 3, 2],
                            "cum_train_flops": [0, 10.0, 30.0], "cum_server_flops": [0, 1.0, 2.0],
                            "cum_bytes_up": [0, 300.0, 500.0], "cum_bytes_down": [0, 600.0, 1000.0]})
    run = Run("hetlora-seed0", "hetlora", 0, "FINISHED", {"num_clients": 10, "participation": 1.0}, {}, {}, metrics,
              None, "x")
    assert analysis.run_totals(run) == {"train_flops": 30.0, "server_flops": 2.0, "bytes": 1500.0,
                                        "bytes_per_client_round": 1500.0 / 5}
    # without the metric: rounds x ceil(C N) from the config (C = 0.25 of N = 10 samples 3)
    run.metrics = metrics.drop(columns="clients_sampled")
    run.params = {"num_clients": 10, "participation": 0.25}
    assert analysis.run_totals(run)["bytes_per_client_round"] == 1500.0 / (2 * 3)


def test_accuracy_vs_round_can_start_at_round_one():
    """The transformer recipe draws its few rounds from round 1 (round 0 is the untrained models)."""
    curve = pd.DataFrame({"step": [0, 1, 2], "acc": [0.05, 0.6, 0.65], "acc_seed_std": [float("nan")] * 3,
                          "cum_train_flops": [0, 1e9, 2e9], "cum_bytes": [0, 1e5, 2e5], "seeds": [1] * 3})
    fig = plots.accuracy_vs_round({"hetlora": curve}, "setting", first_round=1)
    x, y = plots.drawn_lines(fig)["hetlora"]
    assert list(x) == [1, 2] and list(y) == pytest.approx([60, 65])
    x, _ = plots.drawn_lines(plots.accuracy_vs_round({"hetlora": curve}, "setting"))["hetlora"]
    assert list(x) == [0, 1, 2]
    plots.plt.close("all")
