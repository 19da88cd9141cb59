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
    setting: dict[str, Any] = field(default_factory=dict)  # its resolved config less seed and method (setting_of)

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


# How a dataset's train/test split is shown after its name (data/sources.py SPLITS); where the split is the file's
# own or generated, the name says enough.
SPLIT_LABELS = {"official": "official split", "re-split": "re-split", "unknown": "split unknown"}


def split_label(params: dict[str, Any]) -> str:
    """' (re-split)' etc. after a dataset's name: which train/test split its runs used (config.json's
    `dataset_split`); '' where the runs did not record one or it is the file's own."""
    split = params.get("dataset_split")
    return f" ({SPLIT_LABELS[split]})" if split in SPLIT_LABELS else ""


def split_note(params: dict[str, Any]) -> str:
    """The split in full, for a report's notes ('' when not recorded)."""
    split = params.get("dataset_split")
    if not split:
        return ""
    from data.sources import SPLITS

    return f"Data split: {split}, {SPLITS.get(split, split)}."


def group_label(params: dict[str, Any], tags: dict[str, str] | None = None) -> str:
    dataset = params.get("dataset") or (tags or {}).get("dataset", "?")
    return f"{dataset_label(dataset)}{split_label(params)} · {setting_label(params)}"


def with_split(label: str, params: dict[str, Any]) -> str:
    """A group label '<data> · <setting>' with the runs' split added after <data> (paper cells are labelled
    before their data is loaded)."""
    head, sep, rest = label.partition(" · ")
    suffix = split_label(params)
    return label if not suffix or head.endswith(suffix) else f"{head}{suffix}{sep}{rest}"


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
    params.setdefault("hparams", params.get(run.data.tags.get("algorithm"), {}))  # logged namespaced: pfedlora.rank
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
# A setting is a run's resolved config less what tells its runs apart (seed, method and its hyper-parameters) and
# what cannot change the numbers (the SETUP fields of bench.config: paths, device, tracking).
NOT_SETTING = ("algorithms", "seeds", "algo")


def setting_of(params: dict[str, Any]) -> dict[str, Any]:
    """The setting of a run (see NOT_SETTING), numbers normalised so a folder and MLflow agree; a partition's
    own parameter only under that partition (no Dirichlet alpha under label skew)."""
    from bench.config import results_fields

    keys = [k for k in results_fields() if k not in NOT_SETTING] + ["dataset_split"]
    out = {k: normalise(params.get(k)) for k in keys}
    if out.get("partition") != "dirichlet":
        out.pop("dirichlet_alpha", None)
    if out.get("partition") not in ("label-skew", None):
        out.pop("classes_per_client", None)
    if out.get("target_accuracy") is None:  # dataset-aware default: the runs' resolved value
        out["target_accuracy"] = normalise(params.get("target_acc"))
    return out


def normalise(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [normalise(v) for v in value]
    return value


def setting_key(setting: dict[str, Any]) -> str:
    return json.dumps(setting, sort_keys=True, default=str)


def label_runs(runs: list[Run], group_of: dict[str, str] | None = None, pool: bool = False) -> list[Run]:
    """Give each run its group (the setting) and method label. A run's group is its setting (`setting_of`):
    settings that the usual label ('CIFAR-10 · N=10, C=100%, ...') cannot tell apart get the fields they differ
    in added ('· rounds=10'), unless `pool` asks to pool them under the usual label. A group given by the
    caller (`group_of`, or preset as `bench paper` does) is kept. Within a group, runs of one algorithm with
    different hyper-parameters become separate methods, e.g. 'pfedlora (rank=8)'."""
    for run in runs:
        run.setting = setting_of(run.params)
        run.group = (group_of or {}).get(run.source) or run.group
    free = [r for r in runs if not r.group]
    by_label: dict[str, list[Run]] = {}
    for run in free:
        by_label.setdefault(group_label(run.params, run.tags), []).append(run)
    for label, members in by_label.items():
        differing = differing_fields([r.setting for r in members])
        for run in members:
            run.group = label if pool or not differing else (
                f"{label} · " + ", ".join(f"{k}={show(run.setting.get(k))}" for k in differing))
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


def differing_fields(settings: list[dict[str, Any]]) -> list[str]:
    keys = dict.fromkeys(k for s in settings for k in s)
    return [k for k in keys if len({setting_key({"v": s.get(k)}) for s in settings}) > 1]


def show(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def describe_settings(runs: list[Run], pool: bool = False) -> list[str]:
    """What grouping found, one line each: how many settings, and each set of settings that share a label
    (same dataset, N, C, partition) but differ elsewhere, e.g. in rounds: reported apart, or pooled (`pool`)."""
    labelled = [r for r in runs if r.setting]
    keys = {setting_key(r.setting) for r in labelled}
    lines = [f"{len(runs)} run(s) in {len(keys)} setting(s) (setting = the resolved config less seed and "
             "method)."] if labelled else []
    by_label: dict[str, dict[str, dict[str, Any]]] = {}
    for run in labelled:
        by_label.setdefault(group_label(run.params, run.tags), {})[setting_key(run.setting)] = run.setting
    for label, settings in by_label.items():
        if len(settings) < 2:
            continue
        fields = differing_fields(list(settings.values()))
        values = "; ".join(f"{k}: " + " vs ".join(show(s.get(k)) for s in settings.values()) for k in fields)
        lines.append(f"{label}: {len(settings)} different settings ({values}): "
                     + ("POOLED as asked (--pool): curves are averaged at the rounds every run evaluated, and "
                        "± is over runs of different settings" if pool
                        else "reported apart (pass --pool to pool them)"))
    return lines


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
    notes: list[str] = field(default_factory=list)           # what grouping left out or pooled

    @property
    def methods(self) -> list[str]:
        return sorted(self.runs, key=method_sort_key)

    @property
    def seeds(self) -> list[int]:
        return sorted({r.seed for rs in self.runs.values() for r in rs})

    @property
    def params(self) -> dict[str, Any]:
        return next(iter(self.runs.values()))[0].params

    def over(self, method: str | None = None) -> str:
        """What a mean ± std of this group (or of one method) is over: '3 seeds', or '3 runs (2 distinct
        seeds)' where pooled runs repeat a seed."""
        methods = [method] if method else self.methods
        sizes = {len(self.runs[m]) for m in methods}
        if len(sizes) > 1:
            return "each method's seeds (" + ", ".join(f"{display_name(m)} {len(self.runs[m])}" for m in methods) + ")"
        n = sizes.pop()
        distinct = min(len({r.seed for r in self.runs[m]}) for m in methods)
        if distinct == n:
            return f"{n} seed{'s' if n != 1 else ''}"
        return f"{n} runs ({distinct} distinct seed{'s' if distinct != 1 else ''})"


def group_runs(runs: list[Run], pool: bool = False) -> list[Group]:
    """Finished runs by group (in first-seen order), then by method. A second run of the same method and seed
    in one setting (the same run twice, e.g. in two results folders) is left out with a note, unless `pool`."""
    groups: dict[str, Group] = {}
    for run in runs:
        if not run.finished:
            continue
        group = groups.setdefault(run.group, Group(run.group))
        members = group.runs.setdefault(run.method, [])
        twin = next((r for r in members if r.seed == run.seed), None)
        if twin is not None and not pool:
            group.notes.append(f"{display_name(run.method)} seed {run.seed} appears twice ({twin.source} and "
                               f"{run.source}): the second is left out (--pool keeps both)")
            continue
        members.append(run)
    for group in groups.values():
        for members in group.runs.values():
            members.sort(key=lambda r: r.seed)
    return sorted(groups.values(), key=group_sort_key)


def group_sort_key(group: Group) -> tuple:
    """Settings in a natural order whatever the source's order: dataset, N, C, partition, classes."""
    p = group.params
    return (str(p.get("dataset", "")), float(p.get("num_clients") or 0), -float(p.get("participation") or 0),
            str(p.get("partition", "")), float(p.get("classes_per_client") or 0), group.label)
