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
    """A ratio 'theirs / ours' as 'k× less' (pFedLoRA needs less) or 'k× more'."""
    if missing(r):
        return "—"
    return f"{r:.2f}× less" if r >= 1 else f"{1 / r:.2f}× more"


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
        col = [pct(sub.loc[m, f"{metric}_mean"], sub.loc[m, f"{metric}_std"]) if m in sub.index else "—"
               for m in methods]
        best = sub[f"{metric}_mean"].max() if len(sub) else math.nan
        display[g] = col
        bold[g] = [m in sub.index and sub.loc[m, f"{metric}_mean"] == best for m in methods]
    seeds = sorted({int(s) for s in acc["seeds"]}) if len(acc) else []
    title = (f"{what} mean test accuracy (%), mean ± std over {'/'.join(map(str, seeds))} seed(s); "
             "best per column in bold")
    return Table(name, title, display, acc, bold)


def accuracy_metrics_table(acc: pd.DataFrame) -> Table:
    """Final, best-over-rounds and validation-selected accuracy per (setting, method)."""
    display = pd.DataFrame({
        "Setting": acc["group"], "Method": [display_name(m) for m in acc["method"]],
        "Final": [pct(a, b) for a, b in zip(acc["final_acc_mean"], acc["final_acc_std"])],
        "Best over rounds": [pct(a, b) for a, b in zip(acc["best_acc_mean"], acc["best_acc_std"])],
        "Validation-selected": [pct(a, b) for a, b in zip(acc["val_selected_acc_mean"], acc["val_selected_acc_std"])],
        "Seeds": acc["seed_list"],
    })
    return Table("accuracy_metrics", "Test accuracy (%): final, best over rounds, and at the round of best "
                 "validation accuracy (mean ± std over seeds)", display, acc)


def cost_table(cost: CostResult, name: str = "cost_to_target") -> Table:
    t = cost.table
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
             "accuracy (over seeds) reaches the target; computation = client training FLOPs, communication = "
             "bytes up + down over all clients."]
    if cost.proposed is not None:
        notes.append("k× = the method's cost divided by pFedLoRA's (how many times less pFedLoRA needs); "
                     "Δacc = pFedLoRA's final accuracy minus the method's. Best baseline in bold.")
    title = f"Rounds, computation and communication to reach {target} mean test accuracy"
    return Table(name, title, display, t, bold, notes)


def client_difference_table(diff: pd.DataFrame, ours: str, base: str, name: str = "client_difference") -> Table:
    display = pd.DataFrame({
        "Client": diff["client"].astype(int), "Model": diff["arch"],
        f"{display_name(ours)} (%)": [pct(x) for x in diff["ours_acc"]],
        f"{display_name(base)} (%)": [pct(x) for x in diff["baseline_acc"]],
        "Difference (points)": [signed(x) for x in diff["diff_points"]],
    })
    better = int((diff["diff_points"] > 0).sum())
    title = (f"Per-client final test accuracy, {display_name(ours)} minus the best baseline {display_name(base)} "
             f"({better} of {len(diff)} clients better; mean {diff['diff_points'].mean():+.2f} points)")
    return Table(name, title, display, diff)


def headline_table(head: pd.DataFrame, name: str = "headline") -> Table:
    display = pd.DataFrame({
        "Setting": head["group"], "Best baseline": [display_name(b) for b in head["baseline"]],
        "Accuracy gain (points)": [signed(x) for x in head["acc_gain_points"]],
        "Rounds to target": [less_more(x) for x in head["rounds_ratio"]],
        "Computation to target": [less_more(x) for x in head["flops_ratio"]],
        "Communication to target": [less_more(x) for x in head["bytes_ratio"]],
        "Target": [f"{pct(t)}% ({k})" for t, k in zip(head["target"], head["target_kind"])],
    })
    title = ("pFedLoRA against the best baseline, in the form of the paper's claims "
             "(+1.35 points accuracy, 11.81× less computation, 7.41× less communication)")
    return Table(name, title, display, head)


def sweep_table(df: pd.DataFrame, x: str, xlabel: str, name: str, title: str) -> Table:
    """Final accuracy (%) per method (rows) and sweep value (columns), mean +- std over seeds."""
    methods = sorted(dict.fromkeys(df["method"]), key=method_sort_key)
    values = sorted(dict.fromkeys(df[x]))
    display = pd.DataFrame({"Method": [display_name(m) for m in methods]})
    bold = pd.DataFrame({"Method": [False] * len(methods)})
    for v in values:
        sub = df[df[x] == v].set_index("method")
        label = f"{xlabel}={v:g}" if isinstance(v, (int, float)) else f"{xlabel}={v}"
        display[label] = [pct(sub.loc[m, "final_acc_mean"], sub.loc[m, "final_acc_std"]) if m in sub.index else "—"
                          for m in methods]
        best = sub["final_acc_mean"].max()
        bold[label] = [m in sub.index and sub.loc[m, "final_acc_mean"] == best for m in methods]
    return Table(name, title, display, df, bold if len(methods) > 1 else None)
