"""The Ray executor: every (algorithm, seed, setting) run of a grid is one Ray task with its own resource
request, on a local Ray instance or an existing cluster (--ray-address / RAY_ADDRESS).

Workers never write results: each runs its run with a forwarding callback first (bench/callbacks/forward.py),
which sends the run's events through a Ray queue to this driver, where they are replayed to the same
results-folder, MLflow and progress callbacks a local run uses. So the MLflow store can be the driver's
local sqlite file or a server, and worker nodes need neither. A worker writes only its run's checkpoint
(under the driver's results folder: shared on one node or a shared filesystem; on a multi-node cluster
without one, a retry on another node starts that run over). A run whose worker dies is retried
`max_retries` times (continuing from its checkpoint), then reported FAILED while the rest of the grid
completes. Every setting is planned, and its folder taken, before anything runs."""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from bench.callbacks import RunInfo
from bench.callbacks.forward import ForwardingCallback, replay
from bench.errors import UserError, mark_interrupted
from bench.executors import Executor
from bench.progress import Progress, fmt_duration

if TYPE_CHECKING:
    from bench.runner import Invocation, InvocationResult, RunTask


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'mhpfl-bench[ray]' (or pip install ray)") from None
    return ray


def connect(ray, address: str | None) -> None:
    """Join the cluster at --ray-address / RAY_ADDRESS, or start a local Ray instance (reused if this process
    already has one)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:  # the tasks exchange kilobytes (configs, metrics): a small object store is plenty
            ray.init(include_dashboard=False, logging_level=logging.WARNING, object_store_memory=256 * 2**20)
    except Exception as err:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise UserError(f"cannot start or reach {where} ({type(err).__name__}: {str(err).splitlines()[0]}); "
                        "check --ray-address / RAY_ADDRESS, or use --executor local") from None


def gpus_per_run(ray, options, device: str) -> float:
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


def remote_run(task: RunTask, queue, invocation: int, threads: int) -> tuple[dict[str, Any], str]:
    """One run inside a Ray worker: every event forwarded to the driver's queue."""
    import ray
    import torch

    torch.set_num_threads(task.cfg.threads or threads)
    return task.execute(ForwardingCallback(queue, invocation), gpu=bool(ray.get_gpu_ids()))


@dataclass
class GridRun:
    invocation: int
    info: RunInfo                        # the driver's view of the run, which the forwarded events fill in
    state: str = "pending"               # pending | running | done
    pid: int | None = None               # the worker process running it (the driver learns it from its events)
    last_step: int = -1
    ended: bool = False                  # the worker sent the run's end

    @property
    def key(self) -> str:
        return self.info.key


class RayGrid:
    """The driver's side of a grid: replays the workers' events to each invocation's callbacks and keeps the
    grid's state (done, running, pending)."""

    def __init__(self, invocations: list[Invocation], progress: Progress):
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
        run = self.runs[(invocation, args[0])]
        if event == "run_start":
            run.state, run.pid = "running", pid
            resumed_from = args[3]
            if resumed_from is not None and resumed_from >= 0:
                self.progress.echo(f"{run.key}: continuing after round {resumed_from} (worker {pid})")
            self.progress.echo(self.status_line())
        replay(event, args, run.info, self.invocations[invocation].callbacks)
        if event == "round_end":
            run.last_step = max(run.last_step, args[1])
        run.ended = run.ended or event == "run_end"

    def finish(self, run: GridRun, summary: dict[str, Any], status: str) -> None:
        inv = self.invocations[run.invocation]
        if not run.ended:  # the worker died before it could end the run
            inv.callbacks.on_run_end(run.info, summary, [], status)
        inv.record(run.key, summary, status)
        run.state = "done"
        self.progress.total_rounds -= run.info.rounds - max(run.last_step, 0)  # rounds a failed run will not send
        self.progress.echo(self.status_line())


class RayExecutor(Executor):
    concurrent = True

    def __init__(self, options):
        self.options = options

    def run(self, cfgs: list, open_invocation: Callable[..., Invocation], show_progress: bool) -> list[InvocationResult]:
        ray = import_ray()
        connect(ray, self.options.address)
        gpus = gpus_per_run(ray, self.options, cfgs[0].device if cfgs else "cpu")
        invocations: list[Invocation] = []
        try:
            estimate = 0.0
            for cfg in cfgs:  # every setting is checked, and its folder taken, before anything runs
                inv = open_invocation(cfg, remote=True)
                invocations.append(inv)
                estimate += self.estimate(inv)
                inv.drop_inputs()  # the workers load their own data
            progress = Progress(sum(inv.cfg.rounds * len(inv.pending) for inv in invocations), enabled=show_progress)
            for inv in invocations:
                inv.begin(progress)
            grid = RayGrid(invocations, progress)
            self.run_grid(ray, grid, gpus, estimate)
            return [inv.close(progress) for inv in invocations]
        except BaseException as err:
            interrupted = isinstance(err, KeyboardInterrupt)  # Ctrl-C or SIGTERM: runs so far kept, marked KILLED
            for inv in invocations:
                if len(inv.outcome.summaries) < len(inv.runs):
                    inv.abort("KILLED" if interrupted else "FAILED")
                    if interrupted:
                        mark_interrupted(err, inv.root)
            raise
        finally:
            for inv in invocations:
                inv.release()

    def estimate(self, inv: Invocation) -> float:
        """The invocation's estimated compute, timed with the threads a worker will have."""
        if not inv.pending:
            return 0.0
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(inv.cfg.threads or max(1, int(self.options.cpus_per_run)))
        try:
            return sum(inv.estimate().values())
        except Exception:  # an estimate is a convenience: one that fails never stops the grid
            return math.nan
        finally:
            torch.set_num_threads(threads)

    def run_grid(self, ray, grid: RayGrid, gpus: float, estimate: float) -> None:
        from ray.util.queue import Queue

        options, progress = self.options, grid.progress
        queue = Queue()
        task = ray.remote(remote_run).options(num_cpus=options.cpus_per_run, num_gpus=gpus,
                                              max_retries=options.max_retries)
        refs: dict[Any, GridRun] = {}
        for i, inv in enumerate(grid.invocations):
            for spec in inv.pending:
                info = RunInfo(spec.key, {}, {}, inv.cfg.rounds, spec.checkpoint)
                ref = task.remote(inv.task(spec), queue, i, max(1, int(options.cpus_per_run)))
                refs[ref] = grid.runs[(i, spec.key)] = GridRun(i, info)
        cpus = float(ray.cluster_resources().get("CPU", 1))
        parallel = max(1, min(len(refs), int(cpus // options.cpus_per_run)))
        timing = (f"estimated ~{fmt_duration(estimate)} of compute (timed on the driver's CPU), "
                  f"~{fmt_duration(estimate / parallel)} with {parallel} in parallel") if math.isfinite(estimate) \
            else "estimate unavailable"
        progress.echo(f"ray: {len(refs)} runs as tasks ({options.cpus_per_run:g} CPU, {gpus:g} GPU each) on {cpus:g} "
                      f"CPUs; {timing}")
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=0.2)
            while size := queue.size():  # every event a finished task sent is queued before it returned
                for event in queue.get_nowait_batch(size):
                    grid.apply(*event)
            for ref in done:
                grid.finish(refs[ref], *self.outcome(ray, ref))

    def outcome(self, ray, ref) -> tuple[dict[str, Any], str]:
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as err:  # raised by the run itself (e.g. a UserError)
            return {"error": one_line_cause(err)}, "FAILED"
        except ray.exceptions.RayError as err:  # the worker died more often than max_retries allows
            return {"error": f"Ray worker died ({type(err).__name__}) after "
                             f"{self.options.max_retries + 1} attempt(s)"}, "FAILED"


def one_line_cause(err) -> str:
    """The exception a run raised inside its worker (a RayTaskError's cause), in one line."""
    if err.cause is not None:
        return f"{type(err.cause).__name__}: {err.cause}"
    return str(err).strip().splitlines()[-1]
