"""`bench report` and `bench paper` (registered on the `bench` group in bench/cli.py)."""
from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

import click

from bench.errors import UserError
from bench.executors import executor_options, make_executor


@click.command()
@click.argument("results_dirs", nargs=-1, type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (default: <dir>/plots for one results folder, else results/report-<time>).")
@click.option("--tracking-uri", help="Read the runs from this MLflow store instead of results folders.")
@click.option("--experiment", help="MLflow experiment to read (with --tracking-uri; default: all).")
@click.option("--run", "parents", multiple=True, help="MLflow parent run (invocation) name or id; repeatable.")
@click.option("--title", default="", help="Title of the report's Markdown index.")
def report(results_dirs, out, tracking_uri, experiment, parents, title) -> None:
    """Figures (PNG, PDF) and tables (Markdown, CSV, LaTeX) from results folders or MLflow runs.

    RESULTS_DIRS are results folders of `bench run`, or folders holding several of them (such as an
    output dir, or the runs/ folder of `bench paper`). With several settings, the report compares
    them side by side (the T1 table) and draws each setting's figures."""
    from reports.report import build_report
    from reports.results import expand_folders, load_folder, load_mlflow

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    if tracking_uri:
        if results_dirs:
            raise UserError("give either RESULTS_DIRS or --tracking-uri, not both")
        try:
            runs = load_mlflow(tracking_uri, experiment, parents)
        except ValueError as err:
            raise UserError(str(err)) from None
        out = out or Path("results") / f"report-{stamp}"
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
        out = out or (folders[0] / "plots" if len(folders) == 1 else Path("results") / f"report-{stamp}")
        source = ", ".join(map(str, folders))
    if not runs:
        raise UserError(f"no runs found in {source}")
    files = build_report(runs, out, title=title or f"Report: {source}")
    click.echo(f"report: {len(files)} files in {out} (index: {files[-1]})")


@click.command()
@click.argument("recipe", metavar="LIST|RECIPE|all")
@click.option("--scale", type=click.Choice(["smoke", "full"]), default="smoke", show_default=True,
              help="smoke: the grid shrunk to minutes on a CPU; full: the SPEC protocol.")
@click.option("--seeds", "seeds", multiple=True, help="Seeds, e.g. --seeds 0,1,2 (replaces the scale's).")
@click.option("--algo", "algorithms", multiple=True, help="Methods to run (repeatable; replaces the scale's).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Reports folder (default: results/paper-<scale>); runs go to <out>/runs.")
@click.option("--data-dir", envvar="BENCH_DATA_DIR", help="Dataset cache directory [env: BENCH_DATA_DIR].")
@click.option("--device", help="auto, cpu or cuda (for every run).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Config override for every run.")
@click.option("--threads", type=int, help="CPU threads for torch (1 is much faster on a busy machine).")
@click.option("--dry-run", is_flag=True, help="List the grid's runs and whether each is done, then stop.")
@click.option("--quiet", is_flag=True, help="No per-round progress lines.")
@executor_options
def paper(recipe, scale, seeds, algorithms, out, data_dir, device, sets, threads, dry_run, quiet,
          **executor) -> None:
    """Regenerate the paper's tables and figures (SPEC section 4) from declarative recipes.

    `bench paper list` shows the recipes; `bench paper t1` runs the T1 grid (reusing finished runs) and
    writes its tables and figures, a manifest, and <out>/index.md; `bench paper all` runs every recipe."""
    from reports import paper as recipes

    if recipe == "list":
        list_recipes(recipes)
        return
    names = list(recipes.RECIPES) if recipe == "all" else [recipe]
    for name in names:
        if name not in recipes.RECIPES:
            raise UserError(f"unknown recipe {name!r}; valid: list, all, {', '.join(recipes.RECIPES)}")
    seed_list = parse_seeds(seeds)
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    options = {k: v for k, v in {"data_dir": data_dir, "device": device, "threads": threads}.items() if v}
    ctx = recipes.Context(out=out or Path("results") / f"paper-{scale}", scale=recipes.SCALES[scale],
                          seeds=tuple(seed_list) if seed_list else None,
                          algorithms=tuple(algorithms) if algorithms else None, options=options, sets=tuple(sets),
                          progress=not quiet, echo=click.echo, executor=make_executor(**executor))
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


def parse_seeds(values: tuple[str, ...]) -> list[int]:
    seeds: list[int] = []
    for value in values:
        for part in value.replace(" ", ",").split(","):
            if not part:
                continue
            if not part.lstrip("-").isdigit():
                raise UserError(f"--seeds {value!r}: expected integers, e.g. --seeds 0,1,2")
            seeds.append(int(part))
    return list(dict.fromkeys(seeds))


def list_recipes(recipes) -> None:
    registered = recipes.registered_methods()
    click.echo("recipes (bench paper NAME [--scale smoke|full]):")
    for name, recipe in recipes.RECIPES.items():
        sizes = []
        for scale in ("smoke", "full"):
            s = recipes.SCALES[scale]
            sizes.append(f"{scale} {len(recipe.grid(s, recipes.methods_of(s, registered)))}")
        click.echo(f"  {name:<14} {recipe.spec}: {recipe.description} [runs: {', '.join(sizes)}]")
    click.echo("  all            every recipe in turn")
