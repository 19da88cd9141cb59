"""Shared test helpers: small synthetic runs built directly on the simulator (no CLI, no tracking)."""
from __future__ import annotations

import pytest
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
