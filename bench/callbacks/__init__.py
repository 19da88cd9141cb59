"""Callbacks: each destination of a run's events is one callback in its own file, and none knows about the
others (the protocol and its event order: base.py). Import each from its module:

    results.py      ResultsFolderCallback: the results folder (bench/store.py), written as rounds finish
    checkpoint.py   CheckpointCallback: the run's complete state every `checkpoint_every` rounds, for resume
    mlflow.py       MlflowCallback: one parent run per invocation, one child per run; `bench sync` fills gaps
    progress.py     ProgressCallback: the per-round progress lines
    forward.py      ForwardingCallback: a Ray worker's events, sent to the driver, which replays them
"""
from __future__ import annotations

from bench.callbacks.base import Callback, CallbackList, InvocationInfo, RunInfo

__all__ = ["Callback", "CallbackList", "InvocationInfo", "RunInfo", "ordered"]


def ordered(*, record: Callback, checkpoint: Callback | None = None, mirror: Callback | None = None,
            display: Callback | None = None) -> CallbackList:
    """The one order of every callback list; each event goes to them in this order:

    1. record: where a round first becomes durable: the results folder (a local run; the Ray driver) or
       the queue to the driver (a Ray worker);
    2. checkpoint: the run's state, after `record`, so a checkpoint never holds a round the folder lacks
       (a resumed run goes back to its checkpoint and catches the others up from its history);
    3. mirror: MLflow, after both, so a crash never leaves MLflow ahead of the results folder;
    4. display: the progress lines."""
    return CallbackList([c for c in (record, checkpoint, mirror, display) if c is not None])
