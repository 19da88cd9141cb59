"""Reading finished runs, from a results folder or from an MLflow store, into one shape (`Run`), so every
table and figure is drawn from the same data whatever the source.

A results folder is read through its store (bench/store.py, which owns the layout). MLflow holds the same: one parent run per invocation,
one child run per (algorithm, seed) with tags algorithm/dataset/seed/setting, params = the flattened
config, metrics per round (step = round), `summary.*` metrics, and clients.csv as an artifact."""
from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

import bench.callbacks.mlflow_client  # noqa: F401  (MLflow's environment, before mlflow loads: no telemetry)
from bench.registry import find_algorithm
from bench.store import ResultsStore, parse_run_key, run_key

# Display names, roles, table order and colours are the algorithms' own (class attributes, read through the
# registry). SPEC section 2: reference points (Standalone, FedAvg) anchor the tables; "the best baseline" is
# chosen among the baselines, falling back to the reference points when no baseline is present.
def role_of(method: str) -> str:
    """proposed | baseline | reference (an unregistered method counts as a baseline)."""
    cls = find_algorithm(method.split(" ", 1)[0])
    return cls.role if cls is not None else "baseline"


@dataclass
class Run:
    """One (algorithm, seed) run, wherever it was read from."""

    key: str                      # <algo>-seed<k>
    algorithm: str
    seed: int
    status: str                   # FINISHED / FAILED / RUNNING
    params: dict[str, Any]        # the resolved config of the run (nested: hparams, algo)
    tags: dict[str, str]
    summary: dict[str, Any]
    metrics: pd.DataFrame         # one row per round, column "step" first
    clients: pd.DataFrame | None  # per-client final results (None if not available)
    source: str                   # folder path or MLflow run id
    method: str = ""              # label in tables/figures: the algorithm, plus hparams where variants coexist
    group: str = ""               # the setting this run belongs to (dataset and federation setting)

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED"

    @property
    def target(self) -> float | None:
        value = self.summary.get("target_acc", self.params.get("target_acc"))
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


# ---- labels -----------------------------------------------------------------------------------------------
def display_name(method: str) -> str:
    base, sep, rest = method.partition(" ")
    cls = find_algorithm(base)
    return ((cls.display_name if cls is not None and cls.display_name else base)) + (sep + rest if sep else "")


def method_sort_key(method: str) -> tuple[int, str]:
    cls = find_algorithm(method.split(" ", 1)[0])
    return (cls.table_order if cls is not None else 1000, method)


def dataset_label(name: str) -> str:
    """cifar10 -> CIFAR-10; a path to cifar10-subset-3000-1000.npz -> CIFAR-10 subset (3000 train / 1000 test)."""
    stem = Path(str(name)).name
    if stem.endswith(".npz"):
        stem = stem[:-4]
    pretty = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
    if stem in pretty:
        return pretty[stem]
    for raw, nice in sorted(pretty.items(), key=lambda kv: -len(kv[0])):
        if stem.startswith(raw + "-subset-"):
            parts = stem[len(raw) + len("-subset-"):].split("-")
            if len(parts) == 2 and all(p.isdigit() for p in parts):
                return f"{nice} subset ({parts[0]} train / {parts[1]} test)"
    return stem


def setting_label(params: dict[str, Any]) -> str:
    """'N=10, C=100%, 2 classes/client' (+ model group when not the default)."""
    parts = []
    if "num_clients" in params:
        parts.append(f"N={int(params['num_clients'])}")
    if "participation" in params:
        parts.append(f"C={100 * float(params['participation']):g}%")
    partition = params.get("partition")
    if partition == "label-skew":
        parts.append(f"{int(params.get('classes_per_client') or 2)} classes/client")
    elif str(partition).startswith("file:"):
        parts.append(f"partition {Path(str(partition)[len('file:'):]).name}")
    elif partition == "dirichlet":
        parts.append(f"Dirichlet({params.get('dirichlet_alpha')})")
    elif partition:
        parts.append(str(partition).upper() if partition == "iid" else str(partition))
    group = params.get("model_group")
    if group and group != "cnn-hetero":
        parts.append(str(group))
    return ", ".join(parts)


def group_label(params: dict[str, Any], tags: dict[str, str] | None = None) -> str:
    dataset = params.get("dataset") or (tags or {}).get("dataset", "?")
    return f"{dataset_label(dataset)} · {setting_label(params)}"


# ---- results folders --------------------------------------------------------------------------------------
def frame(rows: list[dict[str, str]]) -> pd.DataFrame:
    """CSV rows (strings) as a DataFrame: a column of integers as int64, of numbers as float64 (an empty cell
    is NaN), any other as strings."""
    columns = {}
    for name in dict.fromkeys(k for row in rows for k in row):
        values = [row.get(name, "") for row in rows]
        try:
            numbers = [math.nan if v in ("", None) else float(v) for v in values]
        except ValueError:
            columns[name] = values
            continue
        integral = all(v not in ("", None) and v.lstrip("-").isdigit() for v in values)
        columns[name] = [int(v) for v in values] if integral else numbers
    return pd.DataFrame(columns)


def load_folder(root: Path) -> list[Run]:
    """Every run of one results folder (finished or not), read through its store (bench/store.py)."""
    store = ResultsStore(Path(root))
    invocation = store.config()
    runs = []
    for key in store.run_keys():
        if not store.has_rows(key):
            continue
        meta = store.run_config(key)
        params = {**invocation, **meta.get("params", {})}
        tags = dict(meta.get("tags", {}))
        summary = store.summary(key)
        algorithm, seed = parse_run_key(key)
        runs.append(Run(
            key=key, algorithm=tags.get("algorithm", algorithm), seed=int(tags.get("seed", seed)),
            status=summary.get("status", "RUNNING"), params=params, tags=tags, summary=summary,
            metrics=frame(store.rows(key)), clients=frame(store.clients(key)) if store.has_clients(key) else None,
            source=str(store.run_dir(key))))
    return runs


# ---- MLflow -----------------------------------------------------------------------------------------------
def parse_param(text: str) -> Any:
    """MLflow stores params as strings: turn them back into numbers, booleans, None, lists."""
    if text in ("None", "null"):
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.startswith("[") and text.endswith("]"):
        try:
            return json.loads(text.replace("'", '"'))
        except json.JSONDecodeError:
            return text
    return text


def unflatten(flat: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):  # a key that is both a value and a prefix: keep the value
                break
        else:
            node[leaf] = parse_param(value)
    return out


def load_mlflow(tracking_uri: str, experiment: str | None = None, parents: Iterable[str] = (),
                run_ids: Iterable[str] = ()) -> list[Run]:
    """Child runs from an MLflow store: those of the named parent runs (run name or id), the given run ids,
    or every (algorithm, seed) run of the experiment when neither is given."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    parents, run_ids = list(parents), list(run_ids)
    if experiment is None and not run_ids and not parents:
        raise ValueError("name an experiment, parent runs or run ids to read from MLflow")
    experiments = [client.get_experiment_by_name(experiment)] if experiment else client.search_experiments()
    if experiment and experiments[0] is None:
        raise ValueError(f"no MLflow experiment named {experiment!r} in {tracking_uri}")
    exp_ids = [e.experiment_id for e in experiments]
    selected = [client.get_run(r) for r in run_ids]
    if parents or not run_ids:
        everything = search_all(client, exp_ids)
        if parents:
            parent_ids = {r.info.run_id for r in everything
                          if r.data.tags.get("bench.kind") == "invocation"
                          and (r.info.run_name in parents or r.info.run_id in parents)}
            missing = [p for p in parents if not any(r.info.run_id == p or r.info.run_name == p for r in everything)]
            if missing:
                raise ValueError(f"no parent run named {', '.join(missing)} in {tracking_uri}")
            selected += [r for r in everything if r.data.tags.get("mlflow.parentRunId") in parent_ids]
        else:
            selected += [r for r in everything if "algorithm" in r.data.tags]
    return [mlflow_run(client, r) for r in selected]


def search_all(client, exp_ids: list[str]) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(exp_ids, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def mlflow_run(client, run) -> Run:
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
    params = unflatten(run.data.params)
    series: dict[str, dict[int, float]] = {}
    summary: dict[str, Any] = {}
    for name in run.data.metrics:
        if name.startswith("summary."):
            summary[name[len("summary."):]] = run.data.metrics[name]
            continue
        if name == "step":  # the round number itself (logged with step 0's row)
            continue
        series[name] = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
    metrics = pd.DataFrame(series).sort_index()
    metrics.index.name = "step"
    metrics = metrics.reset_index()
    for key in ("rounds", "best_round", "val_selected_round", "rounds_to_target"):
        if key in summary:
            summary[key] = int(summary[key])
    summary["status"] = run.info.status
    clients = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run.info.run_id, "clients.csv", tmp)
            clients = pd.read_csv(path)
        except Exception:  # no clients table logged (failed run): per-client figures skip it
            clients = None
    algorithm = tags.get("algorithm") or str(params.get("algorithm", "?"))
    seed = int(tags.get("seed", params.get("seed", 0)))
    return Run(key=run_key(algorithm, seed), algorithm=algorithm, seed=seed, status=run.info.status,
               params=params, tags=tags, summary=summary, metrics=metrics, clients=clients,
               source=f"mlflow:{run.info.run_id}")


# ---- grouping ---------------------------------------------------------------------------------------------
def label_runs(runs: list[Run], group_of: dict[str, str] | None = None) -> list[Run]:
    """Give each run its group (the setting) and method label. Within a group, runs of one algorithm with
    different hyper-parameters become separate methods, e.g. 'pfedlora (rank=8)'."""
    for run in runs:
        run.group = (group_of or {}).get(run.source) or run.group or group_label(run.params, run.tags)
    by_algo: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        by_algo.setdefault((run.group, run.algorithm), []).append(run)
    for (_, algorithm), members in by_algo.items():
        hps = [flat_hparams(r.params.get("hparams", {})) for r in members]
        keys = sorted({k for hp in hps for k in hp if len({h.get(k) for h in hps}) > 1})
        for run, hp in zip(members, hps):
            if run.method:
                continue
            run.method = algorithm + (" (" + ", ".join(f"{k}={hp.get(k)}" for k in keys) + ")" if keys else "")
    return runs


def flat_hparams(hp: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in (hp or {}).items():
        if isinstance(v, dict):
            out.update(flat_hparams(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@dataclass
class Group:
    """The runs of one setting, by method."""

    label: str
    runs: dict[str, list[Run]] = field(default_factory=dict)  # method -> finished runs, by seed
    cache: dict[str, Any] = field(default_factory=dict, repr=False)  # derived data (mean curves)

    @property
    def methods(self) -> list[str]:
        return sorted(self.runs, key=method_sort_key)

    @property
    def seeds(self) -> list[int]:
        return sorted({r.seed for rs in self.runs.values() for r in rs})

    @property
    def params(self) -> dict[str, Any]:
        return next(iter(self.runs.values()))[0].params


def group_runs(runs: list[Run]) -> list[Group]:
    """Finished runs by group (in first-seen order), then by method."""
    groups: dict[str, Group] = {}
    for run in runs:
        if not run.finished:
            continue
        group = groups.setdefault(run.group, Group(run.group))
        group.runs.setdefault(run.method, []).append(run)
    for group in groups.values():
        for members in group.runs.values():
            members.sort(key=lambda r: r.seed)
    return sorted(groups.values(), key=group_sort_key)


def group_sort_key(group: Group) -> tuple:
    """Settings in a natural order whatever the source's order: dataset, N, C, partition, classes."""
    p = group.params
    return (str(p.get("dataset", "")), float(p.get("num_clients") or 0), -float(p.get("participation") or 0),
            str(p.get("partition", "")), float(p.get("classes_per_client") or 0), group.label)
