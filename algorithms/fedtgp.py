"""FedTGP (Zhang et al., AAAI 2024): trainable global prototypes, learned on the server with an adaptive-margin
contrastive loss against the clients' uploaded prototypes. Clients as in FedProto (algorithms/fedproto.py).

Server state: a small network TGP(c) = W2 ReLU(W1 E[c] + b1) + b2 (an embedding row per class, a hidden layer of
the prototype size d), kept across rounds. Each round, with the uploaded (prototype p, class c) pairs:
  margin delta = min(max_c min_{c' != c} ||Q_c - Q_c'||, tau), Q_c = the plain mean of this round's uploaded
  prototypes of class c (over the classes uploaded this round; tau when fewer than two are);
  loss on a batch = CE(-(D + delta * onehot(c)), c), D[i, j] = ||p_i - TGP(j)|| (Euclidean),
so each prototype is pulled towards its class's global prototype until it is closer to it by the margin than
to any other. `server_epochs` passes over the pairs in seeded random order, batches of `server_batch_size`
(-1 = the run's batch_size, 0 = all pairs), plain SGD (lr `server_lr`, no momentum; a new optimizer each
round, as both codes). Then the global prototypes TGP(0..K-1) of every class go down (K x d float32, no
class ids: every class has one) from round 1 on; the upload is FedProto's.

The distance is computed as sqrt(max(|p|^2 - 2 p.g + |g|^2, 1e-12)): the codes' expansion (matrix products,
counted as server FLOPs) with a floor that keeps the square root's gradient finite."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.base import Payload
from algorithms.fedproto import FedProto, check_prototype_options
from bench.errors import UserError

SERVER_STREAM = 3  # seed offset of the server's shuffling generator


@dataclass
class FedTGPHyperparams:
    lam: float = 10.0            # weight of the client's prototype distance term (the authors' run scripts)
    margin_threshold: float = 100.0  # tau: the adaptive margin's cap
    server_epochs: int = 100     # passes over the uploaded prototypes per round
    server_lr: float = 0.01      # the server's SGD learning rate (the codes use the clients' lr, 0.01)
    server_batch_size: int = -1  # pairs per server step: -1 = the run's batch_size (codes), 0 = all pairs
    prototypes: str = "after"    # as FedProto: after | all-epochs | last-epoch
    inference: str = "model"     # model: the local model (SPEC); prototype: the nearest global prototype (codes)
    proto_dim: int = 0           # as FedProto: 0 = the models' representation size

    def validate(self) -> None:
        check_prototype_options("fedtgp", self)
        if not self.margin_threshold >= 0:
            raise UserError(f"fedtgp.margin_threshold must be >= 0, got {self.margin_threshold}")
        if self.server_epochs < 1:
            raise UserError(f"fedtgp.server_epochs must be >= 1, got {self.server_epochs}")
        if not self.server_lr > 0:
            raise UserError(f"fedtgp.server_lr must be > 0, got {self.server_lr}")
        if self.server_batch_size < -1:
            raise UserError(f"fedtgp.server_batch_size must be >= -1 (-1 = the run's batch_size, 0 = all pairs), "
                            f"got {self.server_batch_size}")


class TrainablePrototypes(nn.Module):
    """TGP(c) = fc(ReLU(hidden(embedding[c]))): one d-dimensional global prototype per class."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_classes, dim)
        self.hidden = nn.Linear(dim, dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self) -> torch.Tensor:
        return self.fc(F.relu(self.hidden(self.embedding.weight)))


def euclidean(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """||p_i - g_j|| for every pair (rows of p, rows of g)."""
    sq = (p * p).sum(1, keepdim=True) - 2 * p @ g.T + (g * g).sum(1)
    return sq.clamp_min(1e-12).sqrt()


def adaptive_margin(protos: torch.Tensor, labels: torch.Tensor, num_classes: int, tau: float) -> torch.Tensor:
    """min(max over uploaded classes of the distance from its mean prototype to the nearest other class's, tau)."""
    sums = torch.zeros(num_classes, protos.shape[1], device=protos.device).index_add_(0, labels, protos)
    ones = torch.ones(len(labels), device=protos.device)
    counts = torch.zeros(num_classes, device=protos.device).index_add_(0, labels, ones)
    held = counts > 0
    means = sums / counts.clamp(min=1).unsqueeze(1)
    dist = euclidean(means, means)
    pair = held.unsqueeze(0) & held.unsqueeze(1) & ~torch.eye(num_classes, dtype=torch.bool, device=protos.device)
    gap = torch.where(pair, dist, torch.full_like(dist, float("inf"))).min(1).values
    tau_t = torch.tensor(float(tau), device=protos.device)
    if int(held.sum()) < 2:
        return tau_t
    return torch.minimum(gap[held].max(), tau_t)


def margin_loss(protos: torch.Tensor, labels: torch.Tensor, global_protos: torch.Tensor,
                margin: torch.Tensor) -> torch.Tensor:
    """CE(-(D + margin * onehot), labels): the adaptive-margin contrastive loss of the paper."""
    dist = euclidean(protos, global_protos)
    dist = dist + margin * F.one_hot(labels, global_protos.shape[0])
    return F.cross_entropy(-dist, labels)


class FedTGP(FedProto):
    name = "fedtgp"
    display_name, role, table_order, colour = "FedTGP", "baseline", 70, "#aec7e8"
    server_flops_by_upload_shapes = True
    description = "trainable global prototypes learned on the server with an adaptive-margin contrastive loss"
    Hyperparams = FedTGPHyperparams
    # TsingZ0/FedTGP and HtFLlib share one implementation: both evaluate with the nearest global prototype.
    profiles = {
        "official": {"inference": "prototype"},
        "htfllib": {"inference": "prototype"},
    }

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        self.generator = torch.Generator(device=ctx.device)
        self.generator.manual_seed(ctx.seed * 1000 + SERVER_STREAM)

    def init_server(self) -> None:
        super().init_server()
        self.tgp = TrainablePrototypes(self.ctx.num_classes, self.dim).to(self.ctx.device)
        self.margin = torch.zeros((), device=self.ctx.device)  # the last round's delta (diagnostics, tests)

    def global_payload(self) -> Payload:
        return {"protos": self.protos}  # every class has a global prototype: no class ids needed

    def aggregate(self, uploads: dict[int, Payload], round_index: int) -> None:
        ids = sorted(uploads)
        protos = torch.cat([uploads[i]["protos"].float() for i in ids])
        labels = torch.cat([uploads[i]["classes"].long() for i in ids])
        self.margin = adaptive_margin(protos, labels, self.ctx.num_classes, self.hp.margin_threshold)
        batch = {0: len(labels), -1: self.ctx.cfg.batch_size}.get(self.hp.server_batch_size,
                                                                    self.hp.server_batch_size)
        optimizer = torch.optim.SGD(self.tgp.parameters(), lr=self.hp.server_lr)
        self.tgp.train()
        for _ in range(self.hp.server_epochs):
            order = torch.randperm(len(labels), generator=self.generator, device=labels.device)
            for start in range(0, len(order), batch):
                idx = order[start:start + batch]
                loss = margin_loss(protos[idx], labels[idx], self.tgp(), self.margin)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            self.protos = self.tgp().detach().clone()
        self.held = torch.ones(self.ctx.num_classes, dtype=torch.bool, device=self.ctx.device)
