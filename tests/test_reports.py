"""The report: its numbers equal the per-round metrics (results folder and MLflow), every figure type draws
the data of its CSV, and the PNGs really show the methods' lines and bars."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from bench.cli import cli
from reports import analysis, plots
from reports.report import run_report
from reports.results import group_runs, label_runs, load_folder
from reports.synthetic import fresh_mlflow_store, tiny_npz, write_synthetic_results

FIGURES = ("accuracy_vs_round", "accuracy_vs_cost", "final_accuracy", "client_difference", "cost_to_target")
TABLES = ("final_accuracy", "accuracy_metrics", "cost_to_target", "client_difference", "headline", "claims",
          "cost_normalised")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """3 methods x 2 seeds, 6 rounds, with its report."""
    root = write_synthetic_results(tmp_path_factory.mktemp("syn"), "syn", methods=("pfedlora", "fedgh", "standalone"),
                                   seeds=(0, 1), rounds=6, clients=8, target=0.9)
    files = run_report(root, "synthetic")
    return root, files


def seed_frames(root: Path, method: str) -> list[pd.DataFrame]:
    return [pd.read_csv(p) for p in sorted((root / "runs").glob(f"{method}-seed*/metrics.csv"))]


def colour_pixels(png: Path, hex_colour: str, tol: int = 12) -> int:
    """How many pixels of the image have (about) this colour."""
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    target = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(img - target).max(axis=2) <= tol).sum())


def test_every_output_written_and_listed_in_the_index(synthetic):
    root, files = synthetic
    plots_dir = root / "plots"
    names = {f.name for f in files}
    for stem in FIGURES:
        assert {f"{stem}.png", f"{stem}.pdf"} <= names, stem
    for stem in TABLES:
        assert {f"{stem}.md", f"{stem}.csv", f"{stem}.tex"} <= names, stem
    index = (plots_dir / "report.md").read_text()
    assert files[-1] == plots_dir / "report.md"
    for f in files[:-1]:
        assert f"]({f.name})" in index, f"{f.name} not in the index"
    for stem in FIGURES:
        assert "![" in index and f"({stem}.png)" in index
    for f in plots_dir.iterdir():  # nothing written that the index does not list
        assert f in files, f


def test_accuracy_curves_draw_the_mean_over_seeds_of_metrics_csv(synthetic):
    root, _ = synthetic
    data = pd.read_csv(root / "plots" / "accuracy_curves.csv")
    runs = label_runs(load_folder(root))
    group = group_runs(runs)[0]
    curves = analysis.curves(group)
    assert group.label == "CIFAR-10 · N=8, C=100%, 2 classes/client"
    lines_round = plots.drawn_lines(plots.accuracy_vs_round(curves, group.label))
    fig_flops = plots.accuracy_vs_cost(curves, group.label, "flops")
    fig_bytes = plots.accuracy_vs_cost(curves, group.label, "bytes")
    lines_flops, lines_bytes = plots.drawn_lines(fig_flops), plots.drawn_lines(fig_bytes)
    for method in ("pfedlora", "fedgh", "standalone"):
        frames = seed_frames(root, method)
        acc = np.mean([f["acc_mean"] for f in frames], axis=0)
        std = np.std([f["acc_mean"] for f in frames], axis=0, ddof=1)
        flops = np.mean([f["cum_train_flops"] for f in frames], axis=0)
        nbytes = np.mean([f["cum_bytes_up"] + f["cum_bytes_down"] for f in frames], axis=0)
        d = data[data["method"] == method]
        np.testing.assert_allclose(d["acc"], acc)
        np.testing.assert_allclose(d["acc_seed_std"], std)  # across seeds: named so, never plain acc_std
        np.testing.assert_allclose(d["cum_train_flops"], flops)
        np.testing.assert_allclose(d["cum_bytes"], nbytes)
        x, y = lines_round[method]
        np.testing.assert_allclose(x, d["step"])
        np.testing.assert_allclose(y, 100 * d["acc"])
        x, y = lines_flops[method]  # round 0 (no cost yet) cannot sit on a log axis
        np.testing.assert_allclose(x, d["cum_train_flops"].iloc[1:])
        np.testing.assert_allclose(y, 100 * d["acc"].iloc[1:])
    x, y = lines_bytes["pfedlora"]
    np.testing.assert_allclose(x, data[data["method"] == "pfedlora"]["cum_bytes"].iloc[1:])
    # Standalone communicates nothing: a level at its final accuracy, not a line on the log axis.
    assert "standalone" not in lines_bytes
    np.testing.assert_allclose(lines_bytes["standalone:level"][1], 100 * data[data["method"] == "standalone"]["acc"].iloc[-1])
    for fig, column in ((fig_flops, "cum_train_flops"), (fig_bytes, "cum_bytes")):
        ax = fig.axes[0]
        assert ax.get_xscale() == "log" and "log scale" in ax.get_xlabel() and "(%)" in ax.get_ylabel()
        assert "N=8, C=100%" in ax.get_title()
        positive = data[column][data[column] > 0]
        low, high = ax.get_xlim()  # limited to the data, not decades past it
        assert positive.min() / 1.31 <= low <= positive.min() and positive.max() <= high <= positive.max() * 1.31
    # The report's one figure of both: two panels, the same curves, each method's line tagged by panel.
    both = plots.drawn_lines(plots.accuracy_vs_costs(curves, group.label))
    np.testing.assert_allclose(both["pfedlora@flops"][0], lines_flops["pfedlora"][0])
    np.testing.assert_allclose(both["pfedlora@bytes"][0], lines_bytes["pfedlora"][0])


def test_one_colour_per_method_across_figures(synthetic):
    root, _ = synthetic
    group = group_runs(label_runs(load_folder(root)))[0]
    curves = analysis.curves(group)
    colours = {}
    for fig in (plots.accuracy_vs_round(curves, "t"), plots.accuracy_vs_cost(curves, "t", "flops")):
        for line in fig.axes[0].get_lines():
            if line.get_gid():
                colours.setdefault(line.get_gid().split(":")[0], set()).add(line.get_color())
    fig = plots.final_accuracy_dots(analysis.accuracy_table([group]), "t", analysis.paired_differences(group))
    for ax in fig.axes:
        for line in ax.get_lines():
            if line.get_gid():
                colours[line.get_gid()].add(matplotlib_hex(line.get_color()))
    for method, seen in colours.items():
        assert {c.lower() for c in seen} == {plots.method_color(method)}, method
    from bench.registry import algorithms

    builtins = list(algorithms())
    assert len({plots.method_color(m) for m in builtins}) == len(builtins)
    assert all(plots.method_color(m) == cls.colour for m, cls in algorithms().items())


def matplotlib_hex(rgba) -> str:
    from matplotlib.colors import to_hex

    return to_hex(rgba, keep_alpha=False)


def test_pngs_show_each_method(synthetic):
    """Look at the images: each method's colour is drawn in quantity, and the figures are not blank."""
    root, _ = synthetic
    d = root / "plots"
    for stem in FIGURES:
        img = np.asarray(Image.open(d / f"{stem}.png").convert("L"))
        assert img.shape[0] > 400 and img.shape[1] >= 700, stem
        assert (img < 250).mean() > 0.02, f"{stem} looks blank"
    for method in ("pfedlora", "fedgh", "standalone"):
        colour = plots.method_color(method)
        assert colour_pixels(d / "accuracy_vs_round.png", colour) > 150, method
        assert colour_pixels(d / "final_accuracy.png", colour, tol=40) > 60, method  # a dot and its error bar
    assert colour_pixels(d / "accuracy_vs_round.png", plots.method_color("fedkd")) == 0  # not in this report
    assert colour_pixels(d / "accuracy_vs_cost.png", plots.method_color("standalone")) > 150


def test_final_accuracy_and_client_difference_bars_match_tables(synthetic):
    root, _ = synthetic
    acc = pd.read_csv(root / "plots" / "final_accuracy.csv").set_index("method")
    group = group_runs(label_runs(load_folder(root)))[0]
    for method in ("pfedlora", "fedgh", "standalone"):
        finals = [f["acc_mean"].iloc[-1] for f in seed_frames(root, method)]
        assert acc.loc[method, "final_acc_mean"] == pytest.approx(np.mean(finals))
        assert acc.loc[method, "final_acc_seed_std"] == pytest.approx(np.std(finals, ddof=1))
        summaries = [json.loads(p.read_text()) for p in sorted((root / "runs").glob(f"{method}-seed*/summary.json"))]
        assert acc.loc[method, "best_acc_mean"] == pytest.approx(np.mean([s["best_acc"] for s in summaries]))
        assert acc.loc[method, "val_selected_acc_mean"] == pytest.approx(
            np.mean([s["val_selected_acc"] for s in summaries]))
    dots = plots.drawn_lines(plots.final_accuracy_dots(analysis.accuracy_table([group]), "t"), 0)
    assert {m: xy[0][0] for m, xy in dots.items()} == pytest.approx({m: 100 * acc.loc[m, "final_acc_mean"]
                                                                      for m in acc.index})
    # Paired by seed against the best baseline (FedGH): the differences of the seeds' final accuracies.
    fedgh = [f["acc_mean"].iloc[-1] for f in seed_frames(root, "fedgh")]
    for method in ("pfedlora", "standalone"):
        diffs = 100 * (np.array([f["acc_mean"].iloc[-1] for f in seed_frames(root, method)]) - fedgh)
        assert acc.loc[method, "paired_diff_points"] == pytest.approx(diffs.mean())
        assert acc.loc[method, "paired_diff_seed_std"] == pytest.approx(diffs.std(ddof=1))
        assert acc.loc[method, "paired_wins"] == (diffs > 0).sum()
    assert np.isnan(acc.loc["fedgh", "paired_diff_points"])

    diff = pd.read_csv(root / "plots" / "client_difference.csv")
    ours = [pd.read_csv(p) for p in sorted((root / "runs").glob("pfedlora-seed*/clients.csv"))]
    base = [pd.read_csv(p) for p in sorted((root / "runs").glob("fedgh-seed*/clients.csv"))]  # best baseline
    expected = 100 * np.mean([o["test_acc"] - b["test_acc"] for o, b in zip(ours, base)], axis=0)
    np.testing.assert_allclose(diff.sort_values("client")["diff_points"], expected)
    table, o, b = analysis.client_difference(group)
    assert (o, b) == ("pfedlora", "fedgh")
    drawn = plots.drawn_lines(plots.client_difference_dots(table, o, b, "t"))
    assert {k: xy[1][0] for k, xy in drawn.items()} == pytest.approx(
        {f"client{c}": v for c, v in zip(diff["client"], diff["diff_points"])})


def test_cost_to_target_falls_back_to_the_best_baseline_and_gives_ratios(synthetic, tmp_path):
    root, _ = synthetic
    cost = pd.read_csv(root / "plots" / "cost_to_target.csv").set_index("method")
    # Fixed target 90% is reached by nobody: the target is FedGH's mean final accuracy.
    fedgh_final = np.mean([f["acc_mean"].iloc[-1] for f in seed_frames(root, "fedgh")])
    assert set(cost["target_kind"]) == {"fallback"}
    assert cost["target"].iloc[0] == pytest.approx(fedgh_final)
    group = group_runs(label_runs(load_folder(root)))[0]
    curves = analysis.curves(group)
    for method in cost.index:
        c = curves[method]
        hit = c[(c["step"] > 0) & (c["acc"] >= fedgh_final - 1e-12)]
        if hit.empty:
            assert np.isnan(cost.loc[method, "rounds_to_target"])
            continue
        assert cost.loc[method, "rounds_to_target"] == hit["step"].iloc[0]
        assert cost.loc[method, "train_flops_to_target"] == pytest.approx(hit["cum_train_flops"].iloc[0])
        assert cost.loc[method, "bytes_to_target"] == pytest.approx(hit["cum_bytes"].iloc[0])
    assert cost.loc["fedgh", "rounds_to_target"] <= 6  # reaches its own final accuracy
    ratio = cost.loc["fedgh", "train_flops_to_target"] / cost.loc["pfedlora", "train_flops_to_target"]
    assert cost.loc["fedgh", "flops_ratio"] == pytest.approx(ratio)
    assert cost.loc["fedgh", "acc_gain_points"] == pytest.approx(
        100 * (cost.loc["pfedlora", "final_acc"] - cost.loc["fedgh", "final_acc"]))
    text = (root / "plots" / "cost_to_target.md").read_text()
    assert "best baseline's final accuracy (FedGH" in text and "fixed 90% not reached" in text
    dots = plots.drawn_lines(plots.cost_dots(analysis.cost_to_target(group), "t"), 0)
    assert dots["pfedlora"][0][0] == cost.loc["pfedlora", "rounds_to_target"]

    # A target everyone reaches is used as is.
    low = write_synthetic_results(tmp_path, "low", methods=("pfedlora", "fedgh"), seeds=(0,), rounds=6, target=0.3)
    result = analysis.cost_to_target(group_runs(label_runs(load_folder(low)))[0])
    assert (result.target, result.target_kind) == (0.3, "fixed")
    summary = json.loads((low / "runs" / "pfedlora-seed0" / "summary.json").read_text())
    row = result.table.set_index("method").loc["pfedlora"]
    assert (row["rounds_to_target"], row["train_flops_to_target"], row["bytes_to_target"]) == (
        summary["rounds_to_target"], summary["train_flops_to_target"], summary["bytes_to_target"])


def test_tables_are_well_formed(synthetic):
    root, _ = synthetic
    for stem in TABLES:
        md = (root / "plots" / f"{stem}.md").read_text()
        rows = [line for line in md.splitlines() if line.startswith("|")]
        assert len({line.count("|") - line.count("\\|") for line in rows}) == 1, stem
        tex = (root / "plots" / f"{stem}.tex").read_text()
        spec = re.search(r"\\begin\{tabular\}\{(\w+)\}", tex).group(1)
        body = tex.split("\\midrule")[1].split("\\bottomrule")[0]
        for line in filter(None, (x.strip() for x in body.splitlines())):
            assert line.count(" & ") == len(spec) - 1, (stem, line)
        assert "%" not in body.replace("\\%", "")
    md = (root / "plots" / "final_accuracy.md").read_text()
    assert "**" in md and "±" in md  # best in bold, mean ± std


def test_report_equals_results_folder_and_mlflow_for_a_real_run(tmp_path):
    """A real `bench run` (tiny data): the report's numbers equal the per-round metrics in metrics.csv and in
    MLflow, and a report drawn from MLflow equals the one drawn from the folder."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "results"
    uri = fresh_mlflow_store(out / "mlflow.db")
    data = tiny_npz(tmp_path / "tiny.npz")
    result = CliRunner().invoke(cli, [
        "run", "--algo", "pfedlora", "--algo", "standalone", "--dataset", str(data), "--clients", "5",
        "--rounds", "2", "--batch-size", "32", "--output-dir", str(out), "--run-name", "real", "--quiet",
        "--device", "cpu", "--set", "pfedlora.rank=4", "--set", "target_accuracy=0.3"])
    assert result.exit_code == 0, result.output
    root, plots_dir = out / "real", out / "real" / "plots"
    curves = pd.read_csv(plots_dir / "accuracy_curves.csv")
    finals = pd.read_csv(plots_dir / "final_accuracy.csv").set_index("method")
    cost = pd.read_csv(plots_dir / "cost_to_target.csv").set_index("method")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("mhpfl-bench")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("bench.kind") == "invocation")
    logged = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "accuracy_vs_round.png", "accuracy_vs_cost.pdf", "accuracy_vs_cost.png",
            "cost_to_target.tex", "final_accuracy.csv", "accuracy_curves.csv", "claims.md"} <= logged
    for method in ("pfedlora", "standalone"):
        metrics = pd.read_csv(root / "runs" / f"{method}-seed0" / "metrics.csv")
        summary = json.loads((root / "runs" / f"{method}-seed0" / "summary.json").read_text())
        child = next(r for r in runs if r.data.tags.get("algorithm") == method)
        history = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "acc_mean")}
        flops = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "cum_train_flops")}
        c = curves[curves["method"] == method]
        assert list(c["step"]) == [0, 1, 2] == sorted(history)
        np.testing.assert_allclose(c["acc"], metrics["acc_mean"])
        np.testing.assert_allclose(c["acc"], [history[s] for s in c["step"]])
        np.testing.assert_allclose(c["cum_train_flops"], [flops[s] for s in c["step"]])
        np.testing.assert_allclose(c["cum_bytes"], metrics["cum_bytes_up"] + metrics["cum_bytes_down"])
        assert finals.loc[method, "final_acc_mean"] == pytest.approx(summary["final_acc"])
        assert finals.loc[method, "final_acc_mean"] == pytest.approx(child.data.metrics["summary.final_acc"])
        assert finals.loc[method, "best_acc_mean"] == pytest.approx(summary["best_acc"])
        assert finals.loc[method, "val_selected_acc_mean"] == pytest.approx(summary["val_selected_acc"])
        if cost.loc[method, "target_kind"] == "fixed":
            assert cost.loc[method, "target"] == 0.3
            assert cost.loc[method, "rounds_to_target"] == summary["rounds_to_target"]
            assert cost.loc[method, "train_flops_to_target"] == summary["train_flops_to_target"]
            assert cost.loc[method, "bytes_to_target"] == summary["bytes_to_target"]
    # `bench report` reading MLflow instead of the folder: identical tables and curves.
    from_mlflow = tmp_path / "from_mlflow"
    result = CliRunner().invoke(cli, ["report", "--tracking-uri", uri, "--experiment", "mhpfl-bench", "--run", "real",
                                      "--out", str(from_mlflow)])
    assert result.exit_code == 0, result.output
    for name in ("accuracy_curves.csv", "final_accuracy.csv", "cost_to_target.csv", "client_difference.csv"):
        a, b = pd.read_csv(plots_dir / name), pd.read_csv(from_mlflow / name)
        pd.testing.assert_frame_equal(a, b, check_dtype=False)


def test_bench_report_cli_compares_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "FORMATS", ("png",))  # PDFs are checked above; keep this test quick
    a = write_synthetic_results(tmp_path / "res", "a", methods=("pfedlora", "fedgh"), seeds=(0,), rounds=3,
                                clients=10, participation=1.0)
    b = write_synthetic_results(tmp_path / "res", "b", methods=("pfedlora", "fedgh"), seeds=(0,), rounds=3,
                                clients=50, participation=0.2)
    out = tmp_path / "report"
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "res"), "--out", str(out)])  # finds a and b
    assert result.exit_code == 0, result.output
    t1 = (out / "final_accuracy.md").read_text()
    assert t1.index("N=10, C=100%") < t1.index("N=50, C=20%")  # the T1 form: one column per setting
    for suffix in ("cifar-10-n-10-c-100-2-classes-client", "cifar-10-n-50-c-20-2-classes-client"):
        assert (out / f"accuracy_vs_round-{suffix}.png").exists()
        assert (out / f"cost_to_target-{suffix}.md").exists()
    assert (out / "report.md").read_text().count("![") == 2 * len(FIGURES)
    bad = CliRunner().invoke(cli, ["report", str(tmp_path / "nope")])
    assert bad.exit_code != 0
    assert a.exists() and b.exists()


def test_report_survives_failed_runs_and_sparse_evaluation(tmp_path, monkeypatch):
    """A failed run is left out (and named in the index); rounds without evaluation (eval_every > 1) are
    skipped, not drawn as zeros; nothing raises, so a report can never fail the `bench run` it follows."""
    monkeypatch.setattr(plots, "FORMATS", ("png",))
    root = write_synthetic_results(tmp_path, "edge", methods=("pfedlora", "fedgh", "standalone"), seeds=(0,), rounds=4)
    metrics = root / "runs" / "fedgh-seed0" / "metrics.csv"
    df = pd.read_csv(metrics)
    df.loc[df["step"].isin([1, 3]), ["acc_mean", "acc_std", "val_acc_mean"]] = np.nan
    df.to_csv(metrics, index=False)
    failed = root / "runs" / "standalone-seed0"
    summary = json.loads((failed / "summary.json").read_text())
    (failed / "summary.json").write_text(json.dumps({**summary, "status": "FAILED", "error": "boom"}))
    pd.read_csv(failed / "metrics.csv").iloc[:1].to_csv(failed / "metrics.csv", index=False)
    files = run_report(root, "edge")
    index = (root / "plots" / "report.md").read_text()
    assert "Not included: standalone-seed0" in index and "boom" in index
    curves = pd.read_csv(root / "plots" / "accuracy_curves.csv")
    assert set(curves["method"]) == {"pfedlora", "fedgh"}
    assert list(curves[curves["method"] == "fedgh"]["step"]) == [0, 2, 4]
    assert "could not be made" not in index
    assert {f.name for f in files} >= {"accuracy_vs_round.png", "cost_to_target.png", "client_difference.png"}


def test_reports_read_display_name_order_role_and_colour_from_the_algorithm_class():
    from algorithms.base import Algorithm
    from bench.registry import _REGISTRY, algorithms, register
    from reports.results import display_name, method_sort_key, role_of

    class Plugin(Algorithm):
        name = "metaplugin"
        display_name, role, table_order, colour = "Meta Plugin", "reference", -5, "#123456"

    algorithms()  # the installed ones first, then the test's own
    register(Plugin)
    try:
        assert display_name("metaplugin") == "Meta Plugin"
        assert display_name("metaplugin (rank=8)") == "Meta Plugin (rank=8)"
        assert sorted(["fedkd", "metaplugin", "pfedlora"], key=method_sort_key) == ["metaplugin", "pfedlora", "fedkd"]
        assert plots.method_color("metaplugin") == "#123456"
        assert role_of("metaplugin") == "reference" and role_of("pfedlora") == "proposed"
        assert role_of("fedkd") == "baseline" and role_of("unknown-method") == "baseline"
    finally:
        _REGISTRY.pop("metaplugin")
