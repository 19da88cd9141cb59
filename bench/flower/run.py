"""A results folder's runs over a Flower Grid: the run lifecycle of bench/runner.py (execute_run) with a
FlowerSimulation in place of the built-in Simulation. The same callbacks write the results folder, MLflow and the
progress lines, round by round, so a run that fails (a SuperNode that stops mid-round) keeps every round
already written and ends FAILED with the reason."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable

from bench.callbacks import Callback, RunInfo
from bench.flower.link import ClientLink
from bench.flower.server import FlowerSimulation
from bench.plan import RunSpec
from bench.runner import Invocation, RunEnv, execute_run, failed_summary


@dataclass
class FlowerOptions:
    reply_timeout: float = 3600.0   # seconds a client may take to answer one message before the run fails
    connect_timeout: float = 120.0  # seconds to wait for the SuperNodes holding clients 0..N-1


def serve(inv: Invocation, grid: Any, options: FlowerOptions) -> None:
    """Run every pending run of `inv` over `grid` (a ServerApp's Grid), one after the other."""
    link = ClientLink(grid, options.reply_timeout, options.connect_timeout)
    link.connect(inv.cfg.num_clients)
    for spec in inv.pending:
        if link.lost is not None:  # a client is gone: the runs after it cannot run either
            inv.record(spec.key, *skipped_run(spec, inv.env, inv.callbacks, link.lost))
        else:
            inv.record(spec.key, *execute_flower_run(spec, inv.env, inv.callbacks, link))


def execute_flower_run(spec: RunSpec, env: RunEnv, callbacks: Callback, link: ClientLink) -> tuple[dict[str, Any], str]:
    """One (algorithm, seed) run with its clients in Flower ClientApps: execute_run's lifecycle (an exception
    marks the run FAILED, the rounds written so far kept; a UserError ends it FAILED and propagates) with a
    FlowerSimulation. Client state lives on the clients, so a Flower run is not checkpointed: an interrupted
    one starts over."""
    def flower_simulation(spec: RunSpec, env: RunEnv, run: RunInfo) -> FlowerSimulation:
        return FlowerSimulation(env.cfg, spec.algorithm, spec.seed, env.inputs.data, env.inputs.splits[spec.seed],
                                env.device, spec.hparams, link, spec.key, run.params["partition_hash"])

    return execute_run(dataclasses.replace(spec, checkpoint=None), env, callbacks, flower_simulation)


def skipped_run(spec: RunSpec, env: RunEnv, callbacks: Callback, reason: str) -> tuple[dict[str, Any], str]:
    """A run that cannot start because a client was lost in an earlier run: FAILED, with that reason."""
    run = env.run_info(dataclasses.replace(spec, checkpoint=None))
    callbacks.on_run_start(run, -1 if env.resume else None)  # as execute_run: a resumed folder's run starts over
    summary = failed_summary(run, env.cfg, f"not run: {reason}")
    callbacks.on_run_end(run, summary, [], "FAILED")
    return summary, "FAILED"


def simulate(main: Callable[[Any], None], num_supernodes: int, cpus: float = 1.0, gpus: float = 0.0) -> None:
    """Flower's simulation engine on this machine: `main(grid)` as the ServerApp (a thread of this process),
    `num_supernodes` virtual SuperNodes (node config partition-id 0..N-1) running bench's ClientApp in one Ray
    actor of `cpus` CPUs and `gpus` GPUs (messages go one at a time: more actors would idle). An exception in
    `main` propagates."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from bench.flower.client import app as client_app

    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context) -> None:
        main(grid)

    backend = {"client_resources": {"num_cpus": cpus, "num_gpus": gpus},
               "init_args": {"num_cpus": cpus, "num_gpus": gpus, "include_dashboard": False,
                             "object_store_memory": 256 * 2**20, "logging_level": logging.WARNING,
                             "log_to_driver": False}}
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.ERROR)  # Flower's per-message INFO lines and run_simulation's deprecation note
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_supernodes,
                       backend_config=backend)
    finally:
        flwr_log.setLevel(level)
