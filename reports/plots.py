"""Figures, drawn from the numbers in reports/analysis.py (themselves read from results folders or MLflow),
so they can be redrawn any time.

Made to be used as they are in a paper: single-panel figures are one column wide (3.5 in), multi-panel ones
two columns (7.2 in), and no text is below 8 pt at that size; aspect ratios stay below 3.5:1; PDFs embed
TrueType fonts (pdf.fonttype 42). Costs are on log axes limited to the data, drawn as dots (never bars, whose
length means nothing on a log axis); accuracies are dots with error bars on axes fitted to the data (not bars
from zero, which hide differences of a few points); every method keeps one colour, marker and line style in
every figure; a title that says "± std" draws it (bands or error bars). Data artists carry the method (or
client) as their gid, so tests can read back what was drawn."""
from __future__ import annotations

import math
import textwrap
import zlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter, NullLocator  # noqa: E402

from bench.registry import algorithms, find_algorithm  # noqa: E402
from reports.analysis import Budget, CostResult, difference_summary  # noqa: E402
from reports.results import display_name, method_sort_key  # noqa: E402

EXTRA_COLORS = ("#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", ":", "-.")
COLUMN_W, WIDE_W = 3.5, 7.2   # inches: one column, two columns of a paper
DPI = 200
FORMATS = ("png", "pdf")  # every figure is saved in each (PNG first: the Markdown index embeds it)
GREY = "#8c8c8c"

plt.rcParams.update({
    "font.size": 8, "axes.titlesize": 8.5, "axes.labelsize": 8, "xtick.labelsize": 8, "ytick.labelsize": 8,
    "legend.fontsize": 8, "figure.titlesize": 9, "axes.spines.top": False, "axes.spines.right": False,
    "pdf.fonttype": 42, "ps.fonttype": 42, "lines.markersize": 4, "errorbar.capsize": 2,
})


# ---- styles ---------------------------------------------------------------------------------------------------
def registry_index(method: str) -> int:
    """The algorithm's place among the registered ones (stable across figures); unknown: from its name."""
    base = method.split(" ", 1)[0]
    names = list(algorithms())
    cls = find_algorithm(base)
    return names.index(cls.name) if cls is not None and cls.name in names else zlib.crc32(base.encode()) % 97


def method_color(method: str) -> str:
    """Fixed colour of a method: its algorithm's `colour` (variants like 'pfedlora (rank=8)' share it);
    unknown methods get a stable colour from their name."""
    base = method.split(" ", 1)[0]
    cls = find_algorithm(base)
    if cls is not None and cls.colour:
        return cls.colour
    return EXTRA_COLORS[zlib.crc32(base.encode()) % len(EXTRA_COLORS)]


def style_of(method: str, methods: list[str]) -> dict:
    """Colour, marker and line style of a method: fixed per algorithm (so methods whose curves overlap stay
    apart in print); variants of one algorithm in one figure get further line styles."""
    base = method.split(" ", 1)[0]
    siblings = [m for m in methods if m.split(" ", 1)[0] == base]
    k, i = registry_index(method), siblings.index(method)
    style = {"color": method_color(method), "marker": MARKERS[k % len(MARKERS)],
             "linestyle": LINESTYLES[(k + i) % len(LINESTYLES)]}
    if i % 2:  # a variant: open markers as well as its own line style
        style["mfc"] = "white"
    return style


def marker_of(method: str) -> str:
    return MARKERS[registry_index(method) % len(MARKERS)]


# ---- helpers --------------------------------------------------------------------------------------------------
def wrap(text: str, width_in: float, size: float = 8.5) -> str:
    """Wrap each line of a title to the figure's width (about 0.62 em per character in DejaVu Sans)."""
    chars = max(20, int(width_in * 72 / (0.62 * size)))
    return "\n".join(textwrap.fill(line, chars, break_on_hyphens=False) for line in text.split("\n"))


def seeds_note(seeds: int, drawn: str = "band") -> str:
    return f"mean over {seeds} seeds, {drawn} = ± std across seeds" if seeds > 1 else "1 seed"


def si(value: float) -> str:
    """200G, 1.5T, 50k: a tick label (the unit is in the axis label)."""
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:g}{prefix}"
    return f"{value:g}"


def log_ticks(low: float, high: float, max_ticks: int = 4) -> list[float]:
    """At most `max_ticks` readable ticks in [low, high]: decades, or 1-2-5 steps (else every other integer
    mantissa) inside a narrow range."""
    lo, hi = math.floor(math.log10(low)), math.ceil(math.log10(high))

    def within(subs) -> list[float]:
        return [m * 10.0 ** e for e in range(lo, hi + 1) for m in subs if low <= m * 10.0 ** e <= high]

    for subs in ((1, 2, 5), (1, 3), (1,)):
        if 2 <= len(within(subs)) <= max_ticks:
            return within(subs)
    decades = within((1,))
    if len(decades) > max_ticks:
        return decades[::math.ceil(len(decades) / max_ticks)]
    steps = within(range(1, 10))
    steps = steps[::math.ceil(len(steps) / max_ticks)] if steps else []
    gap = math.log10(high / low) / (max_ticks + 1)  # closer ticks than this crowd their labels (700G800G900G1T)
    if len(steps) >= 2 and all(math.log10(b / a) >= gap for a, b in zip(steps, steps[1:])):
        return steps
    # integer mantissas crowd one end, or the range is narrower than one step: three ticks spaced evenly in
    # log, at three significant figures
    return sorted({float(f"{low ** (1 - f) * high ** f:.3g}") for f in (0.2, 0.5, 0.8)})


def log_axis(ax, which: str, values, pad: float = 1.3) -> None:
    """Log scale limited to the data (a factor `pad` either side), SI tick labels without unit, <= 4 ticks."""
    positive = [float(v) for v in values if v is not None and v == v and v > 0]
    if not positive:
        return
    low, high = min(positive) / pad, max(positive) * pad
    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    (ax.set_xlim if which == "x" else ax.set_ylim)(low, high)
    axis.set_major_locator(FixedLocator(log_ticks(low, high)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: si(v)))
    axis.set_minor_locator(NullLocator())
    axis.set_minor_formatter(NullFormatter())


def fit_limits(ax, values, which: str = "x", pad: float = 0.12, clip=(0.0, 100.0)) -> None:
    """Linear axis fitted to the data (with room for error bars), not forced to start at zero."""
    vals = [float(v) for v in values if v == v]
    if not vals:
        return
    low, high = min(vals), max(vals)
    span = max(high - low, 1.0)
    low, high = max(clip[0], low - pad * span), min(clip[1], high + pad * span)
    (ax.set_xlim if which == "x" else ax.set_ylim)(low, high)


def legend_columns(labels: list[str], width: float) -> int:
    """As many legend columns as the longest label lets fit across the figure (8 pt text, ~0.6 em a character,
    plus the handle)."""
    longest = max((len(label) for label in labels), default=1)
    entry = longest * 0.6 * 8 / 72 + 0.55
    return max(1, min(len(labels), int(width / entry)))


def legend_rows(labels: list[str], width: float) -> int:
    return math.ceil(len(labels) / legend_columns(labels, width)) if labels else 0


def legend_below(fig: Figure, ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=legend_columns(labels, fig.get_figwidth()),
                   frameon=False, bbox_to_anchor=(0.5, 0.0))


def finish(fig: Figure, legend_rows: int = 0) -> None:
    """Tight layout with room at the bottom for a legend of `legend_rows` rows."""
    bottom = (0.08 + 0.17 * legend_rows) / fig.get_figheight() if legend_rows else 0
    fig.tight_layout(rect=(0, bottom, 1, 1))


def save_figure(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.{fmt}" for fmt in FORMATS]
    for path in paths:
        fig.savefig(path, dpi=DPI)  # no bbox "tight": the size stays the designed column width
    plt.close(fig)
    return paths


def drawn_lines(fig: Figure, ax_index: int | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """gid -> (x, y) of the data lines (and dots) of a figure, or of one of its axes."""
    axes = fig.axes if ax_index is None else [fig.axes[ax_index]]
    return {line.get_gid(): (np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float))
            for ax in axes for line in ax.get_lines() if line.get_gid()}


def dot(ax, x, y, gid: str, xerr=None, yerr=None, **style):
    """A dot (with error bars) whose Line2D carries `gid`."""
    container = ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=style.pop("fmt", "o"), **style)
    container.lines[0].set_gid(gid)
    return container


# ---- accuracy curves ----------------------------------------------------------------------------------------
def accuracy_vs_round(curves: dict[str, pd.DataFrame], title: str, heading: str = "Accuracy vs round",
                      first_round: int = 0) -> Figure:
    """Mean test accuracy per round, one line per method (band = ± std across seeds). `first_round` = 1 leaves
    out the untrained models' accuracy at round 0, so that the axis fits the trained rounds (a few rounds)."""
    curves = {m: c[c["step"] >= first_round] for m, c in curves.items()}
    methods = [m for m in sorted(curves, key=method_sort_key) if not curves[m].empty]
    rows = legend_rows([display_name(m) for m in methods], COLUMN_W)
    fig, ax = plt.subplots(figsize=(COLUMN_W, 2.9 + 0.17 * rows))
    seeds = max((int(c["seeds"].max()) for c in curves.values() if len(c)), default=1)
    for m in methods:
        c, st = curves[m], style_of(m, methods)
        line, = ax.plot(c["step"], 100 * c["acc"], label=display_name(m), lw=1.4,
                        markevery=max(1, len(c) // 8), **st)
        line.set_gid(m)
        if seeds > 1 and c["acc_seed_std"].notna().any():
            ax.fill_between(c["step"], 100 * (c["acc"] - c["acc_seed_std"]), 100 * (c["acc"] + c["acc_seed_std"]),
                            color=st["color"], alpha=0.15, lw=0)
    ax.set_xlabel("communication round")
    ax.set_ylabel("mean test accuracy (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
    ax.set_title(wrap(f"{heading}\n{title} · {seeds_note(seeds)}", COLUMN_W))
    ax.grid(alpha=0.3)
    legend_below(fig, ax)
    finish(fig, rows)
    return fig


def draw_cost_curves(ax, curves: dict[str, pd.DataFrame], cost: str, budget: Budget | None = None,
                     gid_suffix: str = "") -> None:
    """Accuracy against cumulative training FLOPs ('flops') or bytes up + down ('bytes') on `ax`, log x limited
    to the data, band = ± std across seeds; a method that spends none of it is a dashed level at its final
    accuracy; the matched budget (if any) a dotted vertical line."""
    column, what = {"flops": ("cum_train_flops", "client training FLOPs"),
                    "bytes": ("cum_bytes", "bytes up + down")}[cost]
    unit = "FLOPs" if cost == "flops" else "bytes"
    methods = sorted(curves, key=method_sort_key)
    values = []
    for m in methods:
        c = curves[m]
        c = c[c["step"] > 0]
        if c.empty:
            continue
        st = style_of(m, methods)
        if (c[column] <= 0).all():
            line = ax.axhline(100 * c["acc"].iloc[-1], lw=1.1, label=f"{display_name(m)} (no {unit})",
                              color=st["color"], linestyle=(0, (5, 3)), alpha=0.9)
            line.set_gid(f"{m}:level{gid_suffix}")
            continue
        c = c[c[column] > 0]
        values += list(c[column])
        line, = ax.plot(c[column], 100 * c["acc"], label=display_name(m), lw=1.4,
                        markevery=max(1, len(c) // 8), **st)
        line.set_gid(m + gid_suffix)
        if c["acc_seed_std"].notna().any():
            ax.fill_between(c[column], 100 * (c["acc"] - c["acc_seed_std"]), 100 * (c["acc"] + c["acc_seed_std"]),
                            color=st["color"], alpha=0.15, lw=0)
    log_axis(ax, "x", values + ([budget.budget] if budget is not None and budget.budget else []))
    if budget is not None and budget.budget:
        ax.axvline(budget.budget, color=GREY, lw=1, linestyle=":")
        ax.text(budget.budget, 0.98, "matched budget", transform=ax.get_xaxis_transform(), fontsize=8,
                color="#555555", va="top", ha="right", rotation=90)
    ax.set_xlabel(f"cumulative {what} (log scale)")
    ax.set_ylabel("mean test accuracy (%)")
    ax.grid(alpha=0.3, which="major")


def accuracy_vs_cost(curves: dict[str, pd.DataFrame], title: str, cost: str) -> Figure:
    """One panel: accuracy against cumulative FLOPs or bytes (see draw_cost_curves)."""
    methods = [m for m in curves if not curves[m].empty]
    rows = legend_rows([display_name(m) + " (no bytes)" for m in methods], COLUMN_W)
    fig, ax = plt.subplots(figsize=(COLUMN_W, 2.9 + 0.17 * rows))
    draw_cost_curves(ax, curves, cost)
    seeds = max((int(c["seeds"].max()) for c in curves.values() if len(c)), default=1)
    name = "computation" if cost == "flops" else "communication"
    ax.set_title(wrap(f"Accuracy vs cumulative {name}\n{title} · {seeds_note(seeds)}", COLUMN_W))
    legend_below(fig, ax)
    finish(fig, rows)
    return fig


def accuracy_vs_costs(curves: dict[str, pd.DataFrame], title: str,
                      budgets: dict[str, Budget] | None = None) -> Figure:
    """Two panels: accuracy against cumulative FLOPs and against cumulative bytes, one curve per method, log x,
    with the matched budgets of the cost-normalised table."""
    methods = [m for m in curves if not curves[m].empty]
    rows = legend_rows([display_name(m) for m in methods] + ["Standalone (no bytes)"], WIDE_W)
    fig, axes = plt.subplots(1, 2, figsize=(WIDE_W, 3.0 + 0.17 * rows), sharey=True)
    for ax, cost in zip(axes, ("flops", "bytes")):
        draw_cost_curves(ax, curves, cost, (budgets or {}).get(cost), gid_suffix=f"@{cost}")
    axes[1].set_ylabel("")
    axes[1].tick_params(labelleft=True)
    seeds = max((int(c["seeds"].max()) for c in curves.values() if len(c)), default=1)
    fig.suptitle(wrap(f"Accuracy vs cumulative computation and communication\n{title} · {seeds_note(seeds)}",
                      WIDE_W, 9))
    handles = {h.get_label(): h for ax in axes for h in ax.get_legend_handles_labels()[0]}
    fig.legend(list(handles.values()), list(handles), loc="lower center", frameon=False,
               ncol=legend_columns(list(handles), WIDE_W))
    finish(fig, legend_rows(list(handles), WIDE_W))
    return fig


# ---- accuracy per method ----------------------------------------------------------------------------------------
def final_accuracy_dots(acc: pd.DataFrame, title: str, paired: pd.DataFrame | None = None,
                        seed_diffs: dict[str, list[float]] | None = None) -> Figure:
    """Left: final accuracy per method, mean ± std across seeds (unpaired). Right (when a best baseline exists):
    each method's final accuracy minus the best baseline's, paired by seed: mean ± std across seeds, the seeds
    themselves as open circles, and the seeds won."""
    acc = acc.assign(order=[method_sort_key(m) for m in acc["method"]]).sort_values("order")
    methods = list(acc["method"])
    two = paired is not None and len(paired) > 0
    width = WIDE_W if two else COLUMN_W
    fig, axes = plt.subplots(1, 2 if two else 1, figsize=(width, 1.5 + 0.3 * len(methods)), sharey=True,
                             squeeze=False)
    ax = axes[0][0]
    y = np.arange(len(methods))[::-1]
    means, stds = 100 * acc["final_acc_mean"].to_numpy(), 100 * acc["final_acc_seed_std"].to_numpy()
    for yi, m, mean, std in zip(y, methods, means, stds):
        dot(ax, [mean], [yi], m, xerr=None if std != std else [std], color=method_color(m),
            fmt=marker_of(m), ms=5)
    ax.set_yticks(y, [display_name(m) for m in methods])
    fit_limits(ax, list(means - np.nan_to_num(stds)) + list(means + np.nan_to_num(stds)), "x")
    ax.set_xlabel("final mean test accuracy (%)")
    ax.grid(alpha=0.3, axis="x")
    seeds = int(acc["seeds"].max()) if len(acc) else 1
    ax.set_title("Final accuracy (unpaired)" if two else "Final accuracy")
    if two:
        paired_panel(axes[0][1], paired, dict(zip(methods, y)), seed_diffs or {})
    what = ("mean ± std across seeds" + ("; right: the differences paired by seed, open circles the single seeds"
                                         if two else "") if seeds > 1 else "1 seed")
    fig.suptitle(wrap(f"Final accuracy per method\n{title} · {what}", width, 9))
    fig.tight_layout()
    return fig


def paired_panel(ax, paired: pd.DataFrame, ypos: dict[str, float], seed_diffs: dict[str, list[float]]) -> None:
    base = paired["reference"].iloc[0]
    if base in ypos:
        ax.text(0, ypos[base], " reference", va="center", ha="left", fontsize=8, color="#555555")
    values = []
    for _, row in paired.iterrows():
        m, yi = row["method"], ypos[row["method"]]
        spread = row["diff_seed_std"]
        dot(ax, [row["diff_points"]], [yi], m, xerr=None if spread != spread else [spread], color=method_color(m),
            fmt=marker_of(m), ms=5)
        per_seed = seed_diffs.get(m, [])
        if len(per_seed) > 1:
            ax.plot(per_seed, [yi] * len(per_seed), linestyle="none", marker="o", mfc="none", ms=3.5,
                    color=method_color(m), alpha=0.7)
        values += [row["diff_points"] + (spread if spread == spread else 0),
                   row["diff_points"] - (spread if spread == spread else 0), *per_seed]
        ax.text(1.01, yi, f"won {int(row['wins'])}/{int(row['paired_seeds'])}", transform=ax.get_yaxis_transform(),
                va="center", fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    vals = [v for v in values if v == v] + [0.0]
    span = max(max(vals) - min(vals), 0.5)
    ax.set_xlim(min(vals) - 0.12 * span, max(vals) + 0.12 * span)
    ax.set_xlabel(f"final accuracy − {display_name(base)} (points)")
    ax.grid(alpha=0.3, axis="x")
    ax.set_title(wrap(f"Paired vs the best baseline ({display_name(base)})", WIDE_W / 2 - 0.8))


def client_difference_dots(diff: pd.DataFrame, ours: str, base: str, title: str) -> Figure:
    """Per-client accuracy difference (points), sorted: in pFedLoRA's colour where it wins, the baseline's where
    it loses, grey crosses where they tie (exactly equal accuracy). One seed: lollipops from zero; several:
    dots with error bars (± std across seeds). The legend counts wins, ties and losses and gives the mean over
    clients, unweighted and weighted by test samples."""
    from matplotlib.lines import Line2D

    d = diff.sort_values("diff_points", ascending=False).reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(WIDE_W, 3.4))
    s = difference_summary(d)
    seeds = int(d["seeds"].max()) if len(d) else 1
    for xi, row in d.iterrows():
        v, err = row["diff_points"], row["diff_seed_std"]
        colour = method_color(ours) if v > 0 else method_color(base) if v < 0 else GREY
        if seeds == 1:
            ax.vlines(xi, 0, v, color=colour, lw=1.2)
        dot(ax, [xi], [v], f"client{int(row['client'])}", yerr=None if err != err else [err], color=colour,
            fmt="x" if v == 0 else "o", ms=4)
    ax.axhline(0, color="black", lw=0.8)
    if len(d):
        ax.axhline(s["mean"], color="black", lw=1, linestyle="--")
    if len(d) <= 30:
        ax.set_xticks(np.arange(len(d)), [f"{int(c)}\n{a}" for c, a in zip(d["client"], d["arch"])])
        ax.set_xlabel("client (id, model), sorted by difference")
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"{len(d)} clients, sorted by difference")
    ax.set_ylabel("accuracy difference (points)")
    weighted = "" if s["weighted_mean"] != s["weighted_mean"] else f", weighted by test samples {s['weighted_mean']:+.2f}"
    handles = [Line2D([], [], color=method_color(ours), marker="o", lw=0, label=f"{display_name(ours)} better "
                      f"({s['better']})"),
               Line2D([], [], color=method_color(base), marker="o", lw=0, label=f"{display_name(base)} better "
                      f"({s['worse']})"),
               Line2D([], [], color=GREY, marker="x", lw=0, label=f"tie ({s['tied']})"),
               Line2D([], [], color="black", linestyle="--", label=f"mean over clients {s['mean']:+.2f} "
                      f"(unweighted{weighted})")]
    fig.legend(handles=handles, loc="lower center", frameon=False, ncol=2)
    ax.set_title(wrap(f"Per-client final accuracy: {display_name(ours)} − {display_name(base)} (best baseline), "
                      f"{s['clients']} clients\n{title} · " + (f"mean over {seeds} seeds paired by seed, error bars "
                      "= ± std across seeds" if seeds > 1 else "1 seed"), WIDE_W))
    ax.grid(alpha=0.3, axis="y")
    finish(fig, 2)
    return fig


def cost_dots(cost: CostResult, title: str) -> Figure:
    """Three panels: rounds, computation (log) and communication (log) to reach the target, one dot per method
    (a lollipop on the linear rounds axis), log axes limited to the data; methods that never reached the target
    are marked so. The ratios to pFedLoRA are in the table beside it."""
    t = cost.table.assign(order=[method_sort_key(m) for m in cost.table["method"]]).sort_values("order")
    methods = list(t["method"])
    fig, axes = plt.subplots(1, 3, figsize=(WIDE_W, max(2.4, 1.3 + 0.3 * len(methods))), sharey=True)
    y = np.arange(len(methods))[::-1]
    panels = [("rounds_to_target", "rounds to target", False), ("train_flops_to_target",
              "client training FLOPs to target (log)", True), ("bytes_to_target", "bytes up + down to target (log)", True)]
    for ax, (col, label, log) in zip(axes, panels):
        values = [float(v) if v is not None and v == v else math.nan for v in t[col]]
        for yi, m, v in zip(y, methods, values):
            if v != v or (log and v <= 0):
                ax.text(0.02, yi, "not reached" if v != v else "0 (none)", transform=ax.get_yaxis_transform(),
                        va="center", fontsize=8, color="#555555")
                continue
            if not log:
                ax.hlines(yi, 0, v, color=method_color(m), lw=1.2)
            dot(ax, [v], [yi], m, color=method_color(m), fmt=marker_of(m), ms=5)
        drawn = [v for v in values if v == v and v > 0]
        if log:
            log_axis(ax, "x", drawn, pad=1.6)
        elif drawn:
            ax.set_xlim(0, max(drawn) * 1.15)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=5))
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(y, [display_name(m) for m in methods])
    axes[0].set_ylim(-0.6, len(methods) - 0.4)
    target = "—" if cost.target is None else f"{100 * cost.target:.2f}%"
    fig.suptitle(wrap(f"Cost to reach {target} mean test accuracy ({cost.target_note})\n{title}", WIDE_W, 9))
    fig.tight_layout()
    return fig


# ---- sweeps and ablation (paper recipes) ------------------------------------------------------------------------
def sweep_lines(df: pd.DataFrame, x: str, xlabel: str, title: str, log2: bool = False,
                ylabel: str = "final mean test accuracy (%)", value: str = "final_acc") -> Figure:
    """Final accuracy (mean ± std across seeds) against a swept setting, one line per method."""
    methods = sorted(dict.fromkeys(df["method"]), key=method_sort_key)
    rows = legend_rows([display_name(m) for m in methods], COLUMN_W)
    fig, ax = plt.subplots(figsize=(COLUMN_W, 2.9 + 0.17 * rows))
    for m in methods:
        sub = df[df["method"] == m].sort_values(x)
        st = style_of(m, methods)
        std = sub[f"{value}_seed_std"].fillna(0).to_numpy()
        line = ax.errorbar(sub[x], 100 * sub[f"{value}_mean"], yerr=100 * std if std.any() else None,
                           label=display_name(m), lw=1.4, **st)
        line.lines[0].set_gid(m)
    sweep_x_axis(ax, df[x], xlabel, log2)
    ax.set_ylabel(ylabel)
    seeds = int(df["seeds"].max()) if len(df) else 1
    ax.set_title(wrap(f"{title} · {seeds_note(seeds, 'error bars')}", COLUMN_W))
    ax.grid(alpha=0.3)
    legend_below(fig, ax)
    finish(fig, rows)
    return fig


def sweep_x_axis(ax, x_values: pd.Series, xlabel: str, log2: bool) -> None:
    """The swept setting on x: a tick at every value (log base 2 for ranks and the like)."""
    if log2:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_minor_locator(NullLocator())
    values = sorted(dict.fromkeys(x_values))
    ax.set_xticks(values, [f"{v:g}" for v in values])
    ax.set_xlabel(xlabel)


def cost_per_round_lines(df: pd.DataFrame, x: str, xlabel: str, title: str, log2: bool = False) -> Figure:
    """Communication and computation per round against a swept setting (e.g. the adapter rank)."""
    fig, axes = plt.subplots(1, 2, figsize=(WIDE_W, 2.9))
    methods = sorted(dict.fromkeys(df["method"]), key=method_sort_key)
    for ax, col, label in ((axes[0], "bytes_per_round", "bytes up + down per round (log)"),
                           (axes[1], "train_flops_per_round", "client training FLOPs per round (log)")):
        for m in methods:
            sub = df[df["method"] == m].sort_values(x)
            line, = ax.plot(sub[x], sub[col], label=display_name(m), **style_of(m, methods))
            line.set_gid(f"{m}:{col}")
        log_axis(ax, "y", df[col])
        sweep_x_axis(ax, df[x], xlabel, log2)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(frameon=False)
    fig.suptitle(wrap(title, WIDE_W, 9))
    fig.tight_layout()
    return fig


def grouped_accuracy_dots(acc: pd.DataFrame, title: str) -> Figure:
    """T1 as a figure: settings on the x-axis, one dot per method (mean ± std across seeds), y fitted to the
    data."""
    groups = list(dict.fromkeys(acc["group"]))
    methods = sorted(dict.fromkeys(acc["method"]), key=method_sort_key)
    rows = legend_rows([display_name(m) for m in methods], WIDE_W)
    fig, ax = plt.subplots(figsize=(WIDE_W, 3.1 + 0.17 * rows))
    width = 0.7 / max(len(methods), 1)
    values = []
    for i, m in enumerate(methods):
        sub = acc[acc["method"] == m].set_index("group")
        here = [g for g in groups if g in sub.index]
        xs = [groups.index(g) + (i - (len(methods) - 1) / 2) * width for g in here]
        ys = [100 * sub.loc[g, "final_acc_mean"] for g in here]
        err = [100 * (0 if math.isnan(sub.loc[g, "final_acc_seed_std"]) else sub.loc[g, "final_acc_seed_std"])
               for g in here]
        dot(ax, xs, ys, m, yerr=err if any(err) else None, color=method_color(m), fmt=marker_of(m), ms=5,
            label=display_name(m))
        values += [a + b for a, b in zip(ys, err)] + [a - b for a, b in zip(ys, err)]
    ax.set_xticks(range(len(groups)), [wrap(g.replace(" · ", "\n"), WIDE_W / max(len(groups), 1), 8)
                                       for g in groups])
    for j in range(len(groups) - 1):
        ax.axvline(j + 0.5, color="#dddddd", lw=0.8)
    fit_limits(ax, values, "y")
    ax.set_ylabel("final mean test accuracy (%)")
    seeds = int(acc["seeds"].max()) if len(acc) else 1
    ax.set_title(wrap(f"{title} · {seeds_note(seeds, 'error bars')}", WIDE_W))
    ax.grid(alpha=0.3, axis="y")
    legend_below(fig, ax)
    finish(fig, rows)
    return fig


__all__ = ["accuracy_vs_cost", "accuracy_vs_costs", "accuracy_vs_round", "client_difference_dots", "cost_dots",
           "cost_per_round_lines", "drawn_lines", "final_accuracy_dots", "grouped_accuracy_dots", "method_color",
           "save_figure", "sweep_lines"]
