"""One `bench run` invocation: load data once, then for each seed and algorithm run the round loop and
send every round to the trackers. One failing algorithm does not stop the others.

Bad input is refused before anything is written. Each round goes to the results folder, then (every
`checkpoint_every` rounds) the run's complete state to <run dir>/checkpoint/state.pt, then to MLflow; a
resumed invocation (`--resume`, `bench resume`) skips finished runs and continues the others from their
checkpoints, bit-identically on the CPU."""
from __future__ import annotations

import json
import math
import time
import traceback
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from bench.accounting import FlopAccountant
from bench.checkpoint import CheckpointError, Packer, RunCheckpoint, unpack
from bench.config import RunConfig, config_differences, default_classes_per_client, resolve_dataset_defaults
from bench.errors import UserError
from bench.progress import Progress, fmt_duration
from bench.registry import resolve_algorithms
from bench.simulator import RunContext, Simulation
from bench.summary import run_summary
from bench.tracking import ResultsFolder, Tracker, default_tracking_uri, make_mlflow_tracker
from data.device_data import DeviceData
from data.partition import FILE_PREFIX, ClientSplit, is_file_partition, partition
from data.portable import file_splits, partition_sha256
from data.sources import load_dataset


@dataclass
class InvocationResult:
    root: Path
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # run key -> reason
    skipped: list[str] = field(default_factory=list)      # runs already finished in the folder (resume)
    mlflow_unsynced: bool = False                           # MLflow misses part of it: `bench sync` uploads


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} requested but no CUDA GPU is available here; valid: auto, cpu")
    return torch.device(name)


def run_key(algo: str, seed: int) -> str:
    return f"{algo}-seed{seed}"


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


def estimate_seconds(cfg: RunConfig, data: DeviceData, splits: list[ClientSplit], device: torch.device) -> dict[str, float]:
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
    for cls in resolve_algorithms(cfg.algorithms):
        cost = cls.estimated_cost(cls.hparams_for(cfg), cfg)
        per_round = cfg.participation * (train_epoch * cfg.local_epochs + evaluation) * cost
        out[cls.name] = (per_round * cfg.rounds + evaluation) * len(cfg.seeds)
    return out


def check_algorithms(cfg: RunConfig, algo_classes: list, data: DeviceData, splits: list[ClientSplit],
                     device: torch.device) -> None:
    """Construct each algorithm once (cheap: no client state) so a setting it refuses (a UserError) is
    reported before anything runs or is written."""
    from models.groups import MODEL_GROUPS, is_homogeneous

    for cls in algo_classes:
        if cls.homogeneous_only and not is_homogeneous(cfg.model_group):
            raise UserError(f"{cls.name} needs a model-homogeneous group, got {cfg.model_group!r}; "
                            f"valid: {', '.join(g for g in MODEL_GROUPS if is_homogeneous(g))}")
        ctx = RunContext(cfg, data, device, cfg.seeds[0], cls.name, FlopAccountant(), splits)
        cls(ctx, cls.hparams_for(cfg))


NEEDS_RUN_NAME = "--resume needs --run-name NAME (the run to continue), or use `bench resume RESULTS_DIR`"


def results_root(cfg: RunConfig, resume: bool, partition_hashes: dict[str, str] | None = None) -> tuple[Path, bool]:
    """(<output-dir>/<run-name>, whether it holds a run to continue). Without a run name: a new timestamped
    folder, made unique with a suffix when another process took the same second. Refuses a folder that
    holds another run's results (another config, or another partition of a seed both have), or this run's
    without --resume."""
    output_dir = Path(cfg.output_dir)
    if cfg.run_name is None:
        if resume:
            raise UserError(NEEDS_RUN_NAME)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        output_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, 1000):
            root = output_dir / (stamp if attempt == 1 else f"{stamp}-{attempt}")
            try:
                root.mkdir()
                return root, False
            except FileExistsError:
                continue
        raise UserError(f"cannot create a new results folder under {output_dir}; give --run-name")
    root = output_dir / cfg.run_name
    stored_path = root / "config.json"
    if not stored_path.exists():
        return root, False
    try:
        stored = json.loads(stored_path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{root} holds an unreadable config.json; choose another --run-name or --output-dir") from None
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


@dataclass
class Invocation:
    """One results folder being written: a setting's (algorithm, seed) runs, its trackers and its outcome.
    An executor (`run_invocation` here, or bench/executors.py on Ray) runs `pending`; `close` draws the
    plots and ends the trackers."""
    cfg: RunConfig
    algo_classes: list
    dataset_name: str
    device: torch.device
    target: float
    results: ResultsFolder
    trackers: list[Tracker]
    config: dict[str, Any]                 # the resolved config the trackers receive
    resuming: bool
    uses_mlflow: bool
    pending: list[tuple[int, Any]]         # (seed, algorithm class) still to run
    outcome: InvocationResult
    inputs: tuple | None = None            # (dataset, DeviceData, splits by seed) when kept for running here

    @property
    def root(self) -> Path:
        return self.results.root

    def header(self) -> str:
        cfg = self.cfg
        return (f"bench: {', '.join(c.name for c in self.algo_classes)} on {self.dataset_name} "
                f"({cfg.num_clients} clients, C={cfg.participation}, {cfg.rounds} rounds, E={cfg.local_epochs}, "
                f"seeds {cfg.seeds}) on {self.config['device_resolved']}; results in {self.root}"
                + ("  [resumed]" if self.resuming else ""))

    def record(self, key: str, summary: dict[str, Any], status: str) -> None:
        self.outcome.summaries[key] = summary
        if status != "FINISHED":
            self.outcome.failed[key] = summary.get("error", status)

    def abort(self) -> None:
        """Interrupted (a UserError inside a run, Ctrl-C): close the trackers; the caller re-raises."""
        for t in self.trackers:
            t.end_invocation([self.root / "summary.csv"], "FAILED")

    def close(self, progress: Progress) -> InvocationResult:
        status = "FAILED" if self.outcome.failed else "FINISHED"
        plots = []
        try:
            from reports.report import run_report

            plots = run_report(self.root, title=f"{self.dataset_name}, N={self.cfg.num_clients}, "
                                                f"C={self.cfg.participation}")
        except Exception as err:  # figures are a convenience: never lose a run's results over them
            warnings.warn(f"could not draw the plots of {self.root} ({type(err).__name__}: {err})", stacklevel=2)
        for t in self.trackers:
            t.end_invocation([self.root / "summary.csv", *plots], status)
        self.outcome.mlflow_unsynced = bool(self.uses_mlflow and self.results.mlflow_info().get("unsynced"))
        progress.echo(f"done: results in {self.root}")
        if self.outcome.mlflow_unsynced:
            progress.echo(f"note: MLflow misses part of this invocation; upload it with `bench sync {self.root}`")
        return self.outcome


def load_inputs(cfg: RunConfig, device: torch.device) -> tuple:
    """(dataset, DeviceData, client splits by seed)."""
    dataset = load_dataset(cfg.dataset, Path(cfg.data_dir) if cfg.data_dir else None, seed=cfg.seeds[0])
    data = DeviceData(dataset, device, augment=cfg.augment)
    return dataset, data, {seed: client_splits(cfg, dataset, seed, device) for seed in cfg.seeds}


def open_invocation(cfg: RunConfig, *, use_mlflow: bool = True, resume: bool = False,
                    remote: bool = False) -> Invocation:
    """Check `cfg` (bad input is refused before anything is written), take its results folder, start the
    trackers and keep the finished runs of a resumed folder. The caller must `results.release()`.
    `remote`: the runs execute on Ray workers, which pick their own device; the checks run on this CPU."""
    device = torch.device("cpu") if remote else resolve_device(cfg.device)
    algo_classes = resolve_algorithms(cfg.algorithms)
    if resume and cfg.run_name is None:
        raise UserError(NEEDS_RUN_NAME)
    inputs = load_inputs(cfg, device)
    dataset, data, splits_by_seed = inputs
    cfg = resolve_dataset_defaults(cfg, dataset.num_classes)  # what the folder records and every run uses
    check_algorithms(cfg, algo_classes, data, splits_by_seed[cfg.seeds[0]], device)
    target = cfg.target_accuracy
    hashes = {str(seed): partition_sha256(splits) for seed, splits in splits_by_seed.items()}
    root, resuming = results_root(cfg, resume, hashes)
    results = ResultsFolder(root)
    results.acquire()
    try:
        trackers: list[Tracker] = [results]
        if use_mlflow:
            output_dir = Path(cfg.output_dir)
            mlflow_tracker = make_mlflow_tracker(cfg.tracking_uri or default_tracking_uri(output_dir),
                                                 cfg.experiment, output_dir, results)
            if mlflow_tracker is not None:
                trackers.append(mlflow_tracker)
        config = {**cfg.to_dict(), "run_name": root.name, "device_resolved": f"ray worker ({cfg.device})" if remote
                  else str(device), "target_acc": target, "partition_hashes": hashes, "torch": torch.__version__}
        for t in trackers:
            resume_hook = getattr(t, "resume_invocation", None) if resuming else None
            (resume_hook or t.start_invocation)(root.name, config)
    except BaseException:
        results.release()
        raise
    inv = Invocation(cfg, algo_classes, dataset.name, device, target, results, trackers, config, resuming,
                     use_mlflow, [], InvocationResult(root), inputs)
    for seed, cls in [(seed, cls) for seed in cfg.seeds for cls in algo_classes]:
        key = run_key(cls.name, seed)
        finished = results.finished_summary(key) if resuming else None
        if finished is None:
            inv.pending.append((seed, cls))
            continue
        summary = {k: v for k, v in finished.items() if k != "status"}
        inv.outcome.summaries[key] = summary
        inv.outcome.skipped.append(key)
        results.record_summary(key, summary, "FINISHED")
        for t in trackers:  # e.g. killed after the folder had its end but before MLflow did
            if hasattr(t, "sync_run"):
                t.sync_run(key)
    return inv


def run_invocation(cfg: RunConfig, *, show_progress: bool = True, use_mlflow: bool = True,
                   resume: bool = False, executor=None) -> InvocationResult:
    """Run every (seed, algorithm) of `cfg`. `resume=True` continues the results folder
    <output_dir>/<run_name> if it holds this run (finished runs are kept, the others continue from their
    last checkpoint), and starts it otherwise. `executor` (bench.executors.ExecutorOptions) picks where
    the runs execute: here one after the other (default), or as parallel Ray tasks."""
    return run_invocations([cfg], show_progress=show_progress, use_mlflow=use_mlflow, resume=resume,
                           executor=executor)[0]


def run_invocations(cfgs: list[RunConfig], *, show_progress: bool = True, use_mlflow: bool = True,
                    resume: bool = False, executor=None) -> list[InvocationResult]:
    """Several settings (e.g. a paper recipe's grid): on Ray every run of every setting is one task and they
    all run in parallel; here the settings run one after the other."""
    if executor is not None and executor.kind == "ray":
        from bench.executors import run_on_ray

        return run_on_ray(cfgs, executor, show_progress=show_progress, use_mlflow=use_mlflow, resume=resume)
    outcomes = []
    for cfg in cfgs:
        inv = open_invocation(cfg, use_mlflow=use_mlflow, resume=resume)
        try:
            outcomes.append(run_here(inv, show_progress))
        finally:
            inv.results.release()
    return outcomes


def run_here(inv: Invocation, show_progress: bool) -> InvocationResult:
    """The local executor: the pending runs one after the other in this process."""
    cfg = inv.cfg
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    dataset, data, splits_by_seed = inv.inputs
    progress = Progress(cfg.rounds * len(inv.pending), enabled=show_progress)
    progress.echo(inv.header())
    for key in inv.outcome.skipped:
        progress.echo(f"{key}: already finished in {inv.root}; kept")
    try:
        if inv.pending:
            estimate = estimate_seconds(cfg, data, splits_by_seed[inv.pending[0][0]], inv.device)
            progress.echo("estimated time: " + ", ".join(f"{k} ~{fmt_duration(v)}" for k, v in estimate.items())
                          + f"; total ~{fmt_duration(sum(estimate.values()))}")
        for seed, algo_cls in inv.pending:
            summary, status = execute_run(cfg, algo_cls, seed, data, splits_by_seed[seed], inv.device, inv.trackers,
                                          progress, inv.target, inv.config, dataset.name, resume=inv.resuming,
                                          checkpoint_dir=checkpoint_dir(inv, run_key(algo_cls.name, seed)))
            inv.record(run_key(algo_cls.name, seed), summary, status)
    except BaseException:
        inv.abort()
        raise
    finally:
        torch.set_num_threads(threads_before)  # the option is per run, not for the rest of this process
    return inv.close(progress)


def checkpoint_dir(inv: Invocation, key: str) -> Path | None:
    return inv.results.run_dir(key) / "checkpoint" if inv.cfg.checkpoint_every > 0 else None


def publish(trackers: list[Tracker], key: str, step: int, metrics: dict[str, float], between=None) -> None:
    """Send one round: durable trackers (the results folder) first, then `between` (the checkpoint), then
    the others (MLflow), so a crash never leaves MLflow ahead of the results folder."""
    for t in trackers:
        if getattr(t, "durable", False):
            t.log_round(key, step, metrics)
    if between is not None:
        between()
    for t in trackers:
        if not getattr(t, "durable", False):
            t.log_round(key, step, metrics)


def execute_run(cfg: RunConfig, algo_cls, seed: int, data: DeviceData, splits: list[ClientSplit],
                device: torch.device, trackers: list[Tracker], progress: Progress, target: float,
                config: dict[str, Any], dataset_name: str, *, resume: bool = False,
                checkpoint_dir: Path | None = None) -> tuple[dict[str, Any], str]:
    """One (algorithm, seed) run through the round loop, every round sent to the trackers.
    Returns (summary, status); an exception inside the run (or a non-finite training loss, detected in the
    round it appears) marks it FAILED instead of propagating. With a `checkpoint_dir` the run checkpoints
    every cfg.checkpoint_every rounds; `resume=True` continues from that checkpoint."""
    key = run_key(algo_cls.name, seed)
    hparams = algo_cls.hparams_for(cfg)
    params = {**{k: v for k, v in config.items() if k != "partition_hashes"}, "algorithm": algo_cls.name,
              "seed": seed, "partition_hash": partition_sha256(splits), "hparams": vars(hparams)}
    tags = {"algorithm": algo_cls.name, "dataset": dataset_name, "seed": str(seed),
            "setting": f"N={cfg.num_clients},C={cfg.participation}", "model_group": cfg.model_group}
    checkpoint = RunCheckpoint(checkpoint_dir) if checkpoint_dir is not None else None
    saved = None
    if resume and checkpoint is not None and checkpoint.exists():
        try:
            saved = checkpoint.load()
        except CheckpointError as err:
            warnings.warn(f"{key}: {err}; this run starts over", stacklevel=2)
    start_step = saved[1]["step"] if saved is not None else (-1 if resume else None)
    for t in trackers:
        if start_step is None or not hasattr(t, "resume_run"):
            t.start_run(key, params, tags)
        else:
            t.resume_run(key, params, tags, start_step)
    history: list[dict[str, Any]] = []
    clients: list[dict[str, Any]] = []
    status = "FINISHED"

    def save_checkpoint(sim: Simulation, step: int) -> None:
        nonlocal checkpoint
        try:
            tensors, sim_meta = sim.state_dict()
            packer = Packer()
            meta = {"run": key, "step": step, "history": packer.pack(history, "history"), "sim": sim_meta}
            checkpoint.save(tensors | packer.tensors, meta)
        except Exception as err:  # e.g. a full disk, or state the format cannot hold: the run goes on
            warnings.warn(f"{key}: checkpoint after round {step} failed ({type(err).__name__}: {err}); "
                          "the run continues without checkpoints", stacklevel=2)
            checkpoint = None

    try:
        sim = Simulation(cfg, algo_cls, seed, data, splits, device)
        if saved is not None:
            tensors, meta = saved
            try:
                if meta.get("run") != key:
                    raise ValueError(f"it belongs to run {meta.get('run')!r}, not {key!r}")
                sim.load_state_dict(tensors, meta["sim"])
                history = unpack(meta["history"], tensors)
            except Exception as err:
                raise CheckpointError(f"cannot restore {checkpoint.file} ({type(err).__name__}: {err}); "
                                      "delete it to start this run over") from err
            progress.echo(f"{key}: resuming after round {meta['step']} from {checkpoint.file}")
            for row in history:  # trackers that missed rounds the checkpoint holds get them (others skip them)
                publish(trackers, key, row["step"], {k: v for k, v in row.items() if k != "step"})
        else:
            initial = sim.initial_metrics()
            history.append({"step": 0, **initial})
            publish(trackers, key, 0, initial)
        best = max(h.get("acc_mean", -math.inf) for h in history)
        for round_index in range(sim.rounds_done, cfg.rounds):
            metrics = sim.run_round(round_index)
            if not math.isfinite(metrics["train_loss"]):
                raise FloatingPointError(f"non-finite training loss in round {round_index + 1}")
            step = round_index + 1
            history.append({"step": step, **metrics})
            due = checkpoint is not None and step % cfg.checkpoint_every == 0 and step < cfg.rounds
            publish(trackers, key, step, metrics, (lambda: save_checkpoint(sim, step)) if due else None)
            best = max(best, metrics.get("acc_mean", best))
            progress.round_done(key, step, cfg.rounds, metrics, best, metrics.get("cum_round_time", 0.0))
        clients = sim.client_table()
        summary = run_summary(history, target)
    except UserError as err:
        for t in trackers:
            t.end_run(key, {**(run_summary(history, target) if history else {}), "error": str(err)}, [], "FAILED")
        raise
    except Exception as err:  # isolate the failure: the other algorithms still run
        status = "FAILED"
        reason = f"{type(err).__name__}: {err}"
        summary = {**(run_summary(history, target) if history else {}), "error": reason}
        progress.echo(f"{key}: FAILED ({reason})")
        if progress.enabled:
            traceback.print_exc()
    for t in trackers:
        t.end_run(key, summary, clients, status)
    if status == "FINISHED" and checkpoint is not None and not cfg.keep_checkpoints:
        checkpoint.remove()
    return summary, status
