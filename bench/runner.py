"""The run lifecycle, top to bottom:

    config -> plan (bench/plan.py: run specs, inputs, results folder; bad input refused before anything is
              written) -> executor (bench/executors: here one run after the other, or Ray tasks)
           -> per invocation: begin (callbacks: on_invocation_start, on_run_kept)
              -> per run: execute_run (Simulation + callbacks: on_run_start, on_round_end..., on_run_end)
              -> close (plots, on_invocation_end) -> the results store (bench/store.py)

Each round goes to the callbacks in their documented order (bench/callbacks/__init__.py: `ordered`): the
results folder, then (every `checkpoint_every` rounds) the run's checkpoint, then MLflow, then the progress
line. One failing run does not stop the others. An interrupt (Ctrl-C, SIGTERM) stops the invocation: the
current run and the invocation end KILLED. A resumed invocation (`--resume`, `bench resume`) keeps the
finished runs and continues the others from their checkpoints, bit-identically on the CPU."""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from bench.callbacks import Callback, CallbackList, InvocationInfo, RunInfo, ordered
from bench.callbacks.checkpoint import CheckpointCallback, SavedRun, read_run
from bench.callbacks.mlflow import check_system_metrics, make_mlflow_callback
from bench.callbacks.mlflow_meta import setting_of
from bench.callbacks.progress import ProgressCallback
from bench.callbacks.results import ResultsFolderCallback
from bench.checkpoint import CheckpointError
from bench.config import RunConfig, resolve_dataset_defaults
from bench.checks import check_output_dir
from bench.errors import Terminated, UserError
from bench.executors import Executor, ExecutorOptions, make_executor
from bench.estimate import estimate_runs, per_algorithm
from bench.plan import (NEEDS_RUN_NAME, Inputs, RunSpec, check_algorithms, client_splits,  # noqa: F401
                        estimate_seconds, load_inputs, plan_runs, resolve_device, results_root, with_checkpoints)
from bench.progress import Progress
from bench.simulator import Simulation
from bench.store import ResultsStore, default_tracking_uri, run_key  # noqa: F401  (run_key: re-exported)
from bench.summary import run_summary
from data.portable import partition_sha256


@dataclass
class InvocationResult:
    root: Path
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # run key -> reason
    skipped: list[str] = field(default_factory=list)      # runs already finished in the folder (resume)
    mlflow_unsynced: bool = False                           # MLflow misses part of it: `bench sync` uploads


# ---- one run ----------------------------------------------------------------------------------------------
@dataclass
class RunEnv:
    """What every run of an invocation shares: its config (resolved), inputs and device, and the resolved
    config its runs record (`config`). `resume`: continue each run from its checkpoint, if it has one."""

    cfg: RunConfig
    inputs: Inputs
    device: torch.device
    config: dict[str, Any]
    resume: bool = False

    def run_info(self, spec: RunSpec) -> RunInfo:
        cfg, splits = self.cfg, self.inputs.splits[spec.seed]
        params = {**{k: v for k, v in self.config.items() if k != "partition_hashes"}, "algorithm": spec.name,
                  "seed": spec.seed, "partition_hash": partition_sha256(splits), "hparams": vars(spec.hparams)}
        tags = {"algorithm": spec.name, "role": spec.algorithm.role, "dataset": self.inputs.dataset.name,
                "split": str(self.inputs.dataset.split), "seed": str(spec.seed), "setting": setting_of(params),
                "model_group": cfg.model_group, "partition_hash": params["partition_hash"]}
        return RunInfo(spec.key, params, tags, cfg.rounds, spec.checkpoint)

    def saved(self, spec: RunSpec) -> SavedRun | None:
        """The checkpoint to continue from (None: start over; an unreadable one is warned about)."""
        if not self.resume or spec.checkpoint is None:
            return None
        try:
            return read_run(spec.checkpoint)
        except CheckpointError as err:
            warnings.warn(f"{spec.key}: {err}; this run starts over", stacklevel=2)
            return None


def builtin_simulation(spec: RunSpec, env: RunEnv, run: RunInfo) -> Simulation:
    return Simulation(env.cfg, spec.algorithm, spec.seed, env.inputs.data, env.inputs.splits[spec.seed], env.device,
                      hparams=spec.hparams)


def execute_run(spec: RunSpec, env: RunEnv, callbacks: Callback,
                make_simulation: Callable[[RunSpec, RunEnv, RunInfo], Simulation] = builtin_simulation,
                ) -> tuple[dict[str, Any], str]:
    """One (algorithm, seed) run through the round loop, every round sent to `callbacks`. Returns (summary,
    status); an exception inside the run (or a non-finite training loss, detected in the round it appears)
    marks it FAILED instead of propagating; a UserError ends the run FAILED and propagates; an interrupt
    (Ctrl-C, SIGTERM) ends it KILLED, its checkpoint kept, and propagates. `make_simulation` builds the round
    loop (the Flower executor's runs its clients in ClientApps: bench/flower/run.py)."""
    cfg, run = env.cfg, env.run_info(spec)
    saved = env.saved(spec)
    unrestorable = None
    if saved is not None:
        try:
            run.history, run.restored_from = saved.history(spec.key), saved.file
        except CheckpointError as err:
            unrestorable = err
    callbacks.on_run_start(run, saved.step if saved is not None else (-1 if env.resume else None))
    clients: list[dict[str, Any]] = []
    try:
        if unrestorable is not None:
            raise unrestorable
        run.sim = sim = make_simulation(spec, env, run)
        if saved is not None:
            saved.restore(sim)
        else:
            finish_round(run, callbacks, 0, sim.initial_metrics())
        for round_index in range(sim.rounds_done, cfg.rounds):
            metrics = sim.run_round(round_index)
            if not math.isfinite(metrics["train_loss"]):
                raise FloatingPointError(f"non-finite training loss in round {round_index + 1}")
            finish_round(run, callbacks, round_index + 1, metrics)
        clients = sim.client_table()
        summary, status = run_summary(run.history, cfg.target_accuracy), "FINISHED"
    except UserError as err:
        run.error = err
        callbacks.on_run_end(run, failed_summary(run, cfg, str(err)), [], "FAILED")
        raise
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: the run is KILLED (its checkpoint kept), then we stop
        callbacks.on_run_end(run, failed_summary(run, cfg, f"interrupted ({interrupt_name(err)})"), [], "KILLED")
        raise
    except Exception as err:  # isolate the failure: the other algorithms still run
        run.error = err
        summary, status = failed_summary(run, cfg, f"{type(err).__name__}: {err}"), "FAILED"
    callbacks.on_run_end(run, summary, clients, status)
    return summary, status


def finish_round(run: RunInfo, callbacks: Callback, step: int, metrics: dict[str, float]) -> None:
    run.history.append({"step": step, **metrics})
    callbacks.on_round_end(run, step, metrics)


def failed_summary(run: RunInfo, cfg: RunConfig, reason: str) -> dict[str, Any]:
    return {**(run_summary(run.history, cfg.target_accuracy) if run.history else {}), "error": reason}


@dataclass
class RunTask:
    """One run to execute elsewhere (a Ray worker): picklable; the worker loads its own inputs."""

    cfg: RunConfig
    spec: RunSpec
    config: dict[str, Any]

    def execute(self, record: Callback, gpu: bool) -> tuple[dict[str, Any], str]:
        """Run it with `record` first in the callback order (then its checkpoints), always continuing from
        the run's checkpoint when one exists (a retry after the worker died). A task without a GPU stays off
        any GPU that Ray did not give it."""
        cfg = self.cfg
        device = resolve_device("cpu" if cfg.device == "auto" and not gpu else cfg.device)
        config = {**self.config, "device_resolved": str(device)}  # the run's params name the device it ran on
        env = RunEnv(cfg, load_inputs(cfg, device), device, config, resume=True)
        checkpoints = CheckpointCallback(cfg.checkpoint_every, cfg.keep_checkpoints)
        return execute_run(self.spec, env, ordered(record=record, checkpoint=checkpoints))


# ---- one invocation (one results folder) --------------------------------------------------------------------
@dataclass
class Invocation:
    """One results folder being written: its runs (those still to run: `pending`), callbacks and outcome.
    An executor calls begin, then runs `pending` (execute here, or task elsewhere), then close."""

    env: RunEnv
    runs: list[RunSpec]
    kept: dict[str, dict[str, Any]]        # run key -> summary of the runs already finished (resume)
    store: ResultsStore
    dataset_name: str
    resuming: bool
    use_mlflow: bool
    remote: bool
    outcome: InvocationResult
    callbacks: CallbackList | None = None  # this process's (begin): results folder, checkpoints, MLflow, progress
    progress: Progress | None = None       # this process's progress display (begin): told the estimate per run

    @property
    def cfg(self) -> RunConfig:
        return self.env.cfg

    @property
    def root(self) -> Path:
        return self.store.root

    @property
    def pending(self) -> list[RunSpec]:
        return [r for r in self.runs if r.key not in self.kept]

    def header(self) -> str:
        cfg = self.cfg
        split = self.env.config.get("dataset_split")
        return (f"bench: {', '.join(dict.fromkeys(r.name for r in self.runs))} on {self.dataset_name} "
                + (f"({split} split) " if split else "") +
                f"({cfg.num_clients} clients, C={cfg.participation}: {cfg.clients_per_round} per round, "
                f"{cfg.rounds} rounds, E={cfg.local_epochs}, "
                f"seeds {cfg.seeds}) on {self.env.config['device_resolved']}; results in {self.root}"
                + ("  [resumed]" if self.resuming else ""))

    def begin(self, progress: Progress) -> None:
        """Start the callbacks and hand them the runs kept from before. Where the runs execute elsewhere
        (Ray), the checkpoints are theirs: this process's callbacks are the results folder, MLflow, progress."""
        self.progress = progress
        progress.echo(self.header())
        cfg, output_dir = self.cfg, Path(self.cfg.output_dir)
        mlflow = make_mlflow_callback(cfg.tracking_uri or default_tracking_uri(output_dir), cfg.experiment,
                                      output_dir, self.store, system_metrics=cfg.system_metrics,
                                      ) if self.use_mlflow else None
        checkpoints = None if self.remote else CheckpointCallback(cfg.checkpoint_every, cfg.keep_checkpoints)
        self.callbacks = ordered(record=ResultsFolderCallback(self.store), checkpoint=checkpoints, mirror=mlflow,
                                 display=ProgressCallback(progress))
        self.callbacks.on_invocation_start(InvocationInfo(self.root.name, self.env.config), self.resuming)
        for key, summary in self.kept.items():
            self.outcome.summaries[key] = summary
            self.outcome.skipped.append(key)
            self.callbacks.on_run_kept(key, summary)
            progress.echo(f"{key}: already finished in {self.root}; kept")

    def execute(self, spec: RunSpec) -> None:
        """Run `spec` here, in this process."""
        self.record(spec.key, *execute_run(spec, self.env, self.callbacks))

    def task(self, spec: RunSpec) -> RunTask:
        """`spec` to execute elsewhere (paths absolute: a worker's working directory may differ)."""
        checkpoint = spec.checkpoint.resolve() if spec.checkpoint is not None else None
        return RunTask(worker_config(self.cfg), dataclasses.replace(spec, checkpoint=checkpoint), self.env.config)

    def estimate(self) -> dict[str, float]:
        """The up-front time estimate of every algorithm over the rounds still to run (a resumed folder's
        finished runs and checkpointed rounds cost nothing), with this process's threads; the progress display
        gets it per run (its "ETA all")."""
        inputs, pending = self.env.inputs, self.pending
        per_run = estimate_runs(self.cfg, inputs.data, inputs.splits[pending[0].seed], self.env.device, pending)
        if self.progress is not None:
            self.progress.expect(per_run)
        return per_algorithm(per_run)

    def drop_inputs(self) -> None:
        """Free the data where the runs load their own (Ray workers)."""
        self.env.inputs = None

    def record(self, key: str, summary: dict[str, Any], status: str) -> None:
        self.outcome.summaries[key] = summary
        if status != "FINISHED":
            self.outcome.failed[key] = summary.get("error", status)

    def abort(self, status: str = "FAILED") -> None:
        """Stopped early: a UserError inside a run (FAILED) or an interrupt, Ctrl-C or SIGTERM (KILLED). End the
        callbacks with that status; the caller re-raises."""
        if self.callbacks is not None:
            self.callbacks.on_invocation_end([self.store.summary_table_path], status)

    def close(self, progress: Progress) -> InvocationResult:
        status = "FAILED" if self.outcome.failed else "FINISHED"
        plots = []
        try:
            from reports.report import run_report

            plots = run_report(self.root, title=f"{self.dataset_name}, N={self.cfg.num_clients}, "
                                                f"C={self.cfg.participation}")
        except Exception as err:  # figures are a convenience: never lose a run's results over them
            warnings.warn(f"could not draw the plots of {self.root} ({type(err).__name__}: {err})", stacklevel=2)
        self.callbacks.on_invocation_end([self.store.summary_table_path, *plots], status)
        self.outcome.mlflow_unsynced = bool(self.use_mlflow and self.store.mlflow_info().get("unsynced"))
        progress.echo(f"done: results in {self.root}")
        if self.outcome.mlflow_unsynced:
            progress.echo(f"note: MLflow misses part of this invocation; upload it with `bench sync {self.root}`")
        return self.outcome

    def release(self) -> None:
        self.store.release()


def warn_inexact_participation(cfg: RunConfig) -> None:
    """One line when C x N is not a whole number of clients: the run samples ceil(C x N) (the documented rule)."""
    if not cfg.participation_is_exact:
        k = cfg.clients_per_round
        warnings.warn(f"participation C={cfg.participation:g} of {cfg.num_clients} clients is "
                      f"{cfg.participation * cfg.num_clients:.4g} clients; each round samples ceil(C x N) = {k} "
                      f"(C = {k / cfg.num_clients:.4g} in effect)", stacklevel=2)


def interrupt_name(err: BaseException) -> str:
    """SIGTERM for a termination (bench.errors.Terminated), else SIGINT (Ctrl-C)."""
    return "SIGTERM" if isinstance(err, Terminated) else "SIGINT"


def worker_config(cfg: RunConfig) -> RunConfig:
    """The config a worker receives: relative paths made absolute (a worker's working directory may differ)."""
    def absolute(path: str | None) -> str | None:
        return str(Path(path).resolve()) if path and Path(path).exists() else path

    return dataclasses.replace(cfg, dataset=absolute(cfg.dataset), data_dir=absolute(cfg.data_dir))


def open_invocation(cfg: RunConfig, *, use_mlflow: bool = True, resume: bool = False,
                    remote: bool = False) -> Invocation:
    """Plan `cfg` (bad input is refused before anything is written: the output dir is checked before the data
    loads, the folder created after the last check), take its results folder and find the runs a resumed folder
    already finished. The caller must `release()` it. `remote`: the runs execute on Ray
    workers, which pick their own device; the checks run on this CPU."""
    device = torch.device("cpu") if remote else resolve_device(cfg.device)
    runs = plan_runs(cfg)
    if resume and cfg.run_name is None:
        raise UserError(NEEDS_RUN_NAME)
    check_output_dir(cfg.output_dir, cfg.run_name)
    if use_mlflow and cfg.system_metrics:
        check_system_metrics()  # refused before anything is written
    warn_inexact_participation(cfg)
    inputs = load_inputs(cfg, device, runs)
    cfg = resolve_dataset_defaults(cfg, inputs.dataset.num_classes)  # what the folder records and every run uses
    check_algorithms(cfg, runs, inputs, device)
    hashes = {str(seed): partition_sha256(splits) for seed, splits in inputs.splits.items()}
    root, resuming = results_root(cfg, resume, hashes)
    store = ResultsStore(root)
    store.acquire()
    runs = with_checkpoints(runs, store, cfg)
    config = {**cfg.to_dict(), "clients_per_round": cfg.clients_per_round, "dataset_split": inputs.dataset.split,
              "run_name": root.name,
              "device_resolved": f"ray worker ({cfg.device})" if remote else str(device),
              "target_acc": cfg.target_accuracy, "partition_hashes": hashes, "torch": torch.__version__}
    kept = {}
    for spec in runs if resuming else []:
        finished = store.finished_summary(spec.key)
        if finished is not None:
            kept[spec.key] = {k: v for k, v in finished.items() if k != "status"}
    return Invocation(RunEnv(cfg, inputs, device, config, resume=resuming), runs, kept, store, inputs.dataset.name,
                      resuming, use_mlflow, remote, InvocationResult(root))


# ---- entry points -----------------------------------------------------------------------------------------
def run_invocations(cfgs: list[RunConfig], *, show_progress: bool = True, use_mlflow: bool = True,
                    resume: bool = False, executor: Executor | ExecutorOptions | None = None) -> list[InvocationResult]:
    """Run every (seed, algorithm) of each setting in `cfgs` with `executor` (default: here, one after the
    other; on Ray every run of every setting is one task, all in parallel). `resume=True` continues the
    results folder <output_dir>/<run_name> if it holds the run (finished runs are kept, the others continue
    from their last checkpoint), and starts it otherwise."""
    opener = functools.partial(open_invocation, use_mlflow=use_mlflow, resume=resume)
    return make_executor(executor).run(cfgs, opener, show_progress)


def run_invocation(cfg: RunConfig, *, show_progress: bool = True, use_mlflow: bool = True, resume: bool = False,
                   executor: Executor | ExecutorOptions | None = None) -> InvocationResult:
    return run_invocations([cfg], show_progress=show_progress, use_mlflow=use_mlflow, resume=resume,
                           executor=executor)[0]
