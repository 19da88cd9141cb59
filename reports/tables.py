"""Tables as Markdown, CSV and LaTeX. The CSV holds the raw numbers (fractions, FLOPs, bytes); Markdown
and LaTeX hold the formatted cells (percentages with mean +- std, SI-prefixed costs, ratios)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from reports.analysis import CostResult
from reports.results import display_name, method_sort_key

SI = [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]


def missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def pct(mean: float, std: float | None = None, digits: int = 2) -> str:
    if missing(mean):
        return "—"
    text = f"{100 * mean:.{digits}f}"
    return text + (f" ± {100 * std:.{digits}f}" if not missing(std) else "")


def eng(x: float | None, unit: str) -> str:
    """205 GFLOP, 1.23 MB: three significant figures with an SI prefix."""
    if missing(x):
        return "not reached"
    if x == 0:
        return f"0 {unit}"
    for scale, prefix in SI:
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def times(r: float | None) -> str:
    return "—" if missing(r) else f"{r:.2f}×"


def less_more(r: float | None) -> str:
    """A ratio 'theirs / ours' as 'k× less' (pFedLoRA needs less), 'k× more', or 'same' where it rounds to 1."""
    if missing(r):
        return "—"
    if f"{r:.2f}" == "1.00" and f"{1 / r:.2f}" == "1.00":
        return "same"
    return f"{r:.2f}× less" if r >= 1 else f"{1 / r:.2f}× more"


def pm(mean: float | None, spread: float | None, digits: int = 2, scale: float = 100, sign: bool = False) -> str:
    """'12.34 ± 0.56' (or '+1.20 ± 0.30' with sign) of a mean and a spread on the `scale` (100: percent)."""
    if missing(mean):
        return "—"
    text = f"{scale * mean:+.{digits}f}" if sign else f"{scale * mean:.{digits}f}"
    return text + (f" ± {scale * spread:.{digits}f}" if not missing(spread) else "")


def common_over(acc: pd.DataFrame) -> str:
    """What every row's ± is over, when they agree ('3 seeds'), else a pointer to the per-row counts."""
    overs = set(acc["over"]) if "over" in acc and len(acc) else set()
    return overs.pop() if len(overs) == 1 else "each row's seeds (Seeds column of accuracy_metrics)"


def signed(points: float | None) -> str:
    return "—" if missing(points) else f"{points:+.2f}"


@dataclass
class Table:
    name: str                     # file stem
    title: str                    # caption
    display: pd.DataFrame         # formatted cells
    data: pd.DataFrame            # raw numbers, written as CSV
    bold: pd.DataFrame | None = None   # same shape as display: cells to emphasise
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        cols = [str(c) for c in self.display.columns]
        lines = ["| " + " | ".join(md_escape(c) for c in cols) + " |",
                 "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(cols))) + "|"]
        for i in range(len(self.display)):
            cells = []
            for j in range(len(cols)):
                text = md_escape(str(self.display.iat[i, j]))
                cells.append(f"**{text}**" if self.is_bold(i, j) and text not in ("", "—") else text)
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def latex(self) -> str:
        cols = [str(c) for c in self.display.columns]
        out = ["% " + self.title, "\\begin{table}[t]", "\\centering",
               f"\\caption{{{tex_escape(self.title)}}}", f"\\label{{tab:{self.name.replace('_', '-')}}}",
               "\\begin{tabular}{l" + "r" * (len(cols) - 1) + "}", "\\toprule",
               " & ".join(tex_escape(c) for c in cols) + " \\\\", "\\midrule"]
        for i in range(len(self.display)):
            cells = []
            for j in range(len(cols)):
                text = tex_escape(str(self.display.iat[i, j]))
                cells.append(f"\\textbf{{{text}}}" if self.is_bold(i, j) and text not in ("", "---") else text)
            out.append(" & ".join(cells) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}"]
        out += [f"\\\\[2pt]\\footnotesize {tex_escape(n)}" for n in self.notes]
        out += ["\\end{table}", ""]
        return "\n".join(out)

    def is_bold(self, i: int, j: int) -> bool:
        return self.bold is not None and bool(self.bold.iat[i, j])

    def write(self, out_dir: Path) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        md, csv, tex = (out_dir / f"{self.name}{ext}" for ext in (".md", ".csv", ".tex"))
        notes = "".join(f"\n\n{n}" for n in self.notes)
        md.write_text(f"**{self.title}**\n\n{self.markdown()}{notes}\n")
        self.data.to_csv(csv, index=False)
        tex.write_text(self.latex())
        return [md, csv, tex]


def md_escape(text: str) -> str:
    return text.replace("|", "\\|")


TEX = {"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "$": "\\$", "#": "\\#", "_": "\\_", "{": "\\{",
       "}": "\\}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}", "±": "$\\pm$", "×": "$\\times$",
       "—": "---", "−": "$-$", "·": "$\\cdot$", "Δ": "$\\Delta$", "≥": "$\\geq$"}


def tex_escape(text: str) -> str:
    return "".join(TEX.get(ch, ch) for ch in text)


# ---- the tables ---------------------------------------------------------------------------------------------
def final_accuracy_table(acc: pd.DataFrame, name: str = "final_accuracy", metric: str = "final_acc",
                         what: str = "Final") -> Table:
    """T1 form: methods x settings, mean +- std over seeds of the accuracy (%), best per column in bold."""
    groups = list(dict.fromkeys(acc["group"]))
    methods = sorted(dict.fromkeys(acc["method"]), key=method_sort_key)
    display = pd.DataFrame({"Method": [display_name(m) for m in methods]})
    bold = pd.DataFrame({"Method": [False] * len(methods)})
    for g in groups:
        sub = acc[acc["group"] == g].set_index("method")
        col = [pct(sub.loc[m, f"{metric}_mean"], sub.loc[m, f"{metric}_seed_std"]) if m in sub.index else "—"
               for m in methods]
        best = sub[f"{metric}_mean"].max() if len(sub) else math.nan
        display[g] = col
        bold[g] = [m in sub.index and sub.loc[m, f"{metric}_mean"] == best for m in methods]
    title = (f"{what} mean test accuracy (%), mean ± std across seeds over {common_over(acc)}; "
             "best per column in bold")
    return Table(name, title, display, acc, bold)


def accuracy_metrics_table(acc: pd.DataFrame, name: str = "accuracy_metrics") -> Table:
    """Final, best-over-rounds and validation-selected accuracy per (setting, method), unpaired mean ± std
    across seeds, beside the paired difference of the final accuracy to the best baseline and its win count."""
    paired = "paired_diff_points" in acc
    display = pd.DataFrame({
        "Setting": acc["group"], "Method": [display_name(m) for m in acc["method"]],
        "Final": [pct(a, b) for a, b in zip(acc["final_acc_mean"], acc["final_acc_seed_std"])],
        "Best over rounds": [pct(a, b) for a, b in zip(acc["best_acc_mean"], acc["best_acc_seed_std"])],
        "Validation-selected": [pct(a, b) for a, b in zip(acc["val_selected_acc_mean"],
                                                          acc["val_selected_acc_seed_std"])],
    })
    if paired:
        display["Final − best baseline, paired (points)"] = [
            "best baseline" if missing(d) and missing(n) else pm(d, s, scale=1, sign=True)
            for d, s, n in zip(acc["paired_diff_points"], acc["paired_diff_seed_std"], acc["paired_seeds"])]
        display["Seeds won / tied / lost"] = [
            "—" if missing(n) else f"{int(w)} / {int(t)} / {int(lo)}"
            for w, t, lo, n in zip(acc["paired_wins"], acc["paired_ties"], acc["paired_losses"], acc["paired_seeds"])]
    display["Seeds"] = acc["seeds"].astype(int)
    notes = ["Final, best and validation-selected: mean ± std across seeds (unpaired; the seed-to-seed spread is "
             "shared by all methods, since a seed fixes the partition)."]
    if paired:
        notes.append("Paired: the method's final accuracy minus the best baseline's, seed by seed, then mean ± "
                     "std across those seeds; won / tied / lost counts the seeds.")
    return Table(name, "Test accuracy (%): final, best over rounds, and at the round of best validation "
                 f"accuracy; mean ± std across seeds over {common_over(acc)}", display, acc, notes=notes)


def cost_table(cost: CostResult, name: str = "cost_to_target", group: str = "") -> Table:
    t = cost.table
    group = group or (str(t["group"].iloc[0]) if len(t) else "")
    target = "—" if cost.target is None else f"{100 * cost.target:.2f}%"
    display = pd.DataFrame({
        "Method": [display_name(m) for m in t["method"]],
        "Rounds": [("not reached" if missing(r) else str(int(r))) for r in t["rounds_to_target"]],
        "Computation (FLOPs)": [eng(x, "FLOP") for x in t["train_flops_to_target"]],
        "Communication (bytes)": [eng(x, "B") for x in t["bytes_to_target"]],
        "Final acc. (%)": [pct(x) for x in t["final_acc"]],
    })
    if cost.proposed is not None:
        display.insert(2, "Rounds ×", [times(x) for x in t["rounds_ratio"]])
        display.insert(4, "Computation ×", [times(x) for x in t["flops_ratio"]])
        display.insert(6, "Communication ×", [times(x) for x in t["bytes_ratio"]])
        display["pFedLoRA Δacc (points)"] = [signed(x) if m != cost.proposed else "—"
                                             for m, x in zip(t["method"], t["acc_gain_points"])]
    bold = pd.DataFrame(False, index=display.index, columns=display.columns)
    if cost.baseline is not None:
        bold.loc[list(t["method"]).index(cost.baseline), "Method"] = True
    notes = [f"Target: {target} ({cost.target_note}). Costs are cumulative up to the first round whose mean "
             "accuracy (mean over seeds) reaches the target, and are means over seeds; computation = client "
             "training FLOPs, communication = bytes up + down over all clients. No spread is shown: one mean curve per method."]
    if cost.proposed is not None:
        notes.append("k× = the method's cost divided by pFedLoRA's (how many times less pFedLoRA needs); "
                     "Δacc = pFedLoRA's final accuracy minus the method's. Best baseline in bold.")
    title = f"Rounds, computation and communication to reach {target} mean test accuracy ({group})"
    return Table(name, title, display, t, bold, notes)


def client_difference_table(diff: pd.DataFrame, ours: str, base: str, name: str = "client_difference",
                            group: str = "") -> Table:
    from reports.analysis import difference_summary

    seeds = int(diff["seeds"].max()) if len(diff) else 1
    display = pd.DataFrame({
        "Client": diff["client"].astype(int), "Model": diff["arch"],
        f"{display_name(ours)} (%)": [pct(x) for x in diff["ours_acc"]],
        f"{display_name(base)} (%)": [pct(x) for x in diff["baseline_acc"]],
        "Difference (points)": [pm(d, s, scale=1, sign=True) for d, s in zip(diff["diff_points"],
                                                                              diff["diff_seed_std"])],
    })
    s = difference_summary(diff)
    weighted = ("" if missing(s["weighted_mean"])
                else f"; weighted by test samples {s['weighted_mean']:+.2f}")
    title = (f"Per-client final test accuracy, {display_name(ours)} minus the best baseline {display_name(base)}"
             f"{' (' + group + ')' if group else ''}: better on {s['better']}, tied on {s['tied']}, worse on "
             f"{s['worse']} of {s['clients']} clients; mean over clients {s['mean']:+.2f} points (unweighted"
             f"{weighted})")
    over = (f"mean over {seeds} seeds, paired by seed (± = std across seeds)" if seeds > 1 else "1 seed")
    notes = [f"Per client: {over}. Tied = exactly equal accuracy."]
    return Table(name, title, display, diff, notes=notes)


def headline_table(head: pd.DataFrame, name: str = "headline") -> Table:
    """Measured here, per setting, against the best baseline; the paper's claims in their own columns."""
    from reports.analysis import PAPER_CLAIMS

    claim = {k: v for k, v in PAPER_CLAIMS.items()}
    display = pd.DataFrame({
        "Setting": head["group"], "Best baseline": [display_name(b) for b in head["baseline"]],
        "Accuracy gain (points)": [signed(x) for x in head["acc_gain_points"]],
        "Paper: accuracy": f"{claim['acc_gain_points']:+.2f}",
        "Computation per round": [less_more(x) for x in head["flops_round_ratio"]],
        "Computation to target": [less_more(x) for x in head["flops_target_ratio"]],
        "Paper: computation": f"{claim['flops_ratio']:.2f}× less",
        "Communication per round": [less_more(x) for x in head["bytes_round_ratio"]],
        "Communication to target": [less_more(x) for x in head["bytes_target_ratio"]],
        "Paper: communication": f"{claim['bytes_ratio']:.2f}× less",
        "Target": [f"{pct(t)}% ({k})" for t, k in zip(head["target"], head["target_kind"])],
    })
    title = "pFedLoRA against the best baseline of each setting: measured here, beside the paper's claims"
    notes = ["Measured columns: this report's runs (means over seeds; per round = totals / rounds run; to target "
             "= cumulative to the first round reaching the target). Columns 'Paper: ...' are the pFedLoRA "
             "paper's claimed figures, not measured here; the paper does not say in which setting, nor whether "
             "its savings are per round or to a target."]
    return Table(name, title, display, head, notes=notes)


def claims_table(claims: pd.DataFrame, name: str = "claims", group: str = "") -> Table:
    """One setting: rows = the measures of the paper's claims, a column with the paper's figure, then one
    column per baseline with what was measured against it (best baseline first, in bold)."""
    from reports.analysis import PAPER_CLAIMS

    c = claims.sort_values("best_baseline", ascending=False, kind="stable")
    measures = [("Final accuracy gain (points)", "acc_gain_points", signed, f"{PAPER_CLAIMS['acc_gain_points']:+.2f}"),
                ("Computation per round", "flops_round_ratio", less_more, "—"),
                ("Computation to target", "flops_target_ratio", less_more, f"{PAPER_CLAIMS['flops_ratio']:.2f}× less"),
                ("Communication per round", "bytes_round_ratio", less_more, "—"),
                ("Communication to target", "bytes_target_ratio", less_more, f"{PAPER_CLAIMS['bytes_ratio']:.2f}× less"),
                ("Rounds to target", "rounds_target_ratio", less_more, "—")]
    display = pd.DataFrame({"Measure (pFedLoRA vs ...)": [m[0] for m in measures],
                            "Paper's claim (vs best baseline)": [m[3] for m in measures]})
    for _, row in c.iterrows():
        label = display_name(row["baseline"]) + (" (best baseline)" if row["best_baseline"] else "")
        display[label] = [fmt(row[col]) for _, col, fmt, _ in measures]
    bold = pd.DataFrame(False, index=display.index, columns=display.columns)
    if len(c) and c["best_baseline"].iloc[0]:
        bold.iloc[:, 2] = True
    notes = [requirement_note(c)]
    title = f"The paper's claims against this setting's measurements ({group or c['group'].iloc[0]})"
    return Table(name, title, display, claims, bold, notes)


def requirement_note(c: pd.DataFrame) -> str:
    """What the paper's claims would require, stated with the measured per-round ratios of the best baseline."""
    from reports.analysis import PAPER_CLAIMS

    best = c[c["best_baseline"]]
    if not len(best):
        return "No baseline in this setting: the claims cannot be checked."
    row = best.iloc[0]
    name = display_name(row["baseline"])
    parts = [f"What the claims would require against {name}: a final accuracy {PAPER_CLAIMS['acc_gain_points']:+.2f} "
             f"points above it (measured {signed(row['acc_gain_points'])})"]
    for kind, what in (("flops", "computation"), ("bytes", "communication")):
        per, need = row[f"{kind}_round_ratio"], row[f"{kind}_rounds_ratio_needed"]
        if missing(per) or missing(need):
            parts.append(f"{what}: no per-round ratio ({name} or pFedLoRA spends none)")
            continue
        parts.append(f"{PAPER_CLAIMS[kind + '_ratio']:.2f}× less {what}: per round pFedLoRA needs {less_more(per)}, "
                     f"so it would have to reach the target in {need:.2f}× fewer rounds than {name}"
                     + (" (measured: not both reached the target)" if missing(row["rounds_target_ratio"])
                        else f" (measured: {less_more(row['rounds_target_ratio'])})"))
    return "; ".join(parts) + ". A per-round saving alone can only give the claims where the per-round ratio " \
        "already equals them."


def cost_normalised_table(table: pd.DataFrame, budgets: dict, name: str = "cost_normalised", group: str = "") -> Table:
    """Accuracy at matched budgets and the worst clients, with 95% confidence intervals over seeds."""
    def ci(col: str) -> list[str]:
        return [pct(m, h) for m, h in zip(table[col], table[f"{col}_ci"])]

    display = pd.DataFrame({"Method": [display_name(m) for m in table["method"]],
                            "Final": ci("final_acc"), "Worst clients (10th percentile)": ci("worst_client_acc"),
                            "Within the FLOPs budget": ci("acc_at_flops_budget"),
                            "Within the bytes budget": ci("acc_at_bytes_budget"),
                            "Seeds": table["seeds"].astype(int)})
    notes = []
    for kind, what in (("flops", "FLOP"), ("bytes", "B")):
        b = budgets[kind]
        if b.budget is None:
            notes.append(f"{kind} budget: none (no method spends any)")
            continue
        notes.append(f"{'FLOPs' if kind == 'flops' else 'Bytes'} budget {eng(b.budget, what)}: what "
                     f"{display_name(b.cheapest)}, the cheapest, needed to first reach its own final mean accuracy; "
                     "each method's accuracy at its last round within it ('—': its first round costs more)")
    notes.append("Values: mean over seeds ± the half-width of the 95% Student-t confidence interval across seeds "
                 "(none with one seed). Worst clients: the 10th percentile of the clients' final accuracy, per seed.")
    title = f"Accuracy (%) at matched computation and communication budgets, and of the worst clients ({group})"
    return Table(name, title, display, table, notes=notes)


def sweep_table(df: pd.DataFrame, x: str, xlabel: str, name: str, title: str) -> Table:
    """Final accuracy (%) per method (rows) and sweep value (columns), mean +- std over seeds."""
    methods = sorted(dict.fromkeys(df["method"]), key=method_sort_key)
    values = sorted(dict.fromkeys(df[x]))
    display = pd.DataFrame({"Method": [display_name(m) for m in methods]})
    bold = pd.DataFrame({"Method": [False] * len(methods)})
    for v in values:
        sub = df[df[x] == v].set_index("method")
        label = f"{xlabel}={v:g}" if isinstance(v, (int, float)) else f"{xlabel}={v}"
        display[label] = [pct(sub.loc[m, "final_acc_mean"], sub.loc[m, "final_acc_seed_std"]) if m in sub.index
                          else "—" for m in methods]
        best = sub["final_acc_mean"].max()
        bold[label] = [m in sub.index and sub.loc[m, "final_acc_mean"] == best for m in methods]
    return Table(name, title, display, df, bold if len(methods) > 1 else None)


def cost_summary_table(summary: pd.DataFrame, name: str = "cost_summary", group: str = "") -> Table:
    """Per method: final accuracy (mean ± std across seeds) beside the measured totals of its runs (means over
    seeds): client training FLOPs, server FLOPs, bytes up + down, and bytes per sampled client per round. Best
    accuracy in bold."""
    s = summary.assign(order=[method_sort_key(m) for m in summary["method"]]).sort_values("order", kind="stable")
    s = s.drop(columns="order").reset_index(drop=True)
    display = pd.DataFrame({
        "Method": [display_name(m) for m in s["method"]],
        "Final acc. (%)": [pct(a, b) for a, b in zip(s["final_acc_mean"], s["final_acc_seed_std"])],
        "Client training FLOPs": [eng(x, "FLOP") if not missing(x) else "—" for x in s["train_flops"]],
        "Server FLOPs": [eng(x, "FLOP") if not missing(x) else "—" for x in s["server_flops"]],
        "Bytes up + down": [eng(x, "B") if not missing(x) else "—" for x in s["bytes"]],
        "Bytes per client per round": [eng(x, "B") if not missing(x) else "—" for x in s["bytes_per_client_round"]],
        "Seeds": s["seeds"].astype(int),
    })
    bold = pd.DataFrame(False, index=display.index, columns=display.columns)
    if len(s) and s["final_acc_mean"].notna().any():
        bold["Final acc. (%)"] = s["final_acc_mean"] == s["final_acc_mean"].max()
    notes = ["Totals over the whole run, means over seeds: client training FLOPs (every client's local training), "
             "server FLOPs (aggregation and any server-side training), bytes uploaded + downloaded by all clients. "
             "Per client per round: the total bytes divided by the clients sampled over all rounds (a sampled "
             "client's up + down traffic in a round, on average).",
             "FLOPs are counted as torch's FlopCounterMode counts them (matrix products, convolutions and the "
             "like); element-wise averaging, sums and concatenation count 0, so a server that only averages or "
             "stacks the uploads (e.g. LG-FedAvg, FLoRA, FedSA-LoRA) shows 0 server FLOPs."]
    title = (f"Final mean test accuracy (%), mean ± std across seeds over {common_over_seeds(s)}, and measured "
             f"computation and communication ({group or (s['group'].iloc[0] if len(s) else '')})")
    return Table(name, title, display, s, bold, notes)


def common_over_seeds(s: pd.DataFrame) -> str:
    counts = sorted(set(int(n) for n in s["seeds"])) if len(s) else []
    if len(counts) == 1:
        return f"{counts[0]} seed" + ("s" if counts[0] != 1 else "")
    return "each row's seeds (Seeds column)"
