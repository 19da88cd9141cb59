"""Synthetic results folders (and MLflow stores) with known numbers, written through the real callbacks of
bench/callbacks (results folder, MLflow), so the report can be tested, and demonstrated, without training
anything."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from bench.callbacks import InvocationInfo, RunInfo, ordered
from bench.callbacks.mlflow import make_mlflow_callback
from bench.callbacks.results import ResultsFolderCallback
from bench.store import ResultsStore, run_key
from bench.summary import run_summary

# method -> (final accuracy, client training FLOPs per round, bytes per client per direction per round)
PROFILES = {
    "pfedlora": (0.80, 2.0e12, 2.5e5),
    "fedgh": (0.74, 1.6e12, 2.0e4),
    "lgfedavg": (0.71, 1.5e12, 2.0e4),
    "fedkd": (0.69, 3.5e12, 1.8e6),
    "fml": (0.72, 3.6e12, 2.7e6),
    "standalone": (0.66, 1.5e12, 0.0),
}


def synthetic_history(method: str, seed: int, rounds: int, clients: int) -> list[dict[str, Any]]:
    final, flops, nbytes = PROFILES.get(method, (0.6, 1e12, 1e5))
    rng = np.random.default_rng(seed * 7919 + sum(map(ord, method)))
    tau = 1.0 + rounds / 4
    history, cum = [], {"train_flops": 0.0, "bytes_up": 0.0, "bytes_down": 0.0, "round_time": 0.0}
    for step in range(rounds + 1):
        acc = 0.1 + (final - 0.1) * (1 - math.exp(-step / tau)) + (rng.normal(0, 0.01) if step else 0.0)
        row: dict[str, Any] = {"step": step, "acc_mean": acc, "acc_std": 0.05 + 0.01 * seed,
                               "val_acc_mean": acc + rng.normal(0, 0.005), "test_loss": 2.3 * (1 - acc)}
        if step:
            per = {"train_flops": flops * (1 + 0.01 * seed), "bytes_up": nbytes * clients,
                   "bytes_down": nbytes * clients, "round_time": 0.5}
            for k, v in per.items():
                cum[k] += v
            row.update(train_flops=per["train_flops"], bytes_up=per["bytes_up"], bytes_down=per["bytes_down"],
                       round_time=0.5, train_loss=1.0 - acc / 2)
        row.update({f"cum_{k}": v for k, v in cum.items()})
        history.append(row)
    return history


def synthetic_clients(method: str, seed: int, clients: int) -> list[dict[str, Any]]:
    final = PROFILES.get(method, (0.6,))[0]
    rng = np.random.default_rng(seed * 31 + sum(map(ord, method)) + 1)
    return [{"client": c, "arch": f"cnn{c % 5 + 1}", "n_train": 400, "n_val": 100, "n_test": 100,
             "test_acc": float(np.clip(final + rng.normal(0, 0.05), 0, 1)), "val_acc": final}
            for c in range(clients)]


def write_synthetic_results(output_dir: Path, name: str, methods=("pfedlora", "fedgh", "standalone"),
                            seeds=(0, 1), rounds: int = 6, clients: int = 10, participation: float = 1.0,
                            dataset: str = "cifar10", target: float = 0.9, mlflow: bool = False,
                            experiment: str = "synthetic", params: dict[str, Any] | None = None,
                            hparams: dict[str, Any] | None = None) -> Path:
    """A results folder <output_dir>/<name> (and, with mlflow=True, the same runs in <output_dir>/mlflow.db)."""
    root = Path(output_dir) / name
    store = ResultsStore(root)
    mirror = None
    if mlflow:
        db = Path(output_dir) / "mlflow.db"
        uri = f"sqlite:///{db.resolve()}" if db.exists() else fresh_mlflow_store(db)
        mirror = make_mlflow_callback(uri, experiment, Path(output_dir), store)
        assert mirror is not None
    callbacks = ordered(record=ResultsFolderCallback(store), mirror=mirror)
    config = {"algorithms": list(methods), "dataset": dataset, "num_clients": clients,
              "participation": participation, "rounds": rounds, "partition": "label-skew",
              "classes_per_client": 2, "model_group": "cnn-hetero", "seeds": list(seeds), "target_acc": target,
              "run_name": name, **(params or {})}
    callbacks.on_invocation_start(InvocationInfo(name, config), False)
    for seed in seeds:
        for method in methods:
            tags = {"algorithm": method, "dataset": dataset, "seed": str(seed),
                    "setting": f"N={clients},C={participation}", "model_group": "cnn-hetero"}
            run = RunInfo(run_key(method, seed), {**config, "algorithm": method, "seed": seed,
                                                  "hparams": hparams or {}}, tags, rounds)
            callbacks.on_run_start(run, None)
            history = synthetic_history(method, seed, rounds, clients)
            for row in history:
                run.history.append(row)
                callbacks.on_round_end(run, row["step"], {k: v for k, v in row.items() if k != "step"})
            callbacks.on_run_end(run, run_summary(history, target), synthetic_clients(method, seed, clients),
                                 "FINISHED")
    callbacks.on_invocation_end([store.summary_table_path], "FINISHED")
    return root


def tiny_npz(path: Path, train: int = 200, test: int = 100, num_classes: int = 10, image_size: int = 16,
             seed: int = 0) -> Path:
    """A small learnable image set as an .npz dataset file (bench's `PATH.npz` source), for quick real runs
    (16x16 images by default: the CNNs adapt their flatten size, and a step costs 5x less than at 32x32)."""
    from data.sources import synthetic_dataset

    ds = synthetic_dataset(num_classes=num_classes, train_size=train, test_size=test, image_size=image_size,
                           seed=seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test,
             classes=np.array(ds.classes))
    return path


_TEMPLATE: dict[str, Path] = {}


def fresh_mlflow_store(path: Path) -> str:
    """An empty, initialised MLflow sqlite store at `path` (its URI). The schema is created once per process
    (MLflow's migrations take seconds) and copied, which keeps tests that each need a store quick."""
    import shutil
    import tempfile

    from mlflow.tracking import MlflowClient

    if "db" not in _TEMPLATE:
        template = Path(tempfile.mkdtemp(prefix="bench-mlflow-")) / "template.db"
        MlflowClient(f"sqlite:///{template}").search_experiments()  # creates the tables
        _TEMPLATE["db"] = template
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_TEMPLATE["db"], path)
    return f"sqlite:///{path.resolve()}"
