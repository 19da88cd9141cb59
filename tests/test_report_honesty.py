"""Reports that cannot mislead (issue 13): runs of different settings are reported apart unless pooled on
request, seeds are counted, the paper's claims sit beside the measured figures (recomputed here from
metrics.csv), matched budgets and worst clients have known answers, and every figure meets the standards a
reviewer expects (size, fonts, log axes fitted to the data, no bars on log axes, integer rounds)."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy.stats import t as student_t

from bench.cli import cli
from reports import analysis, plots, tables
from reports.commands import report_command
from reports.report import build_report, run_report
from reports.results import Group, Run, group_runs, label_runs, load_folder
from reports.synthetic import write_synthetic_results

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def png_only(monkeypatch):
    monkeypatch.setattr(plots, "FORMATS", ("png",))  # PDFs: test_figures_meet_the_standards


# ---- grouping --------------------------------------------------------------------------------------------------
def test_two_settings_in_one_root_are_reported_apart_with_a_message(tmp_path, capsys):
    """A 10-round and a 2-round run of the same algorithm and seed: two settings, never one 'over 2 seeds'."""
    res = tmp_path / "results"
    write_synthetic_results(res, "long", methods=("pfedlora", "fedgh"), seeds=(0,), rounds=10)
    write_synthetic_results(res, "short", methods=("pfedlora", "fedgh"), seeds=(0, 1), rounds=2)
    out = tmp_path / "report"
    result = CliRunner().invoke(cli, ["report", str(res), "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert "2 different settings (rounds: 10 vs 2)" in result.output and "reported apart" in result.output
    acc = pd.read_csv(out / "accuracy_metrics.csv")
    assert set(acc["group"]) == {"CIFAR-10 · N=10, C=100%, 2 classes/client · rounds=10",
                                 "CIFAR-10 · N=10, C=100%, 2 classes/client · rounds=2"}
    long = acc[acc["group"].str.endswith("rounds=10")].set_index("method")
    final = pd.read_csv(res / "long" / "runs" / "pfedlora-seed0" / "metrics.csv")["acc_mean"].iloc[-1]
    assert long.loc["pfedlora", "final_acc_mean"] == pytest.approx(final)  # round 10, not averaged with round 2
    assert long.loc["pfedlora", "seeds"] == 1 and math.isnan(long.loc["pfedlora", "final_acc_seed_std"])
    curves = pd.concat(pd.read_csv(f) for f in out.glob("accuracy_curves-*rounds-10.csv"))
    assert curves["step"].max() == 10  # the long run's curve is not cut at the short run's round 2
    index = (out / "report.md").read_text()
    assert "reported apart (pass --pool to pool them)" in index
    # Seeds are counted, and every table says what its ± is over.
    md = (out / "accuracy_metrics.md").read_text()
    assert "mean ± std across seeds over each row's seeds" in md
    assert "| 2 |" in md and "0 1" not in md

    # Pooled on request: one group, and the ± says it is over runs of different settings.
    pooled = tmp_path / "pooled"
    report_command((res,), pooled, tracking_uri=None, experiment=None, parents=(), title="", pool=True)
    said = capsys.readouterr().out
    assert "POOLED as asked (--pool)" in said
    acc = pd.read_csv(pooled / "accuracy_metrics.csv").set_index("method")
    assert set(acc["group"]) == {"CIFAR-10 · N=10, C=100%, 2 classes/client"}
    assert acc.loc["pfedlora", "seeds"] == 3 and acc.loc["pfedlora", "over"] == "3 runs (2 distinct seeds)"


def test_the_same_run_twice_counts_once(tmp_path):
    res = tmp_path / "results"
    write_synthetic_results(res, "a", methods=("pfedlora",), seeds=(0,), rounds=3)
    write_synthetic_results(res, "b", methods=("pfedlora",), seeds=(0,), rounds=3)
    runs = label_runs([r for name in ("a", "b") for r in load_folder(res / name)])
    groups = group_runs(runs)
    assert len(groups) == 1 and len(groups[0].runs["pfedlora"]) == 1
    assert "appears twice" in groups[0].notes[0] and groups[0].over() == "1 seed"


def test_settings_ignore_what_does_not_change_the_numbers(tmp_path):
    """Paths, device and a partition's unused parameter (alpha under label skew) do not split a setting."""
    res = tmp_path / "results"
    write_synthetic_results(res, "a", methods=("pfedlora",), seeds=(0,), rounds=3,
                            params={"output_dir": "x", "device": "cpu", "dirichlet_alpha": 0.5})
    write_synthetic_results(res, "b", methods=("pfedlora",), seeds=(1,), rounds=3,
                            params={"output_dir": "y", "device": "cuda", "dirichlet_alpha": 0.1})
    groups = group_runs(label_runs([r for n in ("a", "b") for r in load_folder(res / n)]))
    assert len(groups) == 1 and groups[0].over() == "2 seeds"


def test_the_split_is_shown_wherever_results_are(tmp_path):
    root = write_synthetic_results(tmp_path, "c100", methods=("pfedlora", "fedgh"), seeds=(0,), rounds=3,
                                   dataset="cifar100", params={"dataset_split": "re-split"})
    run_report(root, "x")
    index = (root / "plots" / "report.md").read_text()
    assert "## CIFAR-100 (re-split) · N=10" in index
    assert "Data split: re-split, a seeded stratified re-split" in index and "NOT the official split" in index
    assert "CIFAR-100 (re-split)" in (root / "plots" / "cost_to_target.md").read_text()


# ---- the paper's claims ------------------------------------------------------------------------------------------
def test_claims_table_recomputed_from_the_metrics(tmp_path):
    root = write_synthetic_results(tmp_path, "claims", methods=("pfedlora", "fedgh", "fedkd", "standalone"),
                                   seeds=(0, 1), rounds=6, target=0.5)
    run_report(root, "x")
    claims = pd.read_csv(root / "plots" / "claims.csv").set_index("baseline")

    def per_round(method: str, column: str) -> float:
        frames = [pd.read_csv(p) for p in sorted((root / "runs").glob(f"{method}-seed*/metrics.csv"))]
        cols = column.split("+")
        return float(np.mean([sum(f[c].iloc[-1] for c in cols) / f["step"].iloc[-1] for f in frames]))

    def to_target(method: str) -> tuple[float, float]:
        frames = [pd.read_csv(p) for p in sorted((root / "runs").glob(f"{method}-seed*/metrics.csv"))]
        acc = np.mean([f["acc_mean"] for f in frames], axis=0)
        k = next(i for i, a in enumerate(acc) if i > 0 and a >= 0.5)
        return (np.mean([f["cum_train_flops"].iloc[k] for f in frames]),
                np.mean([f["cum_bytes_up"].iloc[k] + f["cum_bytes_down"].iloc[k] for f in frames]))

    ours_flops, ours_bytes = per_round("pfedlora", "cum_train_flops"), per_round("pfedlora", "cum_bytes_up+cum_bytes_down")
    for base in ("fedgh", "fedkd"):
        row = claims.loc[base]
        assert row["flops_round_ratio"] == pytest.approx(per_round(base, "cum_train_flops") / ours_flops)
        assert row["bytes_round_ratio"] == pytest.approx(per_round(base, "cum_bytes_up+cum_bytes_down") / ours_bytes)
        (bf, bb), (of, ob) = to_target(base), to_target("pfedlora")
        assert row["flops_target_ratio"] == pytest.approx(bf / of)
        assert row["bytes_target_ratio"] == pytest.approx(bb / ob)
        finals = {m: np.mean([pd.read_csv(p)["acc_mean"].iloc[-1] for p in (root / "runs").glob(f"{m}-seed*/metrics.csv")])
                  for m in ("pfedlora", base)}
        assert row["acc_gain_points"] == pytest.approx(100 * (finals["pfedlora"] - finals[base]))
        assert row["flops_rounds_ratio_needed"] == pytest.approx(11.81 / row["flops_round_ratio"])
    assert bool(claims.loc["fedgh", "best_baseline"]) and not bool(claims.loc["fedkd", "best_baseline"])
    assert math.isnan(claims.loc["standalone", "bytes_round_ratio"])  # Standalone sends nothing: no ratio
    md = (root / "plots" / "claims.md").read_text()
    # The paper's figures in their own column, never in a title above measured numbers.
    header = next(line for line in md.splitlines() if line.startswith("| Measure"))
    assert "Paper's claim (vs best baseline)" in header and "FedGH (best baseline)" in header
    assert "11.81× less" in md and "What the claims would require against FedGH" in md
    title = md.splitlines()[0]
    assert "11.81" not in title and "1.35" not in title and "7.41" not in title
    head = (root / "plots" / "headline.md").read_text()
    assert "11.81" not in head.splitlines()[0] and "Paper: computation" in head


def test_equal_costs_read_same_not_one_times_less():
    assert tables.less_more(1.0) == "same" and tables.less_more(1.004) == "same"
    assert tables.less_more(2.0) == "2.00× less" and tables.less_more(0.5) == "2.00× more"


# ---- matched budgets, worst clients, confidence intervals ----------------------------------------------------------
def hand_run(method: str, seed: int, flops: list[float], acc: list[float], nbytes: list[float] | None = None,
             clients: list[float] | None = None) -> Run:
    steps = list(range(len(acc)))
    metrics = pd.DataFrame({"step": steps, "acc_mean": acc, "cum_train_flops": flops,
                            "cum_bytes_up": nbytes or [0.0] * len(acc), "cum_bytes_down": [0.0] * len(acc)})
    table = None if clients is None else pd.DataFrame({"client": range(len(clients)), "test_acc": clients})
    return Run(key=f"{method}-seed{seed}", algorithm=method, seed=seed, status="FINISHED", params={}, tags={},
               summary={}, metrics=metrics, clients=table, source=f"{method}{seed}", method=method, group="g")


def test_matched_budget_has_the_known_answers():
    """A reaches its final 60% at 20 FLOPs, B its final 45% at 16, C its final 42% at 24: the FLOPs budget is
    B's 16; within it A stopped after round 1 (50%), B after round 4 (45%), C after round 1 (40%). Bytes:
    Standalone-like C sends nothing, so it cannot set the bytes budget and keeps its final accuracy."""
    runs = {
        "a": hand_run("a", 0, [0, 10, 20, 30], [0.1, 0.5, 0.6, 0.6], nbytes=[0, 5, 10, 15]),
        "b": hand_run("b", 0, [0, 4, 8, 12, 16, 20], [0.1, 0.2, 0.3, 0.35, 0.45, 0.45], nbytes=[0, 1, 2, 3, 4, 5]),
        "c": hand_run("c", 0, [0, 12, 24], [0.1, 0.4, 0.42]),
    }
    group = Group("g", {m: [r] for m, r in runs.items()})
    flops = analysis.matched_budget(group, "flops")
    assert (flops.budget, flops.cheapest) == (16, "b") and flops.needs == {"a": 20, "b": 16, "c": 24}
    got = {m: analysis.accuracy_within(r, "flops", flops.budget) for m, r in runs.items()}
    assert got == pytest.approx({"a": 0.5, "b": 0.45, "c": 0.4})
    nbytes = analysis.matched_budget(group, "bytes")
    assert (nbytes.budget, nbytes.cheapest) == (4, "b")  # a needs 10 (its 60% first at round 2), c sends none
    table, _ = analysis.cost_normalised(group)
    t = table.set_index("method")
    assert t.loc["c", "acc_at_bytes_budget"] == pytest.approx(0.42)
    assert math.isnan(t.loc["a", "acc_at_bytes_budget"])  # its first round already costs 5 > 4
    assert t.loc["b", "acc_at_flops_budget"] == pytest.approx(0.45)


def test_worst_client_and_t_intervals_over_seeds():
    clients = [k / 10 for k in range(10)]  # 10th percentile (linear) = 0.09
    runs = [hand_run("a", s, [0, 1], [0.1, acc], clients=[c + s / 100 for c in clients])
            for s, acc in ((0, 0.50), (1, 0.54), (2, 0.58))]
    assert analysis.worst_client(runs[0]) == pytest.approx(0.09)
    table, _ = analysis.cost_normalised(Group("g", {"a": runs}))
    row = table.iloc[0]
    assert row["worst_client_acc"] == pytest.approx(np.mean([0.09, 0.10, 0.11]))
    half = student_t.ppf(0.975, 2) * np.std([0.50, 0.54, 0.58], ddof=1) / math.sqrt(3)
    assert row["final_acc"] == pytest.approx(0.54) and row["final_acc_ci"] == pytest.approx(half)
    one, _ = analysis.cost_normalised(Group("g", {"a": runs[:1]}))
    assert math.isnan(one.iloc[0]["final_acc_ci"])  # one seed: no interval, not a zero-width one


def test_client_difference_counts_ties_and_says_how_it_averages(tmp_path):
    diff = pd.DataFrame({"client": [0, 1, 2, 3], "arch": ["cnn1"] * 4, "ours_acc": [0.6, 0.5, 0.5, 0.4],
                         "baseline_acc": [0.5, 0.5, 0.5, 0.5], "diff_points": [10.0, 0.0, 0.0, -10.0],
                         "diff_seed_std": [math.nan] * 4, "n_test": [300, 100, 100, 100], "seeds": [1] * 4})
    s = analysis.difference_summary(diff)
    assert (s["better"], s["tied"], s["worse"]) == (1, 2, 1)
    assert s["mean"] == 0 and s["weighted_mean"] == pytest.approx((3000 - 1000) / 600)
    table = tables.client_difference_table(diff, "pfedlora", "fedgh")
    assert "better on 1, tied on 2, worse on 1 of 4 clients" in table.title
    assert "unweighted; weighted by test samples +3.33" in table.title
    fig = plots.client_difference_dots(diff, "pfedlora", "fedgh", "t")
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "tie (2)" in labels and any("unweighted" in x for x in labels)


# ---- figures -------------------------------------------------------------------------------------------------------
def test_figures_meet_the_standards(tmp_path, monkeypatch):
    """Sizes at a column's width with no text under 8 pt, aspect ratios below 3.5:1, TrueType fonts in PDFs,
    log axes within the data, dots (no bars) on log axes, integer round ticks, bands where a title says ±."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    monkeypatch.setattr(plots, "FORMATS", ("png", "pdf"))
    root = write_synthetic_results(tmp_path, "fig", methods=("pfedlora", "fedgh", "lgfedavg", "fedkd", "standalone"),
                                   seeds=(0, 1, 2), rounds=5, clients=10, target=0.5)
    group = group_runs(label_runs(load_folder(root)))[0]
    curves = analysis.curves(group)
    budgets = {k: analysis.matched_budget(group, k) for k in analysis.COSTS}
    diff, ours, base = analysis.client_difference(group)
    _, seed_diffs = analysis.seed_differences(group)
    figures = {
        "round": plots.accuracy_vs_round(curves, group.label),
        "costs": plots.accuracy_vs_costs(curves, group.label, budgets),
        "final": plots.final_accuracy_dots(analysis.accuracy_table([group]), group.label,
                                           analysis.paired_differences(group), seed_diffs),
        "clients": plots.client_difference_dots(diff, ours, base, group.label),
        "cost": plots.cost_dots(analysis.cost_to_target(group), group.label),
    }
    for name, fig in figures.items():
        w, h = fig.get_size_inches()
        assert w in (plots.COLUMN_W, plots.WIDE_W) and w / h <= 3.5, name
        fig.canvas.draw()
        for text in fig.findobj(lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text")):
            if text.get_text().strip() and text.get_visible():
                assert text.get_fontsize() >= 8, (name, text.get_text())
        for ax in fig.axes:
            for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
                if scale == "log":  # dots, never bars, on a log axis
                    assert not [p for p in ax.patches if isinstance(p, Rectangle) and p.get_gid()], name
    ax = figures["round"].axes[0]
    assert all(float(t).is_integer() for t in ax.get_xticks()), "round ticks must be integers"
    assert "± std" in ax.get_title() and ax.collections, "a title claiming ± std draws the band"
    for ax in figures["costs"].axes:
        assert ax.get_xscale() == "log" and ax.collections  # error bands on the cost curves too
    cost = figures["cost"]
    table = analysis.cost_to_target(group).table
    for ax, col in zip(cost.axes[1:], ("train_flops_to_target", "bytes_to_target")):
        reached = table[col].dropna()
        low, high = ax.get_xlim()
        assert reached.min() / 1.61 <= low and high <= reached.max() * 1.61  # not decades past the data
    for name, fig in figures.items():
        paths = plots.save_figure(fig, tmp_path / "out", name)
        pdf = paths[1].read_bytes()
        assert b"/FontFile2" in pdf and b"/Type3" not in pdf, name  # TrueType (pdf.fonttype 42)
    plt.close("all")


def test_bench_run_report_tables_say_what_the_spread_is_over(tmp_path):
    root = write_synthetic_results(tmp_path, "over", methods=("pfedlora", "fedgh"), seeds=(0, 1), rounds=3)
    files = build_report(load_folder(root), tmp_path / "r")
    for f in files:
        if f.suffix == ".md" and f.name != "report.md":
            text = f.read_text()
            if "±" in text:
                assert "across seeds" in text, f.name
    outputs = json.loads(json.dumps([f.name for f in files]))
    assert "cost_normalised.md" in outputs and "claims.md" in outputs


def test_log_ticks_never_crowd_one_end_of_the_axis():
    """Narrow ranges (CIFAR-100's cost_to_target: 650G..1.9T) once got 700G, 800G, 900G, 1T squeezed together at
    the left end; ticks must be spread over the range, each pair at least a fifth of its log-width apart."""
    import math

    from reports.plots import log_ticks

    for low, high in ((6.5e11, 1.9e12), (8.3e11, 1.4e12), (3e4, 3e5), (1e3, 1e7), (1.5e5, 9e5)):
        ticks = log_ticks(low, high)
        width = math.log10(high / low)
        assert 2 <= len(ticks) <= 4 and all(low <= t <= high for t in ticks), (low, high, ticks)
        assert all(math.log10(b / a) >= width / 5 for a, b in zip(ticks, ticks[1:])), (low, high, ticks)
