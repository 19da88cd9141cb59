"""The one round loop shared by every algorithm, with the run context that algorithms train through.

Per round: sample clients -> server payload down -> client update -> payload up -> aggregate ->
evaluate -> metrics -> trackers. Bytes are measured here on the payloads; FLOPs are counted here
around the training steps, evaluation and aggregation."""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from algorithms.base import Algorithm, Payload
from bench.accounting import FlopAccountant, transmit, upload_signature
from bench.checkpoint import Packer, rng_state, set_rng_state, unpack
from bench.config import RunConfig
from bench.state import ClientStore
from data.device_data import DeviceData
from data.partition import ClientSplit
from models.cnn import SplitModel
from bench.errors import UserError
from models.groups import MODEL_GROUPS, build_model, client_arch, is_homogeneous

# Seed offsets, so partition, sampling, initialisation and augmentation use independent streams.
SAMPLING_STREAM, AUGMENT_STREAM = 1, 2


@dataclass
class Client:
    id: int
    arch: str
    split: ClientSplit                 # index tensors on the run's device
    state: dict[str, Any] = field(default_factory=dict)  # personal state (see ClientStore)

    @property
    def num_train(self) -> int:
        return len(self.split.train)


class RunContext:
    """What an algorithm sees of the run: settings, data, model building and the training/eval helpers
    through which the simulator counts FLOPs."""

    def __init__(self, cfg: RunConfig, data: DeviceData, device: torch.device, seed: int, algo_name: str,
                 accountant: FlopAccountant, splits: list[ClientSplit]):
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
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed * 1000 + AUGMENT_STREAM)
        self.round_metrics: dict[str, list[tuple[torch.Tensor, float]]] = {}
        self.last_train_loss = torch.full((), float("nan"), device=device)  # mean loss of the latest ctx.train call
        self.client_losses: dict[int, torch.Tensor] = {}  # batched rounds: each client's final-phase loss
        self.round_losses: list[tuple[int, str, torch.Tensor]] = []  # (client, phase, mean loss) this round
        # The modules a client's prediction may use: its personal state's and the server's (set by Simulation).
        self.prediction_modules: Callable[[Client], list[nn.Module]] = lambda client: modules_in(client.state)

    # ---- models and optimisers ------------------------------------------------------------------
    def build_model(self, arch: str) -> SplitModel:
        return build_model(arch, self.num_classes, self.in_channels, self.image_size).to(self.device)

    def representation_dim(self, arch: str) -> int:
        with torch.device("meta"):  # no memory, no RNG draws
            return build_model(arch, self.num_classes, self.in_channels, self.image_size).rep_dim

    def optimizer(self, params: Iterable[nn.Parameter], lr: float | None = None) -> torch.optim.Optimizer:
        """SGD with the run's settings; algorithms create it anew each round (SPEC)."""
        return torch.optim.SGD(params, lr=self.cfg.lr if lr is None else lr, momentum=self.cfg.momentum,
                               weight_decay=self.cfg.weight_decay)

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

    # ---- training ---------------------------------------------------------------------------------
    def train(self, client: Client, trainable: Sequence[nn.Module | Sequence[nn.Module]],
              loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], epochs: int, phase: str,
              indices: torch.Tensor | None = None,
              optimizers: tuple[list[list[nn.Parameter]], list[torch.optim.Optimizer]] | None = None
              ) -> torch.Tensor:
        """Run `epochs` epochs of SGD over the client's training batches and return the mean loss (a tensor,
        so no host sync per batch). Each entry of `trainable` (a module or a list of modules) gets its own
        optimizer and its own gradient clipping; only parameters with requires_grad are trained.
        `phase` names the computation for the FLOP cache (include anything that changes it). `optimizers`:
        the caller's own `optimizers_for(trainable)` (e.g. with momentum kept across rounds) instead of new ones."""
        params, optimizers = optimizers if optimizers is not None else self.optimizers_for(trainable)
        idx = client.split.train if indices is None else indices
        loss_sum = torch.zeros((), device=self.device)
        seen = 0
        for _ in range(epochs):
            for x, y in self.data.train_batches(idx, self.cfg.batch_size, self.generator):
                key = (self.algo_name, phase, client.arch, len(y))
                with self.accountant.count("train", key, client.id):
                    loss = self.step(loss_fn, x, y, params, optimizers)
                loss_sum += loss.detach() * len(y)
                seen += len(y)
        self.last_train_loss = loss_sum / max(seen, 1)
        self.round_losses.append((client.id, phase, self.last_train_loss))
        return self.last_train_loss

    def train_many(self, clients: Sequence[Client], models: Sequence[nn.Module], epochs: int, phase: str,
                   partners: Sequence[nn.Module | None] | None = None) -> dict[int, torch.Tensor]:
        """Cross-entropy training of models[i] on clients[i]'s training batches, i.e. for every i
        self.train(clients[i], [models[i]], CE(models[i](x) + partners[i](x), y), epochs, phase), where a
        partner is a frozen module whose output is added to the logits (or None). With cfg.batched_training
        the clients whose models share an architecture train together (bench/batched.py): equal to
        sequential training on the same batches within float tolerance (the batches are drawn from the run's
        generator in lockstep order, so a seeded run differs from the sequential one). FLOPs are credited per
        client and batch under the same keys as self.train. Returns each client's mean training loss."""
        from bench.batched import SGDSettings, can_batch, train_same_arch

        partners = list(partners) if partners is not None else [None] * len(clients)
        groups: dict[tuple, list[int]] = {}
        for i, m in enumerate(models):
            signature = tuple((n, tuple(p.shape), p.requires_grad) for n, p in m.named_parameters())
            groups.setdefault((type(m), signature), []).append(i)
        losses: dict[int, torch.Tensor] = {}
        for members in groups.values():
            group = [models[i] for i in members]
            if not self.cfg.batched_training or len(members) == 1 or not can_batch(group):
                for i in members:
                    losses[clients[i].id] = self.train(clients[i], [models[i]], _ce_loss(models[i], partners[i]),
                                                       epochs, phase).detach()
                continue
            steps = [epochs * math.ceil(clients[i].num_train / self.cfg.batch_size) for i in members]
            streams = [self._counted_batches(clients[i], models[i], partners[i], epochs, phase) for i in members]
            extra = None
            if any(partners[i] is not None for i in members):
                extra = lambda k, t, x: partners[members[k]](x)  # noqa: E731
            out = train_same_arch(group, streams, SGDSettings.from_config(self.cfg), extra_logits=extra, steps=steps)
            for i, loss in zip(members, out):
                losses[clients[i].id] = loss
                self.round_losses.append((clients[i].id, phase, loss))
        self.client_losses.update(losses)  # a later phase overwrites: the round reports the final phase
        return losses

    def _counted_batches(self, client: Client, model: nn.Module, partner: nn.Module | None, epochs: int,
                         phase: str):
        """The client's training batches for `epochs` epochs, each credited with its step's FLOPs under
        self.train's key; a key not yet cached is counted on meta-device copies (shapes only, no compute)."""
        for _ in range(epochs):
            for x, y in self.data.train_batches(client.split.train, self.cfg.batch_size, self.generator):
                key = (self.algo_name, phase, client.arch, len(y))
                cached = self.accountant.is_cached("train", key)
                with self.accountant.count("train", key, client.id):
                    if not cached:
                        _meta_step(model, partner, x, y)
                yield x, y

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
        with eval_mode(self.prediction_modules(client)):
            for x, y in self.data.eval_batches(split, idx, self.cfg.eval_batch_size):
                with self.accountant.count("eval", (self.algo_name, tag, client.arch, len(y))):
                    logits = predict(x)
                correct += (logits.argmax(1) == y).sum()
                loss += nn.functional.cross_entropy(logits, y, reduction="sum")
        return correct, len(idx), loss

    def record(self, name: str, value: torch.Tensor | float, weight: float = 1.0) -> None:
        """An extra per-round metric from inside a hook (e.g. pFedLoRA's accuracy after phase 1);
        the round figure is the weighted mean over the clients that recorded it."""
        self.round_metrics.setdefault(name, []).append((torch.as_tensor(value, dtype=torch.float32), weight))


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


def _ce_loss(model: nn.Module, partner: nn.Module | None):
    if partner is None:
        return lambda x, y: nn.functional.cross_entropy(model(x), y)
    return lambda x, y: nn.functional.cross_entropy(model(x) + partner(x), y)


def _meta_step(model: nn.Module, partner: nn.Module | None, x: torch.Tensor, y: torch.Tensor) -> None:
    """Forward and backward of one training step on meta-device copies: what FlopCounterMode counts, free."""
    meta_x, meta_y = x.to("meta"), y.to("meta")
    logits = copy.deepcopy(model).to("meta")(meta_x)
    if partner is not None:
        logits = logits + copy.deepcopy(partner).to("meta")(meta_x)
    with torch.autograd.set_detect_anomaly(False):  # anomaly checks read values back: none on meta
        nn.functional.cross_entropy(logits, meta_y).backward()


@dataclass
class ClientEval:
    correct: int
    count: int
    loss: float

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.count, 1)


class Simulation:
    """One (algorithm, seed) run. `on_round(step, metrics)` is called after every evaluated round."""

    def __init__(self, cfg: RunConfig, algo_cls: type[Algorithm], seed: int, data: DeviceData,
                 splits: list[ClientSplit], device: torch.device, hparams: Any = None):
        """`hparams`: the algorithm's typed hyper-parameters as the run plan built them (None: built here
        from cfg, for direct use in tests and benchmarks)."""
        self.cfg = cfg
        self.seed = seed
        self.device = device
        self.accountant = FlopAccountant(cache=cfg.flop_cache)
        if algo_cls.homogeneous_only and not is_homogeneous(cfg.model_group):
            raise UserError(f"{algo_cls.name} needs a model-homogeneous group, got {cfg.model_group!r}; "
                            f"valid: {', '.join(g for g in MODEL_GROUPS if is_homogeneous(g))}")
        torch.manual_seed(seed)  # model initialisation
        self.ctx = RunContext(cfg, data, device, seed, algo_cls.name, self.accountant, splits)
        self.algo = algo_cls(self.ctx, algo_cls.hparams_for(cfg) if hparams is None else hparams)
        self.ctx.prediction_modules = lambda client: modules_in(client.state, self.algo)
        self.store = ClientStore(device, offload=cfg.offload_state)
        self.clients = [Client(i, self.ctx.client_archs[i], split) for i, split in enumerate(splits)]
        for client in self.clients:
            self.algo.init_client(client)
            self.store.put(client.id, client.state)
        self.algo.init_server()
        self.sampler = np.random.default_rng([seed, SAMPLING_STREAM])
        self.per_round = max(1, round(cfg.participation * cfg.num_clients))
        self.test_evals: dict[int, ClientEval] = {}
        self.val_evals: dict[int, ClientEval] = {}
        self.bytes_up: dict[int, int] = {c.id: 0 for c in self.clients}
        self.bytes_down: dict[int, int] = {c.id: 0 for c in self.clients}
        self.cumulative: dict[str, float] = {}
        self.rounds_done = 0

    def sample_clients(self) -> list[int]:
        return sorted(self.sampler.choice(self.cfg.num_clients, size=self.per_round, replace=False).tolist())

    def run_round(self, round_index: int) -> dict[str, float]:
        """One federated round; returns its metrics (evaluated ones only when this round is evaluated)."""
        start = time.perf_counter()
        flops_before = self.accountant.snapshot()
        self.ctx.round_metrics = {}
        self.ctx.round_losses = []
        sampled = self.sample_clients()
        uploads: dict[int, Payload] = {}
        train_losses = []
        up_total = down_total = 0
        if self.cfg.batched_training:  # all downloads, then the clients' updates together, then all uploads
            payloads: dict[int, Payload] = {}
            for cid in sampled:
                client = self.clients[cid]
                client.state = self.store.checkout(cid)
                payloads[cid], down = transmit(self.algo.server_payload(client, round_index), self.device)
                self.bytes_down[cid] += down
                down_total += down
            self.ctx.client_losses = {}
            updates = self.algo.client_update_many([self.clients[c] for c in sampled], payloads, round_index)
            for cid in sampled:
                uploads[cid], up = transmit(updates[cid], self.device)
                self.bytes_up[cid] += up
                up_total += up
                train_losses.append(self.ctx.client_losses.get(cid, torch.full((), float("nan"), device=self.device)))
        else:
            for cid in sampled:
                client = self.clients[cid]
                client.state = self.store.checkout(cid)
                payload, down = transmit(self.algo.server_payload(client, round_index), self.device)
                self.ctx.last_train_loss = torch.full((), float("nan"), device=self.device)
                upload = self.algo.client_update(client, payload, round_index)
                uploads[cid], up = transmit(upload, self.device)
                train_losses.append(self.ctx.last_train_loss.detach())  # the client's final phase; no host sync
                self.bytes_up[cid] += up
                self.bytes_down[cid] += down
                up_total += up
                down_total += down
        check_finite(self.ctx.round_losses, round_index)
        # FlopCounterMode slows a loop of small steps several-fold (FedGH's header training: 13 -> 100 ms per
        # round), so shape-determined server work is counted once per upload signature.
        server_key = None
        if self.algo.server_flops_by_upload_shapes:
            server_key = (self.algo.name, "aggregate", upload_signature(uploads))
        with self.accountant.count("server", server_key):
            self.algo.aggregate(uploads, round_index)
        # Optional post-aggregation download: to this round's clients, or to every client when the algorithm
        # broadcasts (LG-FedAvg's eval_header="global"); the others are checked out for it and back in after.
        recipients = range(self.cfg.num_clients) if self.algo.broadcast_after_aggregation else sampled
        for cid in recipients:
            client = self.clients[cid]
            if cid not in sampled:
                client.state = self.store.checkout(cid)
            late = self.algo.after_aggregation_payload(client, round_index)
            if late is not None:
                payload, down = transmit(late, self.device)
                self.algo.receive_after_aggregation(client, payload, round_index)
                self.bytes_down[cid] += down
                down_total += down
            if cid not in sampled and not self.algo.prediction_uses_server_state:
                self.store.checkin(cid)
        metrics: dict[str, float] = {
            "clients_sampled": len(sampled),
            "bytes_up": up_total, "bytes_down": down_total,
            "bytes_up_per_client": up_total / len(sampled), "bytes_down_per_client": down_total / len(sampled),
        }
        weights = torch.tensor([self.ctx.client_weights[c] for c in sampled])
        metrics["train_loss"] = float((torch.stack(train_losses).cpu() * weights).sum() / weights.sum())
        for name, values in self.ctx.round_metrics.items():
            w = torch.tensor([wt for _, wt in values])
            metrics[name] = float((torch.stack([v for v, _ in values]).cpu() * w).sum() / w.sum())
        is_last = round_index + 1 == self.cfg.rounds
        evaluated_all = self.algo.prediction_uses_server_state
        if (round_index + 1) % self.cfg.eval_every == 0 or is_last:
            changed = range(self.cfg.num_clients) if evaluated_all else sampled
            metrics.update(self.evaluate(changed))
        for cid in (range(self.cfg.num_clients) if evaluated_all else sampled):
            self.store.checkin(cid)
        flops_after = self.accountant.snapshot()
        for kind in flops_after:
            metrics[f"{kind}_flops"] = flops_after[kind] - flops_before[kind]
        metrics["round_time"] = time.perf_counter() - start
        self.rounds_done = round_index + 1
        return self.accumulate(metrics)

    def accumulate(self, metrics: dict[str, float]) -> dict[str, float]:
        for key in ("train_flops", "eval_flops", "server_flops", "bytes_up", "bytes_down", "round_time"):
            self.cumulative[key] = self.cumulative.get(key, 0) + metrics.get(key, 0)
            metrics[f"cum_{key}"] = self.cumulative[key]
        return metrics

    def evaluate(self, client_ids: Iterable[int]) -> dict[str, float]:
        """Evaluate the given clients on their validation and test sets, then summarise over ALL clients
        (clients whose state did not change keep their last evaluation)."""
        for cid in client_ids:
            client = self.clients[cid]
            client.state = self.store.checkout(cid)
            predict = lambda x, c=client: self.algo.predict(c, x)  # noqa: E731
            for split, table in (("test", self.test_evals), ("val", self.val_evals)):
                correct, count, loss = self.ctx.evaluate(client, predict, split)
                table[cid] = ClientEval(int(correct), count, float(loss))
        return summarise(self.test_evals, self.val_evals)

    def initial_metrics(self) -> dict[str, float]:
        """Step 0: every client evaluated before any training."""
        before = self.accountant.snapshot()["eval"]
        metrics = self.evaluate(range(self.cfg.num_clients))
        for cid in range(self.cfg.num_clients):
            self.store.checkin(cid)
        metrics.update(train_flops=0, server_flops=0, bytes_up=0, bytes_down=0, round_time=0.0,
                       eval_flops=self.accountant.snapshot()["eval"] - before)
        return self.accumulate(metrics)

    def client_table(self) -> list[dict[str, Any]]:
        """Per-client final results."""
        rows = []
        for c in self.clients:
            test, val = self.test_evals[c.id], self.val_evals[c.id]
            rows.append({
                "client": c.id, "arch": c.arch, "n_train": c.num_train, "n_val": len(c.split.val),
                "n_test": test.count, "test_acc": test.accuracy, "val_acc": val.accuracy,
                "test_loss": test.loss / max(test.count, 1), "bytes_up": self.bytes_up[c.id],
                "bytes_down": self.bytes_down[c.id], "train_flops": self.accountant.by_client[c.id],
                "state_bytes": self.store.state_bytes(c.id),
            })
        return rows


    # ---- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything the rest of the run depends on, as (tensors, JSON): rounds done, every client's
        personal state, the algorithm's server state, all RNG states (client sampler, augmentation
        generator, torch/numpy/python globals), FLOP totals and cache, evaluation caches, bytes, cumulative
        sums. Call between rounds (every client state checked in)."""
        packer = Packer()
        evals = {name: {cid: [e.correct, e.count, e.loss] for cid, e in table.items()}
                 for name, table in (("test", self.test_evals), ("val", self.val_evals))}
        meta = {
            "rounds_done": self.rounds_done,
            "clients": [packer.pack(c.state, f"client/{c.id}") for c in self.clients],
            "server": packer.pack(self.algo.state_dict(), "server"),
            "rng": {"sampler": packer.pack(self.sampler, "rng/sampler"),
                    "augment": packer.pack(self.ctx.generator, "rng/augment"), **rng_state(packer)},
            "accountant": packer.pack({"totals": dict(self.accountant.totals),
                                       "by_client": dict(self.accountant.by_client),
                                       "cache": self.accountant.cache_state()}, "accountant"),
            "evals": packer.pack(evals, "evals"),
            "bytes": packer.pack({"up": self.bytes_up, "down": self.bytes_down}, "bytes"),
            "cumulative": self.cumulative,
        }
        return packer.tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore `state_dict()` into this freshly built Simulation (same config, algorithm and seed)."""
        if len(meta["clients"]) != len(self.clients):
            raise ValueError(f"checkpoint holds {len(meta['clients'])} clients, this run has {len(self.clients)}")
        for client, spec in zip(self.clients, meta["clients"]):
            restored = unpack(spec, tensors, client.state, self.device, f"client/{client.id}")
            client.state.clear()
            client.state.update(restored)
            self.store.put(client.id, client.state)
        self.algo.load_state_dict(unpack(meta["server"], tensors, self.algo.state_dict(), self.device, "server"))
        rng = meta["rng"]
        self.sampler = unpack(rng["sampler"], tensors, self.sampler)
        unpack(rng["augment"], tensors, self.ctx.generator)
        set_rng_state(rng, tensors)
        acc = unpack(meta["accountant"], tensors)
        self.accountant.totals.clear()
        self.accountant.totals.update(acc["totals"])
        self.accountant.by_client.clear()
        self.accountant.by_client.update(acc["by_client"])
        self.accountant.load_cache(acc["cache"])
        evals = unpack(meta["evals"], tensors)
        self.test_evals = {cid: ClientEval(*v) for cid, v in evals["test"].items()}
        self.val_evals = {cid: ClientEval(*v) for cid, v in evals["val"].items()}
        sent = unpack(meta["bytes"], tensors)
        self.bytes_up, self.bytes_down = sent["up"], sent["down"]
        self.cumulative = dict(meta["cumulative"])
        self.rounds_done = meta["rounds_done"]


def check_finite(losses: list[tuple[int, str, torch.Tensor]], round_index: int) -> None:
    """Fail the round in which a training loss first turns NaN or infinite, naming the client and phase
    (one host sync per round)."""
    if not losses:
        return
    finite = torch.isfinite(torch.stack([loss.detach().float().reshape(()) for _, _, loss in losses]).cpu())
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0])
        cid, phase, loss = losses[i]
        raise FloatingPointError(f"non-finite training loss ({float(loss)}) in round {round_index + 1}, "
                                 f"client {cid}, phase {phase!r}")


def summarise(test: dict[int, ClientEval], val: dict[int, ClientEval]) -> dict[str, float]:
    """Sample-weighted mean accuracy over clients (SPEC), the std across clients, validation accuracy, loss."""
    accs = np.array([e.accuracy for e in test.values()])
    count = sum(e.count for e in test.values())
    return {
        "acc_mean": sum(e.correct for e in test.values()) / max(count, 1),
        "acc_std": float(accs.std()) if len(accs) else math.nan,
        "val_acc_mean": sum(e.correct for e in val.values()) / max(sum(e.count for e in val.values()), 1),
        "test_loss": sum(e.loss for e in test.values()) / max(count, 1),
    }
