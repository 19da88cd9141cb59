"""Fault injection for tests/test_ray.py, installed in every Ray worker at start-up: a worker SIGKILLs
itself right after it has forwarded round `step` of run `key`, when the file <kill dir>/<key>@<step> exists.
The file is removed first, so only the first attempt dies. Killing from inside the worker makes the timing
exact: a kill sent by the driver could arrive after the run has already finished (then it hits an idle worker,
or one running another task)."""
from __future__ import annotations

import os
import signal
from pathlib import Path

KILL_DIR = "BENCH_TEST_KILL_DIR"  # environment variable naming the folder of kill markers


def kill_marker(kill_dir: Path, key: str, step: int) -> Path:
    return kill_dir / f"{key}@{step}"


def install() -> None:
    from bench.callbacks.forward import ForwardingCallback

    forward = ForwardingCallback.on_round_end

    def on_round_end(self, run, step, metrics):
        forward(self, run, step, metrics)  # returns once the event is in the driver's queue
        try:
            kill_marker(Path(os.environ[KILL_DIR]), run.key, step).unlink()
        except (KeyError, FileNotFoundError):
            return
        os.kill(os.getpid(), signal.SIGKILL)

    ForwardingCallback.on_round_end = on_round_end
