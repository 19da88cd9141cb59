"""The two loops the harness is measured against, both driving the SAME algorithm plugins (same models,
losses, data sizes, batch size, epochs and optimizer steps) so that only the machinery differs:

- the peer-style loop (ReferenceRun), written the way common MHPFL libraries (PFLlib, HtFLlib) do it: every
  round each sampled client, one after the other, gets a deepcopy of its model(s), loads its weights from
  disk, reads its data file again, trains from a freshly built DataLoader (a per-sample torchvision transform
  pipeline on host images, batches moved to the device), logs its loss with .item() every batch, saves its
  weights back to disk and hands its upload (weights, logits or prototypes) to the server through a file; the
  server payload is deepcopied to the client; evaluation re-reads the data file and goes through DataLoaders
  with per-batch .item(); plain torch.optim.SGD (one kernel per parameter), default memory format;
- the compute floor: a plain eager PyTorch loop over in-memory, already normalised tensors, one client after
  the other on torch's default threads, default memory format and plain SGD: for every training call the same
  optimizer steps (zero_grad, forward, backward, clip_grad_norm_, SGD step) on batches that
  are views of a pre-built tensor, and the same evaluation forwards; no augmentation, no FLOP accounting,
  no payload copies on the way down, no client store, no metrics.

Both are built from a bench.simulator.Simulation (so they start from the same initial models, partitions
and client sampling as the harness run they are compared to) whose RunContext is switched to a loop-specific
subclass.
"""
from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bench.accounting import FLOP_KINDS
from algorithms.base import Phase
from bench.simulator import ClientEval, RunContext, Simulation


class NullAccountant:
    """Counts nothing (the reference and the floor do no FLOP accounting)."""

    cache_enabled = False

    @contextmanager
    def count(self, kind: str, key: tuple | None = None, client_id: int | None = None) -> Iterator[None]:
        yield

    def snapshot(self) -> dict[str, int]:
        return dict.fromkeys(FLOP_KINDS, 0)


def drive(update, run_phase: Callable[[Phase], torch.Tensor]) -> tuple[dict, torch.Tensor | None]:
    """Run one client's update as a plain loop does: each Phase client_update yields through run_phase, one
    after the other. Returns (upload, the last phase's loss)."""
    if not hasattr(update, "send"):  # no training
        return update, None
    loss = None
    try:
        while True:
            loss = run_phase(update.send(loss))
    except StopIteration as done:
        return done.value or {}, loss


def _adopt(sim: Simulation, cls: type, **attrs: Any) -> Any:
    """Switch the simulation's context (shared with its algorithm) to a loop-specific subclass."""
    ctx = sim.ctx
    ctx.__class__ = cls
    for name, value in attrs.items():
        setattr(ctx, name, value)
    ctx.accountant = NullAccountant()
    sim.accountant = ctx.accountant
    return ctx


# ---- the reference loop -------------------------------------------------------------------------------
class ClientImages(Dataset):
    """A client's images as a library holds them: host uint8 HWC arrays, transformed one sample at a time."""

    def __init__(self, x: np.ndarray, y: np.ndarray, indices: np.ndarray, transform: Callable):
        self.x, self.y, self.indices, self.transform = x, y, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        j = self.indices[i]
        return self.transform(self.x[j]), int(self.y[j])


def _transforms(mean: Sequence[float], std: Sequence[float], augment: bool, padding: int = 4):
    import torchvision.transforms as T

    steps = [T.ToTensor()]
    if augment:
        steps += [T.RandomCrop(32, padding=padding), T.RandomHorizontalFlip()]
    steps.append(T.Normalize(mean, std))
    return T.Compose(steps)


class ReferenceData:
    """The data object the reference's plugins see: DeviceData's attributes (labels, shapes), but batches
    through DataLoaders over host arrays (eval_batches, used by FedGH's and FedAPEN's extra passes)."""

    def __init__(self, device_data, dataset, eval_transform):
        self._device_data = device_data
        self._dataset = dataset
        self._eval_transform = eval_transform

    def __getattr__(self, name: str):
        return getattr(self._device_data, name)

    def eval_batches(self, split: str, idx: torch.Tensor, batch_size: int):
        x, y = (self._dataset.x_test, self._dataset.y_test) if split == "test" else \
            (self._dataset.x_train, self._dataset.y_train)
        loader = DataLoader(ClientImages(x, y, idx.cpu().numpy(), self._eval_transform), batch_size=batch_size)
        device = self._device_data.device
        for xb, yb in loader:
            yield xb.to(device), yb.to(device)


class PlainOptimizer:
    """torch.optim.SGD with its defaults (one kernel per parameter on CPU), whatever the harness uses."""

    def optimizer(self, params, lr=None):
        return torch.optim.SGD(params, lr=self.cfg.lr if lr is None else lr, momentum=self.cfg.momentum,
                               weight_decay=self.cfg.weight_decay)


class ReferenceContext(PlainOptimizer, RunContext):

    def new_round(self) -> None:
        self.loaders: dict[tuple, DataLoader] = {}

    def loader(self, client, indices: torch.Tensor | None) -> DataLoader:
        """One DataLoader per client per round (and per index set, e.g. FedAPEN's 95% training part)."""
        idx = client.split.train if indices is None else indices
        key = (client.id, idx.data_ptr(), idx.numel())
        if key not in self.loaders:
            ds = self.ref_dataset
            self.loaders[key] = DataLoader(
                ClientImages(ds.x_train, ds.y_train, idx.cpu().numpy(), self.train_transform),
                batch_size=self.cfg.batch_size, shuffle=True, num_workers=0)
        return self.loaders[key]

    def train(self, client, phase: Phase):
        params, optimizers = phase.optimizers or self.optimizers_for(phase.trainable)
        loss_fn = phase.loss_fn()
        loader = self.loader(client, phase.indices)
        total, seen = 0.0, 0
        for _ in range(phase.epochs):
            for x, y in loader:
                x, y = x.to(self.device), y.to(self.device)
                loss = loss_fn(x, y)
                for opt in optimizers:
                    opt.zero_grad()
                loss.backward()
                for group, opt in zip(params, optimizers):
                    if self.cfg.grad_clip > 0:
                        nn.utils.clip_grad_norm_(group, self.cfg.grad_clip)
                    opt.step()
                total += loss.item() * len(y)  # the usual per-batch loss logging
                seen += len(y)
        return torch.tensor(total / max(seen, 1))

    @torch.no_grad()
    def evaluate(self, client, predict, split="test", tag="eval"):
        idx = getattr(client.split, split)
        correct, loss = 0, 0.0
        for x, y in self.data.eval_batches(split, idx, self.cfg.eval_batch_size):
            logits = predict(x)
            correct += (logits.argmax(1) == y).sum().item()
            loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        return correct, len(idx), loss


def _state_dicts(state: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.state_dict() if isinstance(v, nn.Module) else v) for k, v in state.items()}


def _load_state(state: dict[str, Any], saved: dict[str, Any]) -> None:
    for k, v in saved.items():
        if isinstance(state.get(k), nn.Module):
            state[k].load_state_dict(v)
        else:
            state[k] = v


class ReferenceRun:
    """The library-style loop around a Simulation's plugin (see the module docstring)."""

    def __init__(self, sim: Simulation, dataset, workdir: Path):
        self.sim = sim
        mean, std = dataset.mean, dataset.std
        eval_tf = _transforms(mean, std, augment=False)
        self.ctx = _adopt(sim, ReferenceContext, ref_dataset=dataset,
                          train_transform=_transforms(mean, std, augment=sim.cfg.augment),
                          data=ReferenceData(sim.ctx.data, dataset, eval_tf))
        self.ctx.new_round()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.models = {c.id: c.state for c in sim.clients}  # what a library keeps per client
        for c in sim.clients:
            torch.save(_state_dicts(c.state), self.path(c.id))
            # each client's images in a file of its own, read again whenever the client trains or is evaluated
            np.savez(self.data_path(c.id), **{f"{name}_{part}": array[getattr(c.split, name).cpu().numpy()]
                                              for name in ("train", "val", "test")
                                              for part, array in (("x", _array(dataset, name, "x")),
                                                                  ("y", _array(dataset, name, "y")))})
        self.test_evals: dict[int, ClientEval] = {}
        self.val_evals: dict[int, ClientEval] = {}

    def path(self, cid: int) -> Path:
        return self.workdir / f"client{cid}.pt"

    def data_path(self, cid: int) -> Path:
        return self.workdir / f"client{cid}-data.npz"

    def reread(self, cid: int) -> None:
        """A peer library reads a client's data files at every training and evaluation (PFLlib's
        read_client_data); the arrays read are as large as the client's share (the batches still come from
        the in-memory copy, so that every loop trains on the same samples)."""
        with np.load(self.data_path(cid)) as files:
            for name in files.files:
                files[name]

    def run_round(self, round_index: int) -> None:
        sim, algo, ctx = self.sim, self.sim.algo, self.ctx
        ctx.new_round()
        ctx.round_metrics = {}
        sampled = sim.sample_clients()
        uploads = {}
        losses = []
        for cid in sampled:
            client = sim.clients[cid]
            local = copy.deepcopy(self.models[cid])                          # a deepcopy per client
            _load_state(local, torch.load(self.path(cid), weights_only=True))  # loaded from disk
            client.state = local
            self.reread(cid)
            payload = copy.deepcopy(algo.server_payload(client, round_index))
            upload, loss = drive(algo.client_update(client, payload, round_index),
                                 lambda phase, c=client: ctx.train(c, phase))
            sent = self.workdir / f"upload{cid}.pt"  # uploads (models, logits, prototypes) through the disk
            torch.save(upload, sent)
            uploads[cid] = torch.load(sent, weights_only=True)
            torch.save(_state_dicts(local), self.path(cid))                   # saved to disk
            self.models[cid] = local
            losses.append(float(loss) if loss is not None else float("nan"))
        algo.aggregate(uploads, round_index)
        for cid in sampled:
            late = algo.after_aggregation_payload(sim.clients[cid], round_index)
            if late is not None:
                algo.receive_after_aggregation(sim.clients[cid], copy.deepcopy(late), round_index)
        if (round_index + 1) % sim.cfg.eval_every == 0 or round_index + 1 == sim.cfg.rounds:
            changed = range(sim.cfg.num_clients) if algo.prediction_uses_server_state else sampled
            for cid in changed:
                client = sim.clients[cid]
                client.state = self.models[cid]
                self.reread(cid)
                for split, table in (("test", self.test_evals), ("val", self.val_evals)):
                    correct, count, loss = ctx.evaluate(client, lambda x, c=client: algo.predict(c, x), split)
                    table[cid] = ClientEval(correct, count, loss)

    def close(self) -> None:
        for c in self.sim.clients:
            for path in (self.path(c.id), self.data_path(c.id), self.workdir / f"upload{c.id}.pt"):
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass


def _array(dataset, split: str, part: str) -> np.ndarray:
    """The dataset's image ("x") or label ("y") array that a split's indices point into."""
    return getattr(dataset, f"{part}_test" if split == "test" else f"{part}_train")


# ---- the compute floor --------------------------------------------------------------------------------
class FloorData:
    """Pre-normalised tensors on the device: a batch is a view, nothing is computed per batch. Index sets
    that were not primed (e.g. FedAPEN's held-out share) read a same-sized slice of a pre-built pool."""

    def __init__(self, device_data, splits):
        self._device_data = device_data
        self.cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        biggest = 1
        for s in splits:
            for name, idx in (("train", s.train), ("val", s.val), ("test", s.test)):
                xs, ys = (device_data.x_test, device_data.y_test) if name == "test" else \
                    (device_data.x_train, device_data.y_train)
                self.cache[(idx.data_ptr(), idx.numel())] = (device_data.normalise(xs[idx]), ys[idx])
                biggest = max(biggest, idx.numel())
        n = min(biggest, len(device_data.y_train))
        self.pool = (device_data.normalise(device_data.x_train[:n]), device_data.y_train[:n])

    def __getattr__(self, name: str):
        return getattr(self._device_data, name)

    def tensors(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hit = self.cache.get((idx.data_ptr(), idx.numel()))
        if hit is not None:
            return hit
        n = idx.numel()
        return self.pool[0][:n], self.pool[1][:n]

    def batches(self, idx: torch.Tensor, batch_size: int):
        x, y = self.tensors(idx)
        return [(x[s:s + batch_size], y[s:s + batch_size]) for s in range(0, len(y), batch_size)]

    def train_batches(self, idx, batch_size, generator=None):
        return iter(self.batches(idx, batch_size))

    def eval_batches(self, split, idx, batch_size):
        return iter(self.batches(idx, batch_size))


class FloorContext(PlainOptimizer, RunContext):
    def train(self, client, phase: Phase):
        params, optimizers = phase.optimizers or self.optimizers_for(phase.trainable)
        loss_fn = phase.loss_fn()
        batches = self.data.batches(client.split.train if phase.indices is None else phase.indices,
                                    self.cfg.batch_size)
        loss = None
        for _ in range(phase.epochs):
            for x, y in batches:
                loss = self.step(loss_fn, x, y, params, optimizers)
                self.samples += len(y)
        return loss.detach() if loss is not None else torch.zeros(())

    @torch.no_grad()
    def evaluate(self, client, predict, split="test", tag="eval"):
        idx = getattr(client.split, split)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        loss = torch.zeros((), device=self.device)
        for x, y in self.data.batches(idx, self.cfg.eval_batch_size):
            logits = predict(x)
            correct += (logits.argmax(1) == y).sum()
            loss += nn.functional.cross_entropy(logits, y, reduction="sum")
        return correct, len(idx), loss


class FloorRun:
    def __init__(self, sim: Simulation):
        self.sim = sim
        self.ctx = _adopt(sim, FloorContext, data=FloorData(sim.ctx.data, [c.split for c in sim.clients]),
                          samples=0)
        self.samples_per_round: list[int] = []

    def run_round(self, round_index: int) -> None:
        sim, algo, ctx = self.sim, self.sim.algo, self.ctx
        ctx.round_metrics = {}
        ctx.samples = 0
        sampled = sim.sample_clients()
        uploads = {}
        for cid in sampled:
            client = sim.clients[cid]
            upload, _ = drive(algo.client_update(client, algo.server_payload(client, round_index), round_index),
                              lambda phase, c=client: ctx.train(c, phase))
            # Uploads may alias the algorithm's working modules (FML's meme), so keep a copy.
            uploads[cid] = {k: v.detach().clone() for k, v in upload.items()}
        algo.aggregate(uploads, round_index)
        for cid in sampled:
            late = algo.after_aggregation_payload(sim.clients[cid], round_index)
            if late is not None:
                algo.receive_after_aggregation(sim.clients[cid], late, round_index)
        if (round_index + 1) % sim.cfg.eval_every == 0 or round_index + 1 == sim.cfg.rounds:
            changed = range(sim.cfg.num_clients) if algo.prediction_uses_server_state else sampled
            for cid in changed:
                client = sim.clients[cid]
                for split in ("test", "val"):
                    ctx.evaluate(client, lambda x, c=client: algo.predict(c, x), split)
        self.samples_per_round.append(ctx.samples)
