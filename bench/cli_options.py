"""The command line's shared options: one vocabulary across run, resume, paper and report (bench/cli.py)."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import click

from bench.config import setup_fields


class Seeds(click.ParamType):
    """A seed, or several separated by commas or spaces: 0 / 0,1,2."""

    name = "SEED"

    def convert(self, value, param, ctx) -> list[int]:
        if isinstance(value, list):
            return value
        parts = [p for p in str(value).replace(" ", ",").split(",") if p]
        if not parts or not all(p.lstrip("-").isdigit() for p in parts):
            self.fail(f"{value!r}: expected integers, e.g. --seed 0 --seed 1 or --seed 0,1,2", param, ctx)
        return [int(p) for p in parts]


def seed_list(*values: tuple[list[int], ...]) -> list[int]:
    """The seeds of repeated --seed options (and their hidden alias), in order."""
    return [seed for option in values for seeds in option for seed in seeds]


# ---- the shared options ---------------------------------------------------------------------------------
ALGO = click.option("--algo", "algorithms", multiple=True, help="Algorithm to run (repeatable); see `bench list`.")
SEED = click.option("--seed", "seeds", type=Seeds(), multiple=True,
                    help="Seed (repeatable, or a comma-separated list: --seed 0,1,2); one run per seed.")
SET = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                   help="Override any config key, e.g. pfedlora.rank=32.")
DATA_DIR = click.option("--data-dir", envvar="BENCH_DATA_DIR", help="Dataset cache directory [env: BENCH_DATA_DIR].")
DEVICE = click.option("--device", help="auto, cpu or cuda.")
THREADS = click.option("--threads", type=int,
                       help="torch CPU threads per run [default: torch's; on Ray: --cpus-per-run]; 1 is much "
                            "faster on a busy machine.")
QUIET = click.option("--quiet", is_flag=True, help="No progress lines.")
TRACKING_URI = partial(click.option, "--tracking-uri")  # its help differs per command: TRACKING_URI(help=...)


class FolderPath(click.Path):
    """A folder option: not an existing file, and not empty (Path("") would be the current directory)."""

    def __init__(self):
        super().__init__(file_okay=False, path_type=Path)

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("an empty path; give a folder, e.g. results", param, ctx)
        return super().convert(value, param, ctx)


def output_dir_option(help: str, legacy_out: bool = False, **kwargs):
    """--output-dir (and the hidden old spelling --out, where a command had it)."""
    def decorate(command):
        command = click.option("--output-dir", "output_dir", type=FolderPath(), help=help, **kwargs)(command)
        if legacy_out:
            command = click.option("--out", "out_alias", type=FolderPath(), hidden=True)(command)
        return command
    return decorate


def executor_options(command):
    """--executor and the Ray options, shared by `bench run`, `bench resume` and `bench paper`."""
    options = [
        click.option("--executor", type=click.Choice(["local", "ray", "flower"]), default="local",
                     show_default=True,
                     help="local: runs one after the other here; ray: each (algorithm, seed, setting) run is a "
                          "Ray task, in parallel; flower: through Flower's simulation engine, every client a "
                          "ClientApp (needs the flower extra)."),
        click.option("--cpus-per-run", type=float, default=1.0, show_default=True,
                     help="Ray: CPUs each run requests (also its torch threads); flower: the CPUs of the "
                          "ClientApps' Ray actor."),
        click.option("--gpus-per-run", type=float,
                     help="Ray: GPUs each run requests, fractions allowed [default: 1 if the cluster has GPUs "
                          "and --device is not cpu, else 0]."),
        click.option("--ray-address", envvar="RAY_ADDRESS",
                     help="Ray: cluster to join, e.g. auto (on a node of a running cluster) or HEAD_IP:6379 "
                          "[env: RAY_ADDRESS; default: a new local Ray instance]."),
        click.option("--max-retries", type=int, default=1, show_default=True,
                     help="Ray: retries of a run whose worker died (continuing from its checkpoint)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


RESUME_HELP = ("Continue the results folder --run-name from its checkpoints (finished runs are kept); settings "
               "that do not change results may differ: " + ", ".join(setup_fields()) + ".")
