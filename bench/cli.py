"""The `bench` command line. User mistakes print one line and exit with code 2 (`--debug` shows the traceback).

One vocabulary across run, resume, paper and report: an option that means the same thing has the same name
and form everywhere (`--seed` repeatable, each also a comma-separated list; `--output-dir`; `--algo`
repeatable; `--set KEY=VALUE`; `--data-dir`, `--device`, `--threads`, `--quiet`, `--tracking-uri`, the
executor options: bench/cli_options.py). Old spellings (`bench paper --seeds 0,1`, `--out`) still work, hidden.

SIGTERM stops a command as Ctrl-C does (exit code 143; 130 for Ctrl-C): a run keeps its checkpoint, marks its
MLflow runs KILLED and says how to continue it."""
from __future__ import annotations

import signal
import sys
import warnings
from pathlib import Path

import click

import bench.callbacks.mlflow_client  # noqa: F401  (MLflow's environment, before mlflow loads: no telemetry)
from bench.cli_options import (ALGO, DATA_DIR, DEVICE, QUIET, RESUME_HELP, SEED, SET, THREADS,  # noqa: F401
                               TRACKING_URI, Seeds, executor_options, output_dir_option, seed_list)
from bench.errors import Terminated, UserError, interrupted_root
from bench.executors import executor_from_cli

DEBUG = False
_default_showwarning = warnings.showwarning


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
def cli(debug: bool) -> None:
    """Benchmark harness for model-heterogeneous personalised federated learning."""
    global DEBUG
    DEBUG = debug


@cli.command()
@ALGO
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option("--preset", default="quick", show_default=True, help="quick (minutes on a CPU) or paper (SPEC protocol).")
@SET
@click.option("--dataset", help="cifar10, cifar100, synthetic[:K] or PATH.npz.")
@click.option("--clients", "num_clients", type=int, help="Number of clients N.")
@click.option("--participation", type=float, help="Fraction C of clients sampled per round, in (0, 1].")
@click.option("--rounds", type=int, help="Communication rounds.")
@click.option("--local-epochs", type=int, help="Local epochs E.")
@click.option("--batch-size", type=int, help="Training batch size.")
@click.option("--partition", help="label-skew, dirichlet, iid, or file:PATH.json (a given partition).")
@click.option("--classes-per-client", type=int,
              help="Classes per client for label-skew [default: 2; 10 on more than 10 classes].")
@click.option("--model-group", help="Model group; see `bench list`.")
@click.option("--profile", help="Reference profile of the algorithms' options: spec, official or htfllib.")
@SEED
@DEVICE
@THREADS
@DATA_DIR
@output_dir_option("Results root (also holds the default MLflow store) [default: results].")
@click.option("--run-name", help="Results subfolder and MLflow parent run name.")
@TRACKING_URI(help="MLflow tracking URI (default: sqlite store in the output dir).")
@click.option("--checkpoint-every", type=int, help="Checkpoint each run every k rounds (0: never) [default: 1].")
@click.option("--system-metrics", is_flag=True, default=None,
              help="Log MLflow's system metrics (CPU, memory, GPU) on every run; needs psutil.")
@click.option("--resume", is_flag=True, help=RESUME_HELP)
@QUIET
@executor_options
def run(algorithms, config_file, preset, sets, quiet, resume, **options) -> None:
    """Run one or more algorithms (and seeds) on one setting; log to MLflow and a results folder."""
    from bench.config import load_config
    from bench.runner import run_invocation

    executor = executor_from_cli(**options)
    options = {k: v for k, v in options.items()
               if k not in ("executor", "cpus_per_run", "gpus_per_run", "ray_address", "max_retries")}
    options["algorithms"] = list(algorithms) or None
    options["seeds"] = seed_list(options["seeds"]) or None
    options["output_dir"] = str(options["output_dir"]) if options["output_dir"] else None
    options["system_metrics"] = options["system_metrics"] or None  # absent: the config file's value
    cfg = load_config(config_file, preset, list(sets), options)
    outcome = run_invocation(cfg, show_progress=not quiet, resume=resume, executor=executor)
    if cfg.subset and not quiet:  # the quick preset's subset: say how to run on every image
        click.echo(f"note: this ran on a subset of {cfg.dataset} ({cfg.subset[0]} train / {cfg.subset[1]} test images, "
                   f"{cfg.rounds} rounds); on every image: add --set subset=[] (longer in proportion), the SPEC protocol: "
                   "--preset paper", err=True)
    finish(outcome)


def finish(outcome) -> None:
    """Exit 1 when a run failed (the others finished and were written)."""
    if outcome.failed:
        click.echo(f"error: {len(outcome.failed)} run(s) failed: " +
                   "; ".join(f"{k}: {v}" for k, v in outcome.failed.items()), err=True)
        sys.exit(1)


@cli.command()
@click.argument("results_dir", type=click.Path(file_okay=False))
@TRACKING_URI(help="MLflow tracking URI (default: the one the run used).")
@QUIET
@executor_options
def resume(results_dir: str, tracking_uri: str | None, quiet: bool, **executor) -> None:
    """Continue an interrupted run from its results folder (finished runs are kept)."""
    from bench.config import from_results
    from bench.runner import run_invocation
    from bench.store import ResultsStore

    runner = executor_from_cli(**executor)
    store = ResultsStore(Path(results_dir))
    cfg = from_results(store.require_config())
    cfg.output_dir, cfg.run_name = str(store.root.parent), store.root.name
    cfg.tracking_uri = tracking_uri or store.mlflow_info().get("tracking_uri") or cfg.tracking_uri
    finish(run_invocation(cfg, show_progress=not quiet, resume=True, executor=runner))


@cli.command()
@click.argument("results_dir", type=click.Path(file_okay=False))
@TRACKING_URI(help="Store to upload to (default: the one the run used).")
def sync(results_dir: str, tracking_uri: str | None) -> None:
    """Upload to MLflow what a results folder holds and MLflow misses (after the store was unavailable)."""
    from bench.callbacks.mlflow import sync_results

    done = sync_results(Path(results_dir), tracking_uri)
    click.echo(f"synced {done['runs']} run(s) of {results_dir} to {done['tracking_uri']}: "
               f"{done['metric_values']} metric value(s) uploaded; invocation {done['status']}")


@cli.command()
@click.argument("results_dirs", nargs=-1, type=click.Path(file_okay=False, path_type=Path))
@output_dir_option("Output folder (default: <dir>/plots for one results folder, else results/report-<time>).",
                   legacy_out=True)
@TRACKING_URI(help="Read the runs from this MLflow store instead of results folders.")
@click.option("--experiment", help="MLflow experiment to read (with --tracking-uri; default: all).")
@click.option("--run", "parents", multiple=True, help="MLflow parent run (invocation) name or id; repeatable.")
@click.option("--title", default="", help="Title of the report's Markdown index.")
@click.option("--pool", is_flag=True, help="Pool runs of settings that share a label (dataset, N, C, partition) but "
              "differ elsewhere (e.g. rounds) instead of reporting them apart; tables then say their ± is over runs.")
def report(results_dirs, output_dir, out_alias, **options) -> None:
    """Figures (PNG, PDF) and tables (Markdown, CSV, LaTeX) from results folders or MLflow runs.

    RESULTS_DIRS are results folders of `bench run`, or folders holding several of them (such as an
    output dir, or the runs/ folder of `bench paper`). With several settings, the report compares
    them side by side (the T1 table) and draws each setting's figures."""
    from reports.commands import report_command

    report_command(results_dirs, output_dir or out_alias, **options)


@cli.command()
@click.argument("recipe", metavar="LIST|RECIPE|all")
@click.option("--scale", type=click.Choice(["smoke", "full"]), default="smoke", show_default=True,
              help="smoke: the grid shrunk to minutes on a CPU; full: the SPEC protocol.")
@SEED
@click.option("--seeds", "seeds_alias", type=Seeds(), multiple=True, hidden=True)
@ALGO
@output_dir_option("Reports folder (default: results/paper-<scale>); runs go to <output-dir>/runs.", legacy_out=True)
@DATA_DIR
@DEVICE
@SET
@THREADS
@click.option("--dry-run", is_flag=True, help="List the grid's runs and whether each is done, then stop.")
@QUIET
@executor_options
def paper(recipe: str, **options) -> None:
    """Regenerate the paper's tables and figures (SPEC section 4) from declarative recipes.

    `bench paper list` shows the recipes; `bench paper t1` runs the T1 grid (reusing finished runs) and
    writes its tables and figures, a manifest, and <output-dir>/index.md; `bench paper all` runs every recipe
    (`--seed` replaces the scale's seeds, `--algo` its methods)."""
    from reports.commands import paper_command

    options["seeds"] = list(dict.fromkeys(seed_list(options["seeds"], options.pop("seeds_alias"))))
    options["output_dir"] = options["output_dir"] or options.pop("out_alias")
    options["executor"] = executor_from_cli(**options) if recipe != "list" else None
    paper_command(recipe, options)


@cli.group()
def partition() -> None:
    """Client partitions: export one for `--partition file:PATH.json` or for PFLlib / HtFLlib."""


@partition.command(name="export")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML config file (of a run).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override any config key, e.g. val_fraction=0.1.")
@click.option("--dataset", help="cifar10, cifar100, synthetic[:K] or PATH.npz.")
@click.option("--clients", "num_clients", type=int, help="Number of clients N.")
@click.option("--seed", type=int,
              help="Export the partition of `bench run --seed SEED` [default: the config's first seed].")
@click.option("--partition", help="label-skew, dirichlet, iid, or file:PATH.json (to convert it).")
@click.option("--classes-per-client", type=int,
              help="Classes per client for label-skew [default: 2; 10 on more than 10 classes].")
@DATA_DIR
@click.option("--format", "fmt", type=click.Choice(["json", "pfllib"]), default="json", show_default=True,
              help="json: our client index lists (+ sha256); pfllib: PFLlib/HtFLlib train/<id>.npz, test/<id>.npz.")
@click.option("--out", required=True, type=click.Path(), help="File (json) or new folder (pfllib) to write.")
def export(config_file, sets, seed, fmt, out, **options) -> None:
    """Write the partition a run with these settings uses (data/portable.py describes both formats)."""
    import torch

    from bench.checks import check_writable
    from bench.config import load_config, resolve_dataset_defaults
    from bench.plan import client_splits
    from data import portable
    from data.sources import load_dataset
    from data.subset import stratified_subset

    cfg = load_config(config_file, "quick", list(sets), options)
    seed = cfg.seeds[0] if seed is None else seed
    if seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {seed}")
    if fmt == "pfllib":
        portable.check_pfllib_out(Path(out))
    elif Path(out).is_dir():
        raise UserError(f"--out {out} is a folder; the json format writes a file, "
                        f"e.g. --out {Path(out) / 'partition.json'}")
    check_writable(Path(out) if fmt == "pfllib" else Path(out).absolute().parent, f"--out {out}")
    dataset = load_dataset(cfg.dataset, Path(cfg.data_dir) if cfg.data_dir else None, seed=seed)
    if cfg.subset:  # the images `bench run` with the same options uses (the quick preset: a subset)
        dataset = stratified_subset(dataset, *cfg.subset)
    cfg = resolve_dataset_defaults(cfg, dataset.num_classes)
    splits = client_splits(cfg, dataset, seed, torch.device("cpu"))
    settings = {"dataset": cfg.dataset, "subset": cfg.subset or None, "num_clients": cfg.num_clients, "partition": cfg.partition,
                "classes_per_client": cfg.classes_per_client, "dirichlet_alpha": cfg.dirichlet_alpha,
                "val_fraction": cfg.val_fraction, "seed": seed}
    if fmt == "json":
        digest = portable.write_json(Path(out), splits, dataset, settings)
    else:
        digest = portable.write_pfllib(Path(out), splits, dataset, settings, cfg.batch_size)
    click.echo(f"wrote the {fmt} partition of {dataset.name} ({cfg.num_clients} clients, {cfg.partition}, seed {seed}) "
               f"to {out}; sha256 {digest}")


@cli.command(name="list")
def list_components() -> None:
    """Show algorithms, model groups, datasets and partitioners."""
    from bench.registry import algorithms
    from data.partition import PARTITIONERS
    from data.sources import DATASETS
    from models.groups import MODEL_GROUPS

    sections = {
        "algorithms": {name: cls.description for name, cls in algorithms().items()},
        "model groups": {name: desc for name, (_, desc) in MODEL_GROUPS.items()},
        "datasets": DATASETS,
        "partitioners": PARTITIONERS,
    }
    for title, entries in sections.items():
        click.echo(f"{title}:")
        for name, desc in entries.items():
            click.echo(f"  {name:<16} {desc}")


@cli.command()
@output_dir_option("Results root holding mlflow.db.", default=Path("results"), show_default=True)
@TRACKING_URI(help="Store to show (default: the sqlite store in the output dir).")
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535))
def ui(output_dir: Path, tracking_uri: str | None, port: int) -> None:
    """Start the MLflow UI on 127.0.0.1 for the results store (one worker, no job runner); Ctrl-C or SIGTERM
    stops it and everything it started."""
    from bench.store import MLFLOW_DB, default_tracking_uri
    from bench.ui import HOST, check_port_free, runs_view_lines, serve

    uri = tracking_uri or default_tracking_uri(output_dir)
    if tracking_uri is None and not (output_dir / MLFLOW_DB).exists():
        raise UserError(f"no MLflow store at {output_dir / MLFLOW_DB}; run `bench run` first or pass --output-dir")
    check_port_free(port)  # before reading the store: a busy port is the first thing to hear about
    click.echo(f"MLflow UI for {uri} at http://{HOST}:{port}  (Ctrl-C to stop)")
    for line in runs_view_lines(uri, HOST, port):
        click.echo(line)
    code = serve(uri, port)
    if code:
        click.echo(f"error: the MLflow server exited with code {code} (its output is above)", err=True)
        sys.exit(1)
    click.echo("MLflow UI stopped")


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our warnings (UserWarning: store unavailable, broken plugin, ...) as one line on stderr."""
    if issubclass(category, UserWarning) and not issubclass(category, DeprecationWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


def on_sigterm(signum, frame) -> None:
    """SIGTERM stops a run as Ctrl-C does (bench.errors.Terminated is a KeyboardInterrupt). Further SIGTERMs
    are ignored, so that they do not cut the clean-up short (checkpoint kept, MLflow runs marked KILLED)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


def interrupted(err: click.exceptions.Abort) -> int:
    """Say what an interrupt stopped and how to continue it; the exit code, 128 + the signal's number."""
    cause = err.__cause__
    name, code = ("SIGTERM", 143) if isinstance(cause, Terminated) else ("SIGINT", 130)
    root = interrupted_root(cause)
    more = f"; the finished rounds are kept in {root}: continue with `bench resume {root}`" if root else ""
    click.echo(f"aborted ({name}){more}", err=True)
    return code


def main() -> None:
    warnings.showwarning = show_warning
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort as err:
        sys.exit(interrupted(err))
    except click.ClickException as err:  # usage errors: one line, exit 2
        click.echo(f"error: {err.format_message()}", err=True)
        sys.exit(2)
    except UserError as err:
        if DEBUG:
            raise
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    finally:
        signal.signal(signal.SIGTERM, previous)  # an in-process caller (the tests) gets its own handler back


if __name__ == "__main__":
    main()
