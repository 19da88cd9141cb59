"""The callback protocol: what the run loop tells the results folder, the checkpoints, MLflow, the progress
display and (on a Ray worker) the driver. A callback overrides the events it needs; the base class does
nothing, so every callback has every method and the loop calls them unconditionally.

Events, in the order a callback receives them:

    on_invocation_start(info, resumed)       once per results folder; resumed: the folder held this run
    on_run_kept(key, summary)                per run that already finished in a resumed folder (not run again)
    per run that executes:
        on_run_start(run, resumed_from)      resumed_from: None (a fresh run), -1 (resumed without a checkpoint:
                                             from scratch) or k (continues after round k of its checkpoint);
                                             run.history then holds rounds 0..k, which a callback that misses
                                             some of them (MLflow, a folder behind a Ray driver) catches up from
        on_round_end(run, step, metrics)     per new round: step 0 (the untrained model) first, then 1..rounds;
                                             run.history already holds the round
        on_run_end(run, summary, clients, status)   FINISHED or FAILED (run.error says why)
    on_invocation_end(artifacts, status)     once, after the plots are drawn (also when interrupted: FAILED)

Every event goes to the callbacks in the order of the list (bench/callbacks/__init__.py: `ordered`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class InvocationInfo:
    name: str                  # the results folder's name (MLflow's parent run name)
    config: dict[str, Any]     # the resolved config, as <root>/config.json records it


@dataclass
class RunInfo:
    """One (algorithm, seed) run as the callbacks see it."""

    key: str                                  # <algo>-seed<k> (bench.store.run_key)
    params: dict[str, Any]                    # the run's parameters (config.json, MLflow params)
    tags: dict[str, str]
    rounds: int = 0                           # the rounds it runs in all
    checkpoint: Path | None = None            # its checkpoint folder (None: not checkpointed)
    history: list[dict[str, Any]] = field(default_factory=list)  # every round so far, {"step": k, **metrics}
    sim: Any = None                           # the live Simulation (None where the run executes elsewhere)
    restored_from: Path | None = None         # the checkpoint file it continued from
    error: BaseException | None = None        # why it failed, once it has (where it ran)


class Callback:
    """No-op base: override what you need."""

    def on_invocation_start(self, info: InvocationInfo, resumed: bool) -> None: ...
    def on_run_kept(self, key: str, summary: dict[str, Any]) -> None: ...
    def on_run_start(self, run: RunInfo, resumed_from: int | None) -> None: ...
    def on_round_end(self, run: RunInfo, step: int, metrics: dict[str, float]) -> None: ...
    def on_run_end(self, run: RunInfo, summary: dict[str, Any], clients: list[dict[str, Any]], status: str) -> None: ...
    def on_invocation_end(self, artifacts: list[Path], status: str) -> None: ...


class CallbackList(Callback):
    """Callbacks called one after the other, in list order, for every event."""

    def __init__(self, callbacks: list[Callback]):
        self.callbacks = list(callbacks)

    def on_invocation_start(self, info: InvocationInfo, resumed: bool) -> None:
        for c in self.callbacks:
            c.on_invocation_start(info, resumed)

    def on_run_kept(self, key: str, summary: dict[str, Any]) -> None:
        for c in self.callbacks:
            c.on_run_kept(key, summary)

    def on_run_start(self, run: RunInfo, resumed_from: int | None) -> None:
        for c in self.callbacks:
            c.on_run_start(run, resumed_from)

    def on_round_end(self, run: RunInfo, step: int, metrics: dict[str, float]) -> None:
        for c in self.callbacks:
            c.on_round_end(run, step, metrics)

    def on_run_end(self, run: RunInfo, summary: dict[str, Any], clients: list[dict[str, Any]], status: str) -> None:
        for c in self.callbacks:
            c.on_run_end(run, summary, clients, status)

    def on_invocation_end(self, artifacts: list[Path], status: str) -> None:
        for c in self.callbacks:
            c.on_invocation_end(artifacts, status)
