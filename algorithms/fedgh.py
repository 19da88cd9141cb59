"""FedGH (Yi et al. 2023, ACM MM): a global header H (representation -> classes) trained on the server.

Client: load H into its model's header, train the whole model with CE, then pass its training data through
the trained extractor and upload the per-class mean representation of every class it holds. Server: train
H with CE on the received (representation, label) pairs with its own persistent SGD optimizer, then
broadcast H. (The authors' script steps the client's optimizer in that loop, so its header never trains;
here the server's own optimizer is stepped.)

Design decisions (each a Hyperparams field where it is a choice):
- Round index 0: SPEC's "from round 1 on" counts rounds from 1, so by default the server's initial H is
  sent and loaded from the very first round (`load_initial_header=True`); False follows the authors'
  script, which keeps the client's own random header in its first round (nothing is downloaded then).
  A client sampled later always gets the current H.
- Representations: eval mode, no augmentation, the client's whole train split in eval batches, right after
  local training; exact per-class means (index_add_). This forward pass counts as the client's
  training FLOPs. Upload: "reps" float32 (|classes_k| x rep_dim) and "classes" in the smallest unsigned
  integer type that holds the class ids (uint8 up to 256 classes: 1 byte each).
- Server training: `server_epochs` passes per round over the pairs, in a seeded random order, in
  mini-batches of `server_batch_size` pairs (default 1: one SGD step per pair, as the authors' loop;
  0 = all pairs in one batch); SGD lr 0.01, momentum 0.9 (`server_lr`, `server_momentum`,
  `server_weight_decay` 0), gradient clipping at the run's grad_clip, optimizer state kept across rounds.
Inference: the client's model (its extractor and its locally trained copy of H).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.base import Algorithm, Payload, load_payload, state_payload
from bench.errors import UserError
from bench.registry import register

SERVER_STREAM = 3  # seed offset of the server's shuffling generator


@dataclass
class FedGHHyperparams:
    server_lr: float = 0.01
    server_momentum: float = 0.9
    server_weight_decay: float = 0.0
    server_epochs: int = 1           # passes over the received pairs per round
    server_batch_size: int = 1       # pairs per server step; 0 = all pairs in one batch
    load_initial_header: bool = True # also send and load the server's initial H in round index 0

    def validate(self) -> None:
        if self.server_lr <= 0 or self.server_momentum < 0 or self.server_weight_decay < 0:
            raise UserError("fedgh.server_lr must be > 0 and fedgh.server_momentum/server_weight_decay >= 0")
        if self.server_epochs < 1 or self.server_batch_size < 0:
            raise UserError(f"fedgh.server_epochs must be >= 1 and fedgh.server_batch_size >= 0 (0 = all), "
                            f"got {self.server_epochs}, {self.server_batch_size}")


def class_id_dtype(num_classes: int) -> torch.dtype:
    """The smallest integer type that holds class ids 0..num_classes-1."""
    if num_classes <= 256:
        return torch.uint8
    if num_classes <= 32768:
        return torch.int16
    return torch.int32


@register
class FedGH(Algorithm):
    name = "fedgh"
    server_flops_by_upload_shapes = True
    description = "global header trained on the server from the clients' per-class mean representations"
    Hyperparams = FedGHHyperparams

    @classmethod
    def estimated_cost(cls, hp, cfg) -> float:
        return 1.0 + 0.22 / cfg.local_epochs  # local training plus one forward pass over the train data

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        dims = {ctx.representation_dim(arch) for arch in set(ctx.client_archs)}
        if len(dims) > 1:
            raise UserError(f"fedgh needs one representation size across clients, got {sorted(dims)}")
        self.rep_dim = dims.pop()
        self.generator = torch.Generator(device=ctx.device)
        self.generator.manual_seed(ctx.seed * 1000 + SERVER_STREAM)

    def init_server(self) -> None:
        self.header = nn.Linear(self.rep_dim, self.ctx.num_classes).to(self.ctx.device)
        self.optimizer = torch.optim.SGD(self.header.parameters(), lr=self.hp.server_lr,
                                         momentum=self.hp.server_momentum, weight_decay=self.hp.server_weight_decay)

    def init_client(self, client) -> None:
        client.state["model"] = self.ctx.build_model(client.arch)

    def server_payload(self, client, round_index: int) -> Payload:
        if round_index == 0 and not self.hp.load_initial_header:
            return {}
        return state_payload(self.header)

    def client_update(self, client, payload: Payload, round_index: int) -> Payload:
        model = client.state["model"]
        if payload:
            load_payload(model.header, payload)
        model.train()
        self.ctx.train(client, [model], lambda x, y: F.cross_entropy(model(x), y), self.ctx.cfg.local_epochs,
                       phase="local")
        classes, reps = self.representations(client)
        return {"reps": reps, "classes": classes.to(class_id_dtype(self.ctx.num_classes))}

    @torch.no_grad()
    def representations(self, client) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class mean extractor outputs over the client's train split (client training FLOPs)."""
        extractor = client.state["model"].eval().extractor
        sums = torch.zeros(self.ctx.num_classes, self.rep_dim, device=self.ctx.device)
        counts = torch.zeros(self.ctx.num_classes, dtype=torch.long, device=self.ctx.device)
        for x, y in self.ctx.data.eval_batches("train", client.split.train, self.ctx.cfg.eval_batch_size):
            with self.ctx.accountant.count("train", (self.name, "representations", client.arch, len(y)), client.id):
                h = extractor(x)
            sums.index_add_(0, y, h.float())
            counts.index_add_(0, y, torch.ones_like(y, dtype=counts.dtype))  # bincount syncs per batch on CUDA
        present = torch.nonzero(counts > 0).flatten()
        return present, sums[present] / counts[present].unsqueeze(1)

    def server_loss(self, uploads: dict[int, Payload]) -> torch.Tensor:
        """Mean CE of the current header on all uploaded pairs (diagnostics and tests)."""
        reps, labels = self.pairs(uploads)
        with torch.no_grad():
            return F.cross_entropy(self.header(reps), labels)

    @staticmethod
    def pairs(uploads: dict[int, Payload]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = sorted(uploads)
        reps = torch.cat([uploads[i]["reps"].float() for i in ids])
        labels = torch.cat([uploads[i]["classes"].long() for i in ids])
        return reps, labels

    def client_update_many(self, clients, payloads, round_index: int) -> dict[int, Payload]:
        models = [c.state["model"] for c in clients]
        for c, model in zip(clients, models):
            if payloads[c.id]:
                load_payload(model.header, payloads[c.id])
            model.train()
        self.ctx.train_many(clients, models, self.ctx.cfg.local_epochs, phase="local")
        out = {}
        for c in clients:
            classes, reps = self.representations(c)
            out[c.id] = {"reps": reps, "classes": classes.to(class_id_dtype(self.ctx.num_classes))}
        return out

    def aggregate(self, uploads: dict[int, Payload], round_index: int) -> None:
        reps, labels = self.pairs(uploads)
        batch = self.hp.server_batch_size or len(labels)
        params = list(self.header.parameters())
        self.header.train()
        for _ in range(self.hp.server_epochs):
            order = torch.randperm(len(labels), generator=self.generator, device=labels.device)
            for start in range(0, len(order), batch):
                idx = order[start:start + batch]
                loss = F.cross_entropy(self.header(reps[idx]), labels[idx])
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.ctx.cfg.grad_clip > 0:
                    nn.utils.clip_grad_norm_(params, self.ctx.cfg.grad_clip, foreach=True)
                self.optimizer.step()
