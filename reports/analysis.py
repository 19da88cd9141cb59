"""The numbers behind every table and figure, computed from per-round metrics (never from plots).

Conventions (documented in reports/README.md):
- accuracy is the sample-weighted mean personalised test accuracy of a round (`acc_mean`), as a fraction;
- "final" = the last evaluated round, "best" = the maximum over rounds, "val-selected" = the test accuracy
  at the first round of best mean validation accuracy (SPEC section 3);
- mean +- std over seeds uses the sample standard deviation (ddof=1); one seed gives no std;
- computation = cumulative client training FLOPs (`cum_train_flops`); communication = cumulative bytes
  uploaded + downloaded (`cum_bytes_up + cum_bytes_down`);
- curves over seeds are averaged at the rounds every seed evaluated;
- "the best baseline" is the non-pFedLoRA method with the highest mean final accuracy, chosen among the
  six MHPFL baselines when any is present, else among the reference points (Standalone, FedAvg).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from reports.results import Group, Run, role_of


def evaluated(df: pd.DataFrame) -> pd.DataFrame:
    """Rounds after training with an accuracy (step 0 is the untrained model)."""
    return df[(df["step"] > 0) & df["acc_mean"].notna()] if "acc_mean" in df else df.iloc[:0]


def run_accuracies(run: Run) -> dict[str, float]:
    ev = evaluated(run.metrics)
    if ev.empty:
        return {"final_acc": math.nan, "best_acc": math.nan, "val_selected_acc": math.nan}
    out = {"final_acc": float(ev["acc_mean"].iloc[-1]), "best_acc": float(ev["acc_mean"].max())}
    if "val_acc_mean" in ev and ev["val_acc_mean"].notna().any():
        out["val_selected_acc"] = float(ev.loc[ev["val_acc_mean"].idxmax(), "acc_mean"])
    else:
        out["val_selected_acc"] = math.nan
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else math.nan


def cost_columns(df: pd.DataFrame) -> pd.DataFrame:
    """step, acc, cumulative training FLOPs and bytes (up + down) of one run."""
    out = pd.DataFrame({"step": df["step"].astype(int)})
    out["acc"] = df["acc_mean"] if "acc_mean" in df else math.nan
    out["cum_train_flops"] = df.get("cum_train_flops", 0)
    out["cum_bytes"] = df.get("cum_bytes_up", 0) + df.get("cum_bytes_down", 0)
    return out


# ---- curves -------------------------------------------------------------------------------------------------
def mean_curve(runs: list[Run]) -> pd.DataFrame:
    """Accuracy and cumulative costs per round, mean (and std of accuracy) over seeds, at the rounds that
    every seed evaluated. Columns: step, acc, acc_std, cum_train_flops, cum_bytes, seeds."""
    frames = [cost_columns(r.metrics).dropna(subset=["acc"]).set_index("step") for r in runs]
    steps = sorted(set.intersection(*(set(f.index) for f in frames))) if frames else []
    stacked = {col: np.stack([f.loc[steps, col].to_numpy(dtype=float) for f in frames])
               for col in ("acc", "cum_train_flops", "cum_bytes")} if steps else {}
    out = pd.DataFrame({"step": steps})
    if not steps:
        return out.assign(acc=[], acc_std=[], cum_train_flops=[], cum_bytes=[], seeds=[])
    out["acc"] = stacked["acc"].mean(0)
    out["acc_std"] = stacked["acc"].std(0, ddof=1) if len(frames) > 1 else math.nan
    out["cum_train_flops"] = stacked["cum_train_flops"].mean(0)
    out["cum_bytes"] = stacked["cum_bytes"].mean(0)
    out["seeds"] = len(frames)
    return out


def curves(group: Group) -> dict[str, pd.DataFrame]:
    if "curves" not in group.cache:
        group.cache["curves"] = {m: mean_curve(group.runs[m]) for m in group.methods}
    return group.cache["curves"]


def curves_long(group: Group) -> pd.DataFrame:
    """The data drawn by the accuracy figures, one row per (method, round)."""
    rows = [c.assign(method=m) for m, c in curves(group).items()]
    cols = ["method", "step", "acc", "acc_std", "cum_train_flops", "cum_bytes", "seeds"]
    return pd.concat(rows, ignore_index=True)[cols] if rows else pd.DataFrame(columns=cols)


# ---- accuracy -----------------------------------------------------------------------------------------------
def accuracy_table(groups: list[Group]) -> pd.DataFrame:
    """One row per (group, method): final / best / validation-selected accuracy, mean and std over seeds."""
    rows = []
    for group in groups:
        for method in group.methods:
            runs = group.runs[method]
            per_seed = [run_accuracies(r) for r in runs]
            row: dict[str, Any] = {"group": group.label, "method": method, "seeds": len(runs),
                                   "seed_list": " ".join(str(r.seed) for r in runs)}
            for metric in ("final_acc", "best_acc", "val_selected_acc"):
                row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std([a[metric] for a in per_seed])
            rows.append(row)
    return pd.DataFrame(rows)


def best_baseline(group: Group) -> str | None:
    """The non-pFedLoRA method with the highest mean final accuracy (MHPFL baselines first, see module doc)."""
    others = [m for m in group.methods if role_of(m) != "proposed"]
    main = [m for m in others if role_of(m) != "reference"] or others
    if not main:
        return None
    finals = {m: mean_std([run_accuracies(r)["final_acc"] for r in group.runs[m]])[0] for m in main}
    return max(main, key=lambda m: finals[m])


def proposed_method(group: Group) -> str | None:
    candidates = [m for m in group.methods if role_of(m) == "proposed"]
    return candidates[0] if candidates else None


def client_difference(group: Group) -> tuple[pd.DataFrame, str | None, str | None]:
    """Per-client final accuracy of pFedLoRA minus the best baseline, paired by seed (same partition), then
    averaged over the seeds both have. Returns (table, pfedlora label, baseline label); empty without both."""
    ours, base = proposed_method(group), best_baseline(group)
    cols = ["client", "arch", "ours_acc", "baseline_acc", "diff_points", "seeds"]
    if ours is None or base is None:
        return pd.DataFrame(columns=cols), ours, base
    a = {r.seed: r.clients for r in group.runs[ours] if r.clients is not None}
    b = {r.seed: r.clients for r in group.runs[base] if r.clients is not None}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return pd.DataFrame(columns=cols), ours, base
    frames = []
    for seed in seeds:
        merged = a[seed][["client", "arch", "test_acc"]].merge(
            b[seed][["client", "test_acc"]], on="client", suffixes=("_ours", "_base"))
        frames.append(merged.assign(seed=seed))
    both = pd.concat(frames)
    table = both.groupby("client", sort=True).agg(arch=("arch", "first"), ours_acc=("test_acc_ours", "mean"),
                                                  baseline_acc=("test_acc_base", "mean")).reset_index()
    table["diff_points"] = 100 * (table["ours_acc"] - table["baseline_acc"])
    table["seeds"] = len(seeds)
    return table[cols], ours, base


# ---- cost to target -----------------------------------------------------------------------------------------
def first_reach(curve: pd.DataFrame, target: float) -> dict[str, Any]:
    """Rounds and cumulative costs at the first round (after training) whose mean accuracy reaches target."""
    hit = curve[(curve["step"] > 0) & (curve["acc"] >= target - 1e-12)]
    if hit.empty:
        return {"rounds": None, "train_flops": None, "bytes": None}
    row = hit.iloc[0]
    return {"rounds": int(row["step"]), "train_flops": float(row["cum_train_flops"]), "bytes": float(row["cum_bytes"])}


@dataclass
class CostResult:
    target: float | None
    target_kind: str                 # "fixed" or "fallback"
    target_note: str                 # e.g. "best baseline's final accuracy (FedGH); fixed 90% not reached by ..."
    fixed_target: float | None
    baseline: str | None
    proposed: str | None
    table: pd.DataFrame = field(default_factory=pd.DataFrame)


def cost_to_target(group: Group) -> CostResult:
    """Rounds, computation and communication to reach the target, for every method, with the ratios
    baseline / pFedLoRA ("pFedLoRA needs k times less") and the accuracy gain of pFedLoRA in points.

    Target (SPEC section 3): the fixed target of the runs (target_acc: 90% CIFAR-10; CIFAR-100 70/60/50% at
    N = 10/50/100 by default) when every method's mean curve reaches it; otherwise the best baseline's mean final accuracy,
    used for every method of the group so the ratios compare like with like."""
    from reports.results import display_name

    curve = curves(group)
    fixed = next((r.target for rs in group.runs.values() for r in rs if r.target is not None), None)
    ours, base = proposed_method(group), best_baseline(group)
    finals = {m: mean_std([run_accuracies(r)["final_acc"] for r in group.runs[m]])[0] for m in group.methods}
    missing = [m for m in group.methods if fixed is None or first_reach(curve[m], fixed)["rounds"] is None]
    if fixed is not None and not missing:
        target, kind, note = fixed, "fixed", f"fixed target {100 * fixed:g}%"
    elif base is not None:
        target, kind = finals[base], "fallback"
        why = (f"fixed {100 * fixed:g}% not reached by {', '.join(display_name(m) for m in missing)}"
               if fixed is not None else "no fixed target")
        note = f"best baseline's final accuracy ({display_name(base)}, {100 * target:.2f}%); {why}"
    else:
        target, kind, note = fixed, "fixed", (f"fixed target {100 * fixed:g}%" if fixed is not None else "none")
    rows = []
    reach = {m: first_reach(curve[m], target) if target is not None else first_reach(curve[m], math.inf)
             for m in group.methods}
    for m in group.methods:
        runs = group.runs[m]
        last = [cost_columns(r.metrics).iloc[-1] for r in runs]
        rounds_run = float(np.mean([int(r.metrics["step"].max()) for r in runs]))
        row: dict[str, Any] = {
            "group": group.label, "method": m, "seeds": len(runs), "target": target, "target_kind": kind,
            "rounds_to_target": reach[m]["rounds"], "train_flops_to_target": reach[m]["train_flops"],
            "bytes_to_target": reach[m]["bytes"], "final_acc": finals[m],
            "train_flops_per_round": float(np.mean([x["cum_train_flops"] for x in last])) / max(rounds_run, 1),
            "bytes_per_round": float(np.mean([x["cum_bytes"] for x in last])) / max(rounds_run, 1),
        }
        if ours is not None:
            for key, col in (("rounds", "rounds_ratio"), ("train_flops", "flops_ratio"), ("bytes", "bytes_ratio")):
                row[col] = ratio(reach[m][key], reach[ours][key])
            row["acc_gain_points"] = 100 * (finals[ours] - finals[m])
        rows.append(row)
    return CostResult(target, kind, note, fixed, base, ours, pd.DataFrame(rows))


def ratio(theirs: float | None, ours: float | None) -> float | None:
    """theirs / ours: how many times less pFedLoRA needs (None where undefined)."""
    if theirs is None or ours is None or ours == 0 or theirs == 0:
        return None
    return float(theirs) / float(ours)


def headline(groups: list[Group]) -> pd.DataFrame:
    """Per group, pFedLoRA against the best baseline in the form of the paper's claims: accuracy gain in
    points, and computation / communication to target as 'k times less'."""
    rows = []
    for group in groups:
        cost = cost_to_target(group)
        if cost.proposed is None or cost.baseline is None:
            continue
        row = cost.table.set_index("method").loc[cost.baseline]
        rows.append({"group": group.label, "baseline": cost.baseline,
                     "ours_final_acc": cost.table.set_index("method").loc[cost.proposed, "final_acc"],
                     "baseline_final_acc": row["final_acc"], "acc_gain_points": row["acc_gain_points"],
                     "target": cost.target, "target_kind": cost.target_kind,
                     "rounds_ratio": row["rounds_ratio"], "flops_ratio": row["flops_ratio"],
                     "bytes_ratio": row["bytes_ratio"], "seeds": len(group.seeds)})
    return pd.DataFrame(rows)
