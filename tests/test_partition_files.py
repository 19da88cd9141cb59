"""Portable partitions (data/portable.py, `bench partition export`, `--partition file:PATH.json`) and label
skew for any N. Runs use the 300-image synthetic .npz of tests/conftest.py, CNN-5, one round."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.config import RunConfig
from bench.runner import client_splits
from data import portable
from data.partition import label_skew_proportions, partition
from data.sources import load_dataset
from tests.conftest import bench_main

pytestmark = pytest.mark.usefixtures("one_thread")

N = 4  # 4 clients x 2 classes on 10 classes: not a multiple, so every test here also exercises the uneven deal
TIMING = {"round_time", "cum_round_time"}  # the only run outputs allowed to differ between identical runs


def run_args(npz: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--algo", "standalone", "--dataset", str(npz), "--clients", str(N), "--model-group", "cnn5-homo",
            "--rounds", "1", "--batch-size", "64", "--set", "eval_batch_size=256", "--output-dir", str(out), "--quiet",
            *extra]


def our_splits(npz: Path, seed: int = 0, **overrides):
    ds = load_dataset(str(npz))
    cfg = RunConfig(dataset=str(npz), num_clients=N, **overrides)
    return ds, client_splits(cfg, ds, seed, torch.device("cpu"))


# ---- label skew for any N ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes, num_clients, cpc", [(10, 4, 2), (10, 3, 2), (10, 7, 2), (10, 7, 3),
                                                          (10, 3, 4), (10, 1, 2), (10, 13, 9), (100, 15, 10)])
def test_uneven_label_skew_deals_classes_as_evenly_as_possible(num_classes, num_clients, cpc):
    rng = np.random.default_rng(0)
    p = label_skew_proportions(num_classes, num_clients, cpc, rng)
    held = p > 0
    assert (held.sum(axis=0) == cpc).all()  # every client: cpc distinct classes
    users = held.sum(axis=1)
    floor, rest = divmod(cpc * num_clients, num_classes)
    assert set(users) <= {floor, floor + 1} and users.max() - users.min() <= 1
    assert (users == floor + 1).sum() == rest  # exactly the remainder goes one client further
    used = users > 0
    assert np.allclose(p[used].sum(axis=1), 1)
    # Each holder's share is its U(0.4, 0.6) weight over the class's sum of such weights.
    for c in np.flatnonzero(used):
        shares = p[c, held[c]]
        assert shares.min() >= 0.4 / (0.4 + 0.6 * (users[c] - 1)) - 1e-12
        assert shares.max() <= 0.6 / (0.6 + 0.4 * (users[c] - 1)) + 1e-12

    # The same through partition(): the samples follow, the same classes in train, val and test.
    y_train, y_test = np.repeat(np.arange(num_classes), 600), np.repeat(np.arange(num_classes), 200)
    splits = partition(y_train, y_test, num_clients, "label-skew", classes_per_client=cpc, seed=1)
    classes = [set(y_train[s.train.numpy()]) for s in splits]
    assert all(len(c) == cpc for c in classes)
    for s, c in zip(splits, classes):
        assert set(y_train[s.val.numpy()]) == c and set(y_test[s.test.numpy()]) == c
    counts = np.bincount(np.concatenate([sorted(c) for c in classes]), minlength=num_classes)
    assert counts.max() - counts.min() <= 1
    # Every sample of a held class is dealt exactly once; those of unheld classes (cpc * N < K) to nobody.
    train = np.concatenate([s.train.numpy() for s in splits] + [s.val.numpy() for s in splits])
    assert len(train) == len(np.unique(train)) == (counts[y_train] > 0).sum()


@pytest.mark.parametrize("num_clients, cpc", [(10, 11), (10, 0)])
def test_impossible_label_skew_names_the_valid_range(num_clients, cpc):
    from bench.errors import UserError

    with pytest.raises(UserError, match=r"classes_per_client is -?\d+; valid: 1\.\.10"):
        label_skew_proportions(10, num_clients, cpc, np.random.default_rng(0))


# ---- JSON round trip ------------------------------------------------------------------------------------------


def metric_rows(root: Path) -> list[dict[str, str]]:
    rows = list(csv.DictReader(open(root / "runs" / "standalone-seed0" / "metrics.csv")))
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def test_exported_json_runs_to_identical_metrics_and_every_run_records_its_hash(small_npz, tmp_path, monkeypatch,
                                                                               capsys):
    from mlflow.tracking import MlflowClient

    exported = tmp_path / "part.json"
    code, out, err = bench_main(monkeypatch, capsys, "partition", "export", "--dataset", str(small_npz), "--clients",
                                str(N), "--seed", "0", "--format", "json", "--out", str(exported))
    assert code == 0, err
    doc = json.loads(exported.read_text())
    ds, splits = our_splits(small_npz)
    # The file is our partition: index lists (train/val into the training arrays, test into the test arrays),
    # the settings that made it, and the sha256 of its canonical client lists, computed here independently.
    assert [{k: c[k] for k in ("train", "val", "test")} for c in doc["clients"]] == [
        {"train": s.train.tolist(), "val": s.val.tolist(), "test": s.test.tolist()} for s in splits]
    import hashlib

    canonical = json.dumps([{k: sorted(c[k]) for k in ("train", "val", "test")} for c in doc["clients"]],
                           separators=(",", ":"))
    assert doc["sha256"] == hashlib.sha256(canonical.encode()).hexdigest() and doc["sha256"] in out
    assert (doc["settings"]["partition"], doc["settings"]["classes_per_client"], doc["settings"]["seed"]) == (
        "label-skew", 2, 0)  # the dataset-aware default, resolved
    assert doc["dataset"]["train_size"] == len(ds.y_train) and doc["dataset"]["test_size"] == len(ds.y_test)

    results = tmp_path / "results"
    assert bench_main(monkeypatch, capsys, *run_args(small_npz, results, "--run-name", "drawn"))[0] == 0
    code, _, err = bench_main(monkeypatch, capsys, *run_args(small_npz, results, "--run-name", "file",
                                                               "--partition", f"file:{exported}"))
    assert code == 0, err
    assert metric_rows(results / "file") == metric_rows(results / "drawn")
    assert len(metric_rows(results / "file")) == 2  # rounds 0 and 1

    for name in ("drawn", "file"):
        config = json.loads((results / name / "config.json").read_text())
        assert config["partition_hashes"] == {"0": doc["sha256"]}
        run_config = json.loads((results / name / "runs" / "standalone-seed0" / "config.json").read_text())
        assert run_config["params"]["partition_hash"] == doc["sha256"]
        assert doc["sha256"] in (results / name / "plots" / "report.md").read_text()
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    children = client.search_runs([client.get_experiment_by_name("mhpfl-bench").experiment_id],
                                  filter_string="tags.algorithm = 'standalone'")
    assert len(children) == 2 and {r.data.params["partition_hash"] for r in children} == {doc["sha256"]}

    # Resuming the file run with another partition file (same settings, other content) is refused.
    other = json.loads(exported.read_text())
    other["clients"][0]["test"], other["clients"][1]["test"] = other["clients"][1]["test"], other["clients"][0]["test"]
    del other["sha256"]
    exported.write_text(json.dumps(other))
    code, _, err = bench_main(monkeypatch, capsys, *run_args(small_npz, results, "--run-name", "file", "--resume",
                                                               "--partition", f"file:{exported}"))
    assert code == 2 and "partition of seed 0: sha256" in err and "holds a different run" in err


# ---- PFLlib / HtFLlib layout ----------------------------------------------------------------------------------


def test_pfllib_layout_decodes_back_to_our_client_data(small_npz, tmp_path, monkeypatch, capsys):
    out = tmp_path / "Cifar10ish"
    code, _, err = bench_main(monkeypatch, capsys, "partition", "export", "--dataset", str(small_npz), "--clients",
                              str(N), "--format", "pfllib", "--out", str(out))
    assert code == 0, err
    ds, splits = our_splits(small_npz)
    config = json.loads((out / "config.json").read_text())
    assert config["num_clients"] == N and config["num_classes"] == 10 and config["partition"] == "pat"
    assert config["source"]["sha256"] == portable.partition_sha256(splits)
    mean = np.array(config["normalisation"]["mean"]).reshape(1, -1, 1, 1)
    std = np.array(config["normalisation"]["std"]).reshape(1, -1, 1, 1)
    assert np.allclose(mean.ravel(), ds.mean) and np.allclose(std.ravel(), ds.std)
    for cid, split in enumerate(splits):
        for folder, idx, x_all, y_all in (("train", split.train, ds.x_train, ds.y_train),
                                          ("val", split.val, ds.x_train, ds.y_train),
                                          ("test", split.test, ds.x_test, ds.y_test)):
            with open(out / folder / f"{cid}.npz", "rb") as f:  # as PFLlib's read_data does
                data = np.load(f, allow_pickle=True)["data"].tolist()
            assert set(data) == {"x", "y"}
            x, y = data["x"], data["y"]
            assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape == (len(idx), 3, 32, 32)
            pixels = np.rint((x.astype(np.float64) * std + mean) * 255)
            assert np.array_equal(pixels, x_all[idx.numpy()].transpose(0, 3, 1, 2))
            assert np.array_equal(y, y_all[idx.numpy()])
            assert abs(x.mean()) < 3 and 0.2 < x.std() < 3  # normalised, not raw 0-255 pixels
    assert sorted(p.name for p in (out / "train").iterdir()) == [f"{i}.npz" for i in range(N)]


# ---- bad input: one line, exit 2, before anything is written ---------------------------------------------------


@pytest.fixture
def good_file(small_npz, tmp_path) -> dict:
    ds, splits = our_splits(small_npz)
    path = tmp_path / "good.json"
    portable.write_json(path, splits, ds, {"partition": "label-skew"})
    return json.loads(path.read_text())


def edit(doc: dict, change) -> dict:
    doc = json.loads(json.dumps(doc))
    change(doc)
    doc.pop("sha256", None)  # as a file converted from another tool: no hash to match
    return doc


BAD_FILES = [
    # (what is wrong, the file's content (None: no file), text the error must contain)
    ("missing file", None, "does not exist"),
    ("not JSON", "{'clients': [", "is not valid JSON"),
    ("no client list", {"clients": {"0": []}}, 'expected an object with "clients"'),
    ("client without val", lambda d: d["clients"][0].pop("val"), "client 0 is not an object with train, val and test"),
    ("float index", lambda d: d["clients"][1]["test"].append(1.5), "client 1 test must be a list of integer indices"),
    ("overlap across clients", lambda d: d["clients"][2]["train"].append(d["clients"][0]["train"][0]),
     "is given twice (client 0 train and client 2 train)"),
    ("train of one, val of another", lambda d: d["clients"][3]["val"].append(d["clients"][1]["train"][-1]),
     "training index"),
    ("test index twice", lambda d: d["clients"][0]["test"].append(d["clients"][0]["test"][0]), "test index"),
    ("index past the arrays", lambda d: d["clients"][1]["train"].append(300),
     "client 1 train index 300 is out of range for the 300 training images"),
    ("test index past the arrays", lambda d: d["clients"][0]["test"].append(100), "valid: 0..99"),
    ("negative index", lambda d: d["clients"][2]["val"].append(-1), "index -1 is out of range"),
    ("more clients", lambda d: d["clients"].append({"train": [], "val": [], "test": []}),
     "num_clients is 4 but it lists 5 clients"),
    ("fewer clients", lambda d: (d["clients"].pop(), d.pop("num_clients")), "holds 3 clients but num_clients is 4"),
    ("edited after export", "keep-hash", "does not match its client lists"),
    ("other data", lambda d: d["dataset"].update(labels_sha256="0" * 64), "was made for other data"),
]


@pytest.mark.parametrize("content, message", [row[1:] for row in BAD_FILES], ids=[row[0] for row in BAD_FILES])
def test_bad_partition_file_is_one_line_exit_2(content, message, good_file, small_npz, tmp_path, monkeypatch, capsys):
    path = tmp_path / "part.json"
    if content == "keep-hash":
        doc = json.loads(json.dumps(good_file))
        doc["clients"][0]["train"].pop()
        path.write_text(json.dumps(doc))
    elif isinstance(content, str):
        path.write_text(content)
    elif callable(content):
        path.write_text(json.dumps(edit(good_file, content)))
    elif content is not None:
        path.write_text(json.dumps(content))
    out = tmp_path / "results"
    code, _, err = bench_main(monkeypatch, capsys, *run_args(small_npz, out, "--partition", f"file:{path}"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not out.exists()  # refused before anything was computed or written


@pytest.mark.parametrize("args, message", [
    (["--format", "csv", "--out", "{t}/x.json"], "Invalid value for '--format': 'csv' is not one of"),
    (["--format", "pfllib", "--out", "{t}/busy"], "exists and is not an empty folder"),
    (["--format", "json", "--out", "{t}/busy"], "is a folder; the json format writes a file"),
    (["--format", "json", "--clients", "3", "--partition", "file:{t}/nothing.json", "--out", "{t}/x.json"],
     "does not exist"),
    (["--format", "json", "--classes-per-client", "11", "--out", "{t}/x.json"], "valid: 1..10"),
])
def test_bad_export_is_one_line_exit_2(args, message, small_npz, tmp_path, monkeypatch, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "old.npz").write_bytes(b"")
    args = [a.replace("{t}", str(tmp_path)) for a in args]
    code, _, err = bench_main(monkeypatch, capsys, "partition", "export", "--dataset", str(small_npz), *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not (tmp_path / "x.json").exists() and [p.name for p in (tmp_path / "busy").iterdir()] == ["old.npz"]
