"""The one round loop shared by every algorithm.

Per round: sample clients -> server payload down -> local update (the Phases client_update yields, run by
bench/training.py) -> payload up -> aggregate -> optional second download -> evaluate -> metrics. Bytes are
measured here on the payloads; FLOPs are counted around the training steps, evaluation and aggregation.
Observers (bench/observe.py) see each of these events."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from algorithms.base import Algorithm, Payload
from bench.accounting import FlopAccountant, transmit, upload_signature
from bench.checkpoint import Packer, rng_state, set_rng_state, unpack
from bench.config import RunConfig
from bench.context import SAMPLING_STREAM, Client, RunContext, eval_mode, modules_in  # noqa: F401 (re-exported)
from bench.errors import UserError
from bench.observe import Observer, Observers
from bench.parallel import ClientPool, client_workers
from bench.state import ClientStore
from bench.training import run_updates
from data.device_data import DeviceData
from data.partition import ClientSplit
from models.groups import MODEL_GROUPS, is_homogeneous


@dataclass
class ClientEval:
    correct: int
    count: int
    loss: float

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.count, 1)


class Simulation:
    """One (algorithm, seed) run: `run_round` per round, `initial_metrics` before the first."""

    def __init__(self, cfg: RunConfig, algo_cls: type[Algorithm], seed: int, data: DeviceData,
                 splits: list[ClientSplit], device: torch.device, hparams: Any = None,
                 observers: Sequence[Observer] = (), accountant: FlopAccountant | None = None):
        """`hparams`: the algorithm's typed hyper-parameters as the run plan built them (None: built here from
        cfg, for direct use in tests and benchmarks). `observers` watch the run (bench/observe.py);
        `accountant`: a FlopAccountant (or subclass) to use instead of a new one."""
        self.cfg = cfg
        self.seed = seed
        self.device = device
        self.accountant = accountant if accountant is not None else FlopAccountant(cache=cfg.flop_cache)
        self.observers = Observers(observers)
        if algo_cls.homogeneous_only and not is_homogeneous(cfg.model_group):
            raise UserError(f"{algo_cls.name} needs a model-homogeneous group, got {cfg.model_group!r}; "
                            f"valid: {', '.join(g for g in MODEL_GROUPS if is_homogeneous(g))}")
        torch.manual_seed(seed)  # model initialisation
        self.ctx = RunContext(cfg, data, device, seed, algo_cls.name, self.accountant, splits, self.observers)
        self.algo = algo_cls(self.ctx, algo_cls.hparams_for(cfg) if hparams is None else hparams)
        self.ctx.prediction_modules = lambda client: modules_in(client.state, self.algo)
        self.store = ClientStore(device, offload=cfg.offload_state)
        self.clients = [Client(i, self.ctx.client_archs[i], split) for i, split in enumerate(splits)]
        for client in self.clients:
            self.algo.init_client(client)
            self.store.put(client.id, client.state)
        self.algo.init_server()
        self.sampler = np.random.default_rng([seed, SAMPLING_STREAM])
        self.test_evals: dict[int, ClientEval] = {}
        self.val_evals: dict[int, ClientEval] = {}
        self.bytes_up: dict[int, int] = {c.id: 0 for c in self.clients}
        self.bytes_down: dict[int, int] = {c.id: 0 for c in self.clients}
        self.round_bytes = {"up": 0, "down": 0}
        self.cumulative: dict[str, float] = {}
        self.rounds_done = 0
        self.pool = ClientPool(client_workers(cfg, device, self.algo,
                                              [m for c in self.clients for m in modules_in(c.state, self.algo)]))

    def sample_clients(self) -> list[int]:
        size = self.cfg.clients_per_round
        return sorted(self.sampler.choice(self.cfg.num_clients, size=size, replace=False).tolist())

    def run_round(self, round_index: int) -> dict[str, float]:
        """One federated round; returns its metrics (evaluated ones only when this round is evaluated)."""
        start = time.perf_counter()
        flops_before = self.accountant.snapshot()
        self.ctx.round_metrics = {}
        self.round_bytes = {"up": 0, "down": 0}
        sampled = self.sample_clients()
        with self.observers.span("round", round=round_index, clients=sampled), self.pool.threads():
            uploads, losses = self.local_updates(sampled, round_index)
            self.aggregate(uploads, round_index)
            self.after_aggregation(sampled, round_index)
            metrics = self.round_summary(sampled, losses)
            evaluated_all = self.algo.prediction_uses_server_state
            if (round_index + 1) % self.cfg.eval_every == 0 or round_index + 1 == self.cfg.rounds:
                metrics.update(self.evaluate(range(self.cfg.num_clients) if evaluated_all else sampled))
            for cid in (range(self.cfg.num_clients) if evaluated_all else sampled):
                self.store.checkin(cid)
        flops_after = self.accountant.snapshot()
        for kind in flops_after:
            metrics[f"{kind}_flops"] = flops_after[kind] - flops_before[kind]
        metrics["round_time"] = time.perf_counter() - start
        self.rounds_done = round_index + 1
        return self.accumulate(metrics)

    def local_updates(self, sampled: list[int], round_index: int) -> tuple[dict[int, Payload], dict[int, torch.Tensor]]:
        """Download, local update and upload for each sampled client: one client after the other, or with
        cfg.batched_training all downloads, then every client's phases in lockstep, then all uploads (unless
        the algorithm's client updates share state). Returns (uploads, each client's final-phase loss)."""
        together = self.cfg.batched_training and self.algo.batchable_clients
        if not together and self.pool.workers > 1 and len(sampled) > 1:
            return self.parallel_updates(sampled, round_index)
        cohorts = [sampled] if together else [[cid] for cid in sampled]
        uploads: dict[int, Payload] = {}
        losses: dict[int, torch.Tensor] = {}
        for cohort in cohorts:
            payloads = {}
            for cid in cohort:
                self.clients[cid].state = self.store.checkout(cid)
                payloads[cid] = self.download(cid, round_index)
            updates = run_updates(self.ctx, self.algo, [self.clients[cid] for cid in cohort], payloads, round_index)
            check_finite(updates.losses, round_index)
            for cid in cohort:
                uploads[cid] = self.upload(cid, updates.uploads[cid], round_index)
            losses.update(updates.final_loss)
        return uploads, losses

    def parallel_updates(self, sampled: list[int], round_index: int
                         ) -> tuple[dict[int, Payload], dict[int, torch.Tensor]]:
        """local_updates with the clients' updates in the pool's threads: downloads first and uploads after, in
        client order on this thread, so bytes, uploads and recorded metrics come in the sequential order."""
        payloads = {}
        for cid in sampled:
            self.clients[cid].state = self.store.checkout(cid)
            payloads[cid] = self.download(cid, round_index)

        def update(cid: int):
            with self.ctx.own_records() as records:
                return run_updates(self.ctx, self.algo, [self.clients[cid]], payloads, round_index), records

        uploads: dict[int, Payload] = {}
        losses: dict[int, torch.Tensor] = {}
        for cid, (updates, records) in zip(sampled, self.pool.map(update, sampled)):
            check_finite(updates.losses, round_index)
            uploads[cid] = self.upload(cid, updates.uploads[cid], round_index)
            losses.update(updates.final_loss)
            for name, values in records.items():
                self.ctx.round_metrics.setdefault(name, []).extend(values)
        return uploads, losses

    def download(self, cid: int, round_index: int, late: bool = False) -> Payload | None:
        """The server's payload for client `cid` (server_payload; after_aggregation_payload when `late`),
        transmitted: a copy on the run's device, its bytes counted. None when a late payload is None."""
        with self.observers.span("download", client=cid, round=round_index, late=late) as info:
            make = self.algo.after_aggregation_payload if late else self.algo.server_payload
            payload = make(self.clients[cid], round_index)
            if payload is None:
                return None
            received, size = transmit(payload, self.device)
            info.update(payload=received, bytes=size)
        self.bytes_down[cid] += size
        self.round_bytes["down"] += size
        return received

    def upload(self, cid: int, payload: Payload, round_index: int) -> Payload:
        """Client `cid`'s upload as the server receives it (a copy; its bytes counted)."""
        with self.observers.span("upload", client=cid, round=round_index) as info:
            received, size = transmit(payload, self.device)
            info.update(payload=received, bytes=size)
        self.bytes_up[cid] += size
        self.round_bytes["up"] += size
        return received

    def aggregate(self, uploads: dict[int, Payload], round_index: int) -> None:
        # FlopCounterMode slows a loop of small steps several-fold (FedGH's header training: 13 -> 100 ms per
        # round), so shape-determined server work is counted once per upload signature.
        server_key = None
        if self.algo.server_flops_by_upload_shapes:
            server_key = (self.algo.name, "aggregate", upload_signature(uploads))
        with self.observers.span("aggregate", round=round_index, uploads=uploads), \
                self.accountant.count("server", server_key):
            self.algo.aggregate(uploads, round_index)

    def after_aggregation(self, sampled: list[int], round_index: int) -> None:
        """The optional post-aggregation download: to this round's clients, or to every client when the
        algorithm broadcasts (LG-FedAvg's eval_header="global"); the others are checked out for it and back in
        after, unless their prediction reads server state (then they are evaluated and checked in later)."""
        recipients = range(self.cfg.num_clients) if self.algo.broadcast_after_aggregation else sampled
        for cid in recipients:
            client = self.clients[cid]
            if cid not in sampled:
                client.state = self.store.checkout(cid)
            payload = self.download(cid, round_index, late=True)
            if payload is not None:
                with self.observers.span("update", client=cid, round=round_index):
                    self.algo.receive_after_aggregation(client, payload, round_index)
            if cid not in sampled and not self.algo.prediction_uses_server_state:
                self.store.checkin(cid)

    def round_summary(self, sampled: list[int], losses: dict[int, torch.Tensor]) -> dict[str, float]:
        """The round's traffic, its n_k-weighted training loss (each client's final phase; NaN for a client
        without one) and the metrics the algorithm recorded (weighted means); one host sync."""
        up, down = self.round_bytes["up"], self.round_bytes["down"]
        metrics: dict[str, float] = {
            "clients_sampled": len(sampled), "bytes_up": up, "bytes_down": down,
            "bytes_up_per_client": up / len(sampled), "bytes_down_per_client": down / len(sampled),
        }
        nan = torch.full((), float("nan"), device=self.device)
        weights = torch.tensor([self.ctx.client_weights[c] for c in sampled])
        train = torch.stack([losses.get(c, nan).detach() for c in sampled]).cpu()
        metrics["train_loss"] = float((train * weights).sum() / weights.sum())
        for name, values in self.ctx.round_metrics.items():
            w = torch.tensor([wt for _, wt in values])
            metrics[name] = float((torch.stack([v for v, _ in values]).cpu() * w).sum() / w.sum())
        return metrics

    def accumulate(self, metrics: dict[str, float]) -> dict[str, float]:
        for key in ("train_flops", "eval_flops", "server_flops", "bytes_up", "bytes_down", "round_time"):
            self.cumulative[key] = self.cumulative.get(key, 0) + metrics.get(key, 0)
            metrics[f"cum_{key}"] = self.cumulative[key]
        return metrics

    def evaluate(self, client_ids: Iterable[int]) -> dict[str, float]:
        """Evaluate the given clients on their validation and test sets, then summarise over ALL clients
        (clients whose state did not change keep their last evaluation)."""
        client_ids = list(client_ids)
        clients = [self.clients[cid] for cid in client_ids]
        for client in clients:
            client.state = self.store.checkout(client.id)

        def evaluate(client: Client) -> list[ClientEval]:
            predict = lambda x: self.algo.predict(client, x)  # noqa: E731
            return [ClientEval(int(correct), count, float(loss)) for correct, count, loss in
                    (self.ctx.evaluate(client, predict, split) for split in ("test", "val"))]

        # Shared (server) modules go to eval mode here, once: per-client toggling would race between threads.
        with self.observers.span("evaluation", clients=client_ids), self.pool.threads(), \
                eval_mode([m for c in clients for m in self.ctx.prediction_modules(c)]):
            for client, (test, val) in zip(clients, self.pool.map(evaluate, clients)):
                self.test_evals[client.id], self.val_evals[client.id] = test, val
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
                    "augment": packer.pack(self.ctx.run_generator, "rng/augment"), **rng_state(packer)},
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
        unpack(rng["augment"], tensors, self.ctx.run_generator)
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
