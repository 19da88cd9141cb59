"""One `bench run` invocation: load data once, then for each seed and algorithm run the round loop and
send every round to the trackers. One failing algorithm does not stop the others."""
from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from bench.config import RunConfig
from bench.errors import UserError
from bench.progress import Progress, fmt_duration
from bench.registry import resolve_algorithms
from bench.simulator import Simulation
from bench.summary import default_target, run_summary
from bench.tracking import ResultsFolder, Tracker, default_tracking_uri, make_mlflow_tracker
from data.device_data import DeviceData
from data.partition import ClientSplit, partition
from data.sources import load_dataset


@dataclass
class InvocationResult:
    root: Path
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # run key -> reason


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} requested but no CUDA GPU is available here; valid: auto, cpu")
    return torch.device(name)


def run_key(algo: str, seed: int) -> str:
    return f"{algo}-seed{seed}"


def client_splits(cfg: RunConfig, dataset, seed: int, device: torch.device) -> list[ClientSplit]:
    if cfg.classes_per_client > dataset.num_classes:
        raise UserError(f"classes_per_client={cfg.classes_per_client} exceeds the {dataset.num_classes} classes "
                        f"of {dataset.name}; valid: 1..{dataset.num_classes}")
    splits = partition(dataset.y_train, dataset.y_test, cfg.num_clients, cfg.partition,
                       classes_per_client=cfg.classes_per_client, alpha=cfg.dirichlet_alpha,
                       val_fraction=cfg.val_fraction, seed=seed)
    return [ClientSplit(s.train.to(device), s.val.to(device), s.test.to(device)) for s in splits]


def estimate_seconds(cfg: RunConfig, data: DeviceData, splits: list[ClientSplit], device: torch.device) -> dict[str, float]:
    """Rough wall time per algorithm, from a timed training step of each architecture (before anything runs)."""
    from models.groups import build_model, client_arch

    step_time: dict[str, float] = {}
    x = data.normalise(data.x_train[: cfg.batch_size])
    y = data.y_train[: cfg.batch_size]
    for arch in {client_arch(cfg.model_group, i) for i in range(cfg.num_clients)}:
        model = build_model(arch, data.num_classes, x.shape[1], x.shape[2]).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        for rep in range(3):  # one warm-up, two timed
            if rep == 1:
                start = time.perf_counter()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_time[arch] = (time.perf_counter() - start) / 2 * len(y) / len(x)
    per_epoch = sum(math.ceil(len(s.train) / cfg.batch_size) * step_time[client_arch(cfg.model_group, i)]
                    for i, s in enumerate(splits)) * cfg.participation
    out = {}
    for cls in resolve_algorithms(cfg.algorithms):
        cost = cls.estimated_cost(cls.make_hparams(cfg.algo.get(cls.name)), cfg)
        out[cls.name] = per_epoch * cfg.local_epochs * cost * cfg.rounds * len(cfg.seeds)
    return out


def run_invocation(cfg: RunConfig, *, show_progress: bool = True, use_mlflow: bool = True) -> InvocationResult:
    device = resolve_device(cfg.device)
    algo_classes = resolve_algorithms(cfg.algorithms)
    dataset = load_dataset(cfg.dataset, Path(cfg.data_dir) if cfg.data_dir else None, seed=cfg.seeds[0])
    data = DeviceData(dataset, device, augment=cfg.augment)
    target = cfg.target_accuracy or default_target(dataset.num_classes)
    name = cfg.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
    output_dir = Path(cfg.output_dir)
    root = output_dir / name
    if (root / "config.json").exists():
        raise UserError(f"{root} already holds the results of a run; choose another --run-name or --output-dir")

    results = ResultsFolder(root)
    trackers: list[Tracker] = [results]
    if use_mlflow:
        mlflow_tracker = make_mlflow_tracker(cfg.tracking_uri or default_tracking_uri(output_dir), cfg.experiment,
                                             output_dir, results)
        if mlflow_tracker is not None:
            trackers.append(mlflow_tracker)
    config = {**cfg.to_dict(), "run_name": name, "device_resolved": str(device), "target_acc": target,
              "torch": torch.__version__}
    for t in trackers:
        t.start_invocation(name, config)

    progress = Progress(cfg.rounds * len(algo_classes) * len(cfg.seeds), enabled=show_progress)
    progress.echo(f"bench: {', '.join(c.name for c in algo_classes)} on {dataset.name} "
                  f"({cfg.num_clients} clients, C={cfg.participation}, {cfg.rounds} rounds, E={cfg.local_epochs}, "
                  f"seeds {cfg.seeds}) on {device}; results in {root}")
    outcome = InvocationResult(root)
    for seed in cfg.seeds:
        splits = client_splits(cfg, dataset, seed, device)
        if seed == cfg.seeds[0]:
            estimate = estimate_seconds(cfg, data, splits, device)
            progress.echo("estimated time: " + ", ".join(f"{k} ~{fmt_duration(v)}" for k, v in estimate.items())
                          + f"; total ~{fmt_duration(sum(estimate.values()))}")
        for algo_cls in algo_classes:
            key = run_key(algo_cls.name, seed)
            summary, status = execute_run(cfg, algo_cls, seed, data, splits, device, trackers, progress, target,
                                          config, dataset.name)
            outcome.summaries[key] = summary
            if status != "FINISHED":
                outcome.failed[key] = summary["error"]

    from reports.report import run_report

    plots = run_report(root, title=f"{dataset.name}, N={cfg.num_clients}, C={cfg.participation}")
    for t in trackers:
        t.end_invocation([root / "summary.csv", *plots], "FAILED" if outcome.failed else "FINISHED")
    progress.echo(f"done: results in {root}")
    return outcome


def execute_run(cfg: RunConfig, algo_cls, seed: int, data: DeviceData, splits: list[ClientSplit],
                device: torch.device, trackers: list[Tracker], progress: Progress, target: float,
                config: dict[str, Any], dataset_name: str) -> tuple[dict[str, Any], str]:
    """One (algorithm, seed) run through the round loop, every round sent to the trackers.
    Returns (summary, status); an exception inside the run marks it FAILED instead of propagating."""
    key = run_key(algo_cls.name, seed)
    hparams = algo_cls.make_hparams(cfg.algo.get(algo_cls.name))
    params = {**config, "algorithm": algo_cls.name, "seed": seed, "hparams": vars(hparams)}
    tags = {"algorithm": algo_cls.name, "dataset": dataset_name, "seed": str(seed),
            "setting": f"N={cfg.num_clients},C={cfg.participation}", "model_group": cfg.model_group}
    for t in trackers:
        t.start_run(key, params, tags)
    history: list[dict[str, Any]] = []
    clients: list[dict[str, Any]] = []
    status = "FINISHED"
    try:
        sim = Simulation(cfg, algo_cls, seed, data, splits, device)
        history.append({"step": 0, **sim.initial_metrics()})
        for t in trackers:
            t.log_round(key, 0, history[-1])
        run_start = time.perf_counter()
        best = history[0]["acc_mean"]
        for round_index in range(cfg.rounds):
            metrics = sim.run_round(round_index)
            if not math.isfinite(metrics["train_loss"]):
                raise FloatingPointError(f"non-finite training loss in round {round_index + 1}")
            step = round_index + 1
            history.append({"step": step, **metrics})
            for t in trackers:
                t.log_round(key, step, metrics)
            best = max(best, metrics.get("acc_mean", best))
            progress.round_done(key, step, cfg.rounds, metrics, best, time.perf_counter() - run_start)
        clients = sim.client_table()
        summary = run_summary(history, target)
    except UserError:
        raise
    except Exception as err:  # isolate the failure: the other algorithms still run
        status = "FAILED"
        reason = f"{type(err).__name__}: {err}"
        summary = {**(run_summary(history, target) if history else {}), "error": reason}
        progress.echo(f"{key}: FAILED ({reason})")
        if progress.enabled:
            traceback.print_exc()
    for t in trackers:
        t.end_run(key, summary, clients, status)
    return summary, status
