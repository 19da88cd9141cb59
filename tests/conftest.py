"""Shared test helpers: small synthetic runs built directly on the simulator (no CLI, no tracking)."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: no spin-waiting on shared CPUs

import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch

from bench.config import RunConfig
from bench.registry import resolve_algorithms
from bench.runner import client_splits
from bench.simulator import Simulation
from data.device_data import DeviceData
from data.sources import synthetic_dataset

_DATA: dict[tuple, object] = {}


def synthetic_device_data(num_classes: int = 10, augment: bool = True) -> tuple[object, DeviceData]:
    key = (num_classes, augment)
    if key not in _DATA:
        ds = synthetic_dataset(num_classes=num_classes, train_size=1000, test_size=300, seed=0)
        _DATA[key] = (ds, DeviceData(ds, torch.device("cpu"), augment=augment))
    return _DATA[key]


def make_simulation(algorithm: str, /, *, num_classes: int = 10, augment: bool = True, seed: int = 0,
                    **overrides) -> Simulation:
    """A Simulation of `algorithm` on a small synthetic set: 5 clients, 2 classes each, batch 32, 1 epoch."""
    settings = dict(dataset="synthetic", num_clients=5, rounds=2, batch_size=32, local_epochs=1,
                    classes_per_client=2, eval_batch_size=256)
    settings.update(overrides)
    cfg = RunConfig(**settings)
    ds, data = synthetic_device_data(num_classes, augment)
    splits = client_splits(cfg, ds, seed, torch.device("cpu"))
    return Simulation(cfg, resolve_algorithms([algorithm])[0], seed, data, splits, torch.device("cpu"))


@pytest.fixture
def simulation():
    return make_simulation


def client_update(sim: Simulation, client, payload, round_index: int = 0):
    """One client's local update through the simulator's training path (the Phases its client_update yields,
    run by bench/training.py): (upload, mean loss of its last phase, or None without training)."""
    from bench.training import run_updates

    done = run_updates(sim.ctx, sim.algo, [client], {client.id: payload}, round_index)
    return done.uploads[client.id], done.final_loss.get(client.id)


# ---- hand-made splits: exact, known client sizes (n_k differ), for the baselines' mechanism tests ----
_HAND_DATA: dict[int, tuple] = {}


def hand_dataset(num_classes: int):
    if num_classes not in _HAND_DATA:
        ds = synthetic_dataset(num_classes=num_classes, train_size=max(400, 10 * num_classes), test_size=200, seed=0)
        _HAND_DATA[num_classes] = (ds, DeviceData(ds, torch.device("cpu"), augment=True))
    return _HAND_DATA[num_classes]


def hand_splits(ds, num_clients: int, classes_per_client: int, per_class: int = 3) -> list:
    """Client i holds classes i*cpc .. i*cpc+cpc-1 (mod classes), per_class + i train samples of each
    (so n_k differ), one validation and one test sample of each."""
    import numpy as np

    from data.partition import ClientSplit

    k = ds.num_classes
    by_class = [np.flatnonzero(ds.y_train == c) for c in range(k)]
    test_by_class = [np.flatnonzero(ds.y_test == c) for c in range(k)]
    used = [0] * k
    splits = []
    for i in range(num_clients):
        train, val, test = [], [], []
        for j in range(classes_per_client):
            c = (i * classes_per_client + j) % k
            take = per_class + i
            train.extend(by_class[c][used[c]:used[c] + take])
            val.append(by_class[c][used[c] + take])
            used[c] += take + 1
            test.append(test_by_class[c][i % len(test_by_class[c])])
        splits.append(ClientSplit(*(torch.tensor(np.array(v), dtype=torch.int64) for v in (train, val, test))))
    return splits


def make_hand_simulation(algorithm: str, /, num_classes=10, num_clients=5, classes_per_client=2, per_class=3,
                         splits=None, hp=None, **cfg_overrides) -> Simulation:
    """A Simulation of `algorithm` on hand_splits (or the given splits) of a small synthetic set."""
    settings = dict(dataset="synthetic", num_clients=num_clients, rounds=2, batch_size=32, local_epochs=1,
                    classes_per_client=classes_per_client, eval_batch_size=256, device="cpu",
                    algorithms=[algorithm], algo={algorithm: hp or {}})
    settings.update(cfg_overrides)
    ds, data = hand_dataset(num_classes)
    if splits is None:
        splits = hand_splits(ds, num_clients, classes_per_client, per_class)
    return Simulation(RunConfig(**settings), resolve_algorithms([algorithm])[0], 0, data, splits, torch.device("cpu"))


@pytest.fixture(scope="module")
def one_thread():
    """Single-threaded torch for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): on a shared
    2-core machine contending OpenMP threads make small CPU kernels (SVD above all) many times slower.
    The thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the CLI in-process, on a small dataset file ----------------------------------------------------------------

def bench_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """The real CLI entry point, in-process (no 4 s of imports per call): (exit code, stdout, stderr)."""
    from bench import cli

    monkeypatch.setattr(sys, "argv", ["bench", *args])
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.setattr(cli, "DEBUG", False)
    try:
        cli.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def small_arrays() -> dict[str, np.ndarray]:
    """300 train / 100 test synthetic images: one or two batches per client and round."""
    ds = synthetic_dataset(num_classes=10, train_size=300, test_size=100, seed=0)
    return dict(x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test)


@pytest.fixture(scope="session")
def small_npz(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "small.npz"
    np.savez(path, **small_arrays())
    return path

