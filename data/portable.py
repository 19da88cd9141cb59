"""Portable partitions: our JSON file of client index lists, and the per-client .npz layout of PFLlib/HtFLlib.

JSON (`bench partition export --format json`; a run reads it with `--partition file:PATH.json`):

    {"format": "mhpfl-bench-partition", "version": 1, "sha256": "...", "num_clients": N,
     "dataset": {"name", "num_classes", "train_size", "test_size", "labels_sha256", "split"},
     "settings": {the settings that made it: partition, classes_per_client, seed, ...},
     "clients": [{"train": [...], "val": [...], "test": [...]}, ...]}

- `train` and `val` index the dataset's official TRAINING arrays (x_train, y_train): `val` is the client's share
  of the validation pool held out from the official training set (SPEC: 10k of CIFAR's 50k), `train` its share
  of the rest; `test` indexes the official TEST arrays (x_test, y_test). Which sample is held out for validation
  is part of the partition: a run on the file uses exactly these sets, whatever its val_fraction.
- `sha256`: of the canonical client lists, the UTF-8 text of
  `json.dumps([{"train": [...], "val": [...], "test": [...]}, ...], separators=(",", ":"))` with every list in
  ascending order. Every run records this hash of its partition (config.json, MLflow param `partition_hash`,
  the report), so a run and a file can be matched.
- Reading needs only `clients` (a file converted from another tool may have nothing else); `sha256`,
  `num_clients` and `dataset.labels_sha256`, when present, are checked. Index order carries no meaning:
  lists are sorted on reading.

PFLlib / HtFLlib (`--format pfllib`): <out>/train/<id>.npz and <out>/test/<id>.npz, each holding `data`, a
pickled dict {'x': float32 (n, C, H, W) images normalised as this harness feeds them to its models (no
augmentation), 'y': int64 labels}, read by their `np.load(f, allow_pickle=True)['data'].tolist()`
(system/utils/data_utils.py); <out>/val/<id>.npz holds the validation sets (those tools ignore it);
<out>/config.json has PFLlib's keys plus the source partition's sha256 and the normalisation.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.errors import UserError
from data.partition import ClientSplit
from data.sources import ArrayDataset

FORMAT = "mhpfl-bench-partition"
VERSION = 1
SPLITS = ("train", "val", "test")  # train and val index the official training arrays, test the test arrays
EXPORT_FORMATS = ("json", "pfllib")


# ---- hashes ---------------------------------------------------------------------------------------------------
def canonical_clients(splits: list[ClientSplit]) -> list[dict[str, list[int]]]:
    return [{name: sorted(getattr(s, name).cpu().tolist()) for name in SPLITS} for s in splits]


def clients_sha256(clients: list[dict[str, list[int]]]) -> str:
    return hashlib.sha256(json.dumps(clients, separators=(",", ":")).encode()).hexdigest()


def partition_sha256(splits: list[ClientSplit]) -> str:
    """The partition's identity: sha256 of its canonical client lists (see the module docstring)."""
    return clients_sha256(canonical_clients(splits))


def labels_sha256(y_train: np.ndarray, y_test: np.ndarray) -> str:
    """Fingerprint of the arrays a partition indexes: the train labels then the test labels, int64 little-endian."""
    h = hashlib.sha256()
    for y in (y_train, y_test):
        h.update(np.ascontiguousarray(y, dtype="<i8").tobytes())
    return h.hexdigest()


def dataset_info(dataset: ArrayDataset) -> dict[str, Any]:
    """What a partition was made for; `split` (data/sources.py SPLITS) says which train/test split it indexes."""
    return {"name": dataset.name, "num_classes": dataset.num_classes, "train_size": len(dataset.y_train),
            "test_size": len(dataset.y_test), "labels_sha256": labels_sha256(dataset.y_train, dataset.y_test),
            "split": dataset.split}


# ---- our JSON format ------------------------------------------------------------------------------------------
def write_json(path: Path, splits: list[ClientSplit], dataset: ArrayDataset, settings: dict[str, Any]) -> str:
    """Write the partition file; returns its sha256. One client per line (a CIFAR partition is about 0.5 MB)."""
    clients = canonical_clients(splits)
    digest = clients_sha256(clients)
    head = {"format": FORMAT, "version": VERSION, "sha256": digest, "num_clients": len(clients),
            "indices": "train and val index the official training arrays (val: the held-out validation pool), "
                       "test the official test arrays",
            "dataset": dataset_info(dataset), "settings": settings}
    lines = json.dumps(head, indent=2)[:-2]  # without the closing "\n}"
    body = ",\n".join("    " + json.dumps(c, separators=(",", ":")) for c in clients)
    _write_text(Path(path), f'{lines},\n  "clients": [\n{body}\n  ]\n}}\n')
    return digest


@dataclass
class PartitionFile:
    path: Path
    clients: list[dict[str, np.ndarray]]  # sorted int64 indices per split
    sha256: str
    dataset: dict[str, Any]


def read_json(path: Path, num_clients: int | None = None) -> PartitionFile:
    """Read and check a partition file on its own (no dataset needed): well-formed, its sha256 (if given)
    matching, its client count equal to `num_clients`, no index negative or given twice."""
    path = Path(path)
    where = f"partition file {path}"
    if not path.is_file():
        raise UserError(f"{where} does not exist; give file:PATH of a JSON file written by "
                        "`bench partition export --format json`")
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{where} is not valid JSON ({' '.join(str(err).split())})") from None
    except OSError as err:
        raise UserError(f"{where} cannot be read ({err.strerror or err})") from None
    expected = 'expected an object with "clients": [{"train": [...], "val": [...], "test": [...]}, ...]'
    if not isinstance(doc, dict) or not isinstance(doc.get("clients"), list) or not doc["clients"]:
        raise UserError(f"{where}: {expected}")
    if doc.get("format", FORMAT) != FORMAT:
        raise UserError(f"{where} has format {doc['format']!r}; expected {FORMAT!r}")
    clients = []
    for cid, entry in enumerate(doc["clients"]):
        if not isinstance(entry, dict) or set(SPLITS) - set(entry):
            raise UserError(f"{where}: client {cid} is not an object with train, val and test lists; {expected}")
        clients.append({name: _index_array(entry[name], f"{where}: client {cid} {name}") for name in SPLITS})
    digest = clients_sha256([{name: c[name].tolist() for name in SPLITS} for c in clients])
    if "sha256" in doc and doc["sha256"] != digest:
        raise UserError(f"{where}: its sha256 {str(doc['sha256'])[:16]}... does not match its client lists "
                        f"({digest[:16]}...); the file was changed after export")
    if "num_clients" in doc and doc["num_clients"] != len(clients):
        raise UserError(f"{where}: num_clients is {doc['num_clients']!r} but it lists {len(clients)} clients")
    if num_clients is not None and num_clients != len(clients):
        raise UserError(f"{where} holds {len(clients)} clients but num_clients is {num_clients}; "
                        f"pass --clients {len(clients)}")
    for cid, c in enumerate(clients):
        for name in SPLITS:
            if len(c[name]) and c[name][0] < 0:
                raise UserError(f"{where}: client {cid} {name} index {int(c[name][0])} is out of range "
                                "(indices start at 0)")
    # train and val index the same (training) arrays: a sample may be in one client's one split only.
    _check_disjoint(where, clients, ("train", "val"), "training")
    _check_disjoint(where, clients, ("test",), "test")
    dataset = doc.get("dataset") if isinstance(doc.get("dataset"), dict) else {}
    return PartitionFile(path, clients, digest, dataset)


def file_splits(path: Path, dataset: ArrayDataset, num_clients: int) -> list[ClientSplit]:
    """The client splits of a partition file, checked against the dataset it is used with."""
    part = read_json(path, num_clients)
    where = f"partition file {part.path}"
    made_for = part.dataset.get("labels_sha256")
    if made_for is not None and made_for != labels_sha256(dataset.y_train, dataset.y_test):
        split = (f", {part.dataset['split']} split" if part.dataset.get("split") else "")
        raise UserError(f"{where} was made for other data (dataset {part.dataset.get('name')!r} with "
                        f"{part.dataset.get('train_size')} train / {part.dataset.get('test_size')} test labels{split}), "
                        f"not {dataset.name} ({len(dataset.y_train)} / {len(dataset.y_test)}, {dataset.split} split): "
                        "its labels differ")
    sizes = {"train": len(dataset.y_train), "val": len(dataset.y_train), "test": len(dataset.y_test)}
    arrays = {"train": "training", "val": "training", "test": "test"}
    for cid, c in enumerate(part.clients):
        for name in SPLITS:
            if len(c[name]) and c[name][-1] >= sizes[name]:
                raise UserError(f"{where}: client {cid} {name} index {int(c[name][-1])} is out of range for the "
                                f"{sizes[name]} {arrays[name]} images of {dataset.name} (valid: 0..{sizes[name] - 1})")
        if not len(c["train"]):
            raise UserError(f"{where} leaves client {cid} without training data; every client needs some")
    return [ClientSplit(*(torch.from_numpy(c[name]) for name in SPLITS)) for c in part.clients]


def _index_array(value: Any, what: str) -> np.ndarray:
    """A JSON list of integers as a sorted int64 array."""
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        raise UserError(f"{what} must be a list of integer indices")
    try:
        return np.sort(np.asarray(value, dtype=np.int64))
    except OverflowError:
        raise UserError(f"{what} holds an index too large for int64") from None


def _check_disjoint(where: str, clients: list[dict[str, np.ndarray]], names: tuple[str, ...], arrays: str) -> None:
    owners = [(cid, name) for cid, c in enumerate(clients) for name in names for _ in range(len(c[name]))]
    values = np.concatenate([c[name] for c in clients for name in names])
    order = np.argsort(values, kind="stable")
    repeated = np.flatnonzero(values[order][1:] == values[order][:-1])
    if len(repeated):
        first, second = order[repeated[0]], order[repeated[0] + 1]
        (c1, s1), (c2, s2) = owners[first], owners[second]
        raise UserError(f"{where}: {arrays} index {int(values[first])} is given twice (client {c1} {s1} and "
                        f"client {c2} {s2}); a sample may belong to one client's one split only")


# ---- PFLlib / HtFLlib layout ----------------------------------------------------------------------------------
PFLLIB_PARTITION = {"label-skew": "pat", "dirichlet": "dir", "iid": None}  # PFLlib's names of our schemes


def check_pfllib_out(out: Path) -> None:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; the pfllib layout needs a new or empty "
                        "folder (stale client files would mix in)")


def write_pfllib(out: Path, splits: list[ClientSplit], dataset: ArrayDataset, settings: dict[str, Any],
                 batch_size: int) -> str:
    """Write the PFLlib/HtFLlib layout (module docstring); returns the source partition's sha256."""
    from data.device_data import DeviceData

    out = Path(out)
    check_pfllib_out(out)
    data = DeviceData(dataset, torch.device("cpu"), augment=False)
    statistic = []
    for name in SPLITS:
        (out / name).mkdir(parents=True, exist_ok=True)
    for cid, s in enumerate(splits):
        for name in SPLITS:
            xs, ys = (data.x_test, data.y_test) if name == "test" else (data.x_train, data.y_train)
            idx = getattr(s, name).cpu()
            x = data.normalise(xs[idx]).numpy()  # exactly the float32 NCHW tensors our models see
            with open(out / name / f"{cid}.npz", "wb") as f:
                np.savez_compressed(f, data={"x": x, "y": ys[idx].numpy().astype(np.int64)})
        held = torch.cat([data.y_train[s.train.cpu()], data.y_test[s.test.cpu()]]).numpy()
        statistic.append([[int(c), int(n)] for c, n in zip(*np.unique(held, return_counts=True))])
    digest = partition_sha256(splits)
    scheme = settings.get("partition", "")
    config = {
        # PFLlib's own keys (dataset/utils/dataset_utils.py save_file), for its `check` and for readers.
        "num_clients": len(splits), "num_classes": dataset.num_classes, "non_iid": scheme != "iid",
        "balance": False, "partition": PFLLIB_PARTITION.get(scheme, scheme),
        "Size of samples for labels in clients": statistic,
        "alpha": settings.get("dirichlet_alpha") if scheme == "dirichlet" else None,
        "batch_size": batch_size,
        # Ours: where it came from and how to undo the normalisation.
        "source": {"format": FORMAT, "sha256": digest, "settings": settings, "dataset": dataset_info(dataset)},
        "normalisation": {"mean": list(dataset.mean), "std": list(dataset.std),
                          "x": "float32 (n, C, H, W) = (pixel / 255 - mean) / std per channel, no augmentation; "
                               "pixel = round((x * std + mean) * 255)"},
        "files": "train/<id>.npz and test/<id>.npz: {'x', 'y'} under key 'data' (np.load(f, allow_pickle=True)"
                 "['data'].tolist()); val/<id>.npz: the client's validation set (PFLlib and HtFLlib ignore it)",
    }
    _write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    return digest


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # atomic: a reader never sees half a file
