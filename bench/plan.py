"""The run plan: what an invocation will run, decided and checked before anything runs or is written.

A config becomes a list of `RunSpec`s, one per (seed, algorithm): the algorithm class, its typed
hyper-parameters (built and checked once, `cls.hparams_for(cfg)`), the seed, the run key and the checkpoint
location. The inputs every run reads (dataset, device data, client splits by seed), the up-front time
estimate and the results folder the invocation writes are decided here too."""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.accounting import FlopAccountant
from bench.config import RunConfig, config_differences, default_classes_per_client
from bench.errors import UserError
from bench.registry import resolve_algorithms
from bench.context import RunContext
from bench.estimate import estimate_seconds  # noqa: F401 (runner imports it from here)
from bench.store import ResultsStore, new_root, run_key
from data.device_data import DeviceData
from data.partition import FILE_PREFIX, ClientSplit, is_file_partition, partition
from data.portable import file_splits
from data.sources import load_dataset
from data.subset import stratified_subset
from models.groups import check_image_size

NEEDS_RUN_NAME = "--resume needs --run-name NAME (the run to continue), or use `bench resume RESULTS_DIR`"


@dataclass(frozen=True)
class RunSpec:
    """One (algorithm, seed) run."""

    algorithm: type                  # the Algorithm subclass
    hparams: Any                     # its typed hyper-parameters, built and checked once
    seed: int
    checkpoint: Path | None = None   # <run dir>/checkpoint; None: the run is not checkpointed

    @property
    def name(self) -> str:
        return self.algorithm.name

    @property
    def key(self) -> str:
        return run_key(self.algorithm.name, self.seed)


def plan_runs(cfg: RunConfig) -> list[RunSpec]:
    """Every (seed, algorithm) run of `cfg`, seed-major. A bad hyper-parameter is a UserError here, also in the
    table of an algorithm that does not run (a typo in a config file)."""
    classes = resolve_algorithms(cfg.algorithms)
    hparams = {cls.name: cls.hparams_for(cfg) for cls in classes}
    for name in cfg.algo:
        if name not in hparams:
            resolve_algorithms([name])[0].hparams_for(cfg)
    return [RunSpec(cls, hparams[cls.name], seed) for seed in cfg.seeds for cls in classes]


def with_checkpoints(runs: list[RunSpec], store: ResultsStore, cfg: RunConfig) -> list[RunSpec]:
    """The runs with their checkpoint location in `store` (none when cfg.checkpoint_every is 0)."""
    every = cfg.checkpoint_every > 0
    return [dataclasses.replace(r, checkpoint=store.checkpoint_dir(r.key) if every else None) for r in runs]


# ---- inputs ------------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """What every run of an invocation reads: loaded once."""

    dataset: Any
    data: DeviceData
    splits: dict[int, list[ClientSplit]]   # by seed


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} requested but no CUDA GPU is available here; valid: auto, cpu")
    count = torch.cuda.device_count() if name.startswith("cuda:") else 0
    if name.startswith("cuda:") and int(name.partition(":")[2]) >= count:
        raise UserError(f"--device {name}: there is no such GPU here; valid: auto, cpu, cuda, "
                        + ", ".join(f"cuda:{i}" for i in range(count)))
    return torch.device(name)


def client_splits(cfg: RunConfig, dataset, seed: int, device: torch.device) -> list[ClientSplit]:
    """The clients' index sets: drawn from `seed` by the partitioner, or read from a partition file (the same
    for every seed)."""
    if is_file_partition(cfg.partition):
        splits = file_splits(Path(cfg.partition[len(FILE_PREFIX):]), dataset, cfg.num_clients)
    else:
        cpc = cfg.classes_per_client
        cpc = default_classes_per_client(dataset.num_classes) if cpc is None else cpc  # None: dataset-aware
        if cpc > dataset.num_classes:
            raise UserError(f"classes_per_client={cpc} exceeds the {dataset.num_classes} classes "
                            f"of {dataset.name}; valid: 1..{dataset.num_classes}")
        splits = partition(dataset.y_train, dataset.y_test, cfg.num_clients, cfg.partition,
                           classes_per_client=cpc, alpha=cfg.dirichlet_alpha,
                           val_fraction=cfg.val_fraction, seed=seed)
    return [ClientSplit(s.train.to(device), s.val.to(device), s.test.to(device)) for s in splits]


def load_inputs(cfg: RunConfig, device: torch.device, runs: list[RunSpec] = ()) -> Inputs:
    """The dataset, its device data and every seed's client splits (the data may depend on the first seed).
    Images that a model of the run cannot take are refused here, before any model is built or trained."""
    dataset = load_dataset(cfg.dataset, Path(cfg.data_dir) if cfg.data_dir else None, seed=cfg.seeds[0])
    if cfg.subset:
        dataset = stratified_subset(dataset, *cfg.subset)
    _, height, width = dataset.image_shape
    check_image_size(cfg.model_group, height, width, extra_architectures(runs))
    data = DeviceData(dataset, device, augment=cfg.augment)
    return Inputs(dataset, data, {seed: client_splits(cfg, dataset, seed, device) for seed in cfg.seeds})


def extra_architectures(runs: list[RunSpec]) -> dict[str, str]:
    """Architectures the algorithms build besides the clients' (hyper-parameters named *_arch, such as FedKD's
    mentee): arch -> the option naming it."""
    out: dict[str, str] = {}
    for spec in runs:
        for name, value in vars(spec.hparams).items():
            if name.endswith("_arch") and isinstance(value, str):
                out.setdefault(value, f"{spec.name}.{name}")
    return out


def check_algorithms(cfg: RunConfig, runs: list[RunSpec], inputs: Inputs, device: torch.device) -> None:
    """Construct each algorithm once (cheap: no client state) so a setting it refuses (a UserError) is
    reported before anything runs or is written."""
    from models.groups import MODEL_GROUPS, is_homogeneous

    for spec in {r.name: r for r in runs}.values():
        cls = spec.algorithm
        if cls.homogeneous_only and not is_homogeneous(cfg.model_group):
            raise UserError(f"{cls.name} needs a model-homogeneous group, got {cfg.model_group!r}; "
                            f"valid: {', '.join(g for g in MODEL_GROUPS if is_homogeneous(g))}")
        ctx = RunContext(cfg, inputs.data, device, cfg.seeds[0], cls.name, FlopAccountant(),
                         inputs.splits[cfg.seeds[0]])
        cls(ctx, spec.hparams)


# ---- the results folder ------------------------------------------------------------------------------------
def results_root(cfg: RunConfig, resume: bool, partition_hashes: dict[str, str] | None = None) -> tuple[Path, bool]:
    """(<output-dir>/<run-name>, whether it holds a run to continue). Without a run name: a new timestamped
    folder. Refuses a folder that holds another run's results (another config, or another partition of a seed
    both have), or this run's without --resume."""
    if cfg.run_name is None:
        if resume:
            raise UserError(NEEDS_RUN_NAME)
        return new_root(Path(cfg.output_dir)), False
    store = ResultsStore(Path(cfg.output_dir) / cfg.run_name)
    root = store.root
    if not store.has_config():
        return root, False
    stored = store.config()
    if not stored:
        raise UserError(f"{root} holds an unreadable config.json; choose another --run-name or --output-dir")
    differences = config_differences(stored, cfg)
    stored_hashes = stored.get("partition_hashes") or {}
    differences += [f"partition of seed {seed}: sha256 {stored_hashes[seed][:12]}... there, {digest[:12]}... here"
                    for seed, digest in (partition_hashes or {}).items()
                    if stored_hashes.get(seed) not in (None, digest)]
    if differences:
        what = "; ".join(differences[:3]) + ("; ..." if len(differences) > 3 else "")
        if resume:
            raise UserError(f"cannot resume {root}: it holds a different run ({what}); "
                            f"use `bench resume {root}` to continue that run as it was configured")
        raise UserError(f"{root} holds a different run's results ({what}); choose another --run-name or "
                        f"--output-dir")
    if not resume:
        raise UserError(f"{root} already holds the results of this run; pass --resume to continue it, "
                        f"or choose another --run-name or --output-dir")
    return root, True
