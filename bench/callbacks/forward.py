"""Ray forwarding as a callback. On a worker, `ForwardingCallback` puts each run event on a queue to the
driver (first in the worker's callback order: a checkpoint never holds a round the driver was not sent);
on the driver, `replay` applies each event to that invocation's own callbacks, exactly as a local run
calls them. Workers never write results or talk to MLflow."""
from __future__ import annotations

import os
from typing import Any

from bench.callbacks.base import Callback, CallbackList, RunInfo


class ForwardingCallback(Callback):
    def __init__(self, queue, invocation: int):
        self.queue, self.invocation, self.pid = queue, invocation, os.getpid()

    def _send(self, event: str, *args: Any) -> None:
        self.queue.put((self.invocation, self.pid, event, args))

    def on_run_start(self, run: RunInfo, resumed_from: int | None) -> None:
        self._send("run_start", run.key, run.params, run.tags, resumed_from, run.history)

    def on_round_end(self, run: RunInfo, step: int, metrics: dict[str, float]) -> None:
        self._send("round_end", run.key, step, metrics)

    def on_run_end(self, run: RunInfo, summary: dict[str, Any], clients: list[dict[str, Any]], status: str) -> None:
        self._send("run_end", run.key, summary, clients, status)


def replay(event: str, args: tuple, run: RunInfo, callbacks: CallbackList) -> None:
    """Apply a forwarded event to the driver's callbacks; `run` is the driver's RunInfo of that run (its
    params, tags and history are filled in from the events)."""
    if event == "run_start":
        _, run.params, run.tags, resumed_from, history = args
        run.history = list(history)
        callbacks.on_run_start(run, resumed_from)
    elif event == "round_end":
        _, step, metrics = args
        run.history.append({"step": step, **metrics})
        callbacks.on_round_end(run, step, metrics)
    elif event == "run_end":
        _, summary, clients, status = args
        callbacks.on_run_end(run, summary, clients, status)
    else:
        raise ValueError(f"unknown forwarded event {event!r}")
