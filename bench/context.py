"""What an algorithm sees of the run: its settings, data, model and optimiser building, and the training and
evaluation helpers through which the simulator counts FLOPs and reports events to observers."""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from algorithms.base import Phase
from bench.accounting import FlopAccountant
from bench.config import RunConfig
from bench.observe import Observers
from data.device_data import DeviceData
from data.partition import ClientSplit
from models.cnn import SplitModel
from models.groups import build_model, client_arch

# Seed offsets, so partition, sampling, initialisation and augmentation use independent streams.
SAMPLING_STREAM, AUGMENT_STREAM = 1, 2


@dataclass
class Client:
    id: int
    arch: str
    split: ClientSplit                 # index tensors on the run's device
    state: dict[str, Any] = field(default_factory=dict)  # personal state (see ClientStore)
    # this round's augmentation/shuffling stream (RunContext.client_generator), set by run_updates
    rng: torch.Generator | None = None

    @property
    def num_train(self) -> int:
        return len(self.split.train)


class RunContext:
    """What an algorithm sees of the run: settings, data, model building and the training/eval helpers
    through which the simulator counts FLOPs."""

    def __init__(self, cfg: RunConfig, data: DeviceData, device: torch.device, seed: int, algo_name: str,
                 accountant: FlopAccountant, splits: list[ClientSplit], observers: Observers | None = None):
        self.cfg = cfg
        self.client_archs = [client_arch(cfg.model_group, i) for i in range(len(splits))]
        self.client_weights = {i: float(len(s.train)) for i, s in enumerate(splits)}  # n_k, for averages
        self.data = data
        self.device = device
        self.seed = seed
        self.algo_name = algo_name
        self.accountant = accountant
        self.num_classes = data.num_classes
        self.in_channels, self.image_size = data.x_train.shape[1], data.x_train.shape[2]
        self.run_generator = torch.Generator(device=device)  # randomness outside a client's update
        self.run_generator.manual_seed(seed * 1000 + AUGMENT_STREAM)
        self._local = threading.local()  # per thread: the client whose update runs (clients may run in parallel)
        self.memory_format = torch.channels_last if channels_last(cfg, device) else torch.contiguous_format
        data.set_memory_format(self.memory_format)
        self.round_metrics: dict[str, list[tuple[torch.Tensor, float]]] = {}
        self.observers = observers if observers is not None else Observers()
        # The modules a client's prediction may use: its personal state's and the server's (set by Simulation).
        self.prediction_modules: Callable[[Client], list[nn.Module]] = lambda client: modules_in(client.state)

    # ---- randomness --------------------------------------------------------------------------------
    def client_generator(self, client_id: int, round_index: int) -> torch.Generator:
        """Client `client_id`'s shuffling and augmentation stream in round `round_index`: seeded from (seed,
        round, client) alone, so a client's batches do not depend on which other clients ran before it, in
        what order, or in parallel."""
        seed = np.random.SeedSequence([self.seed, AUGMENT_STREAM, round_index, client_id]).generate_state(2)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(int(seed[0]) << 32 | int(seed[1]))
        return generator

    @property
    def generator(self) -> torch.Generator:
        """The stream for randomness in algorithm code: the acting client's this round (inside its update),
        else the run's."""
        client = getattr(self._local, "client", None)
        return client.rng if client is not None and client.rng is not None else self.run_generator

    @contextlib.contextmanager
    def acting_as(self, client: Client):
        """Marks `client`'s update as running in this thread (ctx.generator, ctx.record)."""
        previous = getattr(self._local, "client", None)
        self._local.client = client
        try:
            yield
        finally:
            self._local.client = previous

    @contextlib.contextmanager
    def own_records(self):
        """ctx.record calls of this thread go to the yielded dict meanwhile (a client running in parallel: the
        simulator merges them in client order, so the round's means add up in the sequential order)."""
        self._local.records = records = {}
        try:
            yield records
        finally:
            self._local.records = None

    # ---- models and optimisers ------------------------------------------------------------------
    def build_model(self, arch: str) -> SplitModel:
        model = build_model(arch, self.num_classes, self.in_channels, self.image_size)
        model = model.to(self.device, memory_format=self.memory_format)
        if self.cfg.model_init:  # a user's checkpoint (models/pretrained.py): same start for every client of arch
            from models.pretrained import load_model_init

            load_model_init(model, self.cfg.model_init, arch)
        return model

    def representation_dim(self, arch: str) -> int:
        with torch.device("meta"):  # no memory, no RNG draws
            return build_model(arch, self.num_classes, self.in_channels, self.image_size).rep_dim

    def optimizer(self, params: Iterable[nn.Parameter], lr: float | None = None) -> torch.optim.Optimizer:
        """SGD with the run's settings; algorithms create it anew each round (SPEC). foreach: one multi-tensor
        kernel per step instead of one per parameter (bitwise the same update, tests/test_training.py)."""
        return torch.optim.SGD(params, lr=self.cfg.lr if lr is None else lr, momentum=self.cfg.momentum,
                               weight_decay=self.cfg.weight_decay, foreach=True)

    def optimizers_for(self, trainable: Sequence[nn.Module | Sequence[nn.Module]]
                       ) -> tuple[list[list[nn.Parameter]], list[torch.optim.Optimizer]]:
        """(parameter groups, optimizers): one group and one optimizer per entry of `trainable` (a module or a
        list of modules), holding only the parameters with requires_grad."""
        groups = [[entry] if isinstance(entry, nn.Module) else list(entry) for entry in trainable]
        params = [[p for m in mods for p in m.parameters() if p.requires_grad] for mods in groups]
        return params, [self.optimizer(ps) for ps in params if ps]

    def step(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
             y: torch.Tensor, params: list[list[nn.Parameter]], optimizers: list[torch.optim.Optimizer]
             ) -> torch.Tensor:
        """One optimisation step: forward, backward, per-group gradient clipping, SGD step. Returns the loss."""
        loss = loss_fn(x, y)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for group, opt in zip(params, optimizers):
            if self.cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(group, self.cfg.grad_clip, foreach=True)
            opt.step()
        return loss

    # ---- training ----------------------------------------------------------------------------------
    def train(self, client: Client, phase: Phase) -> torch.Tensor:
        """Run one phase of `client`'s training now and return its mean loss (the simulator runs the phases
        that client_update yields through this; tests may call it directly)."""
        from bench.training import train_phase

        return train_phase(self, client, phase)

    # ---- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, client: Client, predict: Callable[[torch.Tensor], torch.Tensor], split: str = "test",
                 tag: str = "eval") -> tuple[torch.Tensor, int, torch.Tensor]:
        """(correct, count, summed CE loss) of `predict` on one of the client's splits; eval FLOPs counted.
        Every module the prediction may use is in eval mode meanwhile (BatchNorm uses and keeps its running
        statistics, dropout is off), whatever `predict` does; the training flags are restored after."""
        idx = getattr(client.split, split)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        loss = torch.zeros((), device=self.device)
        with self.observers.span("evaluate", client=client.id, split=split, tag=tag) as info, \
                eval_mode(self.prediction_modules(client)):
            for x, y in self.data.eval_batches(split, idx, self.cfg.eval_batch_size):
                with self.accountant.count("eval", (self.algo_name, tag, client.arch, len(y))):
                    logits = predict(x)
                correct += (logits.argmax(1) == y).sum()
                loss += nn.functional.cross_entropy(logits, y, reduction="sum")
            info.update(correct=correct, count=len(idx))
        return correct, len(idx), loss

    def record(self, name: str, value: torch.Tensor | float, weight: float = 1.0) -> None:
        """An extra per-round metric from inside a hook (e.g. pFedLoRA's accuracy after phase 1);
        the round figure is the weighted mean over the clients that recorded it."""
        buffer = getattr(self._local, "records", None)  # a parallel client's, merged in client order after
        metrics = buffer if buffer is not None else self.round_metrics
        metrics.setdefault(name, []).append((torch.as_tensor(value, dtype=torch.float32), weight))


def channels_last(cfg: RunConfig, device: torch.device) -> bool:
    """cfg.channels_last, None meaning: on CPU (convolutions measured ~1.2x faster there, benchmarks/speed.py)."""
    return cfg.channels_last if cfg.channels_last is not None else torch.device(device).type == "cpu"


def modules_in(*containers: Any) -> list[nn.Module]:
    """The nn.Modules held (directly or in lists/dicts) by the given dicts or objects' attributes."""
    found: list[nn.Module] = []

    def visit(value: Any) -> None:
        if isinstance(value, nn.Module):
            found.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    for container in containers:
        visit(container if isinstance(container, (dict, list, tuple)) else vars(container))
    return found


@contextlib.contextmanager
def eval_mode(modules: Iterable[nn.Module]):
    """Put every submodule of `modules` in eval mode; restore each one's own training flag on exit."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for m, _ in flags:
            m.training = False
        yield
    finally:
        for m, training in flags:
            m.training = training
