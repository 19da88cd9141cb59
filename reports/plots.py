"""Plots drawn from a results folder (the files, not live objects), so they can be redrawn any time."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

METHOD_ORDER = ("pfedlora", "feddistill", "fml", "fedkd", "lgfedavg", "fedgh", "fedapen", "standalone", "fedavg")


def method_color(method: str) -> str:
    """One fixed colour per method across every figure."""
    cmap = plt.get_cmap("tab10")
    index = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER) + hash(method) % 5
    return cmap(index % 10)


def load_runs(root: Path) -> dict[str, pd.DataFrame]:
    """run key (algo-seedK) -> per-round metrics."""
    return {p.parent.name: pd.read_csv(p) for p in sorted((root / "runs").glob("*/metrics.csv"))}


def accuracy_curves(root: Path, out_dir: Path, title: str = "") -> list[Path]:
    """Mean personalised test accuracy vs round, one line per run; PNG and PDF."""
    runs = load_runs(root)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, df in runs.items():
        df = df.dropna(subset=["acc_mean"])
        method = key.rsplit("-seed", 1)[0]
        ax.plot(df["step"], 100 * df["acc_mean"], label=key, color=method_color(method))
    ax.set_xlabel("round")
    ax.set_ylabel("mean test accuracy (%)")
    ax.set_title(title or "Personalised test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "accuracy_vs_round.png", out_dir / "accuracy_vs_round.pdf"]
    for path in paths:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths
