"""The `bench` command line. User mistakes print one line and exit with code 2 (`--debug` shows the traceback)."""
from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import click

from bench.errors import UserError
from bench.executors import executor_options, make_executor

DEBUG = False


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
def cli(debug: bool) -> None:
    """Benchmark harness for model-heterogeneous personalised federated learning."""
    global DEBUG
    DEBUG = debug


@cli.command()
@click.option("--algo", "algorithms", multiple=True, help="Algorithm to run (repeatable); see `bench list`.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option("--preset", default="quick", show_default=True, help="quick (minutes on a CPU) or paper (SPEC protocol).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any config key, e.g. pfedlora.rank=32.")
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
@click.option("--seed", "seeds", type=int, multiple=True, help="Seed (repeatable: one run per seed).")
@click.option("--device", help="auto, cpu or cuda.")
@click.option("--threads", type=int, help="torch CPU threads per run [default: torch's; on Ray: --cpus-per-run].")
@click.option("--data-dir", envvar="BENCH_DATA_DIR", help="Dataset cache directory [env: BENCH_DATA_DIR].")
@click.option("--output-dir", help="Results root (also holds the default MLflow store).")
@click.option("--run-name", help="Results subfolder and MLflow parent run name.")
@click.option("--tracking-uri", help="MLflow tracking URI (default: sqlite store in the output dir).")
@click.option("--checkpoint-every", type=int, help="Checkpoint each run every k rounds (0: never) [default: 1].")
@click.option("--resume", is_flag=True, help="Continue the results folder --run-name from its checkpoints.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
@executor_options
def run(algorithms, config_file, preset, sets, quiet, resume, executor, cpus_per_run, gpus_per_run, ray_address,
        max_retries, **options) -> None:
    """Run one or more algorithms (and seeds) on one setting; log to MLflow and a results folder."""
    from bench.config import load_config
    from bench.runner import run_invocation

    runner = make_executor(executor, cpus_per_run, gpus_per_run, ray_address, max_retries)
    options["algorithms"] = list(algorithms) or None
    options["seeds"] = list(options["seeds"]) or None
    cfg = load_config(config_file, preset, list(sets), options)
    finish(run_invocation(cfg, show_progress=not quiet, resume=resume, executor=runner))


def finish(outcome) -> None:
    """Exit 1 when a run failed (the others finished and were written)."""
    if outcome.failed:
        click.echo(f"error: {len(outcome.failed)} run(s) failed: " +
                   "; ".join(f"{k}: {v}" for k, v in outcome.failed.items()), err=True)
        sys.exit(1)


@cli.command()
@click.argument("results_dir", type=click.Path(file_okay=False))
@click.option("--tracking-uri", help="MLflow tracking URI (default: the one the run used).")
@click.option("--quiet", is_flag=True, help="No progress lines.")
@executor_options
def resume(results_dir: str, tracking_uri: str | None, quiet: bool, **executor) -> None:
    """Continue an interrupted run from its results folder (finished runs are kept)."""
    from bench.config import from_results
    from bench.runner import run_invocation

    runner = make_executor(**executor)
    from bench.tracking import read_json, results_config

    root = Path(results_dir)
    cfg = from_results(results_config(root))
    cfg.output_dir, cfg.run_name = str(root.parent), root.name
    cfg.tracking_uri = tracking_uri or read_json(root / "mlflow.json").get("tracking_uri") or cfg.tracking_uri
    finish(run_invocation(cfg, show_progress=not quiet, resume=True, executor=runner))


@cli.command()
@click.argument("results_dir", type=click.Path(file_okay=False))
@click.option("--tracking-uri", help="Store to upload to (default: the one the run used).")
def sync(results_dir: str, tracking_uri: str | None) -> None:
    """Upload to MLflow what a results folder holds and MLflow misses (after the store was unavailable)."""
    from bench.tracking import sync_results

    done = sync_results(Path(results_dir), tracking_uri)
    click.echo(f"synced {done['runs']} run(s) of {results_dir} to {done['tracking_uri']}: "
               f"{done['metric_values']} metric value(s) uploaded; invocation {done['status']}")


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
@click.option("--data-dir", envvar="BENCH_DATA_DIR", help="Dataset cache directory [env: BENCH_DATA_DIR].")
@click.option("--format", "fmt", type=click.Choice(["json", "pfllib"]), default="json", show_default=True,
              help="json: our client index lists (+ sha256); pfllib: PFLlib/HtFLlib train/<id>.npz, test/<id>.npz.")
@click.option("--out", required=True, type=click.Path(), help="File (json) or new folder (pfllib) to write.")
def export(config_file, sets, seed, fmt, out, **options) -> None:
    """Write the partition a run with these settings uses (data/portable.py describes both formats)."""
    import torch

    from bench.config import load_config, resolve_dataset_defaults
    from bench.runner import client_splits
    from data import portable
    from data.sources import load_dataset

    cfg = load_config(config_file, "quick", list(sets), options)
    seed = cfg.seeds[0] if seed is None else seed
    if seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {seed}")
    if fmt == "pfllib":
        portable.check_pfllib_out(Path(out))
    elif Path(out).is_dir():
        raise UserError(f"--out {out} is a folder; the json format writes a file, "
                        f"e.g. --out {Path(out) / 'partition.json'}")
    dataset = load_dataset(cfg.dataset, Path(cfg.data_dir) if cfg.data_dir else None, seed=seed)
    cfg = resolve_dataset_defaults(cfg, dataset.num_classes)
    splits = client_splits(cfg, dataset, seed, torch.device("cpu"))
    settings = {"dataset": cfg.dataset, "num_clients": cfg.num_clients, "partition": cfg.partition,
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
@click.option("--output-dir", default="results", show_default=True, help="Results root holding mlflow.db.")
@click.option("--tracking-uri", help="Store to show (default: the sqlite store in the output dir).")
@click.option("--port", default=5000, show_default=True, type=int)
def ui(output_dir: str, tracking_uri: str | None, port: int) -> None:
    """Start the MLflow UI on 127.0.0.1 for the results store."""
    from bench.tracking import default_tracking_uri

    uri = tracking_uri or default_tracking_uri(Path(output_dir))
    if tracking_uri is None and not (Path(output_dir) / "mlflow.db").exists():
        raise UserError(f"no MLflow store at {Path(output_dir) / 'mlflow.db'}; run `bench run` first or pass --output-dir")
    click.echo(f"MLflow UI for {uri} at http://127.0.0.1:{port}  (Ctrl-C to stop)")
    subprocess.run([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                    "--host", "127.0.0.1", "--port", str(port)], check=False)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our warnings (UserWarning: store unavailable, broken plugin, ...) as one line on stderr."""
    if issubclass(category, UserWarning) and not issubclass(category, DeprecationWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


# ---- commands defined in other modules (registered here, so `bench --help` lists them) ----
from reports.commands import paper, report  # noqa: E402

cli.add_command(report)
cli.add_command(paper)


def main() -> None:
    warnings.showwarning = show_warning
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:  # usage errors: one line, exit 2
        click.echo(f"error: {err.format_message()}", err=True)
        sys.exit(2)
    except UserError as err:
        if DEBUG:
            raise
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
