"""Figures, drawn from the numbers in reports/analysis.py (themselves read from results folders or MLflow),
so they can be redrawn any time. Every figure: labelled axes with units, log scales for costs, one fixed
colour per method across all figures, and a title that names the setting. Data artists carry the method as
their gid, so tests can read back what was drawn."""
from __future__ import annotations

import math
import zlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import EngFormatter, FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from reports.analysis import CostResult  # noqa: E402
from bench.registry import find_algorithm  # noqa: E402
from reports.results import display_name, method_sort_key  # noqa: E402

# One colour per method, the same in every figure: the algorithm's own `colour` (pFedLoRA red); others get a
# stable colour from their name.
EXTRA_COLORS = ("#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")
LINESTYLES = ("-", "--", ":", "-.")
DPI = 150
FORMATS = ("png", "pdf")  # every figure is saved in each (PNG first: the Markdown index embeds it)

plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
                     "axes.spines.top": False, "axes.spines.right": False})


def method_color(method: str) -> str:
    """Fixed colour of a method (variants like 'pfedlora (rank=8)' share their algorithm's colour unless
    `variant_colors` is used); unknown methods get a stable colour from their name."""
    base = method.split(" ", 1)[0]
    cls = find_algorithm(base)
    if cls is not None and cls.colour:
        return cls.colour
    return EXTRA_COLORS[zlib.crc32(base.encode()) % len(EXTRA_COLORS)]


def style_of(method: str, methods: list[str]) -> dict:
    """Colour of the algorithm; variants of one algorithm in one figure get different line styles."""
    base = method.split(" ", 1)[0]
    siblings = [m for m in methods if m.split(" ", 1)[0] == base]
    return {"color": method_color(method), "linestyle": LINESTYLES[siblings.index(method) % len(LINESTYLES)]}


def seeds_note(seeds: int) -> str:
    return f"mean ± std over {seeds} seeds" if seeds > 1 else "1 seed"


def percent_axis(ax, axis: str = "y") -> None:
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(fmt)


def log_axis(ax, which: str, unit: str, values) -> None:
    """Log scale with SI-prefixed tick labels (1 MB, 10 MB; 1 TFLOP): ticks at every decade, or at 1-2-5
    steps when the data span less than a decade or two (so there are always labelled ticks)."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    positive = [float(v) for v in values if v is not None and v == v and v > 0]
    span = math.log10(max(positive) / min(positive)) if positive else 3
    axis.set_major_locator(LogLocator(base=10, subs=(1.0,) if span >= 2 else (1.0, 2.0, 5.0), numticks=12))
    axis.set_major_formatter(EngFormatter(unit=unit))
    axis.set_minor_formatter(NullFormatter())


def finish(fig: Figure, ax, legend: bool = True) -> None:
    ax.grid(alpha=0.3, which="major")
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()


def save_figure(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.{fmt}" for fmt in FORMATS]
    for path in paths:
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return paths


def drawn_lines(fig: Figure) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """method -> (x, y) of the data lines of a figure (what tests compare with the CSV)."""
    return {line.get_gid(): (np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float))
            for ax in fig.axes for line in ax.get_lines() if line.get_gid()}


def drawn_bars(fig: Figure, ax_index: int = 0) -> dict[str, float]:
    """method (or client) -> bar length of one axes."""
    ax = fig.axes[ax_index]
    out = {}
    for patch in ax.patches:
        gid = patch.get_gid()
        if gid:
            out[gid] = patch.get_width() if getattr(patch, "_horizontal", False) else patch.get_height()
    return out


def hbars(ax, labels: list[str], values: list[float], colors: list[str], gids: list[str], xerr=None):
    y = np.arange(len(labels))[::-1]
    bars = ax.barh(y, values, xerr=xerr, color=colors, alpha=0.9, capsize=3, height=0.65)
    for patch, gid in zip(bars.patches, gids):
        patch.set_gid(gid)
        patch._horizontal = True
    ax.set_yticks(y, labels)
    return y


# ---- accuracy curves ----------------------------------------------------------------------------------------
def accuracy_vs_round(curves: dict[str, pd.DataFrame], title: str, heading: str = "Accuracy vs round") -> Figure:
    fig, ax = plt.subplots(figsize=(8, 4.6))
    methods = sorted(curves, key=method_sort_key)
    seeds = max((int(c["seeds"].max()) for c in curves.values() if len(c)), default=1)
    for m in methods:
        c = curves[m]
        if c.empty:
            continue
        st = style_of(m, methods)
        line, = ax.plot(c["step"], 100 * c["acc"], label=display_name(m), lw=1.8, **st)
        line.set_gid(m)
        if seeds > 1 and c["acc_std"].notna().any():
            ax.fill_between(c["step"], 100 * (c["acc"] - c["acc_std"]), 100 * (c["acc"] + c["acc_std"]),
                            color=st["color"], alpha=0.15, lw=0)
    ax.set_xlabel("communication round")
    ax.set_ylabel("mean test accuracy (%)")
    ax.set_title(f"{heading}\n{title} · {seeds_note(seeds)}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    finish(fig, ax)
    return fig


def accuracy_vs_cost(curves: dict[str, pd.DataFrame], title: str, cost: str) -> Figure:
    """Accuracy against cumulative training FLOPs ('flops') or bytes up + down ('bytes'), log x-axis.
    Methods with zero cost (Standalone's communication) are drawn as a dashed level of their final accuracy."""
    column, unit, what = {"flops": ("cum_train_flops", "FLOP", "client training computation"),
                          "bytes": ("cum_bytes", "B", "communication, upload + download")}[cost]
    fig, ax = plt.subplots(figsize=(8, 4.6))
    methods = sorted(curves, key=method_sort_key)
    seeds = max((int(c["seeds"].max()) for c in curves.values() if len(c)), default=1)
    for m in methods:
        c = curves[m]
        c = c[c["step"] > 0]
        if c.empty:
            continue
        st = style_of(m, methods)
        if (c[column] <= 0).all():
            line = ax.axhline(100 * c["acc"].iloc[-1], lw=1.2, label=f"{display_name(m)} (none; final accuracy)",
                              color=st["color"], linestyle="--", alpha=0.8)
            line.set_gid(f"{m}:level")
            continue
        c = c[c[column] > 0]
        line, = ax.plot(c[column], 100 * c["acc"], label=display_name(m), lw=1.8, marker="o", ms=2.5, **st)
        line.set_gid(m)
    log_axis(ax, "x", unit, [v for c in curves.values() for v in c[column] if v > 0])
    ax.set_xlabel(f"cumulative {what} ({unit}, log scale)")
    ax.set_ylabel("mean test accuracy (%)")
    name = "computation" if cost == "flops" else "communication"
    ax.set_title(f"Accuracy vs cumulative {name}\n{title} · {seeds_note(seeds)}")
    finish(fig, ax)
    return fig


# ---- bars -----------------------------------------------------------------------------------------------------
def final_accuracy_bars(acc: pd.DataFrame, title: str) -> Figure:
    """Final accuracy per method (one setting): mean +- std over seeds."""
    acc = acc.copy()
    acc["order"] = [method_sort_key(m) for m in acc["method"]]
    acc = acc.sort_values("order")
    methods = list(acc["method"])
    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.42 * len(methods) + 1.2))
    means = 100 * acc["final_acc_mean"].to_numpy()
    stds = 100 * acc["final_acc_std"].fillna(0).to_numpy()
    y = hbars(ax, [display_name(m) for m in methods], list(means), [method_color(m) for m in methods], methods,
              xerr=stds if stds.any() else None)
    for yi, mean, std in zip(y, means, stds):
        ax.text(mean + std + 0.8, yi, f"{mean:.2f}" + (f" ± {std:.2f}" if std else ""), va="center", fontsize=9)
    ax.set_xlim(0, min(100, max(means + stds) * 1.18 + 5) if len(means) else 100)
    ax.set_xlabel("final mean test accuracy (%)")
    seeds = int(acc["seeds"].max()) if len(acc) else 1
    ax.set_title(f"Final accuracy per method\n{title} · {seeds_note(seeds)}")
    finish(fig, ax, legend=False)
    return fig


def client_difference_bars(diff: pd.DataFrame, ours: str, base: str, title: str) -> Figure:
    """Per-client accuracy difference (points), sorted; bars in pFedLoRA's colour where it wins, in the
    baseline's colour where the baseline wins."""
    d = diff.sort_values("diff_points", ascending=False).reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(max(6.5, min(14, 0.35 * len(d) + 3)), 4.4))
    colors = [method_color(ours) if v > 0 else method_color(base) for v in d["diff_points"]]
    bars = ax.bar(np.arange(len(d)), d["diff_points"], color=colors, alpha=0.9, width=0.75)
    for patch, client in zip(bars.patches, d["client"]):
        patch.set_gid(f"client{int(client)}")
    ax.axhline(0, color="black", lw=0.8)
    mean = float(d["diff_points"].mean()) if len(d) else math.nan
    ax.axhline(mean, color="black", lw=1.2, linestyle="--", label=f"mean over clients: {mean:+.2f} points")
    if len(d) <= 40:
        ax.set_xticks(np.arange(len(d)), [f"{int(c)}\n{a}" for c, a in zip(d["client"], d["arch"])], fontsize=7)
        ax.set_xlabel("client (id, model), sorted by difference")
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"{len(d)} clients, sorted by difference")
    ax.set_ylabel("accuracy difference (percentage points)")
    better = int((d["diff_points"] > 0).sum())
    seeds = int(d["seeds"].max()) if len(d) else 1
    ax.set_title(f"Per-client accuracy: {display_name(ours)} − {display_name(base)} (best baseline)\n"
                 f"{title} · {display_name(ours)} better on {better} of {len(d)} clients"
                 + (f" · mean over {seeds} seeds, paired by seed" if seeds > 1 else " · 1 seed"))
    from matplotlib.patches import Patch

    handles = [Patch(color=method_color(ours), label=f"{display_name(ours)} better"),
               Patch(color=method_color(base), label=f"{display_name(base)} better"), *ax.get_lines()[1:]]
    ax.legend(handles=handles, loc="upper right", frameon=False)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def cost_bars(cost: CostResult, title: str) -> Figure:
    """Three panels: rounds, computation (log) and communication (log) to reach the target, per method,
    labelled with the value and the ratio to pFedLoRA."""
    from reports.tables import eng

    t = cost.table.copy()
    t["order"] = [method_sort_key(m) for m in t["method"]]
    t = t.sort_values("order")
    methods = list(t["method"])
    fig, axes = plt.subplots(1, 3, figsize=(14, 1.6 + 0.45 * len(methods)), sharey=True)
    panels = [("rounds_to_target", "rounds_ratio", "rounds to target", None),
              ("train_flops_to_target", "flops_ratio", "client training FLOPs to target (log)", "FLOP"),
              ("bytes_to_target", "bytes_ratio", "bytes up + down to target (log)", "B")]
    for ax, (col, ratio_col, label, unit) in zip(axes, panels):
        values = [v if v is not None and not (isinstance(v, float) and math.isnan(v)) else math.nan for v in t[col]]
        drawable = [v if (v == v and v > 0) else 0 for v in values]
        y = hbars(ax, [display_name(m) for m in methods], drawable, [method_color(m) for m in methods], methods)
        positive = [v for v in drawable if v > 0]
        if unit is not None and positive:
            low, high = min(positive), max(positive)
            log_axis(ax, "x", unit, [low / 3, high * 30])
            ax.set_xlim(low / 3, high * 30)
        elif positive:
            ax.set_xlim(0, max(positive) * 1.45)
        for yi, v, r, m in zip(y, values, t.get(ratio_col, [None] * len(t)), methods):
            if m == cost.proposed:
                r = None
            edge = ax.get_xlim()[0] * 1.1 if unit else ax.get_xlim()[1] * 0.01
            if v != v:
                text, x = "not reached", edge
            elif v == 0:
                text, x = "0 (no communication)", edge
            else:
                text = (eng(v, unit) if unit else f"{int(v)}") + (f"  ({r:.2f}×)" if r is not None and r == r else "")
                x = v * 1.15 if unit else v + max(positive) * 0.02
            ax.text(x, yi, text, va="center", fontsize=8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, axis="x")
    target = "—" if cost.target is None else f"{100 * cost.target:.2f}%"
    note = "" if cost.proposed is None else "  ·  (k×) = method's cost / pFedLoRA's"
    fig.suptitle(f"Cost to reach {target} mean test accuracy — {cost.target_note}\n{title}{note}", fontsize=11)
    fig.tight_layout()
    return fig


# ---- sweeps and ablation (paper recipes) ------------------------------------------------------------------------
def sweep_lines(df: pd.DataFrame, x: str, xlabel: str, title: str, log2: bool = False,
                ylabel: str = "final mean test accuracy (%)", value: str = "final_acc") -> Figure:
    """Final accuracy (mean +- std over seeds) against a swept setting, one line per method."""
    fig, ax = plt.subplots(figsize=(8, 4.6))
    methods = sorted(dict.fromkeys(df["method"]), key=method_sort_key)
    for m in methods:
        sub = df[df["method"] == m].sort_values(x)
        st = style_of(m, methods)
        std = sub[f"{value}_std"].fillna(0).to_numpy()
        line = ax.errorbar(sub[x], 100 * sub[f"{value}_mean"], yerr=100 * std if std.any() else None,
                           label=display_name(m), marker="o", capsize=3, lw=1.8, **st)
        line.lines[0].set_gid(m)
    sweep_x_axis(ax, df[x], xlabel, log2)
    ax.set_ylabel(ylabel)
    seeds = int(df["seeds"].max()) if len(df) else 1
    ax.set_title(f"{title} · {seeds_note(seeds)}")
    finish(fig, ax)
    return fig


def sweep_x_axis(ax, x_values: pd.Series, xlabel: str, log2: bool) -> None:
    """The swept setting on x: a tick at every value (log base 2 for ranks and the like)."""
    if log2:
        ax.set_xscale("log", base=2)
    values = sorted(dict.fromkeys(x_values))
    ax.set_xticks(values, [f"{v:g}" for v in values])
    ax.set_xlabel(xlabel)


def cost_per_round_lines(df: pd.DataFrame, x: str, xlabel: str, title: str, log2: bool = False) -> Figure:
    """Communication and computation per round against a swept setting (e.g. the adapter rank)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = sorted(dict.fromkeys(df["method"]), key=method_sort_key)
    for ax, col, unit, label in ((axes[0], "bytes_per_round", "B", "bytes up + down per round (log)"),
                                 (axes[1], "train_flops_per_round", "FLOP", "client training FLOPs per round (log)")):
        for m in methods:
            sub = df[df["method"] == m].sort_values(x)
            line, = ax.plot(sub[x], sub[col], marker="o", label=display_name(m), **style_of(m, methods))
            line.set_gid(f"{m}:{col}")
        log_axis(ax, "y", unit, df[col])
        sweep_x_axis(ax, df[x], xlabel, log2)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


__all__ = ["accuracy_vs_cost", "accuracy_vs_round", "client_difference_bars",
           "cost_bars", "cost_per_round_lines", "drawn_bars", "drawn_lines", "final_accuracy_bars",
           "method_color", "save_figure", "sweep_lines"]
