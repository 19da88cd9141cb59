"""The bodies of `bench report` and `bench paper` (their options are declared with the rest of the command
line's vocabulary in bench/cli.py)."""
from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from bench.errors import UserError


def report_command(results_dirs: tuple[Path, ...], output_dir: Path | None, *, tracking_uri: str | None,
                   experiment: str | None, parents: tuple[str, ...], title: str, pool: bool = False) -> None:
    """`pool`: pool runs of settings that share a label (dataset, N, C, partition) but differ elsewhere (e.g.
    rounds) instead of reporting them apart; either way the grouping found is printed."""
    from bench.store import expand_folders
    from reports.report import build_report
    from reports.results import load_folder, load_mlflow

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    if tracking_uri:
        if results_dirs:
            raise UserError("give either RESULTS_DIRS or --tracking-uri, not both")
        try:
            runs = load_mlflow(tracking_uri, experiment, parents)
        except ValueError as err:
            raise UserError(str(err)) from None
        out = output_dir or Path("results") / f"report-{stamp}"
        source = f"MLflow {tracking_uri}" + (f", experiment {experiment}" if experiment else "")
    else:
        if not results_dirs:
            raise UserError("give one or more results folders (e.g. results/<run-name>) or --tracking-uri URI")
        for d in results_dirs:
            if not d.is_dir():
                raise UserError(f"{d} is not a folder; give results folders written by `bench run`")
        folders = expand_folders(results_dirs)
        if not folders:
            raise UserError(f"no results folder (with config.json and runs/) in {', '.join(map(str, results_dirs))}")
        runs = [r for f in folders for r in load_folder(f)]
        out = output_dir or (folders[0] / "plots" if len(folders) == 1 else Path("results") / f"report-{stamp}")
        source = ", ".join(map(str, folders))
    if not runs:
        raise UserError(f"no runs found in {source}")
    files = build_report(runs, out, title=title or f"Report: {source}", pool=pool, echo=click.echo)
    click.echo(f"report: {len(files)} files in {out} (index: {files[-1]})")


def paper_command(recipe: str, options: dict[str, Any]) -> None:
    """`options`: the command line's (bench/cli.py: paper), seeds as a list and the executor built."""
    from reports import paper as recipes

    if recipe == "list":
        list_recipes(recipes)
        return
    names = list(recipes.RECIPES) if recipe == "all" else [recipe]
    for name in names:
        if name not in recipes.RECIPES:
            raise UserError(f"unknown recipe {name!r}; valid: list, all, {', '.join(recipes.RECIPES)}")
    if options["threads"] is not None and options["threads"] < 1:
        raise UserError(f"--threads must be >= 1, got {options['threads']}")
    run_options = {k: options[k] for k in ("data_dir", "device", "threads") if options[k] is not None}
    scale = options["scale"]
    ctx = recipes.Context(out=options["output_dir"] or Path("results") / f"paper-{scale}", scale=recipes.SCALES[scale],
                          seeds=tuple(options["seeds"]) or None, algorithms=tuple(options["algorithms"]) or None,
                          options=run_options, sets=tuple(options["sets"]), progress=not options["quiet"],
                          echo=click.echo, executor=options["executor"])
    dry_run = options["dry_run"]
    failed = 0
    for name in names:
        manifest = recipes.run_recipe(name, ctx, dry_run=dry_run)
        if manifest:
            c = manifest["counts"]
            failed += c["failed"]
            click.echo(f"{name}: {c['ran']} run, {c['reused']} reused, {c['failed']} failed in "
                       f"{manifest['wall_s']:.0f} s; outputs in {ctx.out / name}")
    if not dry_run:
        click.echo(f"index: {ctx.out / 'index.md'}; MLflow: bench ui --output-dir {ctx.runs_dir}")
    if failed:
        click.echo(f"error: {failed} run(s) failed (see the manifests)", err=True)
        sys.exit(1)


def list_recipes(recipes) -> None:
    registered = recipes.registered_methods()
    click.echo("recipes (bench paper NAME [--scale smoke|full]):")
    for name, recipe in recipes.RECIPES.items():
        sizes = []
        for scale in ("smoke", "full"):
            s = recipes.recipe_scale(recipe, recipes.SCALES[scale])
            sizes.append(f"{scale} {len(recipe.grid(s, recipes.methods_of(s, registered)))}")
        click.echo(f"  {name:<14} {recipe.spec}: {recipe.description} [runs: {', '.join(sizes)}]")
    click.echo("  all            every recipe in turn")
