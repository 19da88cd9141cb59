"""Checkpoints as a callback: a run's complete state (Simulation and metric history) every `every` rounds,
written after the results folder has the round (callback order) so a checkpoint never holds a round the
folder lacks. A failed write (a full disk, state the format cannot hold) warns once and the run goes on
without checkpoints. A run that finishes deletes its checkpoint unless `keep`. Restoring one is the run
loop's first step (bench/runner.py), with `read_run` below: the two sides of one format, a run's
checkpoint file (bench/checkpoint.py) holding its Simulation's state and its metric history."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from bench.callbacks.base import Callback, RunInfo
from bench.checkpoint import CheckpointError, Packer, RunCheckpoint, unpack


class CheckpointCallback(Callback):
    def __init__(self, every: int, keep: bool = False):
        self.every, self.keep = every, keep
        self.active: dict[str, RunCheckpoint | None] = {}   # run key -> its checkpoint (None: turned off)

    def on_run_start(self, run: RunInfo, resumed_from: int | None) -> None:
        self.active[run.key] = RunCheckpoint(run.checkpoint) if run.checkpoint is not None and self.every > 0 else None

    def on_round_end(self, run: RunInfo, step: int, metrics: dict[str, float]) -> None:
        checkpoint = self.active.get(run.key)
        if checkpoint is None or step == 0 or step % self.every or step >= run.rounds:
            return  # the last round is not saved: the run is about to end
        try:
            save_run(checkpoint, run.key, step, run.sim, run.history)
        except Exception as err:
            warnings.warn(f"{run.key}: checkpoint after round {step} failed ({type(err).__name__}: {err}); "
                          "the run continues without checkpoints", stacklevel=2)
            self.active[run.key] = None

    def on_run_end(self, run: RunInfo, summary: dict[str, Any], clients: list[dict[str, Any]], status: str) -> None:
        checkpoint = self.active.pop(run.key, None)
        if status == "FINISHED" and checkpoint is not None and not self.keep:
            checkpoint.remove()


# ---- one run's checkpoint: its Simulation's state and metric history ---------------------------------------
def save_run(checkpoint: RunCheckpoint, key: str, step: int, sim: Any, history: list[dict[str, Any]]) -> None:
    """Checkpoint a run after round `step`: the Simulation's state and the rounds so far."""
    tensors, sim_meta = sim.state_dict()
    packer = Packer()
    meta = {"run": key, "step": step, "history": packer.pack(history, "history"), "sim": sim_meta}
    checkpoint.save(tensors | packer.tensors, meta)


class SavedRun:
    """A run's checkpoint as read back (`read_run`): the round it was taken after, the rounds it holds and the
    Simulation state to restore."""

    def __init__(self, file: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]):
        self.file, self.tensors, self.meta = file, tensors, meta
        self.step: int = meta["step"]

    def _cannot(self, err: Exception) -> CheckpointError:
        return CheckpointError(f"cannot restore {self.file} ({type(err).__name__}: {err}); "
                               "delete it to start this run over")

    def history(self, key: str) -> list[dict[str, Any]]:
        try:
            if self.meta.get("run") != key:
                raise ValueError(f"it belongs to run {self.meta.get('run')!r}, not {key!r}")
            return unpack(self.meta["history"], self.tensors)
        except Exception as err:
            raise self._cannot(err) from err

    def restore(self, sim: Any) -> None:
        """Load the state into `sim`, a freshly built Simulation of the same run."""
        try:
            sim.load_state_dict(self.tensors, self.meta["sim"])
        except Exception as err:
            raise self._cannot(err) from err


def read_run(directory: Path) -> SavedRun | None:
    """The run's last good checkpoint; None when there is none. An unreadable one raises CheckpointError."""
    checkpoint = RunCheckpoint(directory)
    if not checkpoint.exists():
        return None
    tensors, meta = checkpoint.load()
    return SavedRun(checkpoint.file, tensors, meta)
