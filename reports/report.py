"""The report written at the end of every `bench run` (and by `bench report`)."""
from __future__ import annotations

from pathlib import Path

from reports.plots import accuracy_curves


def run_report(root: Path, title: str) -> list[Path]:
    """Figures for one results folder; returns the files written (logged as MLflow artifacts)."""
    return accuracy_curves(root, root / "plots", title=title)
