"""Declarative recipes for the paper's tables and figures (SPEC section 4): each recipe is a grid of runs
(cells) plus the figures and tables it makes from them.

A cell is one `bench run` invocation of one algorithm with one seed in one setting. Its results folder is
`<out>/runs/<cell name>`, the name derived from its settings (readable part + hash of everything that
changes the numbers), so recipes share cells (T1, convergence and cost use the same runs), a finished cell
is reused instead of re-run, and a grid can be resumed or extended (more seeds, more methods) at any time.
A cell whose folder exists but did not finish is deleted (with its MLflow runs) and run again.

Scales: `full` is the SPEC protocol (500 rounds, E=10, batch 512, 3 seeds, both datasets, every method);
`smoke` is the same grid shrunk to finish on a 2-core CPU in minutes: 3 rounds, E=1, batch 64, 1 seed, a few
cheap methods, CIFAR-10 only, shorter sweeps, and a fixed stratified subset of the real CIFAR-10 images
(3000 train / 1000 test images; normalisation statistics measured on the subset).

A recipe may bring scales of its own: `transformer` compares the LoRA methods with pFedLoRA and the MHPFL
baselines on the heterogeneous ViT group (TRANSFORMER_SCALES: full = vit-hetero, 100 rounds, E=1, batch 64;
smoke = vit-small-hetero on the same CIFAR-10 subset, 3 rounds).
"""
from __future__ import annotations

import functools
import hashlib
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from reports import analysis, plots, tables
from reports.report import Item, Section, figure_item, slug, table_item, write_index
from bench.store import MLFLOW_DB, ResultsStore, default_tracking_uri, run_key
from reports.results import Group, Run, dataset_label, group_runs, load_folder, with_split


# ---- scales -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scale:
    name: str
    base: dict[str, Any]                      # RunConfig fields shared by every cell
    seeds: tuple[int, ...]
    methods: tuple[str, ...]                  # wanted; those not registered at run time are left out
    datasets: tuple[str, ...]
    settings: tuple[tuple[int, float], ...]   # (N, C) of T1, convergence and cost
    sweep_setting: tuple[int, float]          # (N, C) of the non-IID, sensitivity and ablation sweeps
    classes: dict[str, tuple[int, ...]]       # non-IID degree: classes per client, per dataset
    participation: tuple[float, ...]          # at N = participation_clients
    participation_clients: int
    ranks: tuple[int, ...]
    e_local: int                              # E_local of the epoch sweep (the run's E)
    epoch_diffs: tuple[int, ...]              # E_adapter - E_local
    subset: tuple[int, int] | None = None     # (train, test) images of a stratified subset of each dataset


# The six baselines the pFedLoRA paper compares: recipe content (which methods a T1 of the paper holds); how a
# method is shown (name, role, order, colour) comes from its class through the registry.
PAPER_BASELINES = ("feddistill", "fml", "fedkd", "lgfedavg", "fedgh", "fedapen")
# The peers' methods and the authors' successors under the same protocol: an extra block of T1 rows after the
# paper's seven (their table_order puts them there). On tv-hetero FedProto/FedTGP need a proto_dim.
PEER_METHODS = ("fedproto", "fedtgp", "fedmrl", "pfedes")
SCALES: dict[str, Scale] = {
    "full": Scale(
        name="full", base={"rounds": 500, "local_epochs": 10, "batch_size": 512}, seeds=(0, 1, 2),
        methods=("pfedlora", *PAPER_BASELINES, *PEER_METHODS, "standalone"), datasets=("cifar10", "cifar100"),
        settings=((10, 1.0), (50, 0.2), (100, 0.1)), sweep_setting=(100, 0.1),
        classes={"cifar10": (2, 4, 6, 8, 10), "cifar100": (10, 30, 50, 70, 90, 100)},
        participation=(0.1, 0.3, 0.5, 0.7, 0.9, 1.0), participation_clients=100,
        ranks=(8, 16, 32, 64, 128, 256), e_local=10, epoch_diffs=(-5, 0, 5, 10)),
    "smoke": Scale(
        name="smoke", base={"rounds": 3, "local_epochs": 1, "batch_size": 64}, seeds=(0,),
        methods=("pfedlora", "lgfedavg", "fedgh", "standalone"), datasets=("cifar10",),
        settings=((10, 1.0), (50, 0.2), (100, 0.1)), sweep_setting=(100, 0.1),
        classes={"cifar10": (2, 6, 10), "cifar100": (10, 50, 100)},
        participation=(0.1, 0.5, 1.0), participation_clients=100,
        ranks=(8, 64, 256), e_local=2, epoch_diffs=(-1, 0, 2), subset=(3000, 1000)),
}


# The transformer group (heterogeneous ViTs, LoRA): the heterogeneous-LoRA methods beside pFedLoRA, the MHPFL
# baselines that run on any architecture, and Standalone; T1's grid form on scales of its own.
TRANSFORMER_METHODS = ("pfedlora", "hetlora", "flora", "fedsalora", "fedgh", "lgfedavg", "standalone")
TRANSFORMER_SCALES: dict[str, Scale] = {
    "full": replace(SCALES["full"], base={"rounds": 100, "local_epochs": 1, "batch_size": 64,
                                          "model_group": "vit-hetero"},
                    methods=TRANSFORMER_METHODS, settings=((10, 1.0), (50, 0.2))),
    "smoke": replace(SCALES["smoke"], base={"rounds": 3, "local_epochs": 1, "batch_size": 64,
                                            "model_group": "vit-small-hetero"},
                     methods=TRANSFORMER_METHODS, settings=((10, 1.0),)),
}


def default_classes(dataset: str) -> int:
    """SPEC: 2 classes per client for CIFAR-10, 10 for CIFAR-100."""
    return 10 if dataset == "cifar100" else 2


# ---- cells ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    dataset: str                   # logical name (cifar10, cifar100, synthetic, PATH.npz)
    settings: tuple                # sorted (field, value) pairs of RunConfig overrides
    algorithm: str
    hparams: tuple                 # sorted (name, value) pairs of the algorithm's hyper-parameters
    seed: int
    group: str                     # the setting's label in tables and figures
    method: str                    # the method's label (algorithm, or a variant such as 'pfedlora (joint)')
    x: Any = None                  # the swept value (sweep recipes)
    subset: tuple[int, int] | None = None
    mark: str = ""                 # '' at full scale, else e.g. 'SMOKE scale (3 rounds)': in every title and table

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.settings)

    def identity(self, sets: tuple[str, ...] = ()) -> dict[str, Any]:
        return cell_identity(self, tuple(sets))

    def key(self, sets: tuple[str, ...] = ()) -> str:
        """Hash of the resolved configuration (defaults filled in), less what does not change the numbers
        (device, paths, tracking), so two recipes asking for the same run share it."""
        payload = json.dumps(self.identity(sets), sort_keys=True, default=str)
        return hashlib.sha1(payload.encode()).hexdigest()[:8]

    def name(self, sets: tuple[str, ...] = ()) -> str:
        c = self.identity(sets)["config"]
        hp = self.identity(sets)["non_default_hparams"]
        parts = [Path(self.dataset).stem.replace(":", "") + (f"sub{self.subset[0]}" if self.subset else ""),
                 *([c["model_group"]] if c.get("model_group", DEFAULT_GROUP) != DEFAULT_GROUP else []),
                 f"N{c['num_clients']}", f"C{c['participation']:g}", f"k{c['classes_per_client']}",
                 self.algorithm, *(f"{k}{v}" for k, v in sorted(hp.items())), f"s{self.seed}", self.key(sets)]
        return "-".join(str(p).replace("/", "_") for p in parts)


DEFAULT_GROUP = "cnn-hetero"  # RunConfig's default model group: left out of cell names (others are in them)

# RunConfig options under every cell's own: every image of the cell's dataset, never the quick preset's subset
# (the full scale is the SPEC protocol; a smoke scale's subset is its dataset file, subset_dataset).
CELL_OPTIONS: dict[str, Any] = {"subset": []}

# Results-changing RunConfig fields that a cell's identity holds apart from its "config" (in its own terms).
OWN_ENTRIES = ("algorithms", "seeds", "algo", "dataset")


@functools.lru_cache(maxsize=None)
def cell_identity(c: "Cell", sets: tuple[str, ...]) -> dict[str, Any]:
    from bench.config import load_config, results_fields
    from bench.registry import resolve_algorithms

    options: dict[str, Any] = {**CELL_OPTIONS, **c.config, "algorithms": [c.algorithm], "seeds": [c.seed]}
    if c.hparams:
        options[c.algorithm] = dict(c.hparams)
    cfg = load_config(None, "quick", list(sets), options)
    cls = resolve_algorithms([c.algorithm])[0]
    hparams = vars(cls.hparams_for(cfg))
    defaults = vars(cls.make_hparams(None))
    return {"dataset": c.dataset, "subset": c.subset, "algorithm": cls.name, "seed": c.seed, "hparams": hparams,
            "non_default_hparams": {k: v for k, v in hparams.items() if defaults.get(k) != v},
            "config": {k: v for k, v in cfg.to_dict().items() if k in results_fields() and k not in OWN_ENTRIES}}


def cell(scale: Scale, dataset: str, algorithm: str, seed: int, group: str, settings: dict[str, Any], *,
         hparams: dict | None = None, method: str | None = None, x: Any = None) -> Cell:
    """A cell of `scale`: `settings` (RunConfig fields: num_clients, participation, ...) over the scale's base
    and the dataset's default classes per client."""
    settings = {**scale.base, "classes_per_client": default_classes(dataset), **settings}
    mark = scale_mark(scale)
    return Cell(dataset, tuple(sorted(settings.items())), algorithm, tuple(sorted((hparams or {}).items())), seed,
                group + (f" · {mark}" if mark else ""), method or algorithm, x, scale.subset, mark)


def scale_mark(scale: Scale) -> str:
    """'' at full scale (the SPEC protocol); else what every title and table of it must say."""
    if scale.name == "full":
        return ""
    return f"{scale.name.upper()} scale ({scale.base.get('rounds', '?')} rounds)"


def marked(table: tables.Table, cells: dict[str, Cell]) -> tables.Table:
    """The table with its cells' scale mark in front of its title (a smoke-scale table says so)."""
    mark = next((c.mark for c in cells.values() if c.mark), "")
    if mark and mark not in table.title:
        table.title = f"{mark}: {table.title}"
    return table


def data_label(scale: Scale, dataset: str) -> str:
    """CIFAR-10, or 'CIFAR-10 subset 3000/1000' at a scale that uses a subset (so no table passes it off as
    the full dataset)."""
    label = dataset_label(dataset)
    return f"{label} subset {scale.subset[0]}/{scale.subset[1]}" if scale.subset else label


def setting_group(scale: Scale, dataset: str, n: int, c: float, classes: int | None = None) -> str:
    """'CIFAR-10 · N=10, C=100%, 2 classes/client', and the model group where the scale sets one."""
    group = scale.base.get("model_group")
    return (f"{data_label(scale, dataset)} · N={n}, C={100 * c:g}%, "
            f"{classes or default_classes(dataset)} classes/client" + (f", {group}" if group else ""))


# ---- recipes ----------------------------------------------------------------------------------------------------
@dataclass
class Recipe:
    name: str
    spec: str                      # the SPEC section 4 item it regenerates
    description: str
    grid: Callable[[Scale, list[str]], list[Cell]]
    make: Callable[[list[Run], dict[str, Cell], Path], list[Section]]
    scales: dict[str, Scale] | None = None   # the recipe's own scales by name (None: the common SCALES)


def recipe_scale(recipe: Recipe, scale: Scale) -> Scale:
    """The recipe's own scale of `scale`'s name (the transformer group's), else `scale` itself."""
    return (recipe.scales or {}).get(scale.name, scale)


def methods_of(scale: Scale, registered: list[str]) -> list[str]:
    return [m for m in scale.methods if m in registered]


def t1_grid(scale: Scale, methods: list[str]) -> list[Cell]:
    return [cell(scale, d, m, s, setting_group(scale, d, n, c), {"num_clients": n, "participation": c})
            for d in scale.datasets for (n, c) in scale.settings for m in methods for s in scale.seeds]


def sweep_grid(scale: Scale, methods: list[str], values: Callable[[str], tuple], make_cell) -> list[Cell]:
    return [make_cell(d, m, s, v) for d in scale.datasets for v in values(d) for m in methods for s in scale.seeds]


def noniid_grid(scale: Scale, methods: list[str]) -> list[Cell]:
    n, c = scale.sweep_setting
    return sweep_grid(scale, methods, lambda d: scale.classes.get(d, (default_classes(d),)),
                      lambda d, m, s, k: cell(scale, d, m, s, f"{data_label(scale, d)} · N={n}, C={100 * c:g}%",
                                              {"num_clients": n, "participation": c, "classes_per_client": k}, x=k))


def participation_grid(scale: Scale, methods: list[str]) -> list[Cell]:
    n = scale.participation_clients
    return sweep_grid(scale, methods, lambda d: scale.participation,
                      lambda d, m, s, c: cell(scale, d, m, s, f"{data_label(scale, d)} · N={n}, "
                                              f"{default_classes(d)} classes/client",
                                              {"num_clients": n, "participation": c}, x=c))


def proposed_only(methods: list[str]) -> list[str]:
    return [m for m in methods if m == "pfedlora"]


def rank_grid(scale: Scale, methods: list[str]) -> list[Cell]:
    n, c = scale.sweep_setting
    return sweep_grid(scale, proposed_only(methods), lambda d: scale.ranks,
                      lambda d, m, s, r: cell(scale, d, m, s, setting_group(scale, d, n, c),
                                              {"num_clients": n, "participation": c}, hparams={"rank": r}, method=m,
                                              x=r))


def epochs_grid(scale: Scale, methods: list[str]) -> list[Cell]:
    n, c = scale.sweep_setting
    e = scale.e_local
    return sweep_grid(scale, proposed_only(methods), lambda d: tuple(k for k in scale.epoch_diffs if e + k >= 1),
                      lambda d, m, s, k: cell(scale, d, m, s, setting_group(scale, d, n, c),
                                              {"num_clients": n, "participation": c, "local_epochs": e},
                                              hparams={"local_epochs": e, "adapter_epochs": e + k}, method=m, x=k))


def ablation_grid(scale: Scale, methods: list[str]) -> list[Cell]:
    n, c = scale.sweep_setting
    return sweep_grid(scale, proposed_only(methods), lambda d: ("iterative", "joint"),
                      lambda d, m, s, mode: cell(scale, d, m, s, setting_group(scale, d, n, c),
                                                 {"num_clients": n, "participation": c}, hparams={"training": mode},
                                                 method=f"{m} ({mode})", x=mode))


# ---- what each recipe makes -------------------------------------------------------------------------------------
def groups_of(runs: list[Run]) -> list[Group]:
    return group_runs(runs)


def suffix_of(group: Group, many: bool) -> str:
    """A file-name suffix per setting (without the scale mark, which every setting of a recipe shares)."""
    return "-" + slug(re.sub(r" · [A-Z]+ scale \(.*\)$", "", group.label)) if many else ""


def make_t1(runs, cells, out: Path) -> list[Section]:
    groups = groups_of(runs)
    acc = analysis.accuracy_table(groups)
    section = Section("T1: final accuracy")
    if groups:
        for name, metric, what in (("t1_final_accuracy", "final_acc", "Final"),
                                   ("t1_best_accuracy", "best_acc", "Best-over-rounds"),
                                   ("t1_val_selected_accuracy", "val_selected_acc", "Validation-selected")):
            table = tables.final_accuracy_table(acc, name, metric, what)
            section.items.append(table_item(marked(table, cells), out))
        section.items.append(table_item(marked(tables.accuracy_metrics_table(acc, "t1_paired"), cells), out))
        mark = next((c.mark for c in cells.values() if c.mark), "")
        title = "T1: final accuracy per method and setting" + (f" · {mark}" if mark else "")
        section.items.append(figure_item(plots.grouped_accuracy_dots(acc, title), out, "t1_final_accuracy",
                                         "Final accuracy per method and setting"))
    return [section]


def make_convergence(runs, cells, out: Path) -> list[Section]:
    groups = groups_of(runs)
    sections = []
    for group in groups:
        sfx = suffix_of(group, len(groups) > 1)
        section = Section(f"Convergence: {group.label}")
        data = out / f"accuracy_curves{sfx}.csv"
        out.mkdir(parents=True, exist_ok=True)
        analysis.curves_long(group).to_csv(data, index=False)
        section.items.append(figure_item(plots.accuracy_vs_round(analysis.curves(group), group.label), out,
                                         f"accuracy_vs_round{sfx}", "Mean test accuracy vs round", data))
        diff, ours, base = analysis.client_difference(group)
        if len(diff):
            section.items.append(figure_item(plots.client_difference_dots(diff, ours, base, group.label), out,
                                             f"client_difference{sfx}", "Per-client accuracy: pFedLoRA minus the "
                                             "best baseline"))
            table = tables.client_difference_table(diff, ours, base, f"client_difference{sfx}", group.label)
            section.items.append(table_item(marked(table, cells), out))
        sections.append(section)
    return sections


def make_cost(runs, cells, out: Path) -> list[Section]:
    groups = groups_of(runs)
    head = analysis.headline(groups)
    overview = Section("Cost: pFedLoRA vs the best baseline")
    if len(head):
        overview.items.append(table_item(marked(tables.headline_table(head, "cost_headline"), cells), out))
    sections = [overview]
    for group in groups:
        sfx = suffix_of(group, len(groups) > 1)
        section = Section(f"Cost to target: {group.label}")
        cost = analysis.cost_to_target(group)
        section.items.append(table_item(marked(tables.cost_table(cost, f"cost_to_target{sfx}", group.label),
                                               cells), out))
        section.items.append(figure_item(plots.cost_dots(cost, group.label), out, f"cost_to_target{sfx}",
                                         "Rounds, computation and communication to reach the target"))
        claims = analysis.claims(group)
        if len(claims):
            section.items.append(table_item(marked(tables.claims_table(claims, f"claims{sfx}", group.label), cells),
                                            out))
        normalised, budgets = analysis.cost_normalised(group)
        section.items.append(table_item(marked(tables.cost_normalised_table(
            normalised, budgets, f"cost_normalised{sfx}", group.label), cells), out))
        data = out / f"accuracy_curves{sfx}.csv"
        analysis.curves_long(group).to_csv(data, index=False)
        section.items.append(figure_item(plots.accuracy_vs_costs(analysis.curves(group), group.label, budgets), out,
                                         f"accuracy_vs_cost{sfx}", "Accuracy vs cumulative client training FLOPs "
                                         "and bytes (up + down)", data))
        sections.append(section)
    return sections


def sweep_frame(runs: list[Run], cells: dict[str, Cell]) -> pd.DataFrame:
    """One row per (dataset, method, swept value): accuracies (mean, std over seeds) and costs per round."""
    buckets: dict[tuple, list[Run]] = {}
    for run in runs:
        c = cells[run.source]
        if run.finished:
            buckets.setdefault((dataset_label(c.dataset), run.group or c.group, run.method, c.x), []).append(run)
    rows = []
    for (dataset, group, method, x), members in buckets.items():
        accs = [analysis.run_accuracies(r) for r in members]
        last = [analysis.cost_columns(r.metrics).iloc[-1] for r in members]
        rounds = float(np.mean([r.metrics["step"].max() for r in members]))
        row = {"dataset": dataset, "group": group, "method": method, "x": x, "seeds": len(members)}
        for metric in analysis.METRICS:
            row[f"{metric}_mean"], row[f"{metric}_seed_std"] = analysis.mean_std([a[metric] for a in accs])
        row["train_flops_per_round"] = float(np.mean([v["cum_train_flops"] for v in last])) / max(rounds, 1)
        row["bytes_per_round"] = float(np.mean([v["cum_bytes"] for v in last])) / max(rounds, 1)
        rows.append(row)
    return pd.DataFrame(rows)


def make_sweep(heading: str, xlabel: str, short: str, stem: str, log2: bool = False, costs: bool = False):
    def make(runs, cells, out: Path) -> list[Section]:
        df = sweep_frame(runs, cells)
        sections = []
        for group in (dict.fromkeys(df["group"]) if len(df) else []):
            sub = df[df["group"] == group]
            sfx = "-" + slug(str(sub["dataset"].iloc[0])) if df["group"].nunique() > 1 else ""
            section = Section(f"{heading}: {group}")
            title = f"{heading}\n{group}"
            section.items.append(figure_item(plots.sweep_lines(sub, "x", xlabel, title, log2=log2), out,
                                             f"{stem}{sfx}", f"{heading}: final accuracy vs {xlabel}"))
            if costs:
                section.items.append(figure_item(plots.cost_per_round_lines(sub, "x", xlabel, title, log2=log2), out,
                                                 f"{stem}_cost{sfx}", f"{heading}: cost per round vs {xlabel}"))
            table = tables.sweep_table(sub, "x", short, f"{stem}{sfx}",
                                       f"Final mean test accuracy (%) vs {xlabel}, mean ± std across seeds over "
                                       f"{int(sub['seeds'].max())} seed(s) ({group})")
            section.items.append(table_item(marked(table, cells), out))
            sections.append(section)
        return sections
    return make


def make_ablation(runs, cells, out: Path) -> list[Section]:
    groups = groups_of(runs)
    sections = []
    for group in groups:
        sfx = suffix_of(group, len(groups) > 1)
        section = Section(f"Ablation, iterative vs joint training: {group.label}")
        data = out / f"ablation_curves{sfx}.csv"
        out.mkdir(parents=True, exist_ok=True)
        analysis.curves_long(group).to_csv(data, index=False)
        section.items.append(figure_item(plots.accuracy_vs_round(analysis.curves(group), group.label,
                                                                 "Ablation: iterative vs joint training"), out,
                                         f"ablation_accuracy_vs_round{sfx}",
                                         "Iterative (alternating) vs joint training: accuracy vs round", data))
        df = sweep_frame([r for rs in group.runs.values() for r in rs], cells)
        df = df.assign(method="pfedlora")
        display = pd.DataFrame({
            "Training": df["x"], "Final acc. (%)": [tables.pct(a, b) for a, b in zip(df["final_acc_mean"],
                                                                                    df["final_acc_seed_std"])],
            "Best acc. (%)": [tables.pct(a, b) for a, b in zip(df["best_acc_mean"], df["best_acc_seed_std"])],
            "Client FLOPs per round": [tables.eng(v, "FLOP") for v in df["train_flops_per_round"]],
            "Bytes per round": [tables.eng(v, "B") for v in df["bytes_per_round"]],
            "Seeds": df["seeds"]})
        table = tables.Table(f"ablation{sfx}", f"pFedLoRA, iterative vs joint training of F_k and the adapter "
                             f"({group.label}); accuracies mean ± std across seeds", display, df)
        section.items.append(table_item(marked(table, cells), out))
        sections.append(section)
    return sections


def make_transformer(runs, cells, out: Path) -> list[Section]:
    """Every method on the transformer group: final accuracy per setting, then per setting the measured totals
    (cost_summary), accuracy against cumulative FLOPs and bytes, and accuracy against rounds."""
    groups = groups_of(runs)
    overview = Section("Transformer group: final accuracy")
    if groups:
        acc = analysis.accuracy_table(groups)
        overview.items.append(table_item(marked(tables.final_accuracy_table(acc, "transformer_final_accuracy"),
                                                cells), out))
    sections = [overview]
    for group in groups:
        sfx = suffix_of(group, len(groups) > 1)
        section = Section(f"Transformer group: {group.label}")
        summary = analysis.cost_summary(group)
        section.items.append(table_item(marked(tables.cost_summary_table(summary, f"transformer_cost{sfx}",
                                                                         group.label), cells), out))
        data = out / f"accuracy_curves{sfx}.csv"
        out.mkdir(parents=True, exist_ok=True)
        analysis.curves_long(group).to_csv(data, index=False)
        curves = analysis.curves(group)
        section.items.append(figure_item(plots.accuracy_vs_costs(curves, group.label), out, f"accuracy_vs_cost{sfx}",
                                         "Accuracy vs cumulative client training FLOPs and bytes (up + down)", data))
        section.items.append(figure_item(plots.accuracy_vs_round(curves, group.label, first_round=1), out,
                                         f"accuracy_vs_round{sfx}", "Mean test accuracy vs round (from round 1)"))
        sections.append(section)
    return sections


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("t1", "T1", "final accuracy, methods x datasets x settings (N, C), mean ± std over seeds",
           t1_grid, make_t1),
    Recipe("convergence", "Convergence", "accuracy vs round per method; per-client difference pFedLoRA minus "
           "the best baseline (same runs as t1)", t1_grid, make_convergence),
    Recipe("cost", "Cost", "rounds, computation and communication to the target accuracy, ratios pFedLoRA vs "
           "each baseline; accuracy vs cumulative FLOPs and bytes (same runs as t1)", t1_grid, make_cost),
    Recipe("noniid", "Non-IID degree", "final accuracy vs classes per client", noniid_grid,
           make_sweep("Non-IID degree", "classes per client", "k", "noniid")),
    Recipe("participation", "Participation", "final accuracy vs participation rate C at N = 100",
           participation_grid, make_sweep("Participation", "participation rate C", "C", "participation")),
    Recipe("rank", "Sensitivity (rank)", "pFedLoRA: final accuracy and cost per round vs adapter rank r",
           rank_grid, make_sweep("Adapter rank", "adapter rank r", "r", "rank", log2=True, costs=True)),
    Recipe("epochs", "Sensitivity (epochs)", "pFedLoRA: final accuracy vs E_adapter - E_local",
           epochs_grid, make_sweep("Adapter epochs", "E_adapter − E_local", "ΔE", "epochs")),
    Recipe("ablation", "Ablation", "pFedLoRA: iterative (alternating) vs joint training of F_k and the adapter",
           ablation_grid, make_ablation),
    Recipe("transformer", "Transformer group", "pFedLoRA, HetLoRA, FLoRA, FedSA-LoRA, FedGH, LG-FedAvg and "
           "Standalone on heterogeneous ViTs: final accuracy, measured FLOPs and bytes, accuracy vs cost and vs "
           "round", t1_grid, make_transformer, scales=TRANSFORMER_SCALES),
]}


# ---- running a recipe -------------------------------------------------------------------------------------------
@dataclass
class Context:
    out: Path
    scale: Scale
    seeds: tuple[int, ...] | None = None
    algorithms: tuple[str, ...] | None = None
    options: dict[str, Any] = field(default_factory=dict)   # RunConfig options for every cell (device, data_dir)
    sets: tuple[str, ...] = ()                                # --set KEY=VALUE for every cell
    progress: bool = True
    echo: Callable[[str], None] = print
    executor: Any = None                                      # a bench.executors.Executor (or its options); None: local

    @property
    def runs_dir(self) -> Path:
        return self.out / "runs"

    @property
    def tracking_uri(self) -> str:
        return default_tracking_uri(self.runs_dir)

    @property
    def experiment(self) -> str:
        return f"mhpfl-paper-{self.scale.name}"

    def effective_scale(self, recipe: Recipe | None = None) -> Scale:
        """The scale, or `recipe`'s own of that name, with the seeds and methods given on the command line."""
        scale = recipe_scale(recipe, self.scale) if recipe is not None else self.scale
        if self.seeds:
            scale = replace(scale, seeds=tuple(self.seeds))
        if self.algorithms:
            scale = replace(scale, methods=tuple(self.algorithms))
        return scale


def registered_methods() -> list[str]:
    from bench.registry import algorithms

    return list(algorithms())


def recipe_cells(recipe: Recipe, ctx: Context) -> list[Cell]:
    scale = ctx.effective_scale(recipe)
    methods = methods_of(scale, registered_methods()) if not ctx.algorithms else list(scale.methods)
    return recipe.grid(scale, methods)


def cell_status(root: Path, c: Cell) -> str:
    """'done' (finished: reuse), 'partial' (folder without a finished run: delete and re-run) or 'missing'."""
    if not root.exists():
        return "missing"
    return "done" if ResultsStore(root).listed_as_finished(run_key(c.algorithm, c.seed)) else "partial"


def subset_dataset(name: str, subset: tuple[int, int], data_dir: str | None, cache: Path) -> str:
    """A stratified subset of a real dataset as an .npz (written once, then reused): the first
    n/K images of each class after a fixed shuffle, for train and test."""
    n_train, n_test = subset
    path = cache / f"{Path(name).stem}-subset-{n_train}-{n_test}.npz"
    if path.exists():
        with np.load(path) as old:
            if "split" in old.files:  # written before subsets recorded their source's split: write it again
                return str(path)
    from data.sources import load_dataset

    ds = load_dataset(name, Path(data_dir) if data_dir else None)
    rng = np.random.default_rng(0)

    def pick(y: np.ndarray, n: int) -> np.ndarray:
        per = max(1, n // ds.num_classes)
        idx = [rng.permutation(np.flatnonzero(y == k))[:per] for k in range(ds.num_classes)]
        return np.sort(np.concatenate(idx))

    tr, te = pick(ds.y_train, n_train), pick(ds.y_test, n_test)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x_train=ds.x_train[tr], y_train=ds.y_train[tr], x_test=ds.x_test[te], y_test=ds.y_test[te],
             classes=np.array(ds.classes), split=np.array(ds.split))  # the subset keeps its source's split
    tmp.replace(path)
    return str(path)


def drop_cell(root: Path, name: str, ctx: Context) -> None:
    """Delete a cell that did not finish: its folder and its MLflow runs (parent and children)."""
    ResultsStore(root).remove()
    client, exp_id = mlflow_client(ctx)
    if client is None:
        return
    for run in cell_runs(client, exp_id, name):
        client.delete_run(run.info.run_id)


def mlflow_client(ctx: Context):
    if not (ctx.runs_dir / MLFLOW_DB).exists():
        return None, None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(ctx.tracking_uri)
    exp = client.get_experiment_by_name(ctx.experiment)
    return (client, exp.experiment_id) if exp is not None else (None, None)


def cell_runs(client, exp_id: str, name: str) -> list:
    """The active MLflow runs of cell `name`: its invocation's parent (named after the cell) and runs, or, once
    tagged, the runs tagged `cell` (a one-run cell's run is no longer nested: tag_cell)."""
    found = {}
    for query in (f"attributes.run_name = '{name}'", f"tags.cell = '{name}'", f"tags.`bench.invocation` = '{name}'"):
        for run in client.search_runs([exp_id], filter_string=query):
            found[run.info.run_id] = run
    for parent in [r for r in found.values() if r.data.tags.get("bench.kind") == "invocation"]:
        for child in client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"):
            found[child.info.run_id] = child
    return list(found.values())


def cell_run_name(c: Cell, sets: tuple[str, ...] = ()) -> str:
    """What tells a cell's run apart first (method, N, C), then classes per client, seed and data."""
    cfg = c.identity(sets)["config"]
    data = Path(c.dataset).stem.replace(":", "") + (f" sub{c.subset[0]}" if c.subset else "")
    return (f"{c.method} · N={cfg['num_clients']} · C={cfg['participation']:g} · k={cfg['classes_per_client']} · "
            f"seed{c.seed} · {data}")


def tag_cell(name: str, c: Cell, recipe: str, ctx: Context) -> None:
    """MLflow tags for the dashboards: recipe (every recipe that used the cell), scale, cell, the swept value.
    A cell is one run: it is shown as one top-level run named by cell_run_name, not nested under a parent
    that only repeats it (the parent is deleted; the results folder keeps everything)."""
    client, exp_id = mlflow_client(ctx)
    if client is None:
        return
    runs = cell_runs(client, exp_id, name)
    parents = [r for r in runs if r.data.tags.get("bench.kind") == "invocation"]
    members = [r for r in runs if r not in parents]
    used = set()
    for run in runs:
        used |= set(filter(None, run.data.tags.get("recipe", "").split(",")))
    tags = {"recipe": ",".join(sorted(used | {recipe})), "scale": ctx.scale.name, "cell": name,
            "group": c.group, "method": c.method}
    if c.x is not None:
        tags["sweep_value"] = str(c.x)
    label = cell_run_name(c, ctx.sets)
    for run in members:
        for k, v in tags.items():
            client.set_tag(run.info.run_id, k, v)
        if run.info.run_name != label:
            client.update_run(run.info.run_id, name=label)
        if len(members) == 1 and "mlflow.parentRunId" in run.data.tags:
            client.delete_tag(run.info.run_id, "mlflow.parentRunId")
    for parent in parents if len(members) == 1 else []:
        client.delete_run(parent.info.run_id)


def log_recipe_run(name: str, out: Path, ctx: Context, manifest: dict[str, Any]) -> None:
    """One MLflow run per recipe holding its tables, figures and manifest (the recipe's earlier run is
    replaced); its cells' runs carry the tag recipe=<name>."""
    from bench.callbacks.mlflow_meta import common_tags

    client, exp_id = mlflow_client(ctx)
    if client is None:
        return
    query = f"tags.`bench.kind` = 'recipe' and tags.recipe = '{name}'"
    for old in client.search_runs([exp_id], filter_string=query):
        client.delete_run(old.info.run_id)
    counts = manifest.get("counts", {})
    note = (f"Recipe `{name}` ({RECIPES[name].spec}): {RECIPES[name].description}. Scale {ctx.scale.name}; "
            f"{len(manifest.get('cells', []))} runs ({counts.get('ran', 0)} run, {counts.get('reused', 0)} reused, "
            f"{counts.get('failed', 0)} failed); its runs: filter tags.recipe LIKE '%{name}%'.")
    run = client.create_run(exp_id, run_name=f"{name} · {ctx.scale.name}",
                            tags={"bench.kind": "recipe", "recipe": name, "scale": ctx.scale.name,
                                  "role": "recipe", **common_tags(note)})
    run_id = run.info.run_id
    client.log_param(run_id, "seeds", ",".join(map(str, manifest.get("seeds", []))))
    client.log_param(run_id, "methods", ",".join(manifest.get("methods", [])))
    for key, value in {**counts, "wall_s": manifest.get("wall_s", 0)}.items():
        client.log_metric(run_id, key, float(value))
    client.log_artifacts(run_id, str(out))
    client.set_terminated(run_id, "FINISHED")


def plan_cell(c: Cell, ctx: Context, datasets: dict[str, str]) -> tuple[dict[str, Any], Any]:
    """The cell's manifest record and the config to run (None: a finished cell, reused). A cell that did
    not finish is deleted first, with its MLflow runs."""
    from bench.config import load_config

    name = c.name(ctx.sets)
    root = ctx.runs_dir / name
    status = cell_status(root, c)
    record: dict[str, Any] = {"cell": name, "algorithm": c.algorithm, "method": c.method, "seed": c.seed,
                              "group": c.group, "x": c.x}
    if status == "done":
        record["status"] = "reused"
        return record, None
    if status == "partial":
        ctx.echo(f"{name}: unfinished results found, deleting and running again")
        drop_cell(root, name, ctx)
    options = {**CELL_OPTIONS, **c.config, **ctx.options, "dataset": datasets[c.dataset], "algorithms": [c.algorithm],
               "seeds": [c.seed], "output_dir": str(ctx.runs_dir), "run_name": name, "experiment": ctx.experiment}
    if c.hparams:
        options[c.algorithm] = dict(c.hparams)
    return record, load_config(None, "quick", list(ctx.sets), options)


def run_cells(name: str, cells: list[Cell], ctx: Context, datasets: dict[str, str]) -> list[dict[str, Any]]:
    """Run the cells that are not finished: one after the other, or all at once where the executor runs a
    grid's runs together (Ray: the cells then share the grid's wall time); then tag every cell's MLflow runs
    and record its config."""
    from bench import runner
    from bench.executors import make_executor

    executor = make_executor(ctx.executor)
    plans = [plan_cell(c, ctx, datasets) for c in cells]
    todo = [(record, cfg) for record, cfg in plans if cfg is not None]
    batches = [todo] if executor.concurrent and todo else [[item] for item in todo]
    for i, batch in enumerate(batches, 1):
        if not executor.concurrent:
            ctx.echo(f"[{name} {i}/{len(todo)}] {batch[0][0]['cell']}")
        start = time.perf_counter()
        outcomes = runner.run_invocations([cfg for _, cfg in batch], show_progress=ctx.progress, executor=executor)
        wall = round(time.perf_counter() - start, 2)
        for (record, _), outcome in zip(batch, outcomes):
            record["wall_s"] = wall
            record["status"] = "failed" if outcome.failed else "ran"
            if outcome.failed:
                record["error"] = "; ".join(outcome.failed.values())
    for c, (record, _) in zip(cells, plans):
        tag_cell(record["cell"], c, name, ctx)
        record["config"] = ResultsStore(ctx.runs_dir / record["cell"]).config() or None
    return [record for record, _ in plans]


def run_recipe(name: str, ctx: Context, dry_run: bool = False) -> dict[str, Any]:
    """Run (or reuse) every cell of a recipe, then write its figures and tables, its manifest, and the
    index of the whole reports folder. Returns the manifest."""
    recipe = RECIPES[name]
    scale = ctx.effective_scale(recipe)
    cells = recipe_cells(recipe, ctx)
    if not cells:
        raise ValueError(f"recipe {name}: empty grid (no registered method among {', '.join(scale.methods)})")
    if dry_run:
        for c in cells:
            ctx.echo(f"{cell_status(ctx.runs_dir / c.name(ctx.sets), c):8s} {c.name(ctx.sets)}")
        return {}
    start = time.perf_counter()
    data_dir = ctx.options.get("data_dir")
    datasets = {d: (subset_dataset(d, scale.subset, data_dir, ctx.out / "data") if scale.subset else d)
                for d in dict.fromkeys(c.dataset for c in cells)}
    records = run_cells(name, cells, ctx, datasets)
    runs, by_source = collect(cells, ctx)
    out = ctx.out / name
    if out.exists():
        shutil.rmtree(out)
    sections = recipe.make(runs, by_source, out)
    manifest = write_manifest(out, name, ctx, records, datasets, time.perf_counter() - start)
    save_sections(out, sections)
    log_recipe_run(name, out, ctx, manifest)
    write_paper_index(ctx.out)
    return manifest


def collect(cells: list[Cell], ctx: Context) -> tuple[list[Run], dict[str, Cell]]:
    """The runs of the cells, labelled with the cells' groups and methods."""
    runs, by_source = [], {}
    for c in cells:
        for run in load_folder(ctx.runs_dir / c.name(ctx.sets)):
            if run.algorithm != c.algorithm or run.seed != c.seed:
                continue
            run.group, run.method = with_split(c.group, run.params), c.method
            runs.append(run)
            by_source[run.source] = c
    return runs, by_source


# ---- manifest and index -----------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("mhpfl-bench", "torch", "torchvision", "numpy", "pandas", "matplotlib", "mlflow", "click"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def git_state() -> dict[str, Any]:
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": bool(dirty)}


def host() -> dict[str, Any]:
    import os

    import torch

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def write_manifest(out: Path, name: str, ctx: Context, records: list[dict], datasets: dict[str, str],
                   wall: float) -> dict[str, Any]:
    scale = ctx.effective_scale(RECIPES[name])
    manifest = {
        "recipe": name, "spec_item": RECIPES[name].spec, "description": RECIPES[name].description,
        "scale": scale.name, "seeds": list(scale.seeds), "methods": sorted({r["algorithm"] for r in records}),
        "scale_settings": {k: v for k, v in vars(scale).items() if k not in ("name",)},
        "datasets": datasets, "sets": list(ctx.sets), "options": ctx.options,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "wall_s": round(wall, 1),
        "command": " ".join(sys.argv), "git": git_state(), "versions": versions(), "host": host(),
        "mlflow": {"tracking_uri": ctx.tracking_uri, "experiment": ctx.experiment,
                   "ui": f"bench ui --output-dir {ctx.runs_dir}"},
        "cells": records,
        "counts": {s: sum(r["status"] == s for r in records) for s in ("ran", "reused", "failed")},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def save_sections(out: Path, sections: list[Section]) -> None:
    data = [{"heading": s.heading, "notes": s.notes,
             "items": [{"kind": i.kind, "title": i.title, "files": [p.name for p in i.files],
                        "markdown": i.markdown} for i in s.items]} for s in sections]
    (out / "outputs.json").write_text(json.dumps(data, indent=2))


def write_paper_index(root: Path) -> Path:
    """<out>/index.md: every recipe done so far, each with its figures (embedded) and tables (inline), and a
    link to its manifest."""
    sections: list[Section] = []
    lines = []
    for name, recipe in RECIPES.items():
        outputs = root / name / "outputs.json"
        if not outputs.exists():
            continue
        manifest = json.loads((root / name / "manifest.json").read_text())
        counts = manifest["counts"]
        lines.append(f"- [{name}](#{slug(recipe.spec)}): {recipe.description} — scale {manifest['scale']}, "
                     f"seeds {manifest['seeds']}, {len(manifest['cells'])} runs ({counts['ran']} run, "
                     f"{counts['reused']} reused, {counts['failed']} failed), commit "
                     f"{(manifest['git']['commit'] or '?')[:10]}{' (dirty)' if manifest['git']['dirty'] else ''}; "
                     f"[manifest]({name}/manifest.json)")
        sections.append(Section(recipe.spec, notes=[f"Recipe `{name}`: {recipe.description}. "
                                                    f"[manifest]({name}/manifest.json)"]))
        for s in json.loads(outputs.read_text()):
            sections.append(Section(s["heading"], [Item(i["kind"], i["title"], [root / name / f for f in i["files"]],
                                                        i["markdown"]) for i in s["items"]], s["notes"], level=3))
    preamble = "\n".join(["Outputs of `bench paper` (recipes in reports/paper.py). MLflow: "
                          f"`bench ui --output-dir {root / 'runs'}`.", "", *lines])
    return write_index(root / "index.md", "Paper figures and tables", sections, preamble)
