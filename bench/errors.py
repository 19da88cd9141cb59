"""Errors that are the user's doing (the CLI prints them as one line and exits with code 2), and the
interrupts that stop a run early (Ctrl-C, SIGTERM: exit code 130 or 143, the checkpoint kept)."""
from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """Bad input (config, data, option value). The message says what is wrong and what is valid."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised by the CLI's handler: stops a run exactly as Ctrl-C does (a KeyboardInterrupt, so every
    `except KeyboardInterrupt` cleans up for both), but exits with 143 instead of 130."""


def mark_interrupted(err: BaseException, root: Path) -> None:
    """Note on an interrupt the results folder it stopped (the innermost one), so that the CLI can say how to
    continue it (`bench resume ROOT`)."""
    if getattr(err, "results_root", None) is None:
        err.results_root = Path(root)


def interrupted_root(err: BaseException | None) -> Path | None:
    """The results folder `mark_interrupted` noted on `err` or on the interrupt it was raised from."""
    while err is not None:
        root = getattr(err, "results_root", None)
        if root is not None:
            return root
        err = err.__cause__ or err.__context__
    return None
