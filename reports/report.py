"""The report written at the end of every `bench run` (and by `bench report`): figures (PNG and PDF),
tables (Markdown, CSV, LaTeX), the data behind the curves (CSV), and a Markdown index showing all of them.

Runs are grouped by setting (the resolved config less seed and method, reports/results.py); settings that
share a label but differ elsewhere (e.g. rounds) are reported apart unless `pool` asks to pool them, and the
report says what it found. Per setting:
- accuracy_vs_round: mean test accuracy per round, one line per method (band: ± std across seeds);
- accuracy_vs_cost: the same against cumulative client training FLOPs and against bytes (two panels, log x);
- final_accuracy: final accuracy per method, mean ± std across seeds, beside the paired difference to the
  best baseline per seed (figure and table);
- client_difference: per-client accuracy of pFedLoRA minus the best baseline (figure and table);
- cost_to_target: rounds, computation, communication to reach the target, with ratios to pFedLoRA;
- claims: the paper's claimed figures beside the measured ones, against every baseline;
- cost_normalised: accuracy within matched FLOPs and bytes budgets, and of the worst clients, with 95% CIs.
Overview: accuracy_metrics, headline (the best baseline of each setting, the paper's claims beside it) and,
with several settings, the T1 table; file names then get a suffix per setting."""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench.store import ResultsStore
from reports import analysis, plots, tables
from reports.results import Group, Run, describe_settings, group_runs, label_runs, load_folder, split_note


@dataclass
class Item:
    """One output of a report: a figure (png + pdf [+ data csv]) or a table (md + csv + tex)."""

    kind: str                       # "figure" or "table"
    title: str
    files: list[Path]
    markdown: str = ""              # a table's Markdown body, shown inline in the index


@dataclass
class Section:
    heading: str
    items: list[Item] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    level: int = 2                  # Markdown heading level of the section (items one below)


def slug(text: str) -> str:
    text = text.replace("%", "").replace("·", "-")
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def figure_item(fig, out_dir: Path, stem: str, title: str, data: Path | None = None) -> Item:
    files = plots.save_figure(fig, out_dir, stem)
    return Item("figure", title, files + ([data] if data else []))


def table_item(table: tables.Table, out_dir: Path) -> Item:
    return Item("table", table.title, table.write(out_dir), table.markdown() +
                "".join(f"\n\n{n}" for n in table.notes))


def attempt(section: Section, what: str, make) -> None:
    """Add the item(s) `make()` returns; a failure becomes a note (and a warning), never an exception, so a
    report problem cannot fail the `bench run` whose results it draws."""
    try:
        made = make()
    except Exception as err:  # noqa: BLE001 - the report must not take the run down
        plots.plt.close("all")
        warnings.warn(f"report: {what} failed ({type(err).__name__}: {err})", stacklevel=2)
        section.notes.append(f"{what} could not be made: {type(err).__name__}: {err}")
        return
    for item in made if isinstance(made, list) else [made] if made else []:
        section.items.append(item)


def group_section(group: Group, out_dir: Path, suffix: str = "") -> Section:
    """Every figure and table of one setting."""
    section = Section(group.label)
    title = group.label
    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / f"accuracy_curves{suffix}.csv"

    def curve_figures() -> list[Item]:
        curves = analysis.curves(group)
        analysis.curves_long(group).to_csv(data, index=False)
        budgets = {kind: analysis.matched_budget(group, kind) for kind in analysis.COSTS}
        return [figure_item(plots.accuracy_vs_round(curves, title), out_dir, f"accuracy_vs_round{suffix}",
                            "Mean test accuracy vs round", data),
                figure_item(plots.accuracy_vs_costs(curves, title, budgets), out_dir, f"accuracy_vs_cost{suffix}",
                            "Accuracy vs cumulative client training FLOPs and bytes (up + down)", data)]

    def final_accuracy() -> list[Item]:
        acc = analysis.accuracy_table([group])
        _, seed_diffs = analysis.seed_differences(group)
        figure = plots.final_accuracy_dots(acc, title, analysis.paired_differences(group), seed_diffs)
        return [figure_item(figure, out_dir, f"final_accuracy{suffix}",
                            "Final accuracy per method, and paired by seed against the best baseline"),
                table_item(tables.accuracy_metrics_table(acc, f"final_accuracy{suffix}"), out_dir)]

    def client_difference() -> list[Item]:
        diff, ours, base = analysis.client_difference(group)
        if not len(diff):
            if ours is None:
                section.notes.append("No pFedLoRA run in this setting: no per-client difference and no ratios.")
            return []
        return [figure_item(plots.client_difference_dots(diff, ours, base, title), out_dir,
                            f"client_difference{suffix}",
                            "Per-client accuracy difference, pFedLoRA minus the best baseline"),
                table_item(tables.client_difference_table(diff, ours, base, f"client_difference{suffix}", title),
                           out_dir)]

    def cost() -> list[Item]:
        result = analysis.cost_to_target(group)
        items = [figure_item(plots.cost_dots(result, title), out_dir, f"cost_to_target{suffix}",
                             "Rounds, computation and communication to reach the target accuracy"),
                 table_item(tables.cost_table(result, f"cost_to_target{suffix}", title), out_dir)]
        claims = analysis.claims(group)
        if len(claims):
            items.append(table_item(tables.claims_table(claims, f"claims{suffix}", title), out_dir))
        return items

    def cost_normalised() -> Item:
        table, budgets = analysis.cost_normalised(group)
        return table_item(tables.cost_normalised_table(table, budgets, f"cost_normalised{suffix}", title), out_dir)

    section.notes += [n for n in (split_note(group.params), partition_note(group)) if n] + group.notes
    attempt(section, "accuracy curves", curve_figures)
    attempt(section, "final accuracy", final_accuracy)
    attempt(section, "per-client difference", client_difference)
    attempt(section, "cost to target", cost)
    attempt(section, "cost-normalised comparison", cost_normalised)
    return section


def partition_note(group: Group) -> str:
    """Which client partition each seed used: the sha256 of its client index lists (data/portable.py), as
    recorded by the runs (runs from before partition hashes were recorded have none)."""
    by_seed = {run.seed: run.params.get("partition_hash") for runs in group.runs.values() for run in runs}
    by_seed = {seed: digest for seed, digest in sorted(by_seed.items()) if digest}
    if not by_seed:
        return ""
    if len(set(by_seed.values())) == 1 and len(by_seed) > 1:
        return f"Partition (sha256 of the client index lists): `{next(iter(by_seed.values()))}`, every seed."
    return "Partition (sha256 of the client index lists): " + "; ".join(
        f"seed {seed} `{digest}`" for seed, digest in by_seed.items()) + "."


def build_report(runs: list[Run], out_dir: Path, title: str = "Report", index_name: str = "report.md",
                 group_of: dict[str, str] | None = None, pool: bool = False,
                 echo: Callable[[str], None] | None = None) -> list[Path]:
    """Write every figure and table for these runs into out_dir; returns the files (index last). Runs of
    different settings are reported apart unless `pool`; what the grouping found goes to the index's overview
    and to `echo`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = label_runs(runs, group_of, pool)
    groups = group_runs(runs, pool)
    found = describe_settings(runs, pool)
    for line in found if echo else []:
        echo(line)
    sections: list[Section] = []
    overview = Section("Overview", notes=found)
    if groups:
        acc = analysis.accuracy_table(groups)
        if len(groups) > 1:
            attempt(overview, "T1 table", lambda: table_item(tables.final_accuracy_table(acc, "final_accuracy"),
                                                             out_dir))
        attempt(overview, "accuracy table", lambda: table_item(tables.accuracy_metrics_table(acc), out_dir))

        def headline():
            head = analysis.headline(groups)
            return table_item(tables.headline_table(head), out_dir) if len(head) else None

        attempt(overview, "headline table", headline)
    skipped = [r for r in runs if not r.finished]
    overview.notes += [f"Not included: {r.key} in {r.group} ({r.status}"
                       f"{': ' + str(r.summary['error']) if 'error' in r.summary else ''})" for r in skipped]
    if not groups:
        overview.notes.append("No finished run to report.")
    sections.append(overview)
    for group in groups:
        suffix = "" if len(groups) == 1 else "-" + slug(group.label)
        sections.append(group_section(group, out_dir, suffix))
    index = write_index(out_dir / index_name, title, sections)
    files = dict.fromkeys(f for s in sections for item in s.items for f in item.files)
    return [*files, index]


def write_index(path: Path, title: str, sections: list[Section], preamble: str = "") -> Path:
    """A Markdown page showing every figure (embedded PNG, links to PDF and data) and every table (inline,
    links to CSV and LaTeX)."""
    lines = [f"# {title}", ""]
    if preamble:
        lines += [preamble, ""]
    for section in sections:
        if not section.items and not section.notes:
            continue
        h = "#" * section.level
        lines += [f"{h} {section.heading}", ""]
        lines += [f"- {n}" for n in section.notes] + ([""] if section.notes else [])
        for item in section.items:
            rel = [relative(f, path.parent) for f in item.files]
            if item.kind == "figure":
                png = next(r for r in rel if r.endswith(".png"))
                links = " · ".join(f"[{Path(r).suffix[1:].upper()}{' data' if r.endswith('.csv') else ''}]({r})"
                                   for r in rel)
                lines += [f"{h}# {item.title}", "", f"![{item.title}]({png})", "", links, ""]
            else:
                links = " · ".join(f"[{Path(r).suffix[1:].upper()}]({r})" for r in rel)
                lines += [f"{h}# {item.title}", "", item.markdown, "", links, ""]
    path.write_text("\n".join(lines))
    return path


def relative(path: Path, base: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def run_report(root: Path, title: str) -> list[Path]:
    """Figures and tables for one results folder, into <root>/plots; returns the files written (the runner
    logs them as MLflow artifacts of the parent run)."""
    store = ResultsStore(root)
    return build_report(load_folder(store.root), store.plots_dir, title=f"Results: {title}" if title else "Results")
