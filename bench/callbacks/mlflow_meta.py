"""What MLflow shows of a run besides its round metrics: params without noise (resolved, hyper-parameters
namespaced per algorithm), the MLflow-specific tags (colour, git commit, description), the dataset as a run
input (metadata only, nothing uploaded), and the parent run's per-method summary over seeds.

The results folder keeps its own format (run config params with an `hparams` table); this module only
decides how that looks in MLflow, so a `bench sync` of an older folder is shown the same way."""
from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from statistics import mean, stdev
from typing import Any

# Params that say nothing about the run they are logged on: where things go, and per-invocation lists a
# child run restates as its own `algorithm` and `seed`.
NOISE = {"partition_hashes", "algo", "hparams"}
CHILD_NOISE = {"algorithms", "seeds"}
# Partition-specific params, kept only under their partition.
PARTITION_PARAMS = {"dirichlet_alpha": "dirichlet", "classes_per_client": "label-skew"}

# Per-method metrics on the parent run: summary key -> metric suffix (means over seeds; `_seed_std` beside).
PARENT_METRICS = {"final_acc": "final_acc", "best_acc": "best_acc", "val_selected_acc": "val_selected_acc",
                  "total_train_flops": "train_flops_total", "bytes_total": "bytes_total",
                  "wall_time": "wall_time_s", "rounds_to_target": "rounds_to_target"}


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def clean_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config without unset values (tracking_uri=None) and without the params of another partition."""
    partition = config.get("partition")
    return {k: v for k, v in config.items()
            if v is not None and k not in NOISE and PARTITION_PARAMS.get(k, partition) == partition}


def resolved_hparams(algorithm: str, hparams: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The values the run used: the algorithm's sentinel values replaced by what they stand for (pFedLoRA's
    local_epochs/adapter_epochs 0 = the run's E). An algorithm may define `resolved_hparams(hp, cfg_dict)`."""
    from bench.registry import find_algorithm

    cls = find_algorithm(algorithm)
    hook = getattr(cls, "resolved_hparams", None)
    if hook is not None:
        return dict(hook(hparams, config))
    out = dict(hparams)
    if cls is not None and cls.name == "pfedlora":
        for key in ("local_epochs", "adapter_epochs"):
            if out.get(key) == 0 and config.get("local_epochs"):
                out[key] = config["local_epochs"]
    return out


def run_params(params: dict[str, Any]) -> dict[str, str]:
    """A child run's MLflow params: its config without noise, and its algorithm's hyper-parameters, resolved,
    as `<algorithm>.<name>` (pfedlora.rank)."""
    algorithm = str(params.get("algorithm", ""))
    base = {k: v for k, v in clean_config(params).items() if k not in CHILD_NOISE}
    hparams = resolved_hparams(algorithm, params.get("hparams") or {}, params)
    return {**flatten(base), **flatten({algorithm: hparams} if hparams else {})}


def invocation_params(config: dict[str, Any]) -> dict[str, str]:
    """The parent run's params: the config without noise; the algorithms as one list; each running algorithm's
    own hyper-parameter overrides as `<algorithm>.<name>` (not other methods' tables)."""
    base = clean_config(config)
    if isinstance(base.get("algorithms"), list):
        base["algorithms"] = ",".join(map(str, base["algorithms"]))
    running = set(config.get("algorithms") or [])
    tables = {name: values for name, values in (config.get("algo") or {}).items() if name in running and values}
    return {**flatten(base), **flatten(tables)}


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the checkout bench runs from; None outside a git checkout (or without git)."""
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None


def algorithm_colour(algorithm: str) -> str | None:
    from bench.registry import find_algorithm

    cls = find_algorithm(algorithm)
    return (cls.colour or None) if cls is not None else None


def common_tags(description: str) -> dict[str, str]:
    tags = {"mlflow.note.content": description}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def run_tags(key: str, params: dict[str, Any], tags: dict[str, str], invocation: str) -> dict[str, str]:
    """A child run's MLflow tags: its own (algorithm, role, dataset, split, setting, ...), its colour, the
    commit, a description and the invocation it belongs to."""
    algorithm = tags.get("algorithm") or str(params.get("algorithm", ""))
    out = {**tags, "bench.invocation": invocation}
    colour = algorithm_colour(algorithm)
    if colour:
        out["mlflow.runColor"] = colour
    note = (f"{algorithm} ({tags.get('role', 'method')}), seed {tags.get('seed', params.get('seed'))}, on "
            f"{tags.get('setting', '?')}: {params.get('rounds', '?')} rounds, E={params.get('local_epochs', '?')}."
            f" Run `{key}` of invocation `{invocation}`; per-round metrics: acc_mean (mean over clients), "
            "acc_std (spread across clients).")
    return {**out, **common_tags(note)}


def invocation_tags(name: str, config: dict[str, Any], setting: str | None) -> dict[str, str]:
    algos = config.get("algorithms") or []
    seeds = config.get("seeds") or []
    note = (f"{', '.join(map(str, algos))} on {setting or config.get('dataset', '?')}, {len(seeds)} seed(s). "
            "The per-method metrics (<algorithm>.final_acc, ...) are means over seeds, <metric>_seed_std their "
            "spread across seeds; expand this run for one run per (algorithm, seed), or group runs by the "
            "`algorithm` tag.")
    tags = {"bench.kind": "invocation", "bench.invocation": name, "role": "invocation", **common_tags(note)}
    if setting:
        tags["setting"] = setting
    return tags


def dataset_input(params: dict[str, Any], tags: dict[str, str]):
    """The run's dataset as an MLflow run input, described by metadata only (name, source, split, partition):
    no data is uploaded."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    name = str(params.get("dataset") or tags.get("dataset", "?"))
    split = tags.get("split") or params.get("dataset_split")
    if name in ("cifar10", "cifar100"):
        source = HTTPDatasetSource("https://www.cs.toronto.edu/~kriz/cifar.html")
    else:
        source = CodeDatasetSource({"dataset": name, "split": str(split)})
    dataset = MetaDataset(source, name=f"{Path(name).name}" + (f" ({split})" if split else ""))
    input_tags = [InputTag("mlflow.data.context", "train")]
    if tags.get("partition_hash"):
        input_tags.append(InputTag("partition_hash", tags["partition_hash"]))
    return DatasetInput(dataset._to_mlflow_entity(), input_tags)


def parent_metrics(summaries: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, float]:
    """Per-method summary metrics of the parent run from {run key: (algorithm, summary)}: the mean over seeds
    as `<algorithm>.<metric>`, and with two seeds or more their std as `<algorithm>.<metric>_seed_std`
    (the clients' spread is the children's acc_std: another name, another meaning)."""
    by_algo: dict[str, list[dict[str, Any]]] = {}
    for algorithm, summary in summaries.values():
        by_algo.setdefault(algorithm, []).append(summary)
    out: dict[str, float] = {}
    for algorithm, members in by_algo.items():
        out[f"{algorithm}.seeds"] = float(len(members))
        for key, name in PARENT_METRICS.items():
            values = [float(v) for v in (summary_value(s, key) for s in members) if v is not None]
            if not values:
                continue
            out[f"{algorithm}.{name}"] = mean(values)
            if len(values) > 1:
                out[f"{algorithm}.{name}_seed_std"] = stdev(values)
    return out


def summary_value(summary: dict[str, Any], key: str) -> float | None:
    if key == "bytes_total":
        up, down = summary.get("total_bytes_up"), summary.get("total_bytes_down")
        return None if up is None and down is None else float(up or 0) + float(down or 0)
    value = summary.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def setting_of(config: dict[str, Any]) -> str | None:
    """The setting as every report labels it ('CIFAR-10 (official split) · N=10, C=100%, 2 classes/client'),
    so that MLflow and the reports use one format; None when the config does not say."""
    if "num_clients" not in config:
        return None
    from reports.results import group_label

    return group_label(config)
