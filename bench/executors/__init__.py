"""Where runs execute, behind one interface: `Executor.run(cfgs, open_invocation, show_progress)` plans each
setting with `open_invocation` (bench/runner.py), runs its pending runs and closes it.

    local.py   LocalExecutor: here, one run after the other (the default)
    ray.py     RayExecutor: every (algorithm, seed, setting) run of a grid is one Ray task, in parallel, on a
               local Ray instance or an existing cluster; workers forward their events to this process
    flower.py  FlowerExecutor: every client a Flower ClientApp (simulation engine here, or a deployed Grid);
               needs the flower extra

`ExecutorOptions` holds what the command line chose (`--executor`, `--cpus-per-run`, ...); `make_executor`
turns it into an executor."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from bench.errors import UserError

if TYPE_CHECKING:
    from bench.config import RunConfig
    from bench.runner import Invocation, InvocationResult


class Executor(ABC):
    concurrent = False  # runs every setting's runs at once (so a grid has one wall time, not one per setting)

    @abstractmethod
    def run(self, cfgs: list[RunConfig], open_invocation: Callable[..., Invocation],
            show_progress: bool) -> list[InvocationResult]:
        """Run every pending run of every setting; `open_invocation(cfg, remote=...)` plans a setting and takes
        its results folder. Returns each setting's outcome, in order."""


@dataclass
class ExecutorOptions:
    kind: str = "local"                  # local | ray | flower
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


def make_executor(options: Executor | ExecutorOptions | None = None) -> Executor:
    """The executor `options` name (already one: itself; None: the local one)."""
    if isinstance(options, Executor):
        return options
    options = options or ExecutorOptions()
    options.validate()
    return EXECUTORS[options.kind](options)


def executor_from_cli(executor: str, cpus_per_run: float, gpus_per_run: float | None, ray_address: str | None,
                      max_retries: int, **_: Any) -> Executor:
    """The executor of the command-line options (--executor and the Ray options)."""
    return make_executor(ExecutorOptions(executor, cpus_per_run, gpus_per_run,
                                         ray_address if executor == "ray" else None, max_retries))


from bench.executors.local import LocalExecutor  # noqa: E402
from bench.executors.ray import RayExecutor  # noqa: E402
from bench.executors.flower import FlowerExecutor  # noqa: E402

EXECUTORS: dict[str, type] = {"local": LocalExecutor, "ray": RayExecutor, "flower": FlowerExecutor}
