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
from bench.simulator import RunContext
from bench.store import ResultsStore, new_root, run_key
from data.device_data import DeviceData
from data.partition import FILE_PREFIX, ClientSplit, is_file_partition, partition
from data.portable import file_splits
from data.sources import load_dataset

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


def load_inputs(cfg: RunConfig, device: torch.device) -> Inputs:
    """The dataset, its device data and every seed's client splits (the data may depend on the first seed)."""
    dataset = load_dataset(cfg.dataset, Path(cfg.data_dir) if cfg.data_dir else None, seed=cfg.seeds[0])
    data = DeviceData(dataset, device, augment=cfg.augment)
    return Inputs(dataset, data, {seed: client_splits(cfg, dataset, seed, device) for seed in cfg.seeds})


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


# ---- the up-front time estimate ---------------------------------------------------------------------------
_SAMPLE_SECONDS: dict[tuple, tuple[float, float]] = {}  # timings reused by later estimates in this process


def sample_seconds(ctx: RunContext, arch: str) -> tuple[float, float]:
    """(seconds per training sample, per evaluation sample) of `arch`: a training step (batch building, the
    run's optimizer and clipping) and an evaluation batch (at most 256 samples), each the median of three
    calls after a warm-up one, so a busy moment does not skew it."""
    cfg, data, device = ctx.cfg, ctx.data, ctx.device
    train_idx = torch.arange(min(cfg.batch_size, len(data.y_train)), device=device)
    eval_idx = torch.arange(min(cfg.eval_batch_size, 256, len(data.y_test)), device=device)
    key = (arch, ctx.num_classes, tuple(data.x_train.shape[1:]), len(train_idx), len(eval_idx), str(device),
           torch.get_num_threads())
    if key in _SAMPLE_SECONDS:
        return _SAMPLE_SECONDS[key]
    model = ctx.build_model(arch)
    params, optimizers = ctx.optimizers_for([model])

    def train_step():
        model.train()
        for x, y in data.train_batches(train_idx, cfg.batch_size, ctx.generator):
            ctx.step(lambda x, y: torch.nn.functional.cross_entropy(model(x), y), x, y, params, optimizers)

    @torch.no_grad()
    def eval_batch():
        model.eval()
        for x, _ in data.eval_batches("test", eval_idx, len(eval_idx)):
            model(x).argmax(1)

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return sorted(times)[1]
    _SAMPLE_SECONDS[key] = timed(train_step) / len(train_idx), timed(eval_batch) / len(eval_idx)
    return _SAMPLE_SECONDS[key]


def estimate_seconds(cfg: RunConfig, data: DeviceData, splits: list[ClientSplit], device: torch.device,
                     runs: list[RunSpec]) -> dict[str, float]:
    """Rough wall time per algorithm, before anything runs: each architecture's timed cost per sample
    (sample_seconds), scaled by the samples a run trains and evaluates (participating clients' train and
    test+val splits each round, every client's once at the start) and by each algorithm's round cost
    relative to Standalone (`estimated_cost`)."""
    ctx = RunContext(cfg, data, device, cfg.seeds[0], "estimate", FlopAccountant(), splits)
    cost_of = {arch: sample_seconds(ctx, arch) for arch in set(ctx.client_archs)}
    train_epoch = sum(math.ceil(len(s.train) / cfg.batch_size) * cfg.batch_size * cost_of[arch][0]
                      for s, arch in zip(splits, ctx.client_archs))
    evaluation = sum((len(s.test) + len(s.val)) * cost_of[arch][1] for s, arch in zip(splits, ctx.client_archs))
    out = {}
    for spec in {r.name: r for r in runs}.values():
        cost = spec.algorithm.estimated_cost(spec.hparams, cfg)
        per_round = cfg.participation * (train_epoch * cfg.local_epochs + evaluation) * cost
        out[spec.name] = (per_round * cfg.rounds + evaluation) * len(cfg.seeds)
    return out


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
