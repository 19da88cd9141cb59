"""The local executor: each setting is planned, run (its runs one after the other, in this process) and
closed before the next."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from bench.errors import UserError, mark_interrupted
from bench.executors import Executor
from bench.progress import Progress, fmt_duration

if TYPE_CHECKING:
    from bench.runner import Invocation, InvocationResult


class LocalExecutor(Executor):
    def __init__(self, options: Any = None):
        if options is not None and (options.address or options.gpus_per_run is not None):
            raise UserError("--ray-address and --gpus-per-run need --executor ray")

    def run(self, cfgs: list, open_invocation: Callable[..., Invocation], show_progress: bool) -> list[InvocationResult]:
        outcomes = []
        for cfg in cfgs:
            inv = open_invocation(cfg, remote=False)
            try:
                outcomes.append(self.run_one(inv, show_progress))
            finally:
                inv.release()
        return outcomes

    def run_one(self, inv: Invocation, show_progress: bool) -> InvocationResult:
        import torch

        threads_before = torch.get_num_threads()
        if inv.cfg.threads is not None:
            torch.set_num_threads(inv.cfg.threads)
        progress = Progress(inv.cfg.rounds * len(inv.pending), enabled=show_progress)
        try:
            inv.begin(progress)
            if inv.pending:
                progress.echo(estimate_line(inv))
            for spec in inv.pending:
                inv.execute(spec)
        except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: the runs so far are kept, MLflow's marked KILLED
            inv.abort("KILLED")
            mark_interrupted(err, inv.root)
            raise
        except BaseException:
            inv.abort()
            raise
        finally:
            torch.set_num_threads(threads_before)  # the option is per run, not for the rest of this process
        return inv.close(progress)


def estimate_line(inv: Invocation) -> str:
    """The up-front time estimate of the pending runs, as a progress line. An estimate is a convenience: one
    that fails says so and never stops the run."""
    try:
        estimate = inv.estimate()
    except Exception as err:
        return f"estimated time: estimate unavailable ({type(err).__name__}: {err})"
    return ("estimated time: " + ", ".join(f"{k} ~{fmt_duration(v)}" for k, v in estimate.items())
            + f"; total ~{fmt_duration(sum(estimate.values()))}")
