"""The numbers behind every table and figure, computed from per-round metrics (never from plots).

Conventions (documented in reports/README.md):
- accuracy is the sample-weighted mean personalised test accuracy of a round (`acc_mean`), as a fraction;
- "final" = the last evaluated round, "best" = the maximum over rounds, "val-selected" = the test accuracy
  at the first round of best mean validation accuracy (SPEC section 3);
- mean +- std over seeds uses the sample standard deviation (ddof=1); one seed gives no std; confidence
  intervals are 95% Student-t intervals over seeds (mean +- t(0.975, n-1) * std / sqrt(n)); CSV columns name
  the spread they hold: `*_seed_std` across seeds, never across clients (metrics.csv's `acc_std`);
- the paired difference to the best baseline is taken per seed (same seed = same partition), then averaged;
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
    if not len(arr):
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else math.nan


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of the Student-t confidence interval over seeds; half-width NaN below two values."""
    from scipy.stats import t

    arr = np.asarray([v for v in values if v == v], dtype=float)
    if not len(arr):
        return math.nan, math.nan
    if len(arr) < 2:
        return float(arr.mean()), math.nan
    half = float(t.ppf(0.5 + level / 2, len(arr) - 1) * arr.std(ddof=1) / math.sqrt(len(arr)))
    return float(arr.mean()), half


def cost_columns(df: pd.DataFrame) -> pd.DataFrame:
    """step, acc, cumulative training FLOPs and bytes (up + down) of one run."""
    out = pd.DataFrame({"step": df["step"].astype(int)})
    out["acc"] = df["acc_mean"] if "acc_mean" in df else math.nan
    out["cum_train_flops"] = df.get("cum_train_flops", 0)
    out["cum_bytes"] = df.get("cum_bytes_up", 0) + df.get("cum_bytes_down", 0)
    return out


# ---- curves -------------------------------------------------------------------------------------------------
def mean_curve(runs: list[Run]) -> pd.DataFrame:
    """Accuracy and cumulative costs per round, mean (and std of accuracy across seeds) over seeds, at the
    rounds that every seed evaluated. Columns: step, acc, acc_seed_std, cum_train_flops, cum_bytes, seeds."""
    frames = [cost_columns(r.metrics).dropna(subset=["acc"]).set_index("step") for r in runs]
    steps = sorted(set.intersection(*(set(f.index) for f in frames))) if frames else []
    stacked = {col: np.stack([f.loc[steps, col].to_numpy(dtype=float) for f in frames])
               for col in ("acc", "cum_train_flops", "cum_bytes")} if steps else {}
    out = pd.DataFrame({"step": steps})
    if not steps:
        return out.assign(acc=[], acc_seed_std=[], cum_train_flops=[], cum_bytes=[], seeds=[])
    out["acc"] = stacked["acc"].mean(0)
    out["acc_seed_std"] = stacked["acc"].std(0, ddof=1) if len(frames) > 1 else math.nan
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
    cols = ["method", "step", "acc", "acc_seed_std", "cum_train_flops", "cum_bytes", "seeds"]
    return pd.concat(rows, ignore_index=True)[cols] if rows else pd.DataFrame(columns=cols)


# ---- accuracy -----------------------------------------------------------------------------------------------
METRICS = ("final_acc", "best_acc", "val_selected_acc")


def accuracy_table(groups: list[Group]) -> pd.DataFrame:
    """One row per (group, method): final / best / validation-selected accuracy, mean and std across seeds
    (`*_seed_std`), how many seeds, and the paired difference of the final accuracy to the best baseline."""
    rows = []
    for group in groups:
        paired = paired_differences(group).set_index("method")
        for method in group.methods:
            runs = group.runs[method]
            per_seed = [run_accuracies(r) for r in runs]
            row: dict[str, Any] = {"group": group.label, "method": method, "seeds": len(runs),
                                   "over": group.over(method)}
            for metric in METRICS:
                row[f"{metric}_mean"], row[f"{metric}_seed_std"] = mean_std([a[metric] for a in per_seed])
            if method in paired.index:
                row.update({k if k.startswith("paired_") else f"paired_{k}": v
                            for k, v in paired.loc[method].items()})
            rows.append(row)
    return pd.DataFrame(rows)


def seed_differences(group: Group, metric: str = "final_acc") -> tuple[str | None, dict[str, list[float]]]:
    """(best baseline, method -> its `metric` minus the best baseline's in points, one value per seed both
    ran, in seed order). A seed fixes the partition, so the seed-to-seed spread both share cancels."""
    base = best_baseline(group)
    if base is None:
        return None, {}
    ref = {r.seed: run_accuracies(r)[metric] for r in group.runs[base]}
    out = {}
    for method in group.methods:
        if method != base:
            mine = {r.seed: run_accuracies(r)[metric] for r in group.runs[method]}
            out[method] = [100 * (mine[s] - ref[s]) for s in sorted(set(mine) & set(ref))]
    return base, out


def paired_differences(group: Group, metric: str = "final_acc") -> pd.DataFrame:
    """Per method, the paired difference to the best baseline (seed_differences): mean and std across seeds
    in points, and the seeds it wins, ties and loses. The best baseline has no row."""
    cols = ["method", "reference", "paired_seeds", "diff_points", "diff_seed_std", "wins", "ties", "losses"]
    base, diffs = seed_differences(group, metric)
    rows = []
    for method, d in diffs.items():
        mean, std = mean_std(d)
        rows.append({"method": method, "reference": base, "paired_seeds": len(d), "diff_points": mean,
                     "diff_seed_std": std, "wins": sum(x > 0 for x in d), "ties": sum(x == 0 for x in d),
                     "losses": sum(x < 0 for x in d)})
    return pd.DataFrame(rows, columns=cols)


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
    averaged over the seeds both have (`diff_seed_std`: its spread across seeds; `n_test`: the client's test
    samples, for a weighted mean). Returns (table, pfedlora label, baseline label); empty without both."""
    ours, base = proposed_method(group), best_baseline(group)
    cols = ["client", "arch", "ours_acc", "baseline_acc", "diff_points", "diff_seed_std", "n_test", "seeds"]
    if ours is None or base is None:
        return pd.DataFrame(columns=cols), ours, base
    a = {r.seed: r.clients for r in group.runs[ours] if r.clients is not None}
    b = {r.seed: r.clients for r in group.runs[base] if r.clients is not None}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return pd.DataFrame(columns=cols), ours, base
    frames = []
    for seed in seeds:
        left = a[seed][["client", "arch", "test_acc"] + (["n_test"] if "n_test" in a[seed] else [])]
        merged = left.merge(b[seed][["client", "test_acc"]], on="client", suffixes=("_ours", "_base"))
        merged["diff"] = 100 * (merged["test_acc_ours"] - merged["test_acc_base"])
        frames.append(merged.assign(seed=seed, n_test=merged.get("n_test", math.nan)))
    both = pd.concat(frames)
    table = both.groupby("client", sort=True).agg(
        arch=("arch", "first"), ours_acc=("test_acc_ours", "mean"), baseline_acc=("test_acc_base", "mean"),
        diff_points=("diff", "mean"), diff_seed_std=("diff", lambda d: d.std(ddof=1) if len(d) > 1 else math.nan),
        n_test=("n_test", "first")).reset_index()
    table["seeds"] = len(seeds)
    return table[cols], ours, base


def difference_summary(diff: pd.DataFrame) -> dict[str, Any]:
    """Wins, ties (exactly equal accuracy) and losses of pFedLoRA over the clients, and the mean difference
    over clients, unweighted and weighted by test samples (when the clients' sizes are known)."""
    d = diff["diff_points"]
    weights = diff["n_test"] if "n_test" in diff and diff["n_test"].notna().all() else None
    return {"clients": len(d), "better": int((d > 0).sum()), "tied": int((d == 0).sum()),
            "worse": int((d < 0).sum()), "mean": float(d.mean()) if len(d) else math.nan,
            "weighted_mean": float(np.average(d, weights=weights)) if weights is not None and len(d) else math.nan}


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
    """Per group, pFedLoRA against the best baseline, measured: accuracy gain in points, and computation /
    communication per round and to the target as ratios baseline / pFedLoRA (the paper's claims sit beside
    them in the table, PAPER_CLAIMS, never in place of them)."""
    rows = []
    for group in groups:
        table = claims(group)
        best = table[table["best_baseline"]] if len(table) else table
        if not len(best):
            continue
        row = best.iloc[0]
        rows.append({"group": group.label, **row.to_dict(), "seeds": group.over()})
    return pd.DataFrame(rows)


# ---- the paper's claims, checked ----------------------------------------------------------------------------
# pFedLoRA's headline claims against the best baseline (SPEC section 2; the paper does not say in which setting
# nor whether computation and communication are per round or to a target accuracy).
PAPER_CLAIMS = {"acc_gain_points": 1.35, "flops_ratio": 11.81, "bytes_ratio": 7.41}


def per_round(group: Group) -> dict[str, dict[str, float]]:
    """method -> mean over seeds of its client training FLOPs and bytes (up + down) per round run."""
    out = {}
    for m in group.methods:
        runs = group.runs[m]
        last = [cost_columns(r.metrics).iloc[-1] for r in runs]
        rounds = [max(int(r.metrics["step"].max()), 1) for r in runs]
        out[m] = {"train_flops": float(np.mean([x["cum_train_flops"] / n for x, n in zip(last, rounds)])),
                  "bytes": float(np.mean([x["cum_bytes"] / n for x, n in zip(last, rounds)]))}
    return out


def claims(group: Group) -> pd.DataFrame:
    """pFedLoRA against each other method of the group: the final accuracy difference (points, means over
    seeds), the cost ratios baseline / pFedLoRA per round and to the target (FLOPs, bytes; > 1: pFedLoRA
    needs less), and what the paper's computation and communication claims would require of the rounds:
    the ratio of rounds to target (baseline / pFedLoRA) that gives the claimed saving at the measured
    per-round ratio (claim / per-round ratio)."""
    cost = cost_to_target(group)
    ours = cost.proposed
    if ours is None:
        return pd.DataFrame()
    costs = cost.table.set_index("method")
    rounds = per_round(group)
    rows = []
    for m in group.methods:
        if role_of(m) == "proposed":  # pFedLoRA itself and its variants (rank=8, joint, ...)
            continue
        row = {"group": group.label, "baseline": m, "best_baseline": m == cost.baseline,
               "acc_gain_points": 100 * (costs.loc[ours, "final_acc"] - costs.loc[m, "final_acc"]),
               "flops_round_ratio": ratio(rounds[m]["train_flops"], rounds[ours]["train_flops"]),
               "bytes_round_ratio": ratio(rounds[m]["bytes"], rounds[ours]["bytes"]),
               "flops_target_ratio": costs.loc[m, "flops_ratio"], "bytes_target_ratio": costs.loc[m, "bytes_ratio"],
               "rounds_target_ratio": costs.loc[m, "rounds_ratio"], "target": cost.target,
               "target_kind": cost.target_kind}
        for kind in ("flops", "bytes"):
            per = row[f"{kind}_round_ratio"]
            row[f"{kind}_rounds_ratio_needed"] = PAPER_CLAIMS[f"{kind}_ratio"] / per if per else None
        rows.append(row)
    return pd.DataFrame(rows)


# ---- cost-normalised comparison -------------------------------------------------------------------------------
COSTS = {"flops": ("cum_train_flops", "client training FLOPs"), "bytes": ("cum_bytes", "bytes up + down")}


@dataclass
class Budget:
    kind: str                      # "flops" or "bytes"
    budget: float | None           # the matched budget (None: no method has a positive cost)
    cheapest: str | None           # the method whose need set it
    needs: dict[str, float]        # method -> cost at the first round its mean accuracy reached its final one


def matched_budget(group: Group, kind: str) -> Budget:
    """The budget every method is held to: the smallest cost (cumulative FLOPs or bytes, on the mean curve
    over seeds) at which a method first reached its own final mean accuracy. Methods that cost nothing of
    this kind (Standalone's bytes) cannot set it."""
    column = COSTS[kind][0]
    needs = {}
    for m, c in curves(group).items():
        c = c[c["step"] > 0]
        if c.empty:
            continue
        reached = c[c["acc"] >= c["acc"].iloc[-1] - 1e-12]
        needs[m] = float(reached[column].iloc[0])
    positive = {m: v for m, v in needs.items() if v > 0}
    if not positive:
        return Budget(kind, None, None, needs)
    cheapest = min(positive, key=lambda m: (positive[m], method_order(m)))
    return Budget(kind, positive[cheapest], cheapest, needs)


def method_order(method: str) -> tuple:
    from reports.results import method_sort_key

    return method_sort_key(method)


def accuracy_within(run: Run, kind: str, budget: float) -> float:
    """The run's accuracy at its last evaluated round whose cumulative cost is within `budget` (what stopping
    it at the budget gives); NaN when its first round already costs more."""
    c = cost_columns(run.metrics)
    c = c[(c["step"] > 0) & c["acc"].notna() & (c[COSTS[kind][0]] <= budget * (1 + 1e-9))]
    return float(c["acc"].iloc[-1]) if len(c) else math.nan


def worst_client(run: Run, q: float = 10) -> float:
    """The q-th percentile (linear interpolation) of the run's per-client final test accuracy."""
    if run.clients is None or "test_acc" not in run.clients or not len(run.clients):
        return math.nan
    return float(np.percentile(run.clients["test_acc"].to_numpy(dtype=float), q))


def cost_normalised(group: Group) -> tuple[pd.DataFrame, dict[str, Budget]]:
    """Per method: final accuracy, worst-client (10th-percentile) accuracy and the accuracy within the matched
    FLOPs and bytes budgets, each the mean over seeds with its 95% t confidence interval half-width (`*_ci`)."""
    budgets = {kind: matched_budget(group, kind) for kind in COSTS}
    rows = []
    for m in group.methods:
        runs = group.runs[m]
        values = {"final_acc": [run_accuracies(r)["final_acc"] for r in runs],
                  "worst_client_acc": [worst_client(r) for r in runs]}
        for kind, b in budgets.items():
            values[f"acc_at_{kind}_budget"] = ([accuracy_within(r, kind, b.budget) for r in runs]
                                               if b.budget is not None else [math.nan])
        row: dict[str, Any] = {"group": group.label, "method": m, "seeds": len(runs)}
        for name, vals in values.items():
            row[name], row[f"{name}_ci"] = t_interval(vals)
        for kind, b in budgets.items():
            row[f"{kind}_budget"], row[f"{kind}_needed"] = b.budget, b.needs.get(m)
        rows.append(row)
    return pd.DataFrame(rows), budgets


# ---- measured totals per method (the transformer recipe) -------------------------------------------------------
def clients_sampled(run: Run) -> float:
    """The clients sampled over all rounds of a run: the sum of its `clients_sampled` metric, or where a run
    did not record it, rounds x ceil(C N) (bench.config.RunConfig.clients_per_round) from its config."""
    df = run.metrics[run.metrics["step"] > 0]
    if "clients_sampled" in df and df["clients_sampled"].notna().any():
        return float(df["clients_sampled"].sum())
    n, c = run.params.get("num_clients"), run.params.get("participation")
    if n is None or c is None:
        return math.nan
    return float(df["step"].nunique() * max(1, math.ceil(round(float(c) * int(n), 9))))


def run_totals(run: Run) -> dict[str, float]:
    """A run's measured totals: client training FLOPs, server FLOPs, bytes up + down, and bytes per sampled
    client per round (the total over the clients sampled in all rounds); NaN where a run did not record one."""
    df = run.metrics

    def total(column: str) -> float:
        return float(df[column].max()) if column in df and df[column].notna().any() else math.nan

    nbytes = total("cum_bytes_up") + total("cum_bytes_down")
    sampled = clients_sampled(run)
    return {"train_flops": total("cum_train_flops"), "server_flops": total("cum_server_flops"), "bytes": nbytes,
            "bytes_per_client_round": nbytes / sampled if sampled and sampled == sampled else math.nan}


def cost_summary(group: Group) -> pd.DataFrame:
    """Per method of a setting: final accuracy (mean and std across seeds) beside its measured totals (run_totals),
    each the mean over seeds."""
    rows = []
    for m in group.methods:
        runs = group.runs[m]
        row: dict[str, Any] = {"group": group.label, "method": m, "seeds": len(runs)}
        row["final_acc_mean"], row["final_acc_seed_std"] = mean_std([run_accuracies(r)["final_acc"] for r in runs])
        totals = [run_totals(r) for r in runs]
        for key in ("train_flops", "server_flops", "bytes", "bytes_per_client_round"):
            row[key] = float(np.mean([t[key] for t in totals])) if totals else math.nan
        rows.append(row)
    return pd.DataFrame(rows)
