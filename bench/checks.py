"""The up-front input checks: everything that can be refused before data is loaded, compute is spent or a
results folder is written, each refused with one line naming what is wrong and what is valid (a UserError:
exit code 2). The README's table of input checks lists them with the step that makes each.

    validate_config     the config's values (bench.config.validate calls it after every config source)
    check_output_dir    the results root can be created and written (before the data loads)
    check_writable      the same for any folder a command writes (`bench partition export --out`)
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from bench.config import FIELDS, RunConfig
from bench.errors import UserError

MAX_COUNT = 2**31 - 1   # the largest count (clients, rounds, batch size, ...): beyond it torch's int32 sizes overflow
MAX_THREADS = 1024      # torch CPU threads of one run
MAX_SEED = 2**32 - 1    # seeds feed torch and numpy generators after offsets (seed * 1000 + k): they must fit int64
COUNTS = ("num_clients", "rounds", "local_epochs", "batch_size", "eval_every", "eval_batch_size", "classes_per_client",
          "threads")


def validate_config(cfg: RunConfig) -> None:
    """Reject values outside their valid range, each with a one-line message naming the valid range, before
    any data is loaded."""
    validate_numbers(cfg)
    validate_names(cfg)
    validate_components(cfg)
    if cfg.model_init:  # the checkpoint file is read (weights_only) and checked before any data loads
        from models.pretrained import read_init_file

        read_init_file(cfg.model_init)


def validate_numbers(cfg: RunConfig) -> None:
    """Counts, fractions and optimiser settings: in range and finite (a NaN compares false with every bound)."""
    for key in COUNTS:
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise UserError(f"{key} must be a positive integer, got {value}")
    if cfg.checkpoint_every < 0:
        raise UserError(f"checkpoint_every must be a non-negative integer (0 = no checkpoints), "
                        f"got {cfg.checkpoint_every}")
    for key in (*COUNTS, "checkpoint_every"):
        if (getattr(cfg, key) or 0) > MAX_COUNT:
            raise UserError(f"{key} must be at most {MAX_COUNT} (2**31 - 1), got {getattr(cfg, key)}")
    if (cfg.threads or 0) > MAX_THREADS:  # each would be an OS thread of torch's pool
        raise UserError(f"threads must be at most {MAX_THREADS}, got {cfg.threads}; e.g. the number of CPU cores")
    if cfg.subset and (len(cfg.subset) != 2 or min(cfg.subset) < 1 or max(cfg.subset) > MAX_COUNT):
        raise UserError(f"subset must be two positive integers [train, test] (images of a stratified subset) or [] "
                        f"(every image), got {cfg.subset}; e.g. --set subset=[10000,2000]")
    if not 0 <= cfg.parallel_clients <= MAX_THREADS:
        raise UserError(f"parallel_clients must be an integer from 0 (auto) to {MAX_THREADS}, got {cfg.parallel_clients}; "
                        "e.g. the number of CPU cores")
    for key, f in FIELDS.items():
        value = getattr(cfg, key)
        if str(f.type).startswith("float") and value is not None and not math.isfinite(value):
            raise UserError(f"{key} must be a finite number, got {value}")
    if not 0 < cfg.participation <= 1:
        raise UserError(f"participation must be in (0, 1], got {cfg.participation}")
    if not 0 < cfg.val_fraction < 1:
        raise UserError(f"val_fraction must be in (0, 1), got {cfg.val_fraction}")
    for key in ("lr", "dirichlet_alpha"):
        if getattr(cfg, key) <= 0:
            raise UserError(f"{key} must be positive, got {getattr(cfg, key)}")
    for key in ("momentum", "weight_decay", "grad_clip"):
        if getattr(cfg, key) < 0:
            raise UserError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    if cfg.target_accuracy is not None and not 0 < cfg.target_accuracy <= 1:
        raise UserError(f"target_accuracy must be in (0, 1], got {cfg.target_accuracy}")
    if not cfg.seeds:
        raise UserError("seeds must hold at least one seed")
    if any(seed < 0 for seed in cfg.seeds):
        raise UserError(f"seeds must be non-negative integers, got {cfg.seeds}")
    if any(seed > MAX_SEED for seed in cfg.seeds):
        raise UserError(f"seeds must be at most {MAX_SEED} (2**32 - 1), got {cfg.seeds}")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise UserError(f"seeds must be distinct, got {cfg.seeds}")


def validate_names(cfg: RunConfig) -> None:
    """Strings that name a place: a run name is one folder under the output dir."""
    if cfg.run_name is not None:
        name = cfg.run_name
        if not name.strip() or name in (".", "..") or "/" in name or "\\" in name or "\0" in name \
                or len(os.fsencode(name)) > NAME_MAX:
            raise UserError(f"run_name must be a folder name (not empty, no '/', not '.' or '..', at most "
                            f"{NAME_MAX} bytes), got {name[:60]!r}; e.g. --run-name exp1, or leave it out for a "
                            "timestamped folder")
    for key in ("output_dir", "experiment", "dataset", "data_dir", "tracking_uri"):
        value = getattr(cfg, key)
        if value is not None and not value.strip():
            raise UserError(f"{key} must not be empty; leave it out for the default")
    paths = {"dataset": cfg.dataset if cfg.dataset.lower().endswith(".npz") else None, "data_dir": cfg.data_dir,
             "output_dir": cfg.output_dir, "partition": cfg.partition.partition(":")[2] or None}
    for key, value in paths.items():
        if value is not None:
            check_path_usable(key, value)
    ordinal = cfg.device.partition(":")[2]
    if cfg.device not in ("auto", "cpu", "cuda") and not (cfg.device.startswith("cuda:") and ordinal.isdigit()):
        raise UserError(f"unknown device {cfg.device!r}; valid: auto, cpu, cuda, cuda:N (N = a GPU's index)")


NAME_MAX, PATH_MAX = 255, 4096  # bytes in one path component, in a whole path (Linux and most filesystems)


def check_path_usable(key: str, value: str) -> None:
    """A path the system can look up (its existence is checked where it is used): no part longer than a
    filesystem takes, no NUL. Checked on the text, as a missing parent would hide a long name from the system."""
    shown = f"{value[:60]}..." if len(value) > 60 else value
    try:
        path = Path(value).expanduser()
        too_long = len(os.fsencode(path)) > PATH_MAX or any(len(os.fsencode(part)) > NAME_MAX for part in path.parts)
        if too_long:
            raise OSError(36, "File name too long")
        path.exists()
    except (OSError, ValueError) as err:
        raise UserError(f"{key} {shown} cannot be used ({getattr(err, 'strerror', None) or err}); valid: a path "
                        f"of folder names of at most {NAME_MAX} bytes each") from None


def validate_components(cfg: RunConfig) -> None:
    """Partitioner, model group, algorithms and profile: registered names (a partition file is read now)."""
    from algorithms.base import PROFILES
    from bench.registry import resolve_algorithms
    from data.partition import FILE_PREFIX, PARTITIONERS, is_file_partition
    from models.groups import MODEL_GROUPS

    if is_file_partition(cfg.partition):
        from data.portable import read_json

        # Absolute, so the config names the same file from any directory (resume, Ray workers); the file is
        # checked now, before any data is loaded.
        path = Path(cfg.partition[len(FILE_PREFIX):]).expanduser().resolve()
        cfg.partition = f"{FILE_PREFIX}{path}"
        read_json(path, cfg.num_clients)
    elif cfg.partition not in PARTITIONERS:
        raise UserError(f"unknown partitioner {cfg.partition!r}; valid: {', '.join(PARTITIONERS)}")
    if cfg.model_group not in MODEL_GROUPS:
        raise UserError(f"unknown model group {cfg.model_group!r}; valid: {', '.join(MODEL_GROUPS)}")
    if not cfg.algorithms:
        raise UserError("no algorithm given; use --algo NAME (see `bench list`)")
    cfg.algorithms = [cls.name for cls in resolve_algorithms(cfg.algorithms)]
    if len(set(cfg.algorithms)) != len(cfg.algorithms):
        raise UserError(f"each algorithm may be given once, got {cfg.algorithms}")
    if cfg.profile not in PROFILES:
        raise UserError(f"unknown profile {cfg.profile!r}; valid: {', '.join(PROFILES)}")
    # The hyper-parameters (cfg.algo) are built and checked once, by the run plan (bench/plan.py).


def check_output_dir(output_dir: str, run_name: str | None = None) -> None:
    """The results root (and the run's folder, if it exists) can be written: every existing part of the path is
    a folder, and a test folder can be made (then removed) in the deepest existing one. Made before the data
    loads, so an unwritable place costs nothing and leaves nothing behind."""
    root = Path(output_dir).expanduser()
    check_writable(root, f"--output-dir {output_dir}")
    if run_name is not None:
        check_writable(root / run_name, f"--output-dir {output_dir} --run-name {run_name}")


def check_writable(folder: Path, option: str) -> None:
    """`folder` can be created (or is a folder) and written, else one line naming `option`."""
    existing = nearest_existing(folder, option)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".bench-write-test-", dir=existing))
    except OSError as err:
        raise UserError(f"{option}: cannot create a folder in {existing} ({err.strerror or err}); valid: a "
                        "place you can write, e.g. under your home or working directory") from None


def nearest_existing(path: Path, option: str) -> Path:
    """The deepest existing folder on `path` (itself, else an ancestor); a file on the way is refused."""
    for candidate in (path, *path.absolute().parents):
        try:
            if candidate.is_dir():
                return candidate
            if candidate.exists() or candidate.is_symlink():
                raise UserError(f"{option}: {candidate} is a file, not a folder; valid: a path whose existing "
                                "parts are folders")
        except OSError as err:  # a path the system cannot even look at (too long, no permission to search)
            raise UserError(f"{option}: cannot use {path} ({err.strerror or err}); valid: a shorter path you "
                            "can write") from None
    return Path("/")
