"""The Flower executor: each setting's runs go through Flower, every client a ClientApp on its own SuperNode.

Without a Grid it runs Flower's simulation engine on this machine (`flwr.simulation.run_simulation`: a
ServerApp thread here, the ClientApps in Ray actors), one simulation per setting, with N virtual SuperNodes
(node config partition-id 0..N-1). Given a Grid (a deployed ServerApp, bench/flower/deploy.py), it runs over
that federation. Either way this process writes the results folder and MLflow, round by round, as a local run.
Every client's messages go one at a time (bench/flower/server.py says why), so the simulation uses one actor
of `--cpus-per-run` CPUs (also its torch threads unless `threads` is set) and `--gpus-per-run` GPUs."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from bench.errors import UserError, mark_interrupted
from bench.executors.local import LocalExecutor
from bench.progress import Progress

if TYPE_CHECKING:
    from bench.flower.run import FlowerOptions
    from bench.runner import Invocation, InvocationResult


class FlowerExecutor(LocalExecutor):  # its settings one after the other, as the local one
    def __init__(self, options: Any = None, flower: "FlowerOptions | None" = None, grid: Any = None):
        """`options`: the command line's ExecutorOptions (cpus_per_run, gpus_per_run; no Ray address);
        `flower`: timeouts; `grid`: run over this Flower Grid instead of a simulation."""
        from bench.flower import require_flower

        require_flower()
        from bench.flower.run import FlowerOptions

        if options is not None and options.address:
            raise UserError("--ray-address needs --executor ray (a Flower simulation starts its own Ray instance)")
        self.cpus = float(options.cpus_per_run) if options is not None else 1.0
        self.gpus = options.gpus_per_run if options is not None else None
        self.flower = flower or FlowerOptions()
        self.grid = grid

    def run_one(self, inv: "Invocation", show_progress: bool) -> "InvocationResult":
        import torch

        from bench.executors.local import estimate_line

        threads_before = torch.get_num_threads()
        torch.set_num_threads(inv.cfg.threads or max(1, int(self.cpus)))
        progress = Progress(inv.cfg.rounds * len(inv.pending), enabled=show_progress)
        try:
            inv.begin(progress)
            if inv.pending and show_progress:
                progress.echo(estimate_line(inv))
            if inv.pending:
                self.execute(inv)
        except KeyboardInterrupt as err:
            inv.abort("KILLED")
            mark_interrupted(err, inv.root)
            raise
        except BaseException:
            inv.abort()
            raise
        finally:
            torch.set_num_threads(threads_before)
        return inv.close(progress)

    def execute(self, inv: "Invocation") -> None:
        from bench.flower.run import serve

        if self.grid is not None:
            serve(inv, self.grid, self.flower)
        else:
            self.simulate(inv, lambda grid: serve(inv, grid, self.flower))

    def simulate(self, inv: "Invocation", main: Callable[[Any], None]) -> None:
        from bench.flower.run import simulate

        gpus = self.gpus
        if gpus is None:
            import torch

            gpus = 1.0 if inv.env.device.type == "cuda" and torch.cuda.is_available() else 0.0
        simulate(main, inv.cfg.num_clients, self.cpus, gpus)
