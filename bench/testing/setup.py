"""The conformance kit's tiny federation: its settings (Tiny), the runs' inputs (_Setup) and the payload log."""
from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from algorithms.base import Algorithm
from bench.config import RunConfig, resolve_dataset_defaults
from bench.plan import client_splits
from bench.simulator import Simulation
from data.device_data import DeviceData
from data.sources import ArrayDataset, load_dataset, synthetic_dataset
from models.groups import is_homogeneous

_DATA: dict[tuple, tuple[ArrayDataset, DeviceData]] = {}


@dataclass(frozen=True)
class Tiny:
    """The tiny federation check_algorithm runs. model_group: None = "cnn-hetero", or "cnn5-homo" for a
    homogeneous_only algorithm. dataset: "synthetic" / "synthetic:K" (built with train_size/test_size images,
    seed 0), any other name bench.data loads, or an ArrayDataset. participation < 1 (default 3 of 5 clients)
    makes the later rounds depend on the sampler's state. rounds >= 2: the checkpoint is taken after round 1
    and every later round compared. profile: the algorithm's reference profile."""
    model_group: str | None = None
    dataset: Any = "synthetic"
    num_clients: int = 5
    participation: float = 0.6
    rounds: int = 2
    seed: int = 0
    batch_size: int = 16
    train_size: int = 200
    test_size: int = 100
    profile: str = "spec"
    device: str = "cpu"

    @classmethod
    def split(cls, settings: Mapping[str, Any]) -> tuple["Tiny", dict[str, Any]]:
        """(the Tiny fields among `settings`, the rest: RunConfig fields)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in settings.items() if k in names}), \
            {k: v for k, v in settings.items() if k not in names}


@dataclass
class _Setup:
    cls: type[Algorithm]
    name: str
    cfg: RunConfig
    data: DeviceData
    splits: list
    seed: int
    device: torch.device

    @classmethod
    def build(cls, algo_cls, name: str, tiny: Tiny, hparams: Mapping[str, Any] | None,
              config: dict[str, Any]) -> "_Setup":
        model_group = tiny.model_group
        if model_group is None:
            model_group = algo_cls.example_group()
        elif getattr(algo_cls, "homogeneous_only", False) and not is_homogeneous(model_group):
            raise ValueError(f"{name} is homogeneous_only; give a homogeneous model_group, not {model_group!r}")
        dev = torch.device(tiny.device)
        ds, data = _dataset(tiny.dataset, tiny.train_size, tiny.test_size, config.get("augment", True), dev)
        settings = dict(algorithms=[name], dataset=ds.name, num_clients=tiny.num_clients,
                        participation=tiny.participation, rounds=tiny.rounds, local_epochs=1,
                        batch_size=tiny.batch_size, eval_batch_size=256, model_group=model_group, seeds=[tiny.seed],
                        device=tiny.device, profile=tiny.profile, algo={name: dict(hparams)} if hparams else {},
                        checkpoint_every=0)
        settings.update(config)
        cfg = resolve_dataset_defaults(RunConfig(**settings), ds.num_classes)
        return cls(algo_cls, name, cfg, data, client_splits(cfg, ds, tiny.seed, dev), tiny.seed, dev)

    def simulation(self, **overrides: Any) -> Simulation:
        cfg = dataclasses.replace(self.cfg, **overrides)
        return Simulation(cfg, self.cls, self.seed, self.data, self.splits, self.device)


def _dataset(dataset, train_size: int, test_size: int, augment: bool, device: torch.device
             ) -> tuple[ArrayDataset, DeviceData]:
    if isinstance(dataset, ArrayDataset):
        return dataset, DeviceData(dataset, device, augment=augment)
    key = (dataset, train_size, test_size, augment, str(device))
    if key not in _DATA:
        text = dataset.strip().lower()
        if text == "synthetic" or text.startswith("synthetic:"):
            classes = 10 if text == "synthetic" else int(text.split(":", 1)[1])
            ds = synthetic_dataset(num_classes=classes, train_size=train_size, test_size=test_size, seed=0)
        else:
            ds = load_dataset(dataset)
        _DATA[key] = (ds, DeviceData(ds, device, augment=augment))
    return _DATA[key]


class _PayloadLog:
    """The payloads the algorithm hands to the simulator, recorded by wrapping the hooks of one algorithm
    instance (no module global is touched): (round index, "up"/"down", client id, bytes)."""

    def __init__(self, algo: Algorithm):
        self.records: list[tuple[int, str, int, int]] = []
        self._wrap(algo, "server_payload", "down", lambda args, out: {args[0].id: out})
        self._wrap(algo, "after_aggregation_payload", "down",
                   lambda args, out: {} if out is None else {args[0].id: out})
        self._wrap_update(algo)

    def _wrap_update(self, algo: Algorithm) -> None:
        """client_update: its generator's return value (or a plain function's result) is the upload."""
        original = algo.client_update

        @functools.wraps(original)
        def observed(client, payload, round_index):
            out = original(client, payload, round_index)
            if not hasattr(out, "send"):
                self.records.append((round_index, "up", client.id, _size(out or {})))
                return out

            def recorded():
                upload = yield from out
                self.records.append((round_index, "up", client.id, _size(upload or {})))
                return upload

            return recorded()

        algo.client_update = observed

    def _wrap(self, algo: Algorithm, hook: str, direction: str,
              payloads: Callable[[tuple, Any], dict[int, Any]]) -> None:
        original = getattr(algo, hook)

        @functools.wraps(original)
        def observed(*args, **kwargs):
            out = original(*args, **kwargs)
            round_index = kwargs.get("round_index", args[-1] if args else None)
            for cid, payload in payloads(args, out).items():
                self.records.append((round_index, direction, cid, _size(payload)))
            return out

        setattr(algo, hook, observed)  # an instance attribute: shadows the method for this run only

    def totals(self, round_index: int) -> dict[str, int]:
        out = {"up": 0, "down": 0}
        for r, direction, _, size in self.records:
            if r == round_index:
                out[direction] += size
        return out

    def by_client(self, direction: str) -> dict[int, int]:
        out: dict[int, int] = defaultdict(int)
        for _, d, cid, size in self.records:
            if d == direction:
                out[cid] += size
        return dict(out)


def _size(payload: Any) -> int:
    """numel * element_size summed over a payload's tensors (what goes on the wire); malformed payloads are
    left to the simulator, which rejects them."""
    if not isinstance(payload, Mapping):
        return 0
    return sum(t.numel() * t.element_size() for t in payload.values() if isinstance(t, torch.Tensor))


@dataclass
class _Run:
    history: list[dict[str, float]] = field(default_factory=list)  # step 0 (initial evaluation), rounds 1..R
    sim: Simulation | None = None
    error: str | None = None
    exception: BaseException | None = None
