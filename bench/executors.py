"""Where runs execute. `local` (default): one after the other in this process (bench/runner.py).
`ray`: every (algorithm, seed, setting) run of a grid is one Ray task with its own resource request, on a
local Ray instance or an existing cluster (--ray-address / RAY_ADDRESS).

Workers never write results: each sends its run's tracker events (start/resume, rounds, end) through a Ray
queue to this driver, which applies them to the same results folder and MLflow trackers a local run uses.
So the MLflow store can be the driver's local sqlite file or a server, and worker nodes need neither. A
worker writes only its run's checkpoint (under the driver's results folder: shared on one node or a shared
filesystem; on a multi-node cluster without one, a retry on another node starts that run over). A run whose
worker dies is retried `max_retries` times (continuing from its checkpoint), then reported FAILED while the
rest of the grid completes."""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from bench.config import RunConfig
from bench.errors import UserError
from bench.progress import Progress, fmt_duration
from bench.tracking import Tracker

EXECUTORS = ("local", "ray")


@dataclass
class ExecutorOptions:
    kind: str = "local"                  # local | ray
    cpus_per_run: float = 1.0            # Ray resource request of each run (also its torch threads)
    gpus_per_run: float | None = None    # fractions allowed; None: 1 if the runs use a GPU and the cluster has one
    address: str | None = None           # Ray cluster address; None: RAY_ADDRESS, else a local Ray instance
    max_retries: int = 1                 # re-runs of a run whose worker process died

    def validate(self) -> None:
        if self.kind not in EXECUTORS:
            raise UserError(f"unknown executor {self.kind!r}; valid: {', '.join(EXECUTORS)}")
        if not self.cpus_per_run > 0:
            raise UserError(f"--cpus-per-run must be > 0, got {self.cpus_per_run}")
        if self.gpus_per_run is not None and self.gpus_per_run < 0:
            raise UserError(f"--gpus-per-run must be >= 0 (fractions allowed, e.g. 0.5), got {self.gpus_per_run}")
        if self.max_retries < 0:
            raise UserError(f"--max-retries must be >= 0, got {self.max_retries}")
        if self.kind == "local" and (self.address or self.gpus_per_run is not None):
            raise UserError("--ray-address and --gpus-per-run need --executor ray")


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'mhpfl-bench[ray]' (or pip install ray)") from None
    return ray


def connect(ray, options: ExecutorOptions) -> None:
    """Join the cluster at --ray-address / RAY_ADDRESS, or start a local Ray instance (reused if this process
    already has one)."""
    if ray.is_initialized():
        return
    address = options.address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:  # the tasks exchange kilobytes (configs, metrics): a small object store is plenty
            ray.init(include_dashboard=False, logging_level=logging.WARNING, object_store_memory=256 * 2**20)
    except Exception as err:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise UserError(f"cannot start or reach {where} ({type(err).__name__}: {str(err).splitlines()[0]}); "
                        "check --ray-address / RAY_ADDRESS, or use --executor local") from None


def gpus_per_run(ray, options: ExecutorOptions, device: str) -> float:
    gpus = float(ray.cluster_resources().get("GPU", 0))
    cpus = float(ray.cluster_resources().get("CPU", 0))
    if options.cpus_per_run > cpus:
        raise UserError(f"--cpus-per-run {options.cpus_per_run:g} exceeds the Ray cluster's {cpus:g} CPUs; "
                        f"valid: up to {cpus:g}")
    wanted = options.gpus_per_run
    if wanted is None:
        wanted = 1.0 if gpus and device != "cpu" else 0.0
    if wanted > gpus:
        raise UserError(f"--gpus-per-run {wanted:g} but the Ray cluster has {gpus:g} GPU(s); valid: 0 to {gpus:g}")
    if wanted == 0 and device.startswith("cuda"):
        raise UserError(f"--device {device} on Ray needs --gpus-per-run > 0 (the cluster has {gpus:g} GPU(s))")
    return wanted


def executor_options(command):
    """--executor and the Ray options, shared by `bench run`, `bench resume` and `bench paper`."""
    options = [
        click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="local: runs one after the other here; ray: each (algorithm, seed, setting) run is a "
                          "Ray task, in parallel."),
        click.option("--cpus-per-run", type=float, default=1.0, show_default=True,
                     help="Ray: CPUs each run requests (also its torch threads)."),
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


def make_executor(executor: str, cpus_per_run: float, gpus_per_run: float | None, ray_address: str | None,
                  max_retries: int):
    options = ExecutorOptions(executor, cpus_per_run, gpus_per_run, ray_address if executor == "ray" else None,
                              max_retries)
    options.validate()
    return options


class ForwardingTracker(Tracker):
    """Worker side: every event goes to the driver's queue, before the run's checkpoint is written (durable),
    so a checkpoint never holds a round the driver cannot receive."""

    durable = True

    def __init__(self, queue, invocation: int):
        self.queue, self.invocation, self.pid = queue, invocation, os.getpid()

    def _send(self, event: str, *args: Any) -> None:
        self.queue.put((self.invocation, self.pid, event, args))

    def start_run(self, key, params, tags):
        self._send("start_run", key, params, tags)

    def resume_run(self, key, params, tags, step):
        self._send("resume_run", key, params, tags, step)

    def log_round(self, key, step, metrics):
        self._send("log_round", key, step, metrics)

    def end_run(self, key, summary, clients, status):
        self._send("end_run", key, summary, clients, status)


def remote_run(cfg: RunConfig, algorithm: str, seed: int, target: float, config: dict[str, Any],
               checkpoint: str | None, threads: int, queue, invocation: int) -> tuple[dict[str, Any], str]:
    """One run inside a Ray worker: load the data, run the round loop, forward every event to the driver.
    Always continues from the run's checkpoint when one exists (a retry after the worker died)."""
    import ray
    import torch

    from bench.registry import resolve_algorithms
    from bench.runner import execute_run, load_inputs, resolve_device

    torch.set_num_threads(cfg.threads or threads)
    # A task without a GPU request must not wander onto a GPU that Ray did not give it.
    device = resolve_device("cpu" if cfg.device == "auto" and not ray.get_gpu_ids() else cfg.device)
    dataset, data, splits = load_inputs(cfg, device)  # all seeds' splits: the data may depend on the first seed
    algo_cls = resolve_algorithms([algorithm])[0]
    config = {**config, "device_resolved": str(device)}  # the run's params name the device it ran on
    return execute_run(cfg, algo_cls, seed, data, splits[seed], device, [ForwardingTracker(queue, invocation)],
                       Progress(0, enabled=False), target, config, dataset.name, resume=True,
                       checkpoint_dir=Path(checkpoint) if checkpoint else None)


@dataclass
class GridRun:
    invocation: int
    key: str
    rounds: int
    state: str = "pending"               # pending | running | done
    pid: int | None = None               # the worker process running it (the driver learns it from its events)
    last_step: int = -1
    ended: bool = False                  # the worker sent the run's end
    best: float = float("-inf")


class RayGrid:
    """The driver's side of a grid: applies the workers' events to the trackers and keeps the progress."""

    def __init__(self, invocations: list, progress: Progress):
        self.invocations, self.progress = invocations, progress
        self.runs: dict[tuple[int, str], GridRun] = {}

    def status_line(self) -> str:
        runs, p = list(self.runs.values()), self.progress
        count = {state: sum(r.state == state for r in runs) for state in ("done", "running", "pending")}
        elapsed = time.perf_counter() - p.start
        eta = fmt_duration(elapsed / p.done_rounds * (p.total_rounds - p.done_rounds)) if p.done_rounds else "?"
        return (f"grid: {count['done']}/{len(runs)} done, {count['running']} running, {count['pending']} pending; "
                f"rounds {p.done_rounds}/{p.total_rounds}; ETA {eta}")

    def apply(self, invocation: int, pid: int, event: str, args: tuple) -> None:
        inv, key = self.invocations[invocation], args[0]
        run = self.runs[(invocation, key)]
        if event in ("start_run", "resume_run"):
            run.state, run.pid = "running", pid
            if event == "resume_run" and args[3] >= 0:
                self.progress.echo(f"{key}: continuing after round {args[3]} (worker {pid})")
            self.progress.echo(self.status_line())
        for t in inv.trackers:  # the results folder first (durable), as in a local run
            getattr(t, event)(*args)
        if event == "log_round":
            step, metrics = args[1], args[2]
            if step > max(run.last_step, 0):  # a retried run re-sends its rounds: count each once
                run.best = max(run.best, metrics.get("acc_mean", run.best))
                self.progress.round_done(key, step, run.rounds, metrics, run.best, metrics.get("cum_round_time", 0.0))
            run.last_step = max(run.last_step, step)
        run.ended = run.ended or event == "end_run"

    def finish(self, run: GridRun, summary: dict[str, Any], status: str) -> None:
        inv = self.invocations[run.invocation]
        if not run.ended:  # the worker died before it could close the run
            for t in inv.trackers:
                t.end_run(run.key, summary, [], status)
        inv.record(run.key, summary, status)
        run.state = "done"
        self.progress.total_rounds -= run.rounds - max(run.last_step, 0)  # rounds a failed run will not send
        if status != "FINISHED":
            self.progress.echo(f"{run.key}: FAILED ({summary.get('error')})")
        self.progress.echo(self.status_line())


def run_on_ray(cfgs: list[RunConfig], options: ExecutorOptions, *, show_progress: bool = True,
               use_mlflow: bool = True, resume: bool = False) -> list:
    """Every pending run of every setting as a Ray task; events applied here as they arrive."""
    import torch

    from bench.runner import checkpoint_dir, estimate_seconds, open_invocation, run_key

    options.validate()
    ray = import_ray()
    connect(ray, options)
    gpus = gpus_per_run(ray, options, cfgs[0].device if cfgs else "cpu")
    invocations = []
    estimate = 0.0
    try:
        for cfg in cfgs:  # every setting is checked, and its folder taken, before anything runs
            inv = open_invocation(cfg, use_mlflow=use_mlflow, resume=resume, remote=True)
            invocations.append(inv)
            if inv.pending:  # timed with the threads a worker will have
                _, data, splits = inv.inputs
                threads = torch.get_num_threads()
                torch.set_num_threads(cfg.threads or max(1, int(options.cpus_per_run)))
                estimate += sum(estimate_seconds(cfg, data, splits[inv.pending[0][0]], inv.device).values())
                torch.set_num_threads(threads)
            inv.inputs = None  # the workers load their own data
        progress = Progress(sum(inv.cfg.rounds * len(inv.pending) for inv in invocations), enabled=show_progress)
        for inv in invocations:
            progress.echo(inv.header())
            for key in inv.outcome.skipped:
                progress.echo(f"{key}: already finished in {inv.root}; kept")

        from ray.util.queue import Queue

        queue = Queue()
        task = ray.remote(remote_run).options(num_cpus=options.cpus_per_run, num_gpus=gpus,
                                              max_retries=options.max_retries)
        grid = RayGrid(invocations, progress)
        refs: dict[Any, GridRun] = {}
        for i, inv in enumerate(invocations):
            for seed, cls in inv.pending:
                key = run_key(cls.name, seed)
                ckpt = checkpoint_dir(inv, key)
                ref = task.remote(worker_config(inv.cfg), cls.name, seed, inv.target, inv.config,
                                  str(ckpt.resolve()) if ckpt else None, max(1, int(options.cpus_per_run)), queue, i)
                refs[ref] = grid.runs[(i, key)] = GridRun(i, key, inv.cfg.rounds)
        cpus = float(ray.cluster_resources().get("CPU", 1))
        parallel = max(1, min(len(refs), int(cpus // options.cpus_per_run)))
        progress.echo(f"ray: {len(refs)} runs as tasks ({options.cpus_per_run:g} CPU, {gpus:g} GPU each) on {cpus:g} "
                      f"CPUs; estimated ~{fmt_duration(estimate)} of compute (timed on the driver's CPU), "
                      f"~{fmt_duration(estimate / parallel)} with {parallel} in parallel")

        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=0.2)
            while size := queue.size():  # every event a finished task sent is queued before it returned
                for event in queue.get_nowait_batch(size):
                    grid.apply(*event)
            for ref in done:
                try:
                    summary, status = ray.get(ref)
                except ray.exceptions.RayTaskError as err:  # raised by the run itself (e.g. a UserError)
                    summary, status = {"error": one_line_cause(err)}, "FAILED"
                except ray.exceptions.RayError as err:  # the worker died more often than max_retries allows
                    summary = {"error": f"Ray worker died ({type(err).__name__}) after "
                                        f"{options.max_retries + 1} attempt(s)"}
                    status = "FAILED"
                grid.finish(refs[ref], summary, status)
        return [inv.close(progress) for inv in invocations]
    except BaseException:
        for inv in invocations:
            if len(inv.outcome.summaries) < len(inv.cfg.seeds) * len(inv.algo_classes):
                inv.abort()
        raise
    finally:
        for inv in invocations:
            inv.results.release()


def worker_config(cfg: RunConfig) -> RunConfig:
    """The config a worker receives: relative paths made absolute (a worker's working directory may differ)."""
    def absolute(path: str | None) -> str | None:
        return str(Path(path).resolve()) if path and Path(path).exists() else path

    return dataclasses.replace(cfg, dataset=absolute(cfg.dataset), data_dir=absolute(cfg.data_dir))


def one_line_cause(err) -> str:
    cause = getattr(err, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return str(err).strip().splitlines()[-1]
