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
- Representations (`representation`): "exact" = eval mode, no augmentation, the client's whole train split
  in eval batches, right after local training, exact per-class means (index_add_); "batch-mean" = the
  authors' script: a second pass over augmented, shuffled training batches (eval mode), the per-class mean
  of the per-batch class means. Either pass counts as the client's training FLOPs. Upload: "reps" float32
  (|classes_k| x rep_dim) and "classes" in the smallest integer type that holds the class ids (uint8 up
  to 256 classes: 1 byte each).
- Server training: `server_epochs` passes per round over the pairs, in a seeded random order, in
  mini-batches of `server_batch_size` pairs (default 1: one SGD step per pair, as the authors' loop;
  0 = all pairs in one batch, -1 = the run's batch_size as HtFLlib); SGD lr 0.01, momentum 0.9
  (`server_lr`, `server_momentum`, `server_weight_decay` 0), gradient clipping at the run's grad_clip
  (`server_grad_clip`), optimizer state kept across rounds (`keep_server_optimizer`).
- Inference (`eval_header`): "local" = the client's model, its extractor and its locally trained copy of H
  (the authors' script evaluates right after local training); "global" = HtFLlib: after every aggregation
  H is broadcast to every client and loaded into its model, so every client is evaluated with its
  extractor and the current H (a client then needs no download at the start of a round).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.base import Algorithm, Payload, Phase, load_payload, state_payload
from bench.errors import UserError

SERVER_STREAM = 3  # seed offset of the server's shuffling generator
REPRESENTATIONS = ("exact", "batch-mean")
EVAL_HEADERS = ("local", "global")


@dataclass
class FedGHHyperparams:
    server_lr: float = 0.01
    server_momentum: float = 0.9
    server_weight_decay: float = 0.0
    server_epochs: int = 1           # passes over the received pairs per round
    server_batch_size: int = 1       # pairs per server step; 0 = all pairs in one batch, -1 = the run's batch_size
    keep_server_optimizer: bool = True  # one SGD for the whole run (momentum kept); False = a new one each round
    server_grad_clip: bool = True    # clip the server's gradient norm at the run's grad_clip; False = never
    load_initial_header: bool = True # also send and load the server's initial H in round index 0
    # How the uploaded class representations are formed: "exact" means over the unaugmented train split,
    # or "batch-mean": the mean of per-batch class means over augmented training batches (authors' code).
    representation: str = "exact"
    # The header a client is evaluated with: "local" = its own trained copy; "global" = the server's H,
    # broadcast to every client after each aggregation (HtFLlib).
    eval_header: str = "local"

    def validate(self) -> None:
        if self.server_lr <= 0 or self.server_momentum < 0 or self.server_weight_decay < 0:
            raise UserError("fedgh.server_lr must be > 0 and fedgh.server_momentum/server_weight_decay >= 0")
        if self.server_epochs < 1 or self.server_batch_size < -1:
            raise UserError(f"fedgh.server_epochs must be >= 1 and fedgh.server_batch_size >= -1 "
                            f"(0 = all, -1 = the run's batch_size), got {self.server_epochs}, {self.server_batch_size}")
        if self.representation not in REPRESENTATIONS:
            raise UserError(f"fedgh.representation must be one of {', '.join(REPRESENTATIONS)}, "
                            f"got {self.representation!r}")
        if self.eval_header not in EVAL_HEADERS:
            raise UserError(f"fedgh.eval_header must be one of {', '.join(EVAL_HEADERS)}, got {self.eval_header!r}")


def class_id_dtype(num_classes: int) -> torch.dtype:
    """The smallest integer type that holds class ids 0..num_classes-1."""
    if num_classes <= 256:
        return torch.uint8
    if num_classes <= 32768:
        return torch.int16
    return torch.int32


class FedGH(Algorithm):
    name = "fedgh"
    display_name, role, table_order, colour = "FedGH", "baseline", 50, "#8c564b"
    server_flops_by_upload_shapes = True
    description = "global header trained on the server from the clients' per-class mean representations"
    Hyperparams = FedGHHyperparams
    # Sources and line numbers: algorithms/README.md (fidelity notes).
    profiles = {
        # LipingYi/FedGH FedGH_mh.py: no download in round 0; class means of per-batch means over augmented
        # training batches. Its server loop would take one step per pair (SPEC's values) had it stepped a
        # server optimizer; evaluation of the locally trained model as SPEC.
        "official": {"load_initial_header": False, "representation": "batch-mean"},
        # HtFLlib servergh.py/clientgh.py: 100 server epochs in batches of the run's batch_size with a fresh
        # momentum-free SGD each round, no clipping; every client evaluated with the broadcast header.
        "htfllib": {"server_epochs": 100, "server_batch_size": -1, "server_momentum": 0.0,
                    "keep_server_optimizer": False, "server_grad_clip": False, "eval_header": "global"},
    }

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        dims = {ctx.representation_dim(arch) for arch in set(ctx.client_archs)}
        if len(dims) > 1:
            raise UserError(f"fedgh needs one representation size across clients, got {sorted(dims)}")
        self.rep_dim = dims.pop()
        self.generator = torch.Generator(device=ctx.device)
        self.generator.manual_seed(ctx.seed * 1000 + SERVER_STREAM)
        # "global": H goes to every client after aggregation, and every client is then evaluated.
        self.broadcast_after_aggregation = hp.eval_header == "global"
        self.prediction_uses_server_state = hp.eval_header == "global"

    def init_server(self) -> None:
        self.header = nn.Linear(self.rep_dim, self.ctx.num_classes).to(self.ctx.device)
        self.optimizer = self.server_optimizer()

    def server_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.header.parameters(), lr=self.hp.server_lr, momentum=self.hp.server_momentum,
                               weight_decay=self.hp.server_weight_decay)

    def init_client(self, client) -> None:
        client.state["model"] = self.ctx.build_model(client.arch)

    def server_payload(self, client, round_index: int) -> Payload:
        if round_index == 0 and not self.hp.load_initial_header:
            return {}
        if round_index > 0 and self.hp.eval_header == "global":
            return {}  # the broadcast after the previous aggregation already put the current H in every client
        return state_payload(self.header)

    def download(self, client, payload: Payload):
        """Load the received H (if any) into the client's header; returns the model, ready to train."""
        model = client.state["model"]
        if payload:
            load_payload(model.header, payload)
        return model.train()

    def upload(self, client) -> Payload:
        classes, reps = self.representations(client)
        return {"reps": reps, "classes": classes.to(class_id_dtype(self.ctx.num_classes))}

    def client_update(self, client, payload: Payload, round_index: int):
        model = self.download(client, payload)
        yield Phase("local", [model], self.ctx.cfg.local_epochs)  # CE(model(x), y)
        return self.upload(client)

    @torch.no_grad()
    def representations(self, client) -> tuple[torch.Tensor, torch.Tensor]:
        """(classes held, their mean extractor outputs) over the client's train split, as `representation`
        says; eval mode, counted as the client's training FLOPs."""
        model = client.state["model"]
        training = model.training
        model.eval()
        k, device = self.ctx.num_classes, self.ctx.device
        sums = torch.zeros(k, self.rep_dim, device=device)
        counts = torch.zeros(k, dtype=torch.long, device=device)  # samples ("exact") or batches ("batch-mean")
        if self.hp.representation == "exact":
            batches = self.ctx.data.eval_batches("train", client.split.train, self.ctx.cfg.eval_batch_size)
        else:
            batches = self.ctx.data.train_batches(client.split.train, self.ctx.cfg.batch_size, self.ctx.generator)
        for x, y in batches:
            with self.ctx.accountant.count("train", (self.name, "representations", client.arch, len(y)), client.id):
                h = model.extractor(x).float()
            if self.hp.representation == "exact":
                sums.index_add_(0, y, h)
                counts.index_add_(0, y, torch.ones_like(y, dtype=counts.dtype))  # bincount syncs per batch on CUDA
            else:
                batch_sums = torch.zeros_like(sums).index_add_(0, y, h)
                batch_counts = torch.zeros_like(counts).index_add_(0, y, torch.ones_like(y))
                held = batch_counts > 0
                sums += batch_sums / batch_counts.clamp(min=1).unsqueeze(1)  # rows of absent classes stay 0
                counts += held.long()
        model.train(training)
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

    def aggregate(self, uploads: dict[int, Payload], round_index: int) -> None:
        reps, labels = self.pairs(uploads)
        batch = {0: len(labels), -1: self.ctx.cfg.batch_size}.get(self.hp.server_batch_size, self.hp.server_batch_size)
        if not self.hp.keep_server_optimizer:
            self.optimizer = self.server_optimizer()
        params = list(self.header.parameters())
        self.header.train()
        for _ in range(self.hp.server_epochs):
            order = torch.randperm(len(labels), generator=self.generator, device=labels.device)
            for start in range(0, len(order), batch):
                idx = order[start:start + batch]
                loss = F.cross_entropy(self.header(reps[idx]), labels[idx])
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.hp.server_grad_clip and self.ctx.cfg.grad_clip > 0:
                    nn.utils.clip_grad_norm_(params, self.ctx.cfg.grad_clip, foreach=True)
                self.optimizer.step()

    def after_aggregation_payload(self, client, round_index: int) -> Payload | None:
        return state_payload(self.header) if self.hp.eval_header == "global" else None

    def receive_after_aggregation(self, client, payload: Payload, round_index: int) -> None:
        load_payload(client.state["model"].header, payload)

    def predict(self, client, x):
        """The client's own model: its extractor and the header it holds (its trained copy, or the broadcast H)."""
        return client.state["model"](x)
