"""FedAPEN (Qin et al. 2023, KDD): a private model P, a shared homogeneous model S and a learned per-client
mixing weight lambda_k in [0, 1] (init 0.5).

Each batch, with p = P(x), s = S(x) (logits) and mix(a, b) = lambda a + (1 - lambda) b:
    L_P = CE(p, y) + KL(softmax(s).detach || softmax(p)) + CE(mix(p, s.detach), y)
    L_S = CE(s, y) + KL(softmax(p).detach || softmax(s)) + CE(mix(p.detach, s), y)
P and S each have their own optimizer; the summed loss gives each exactly its own gradient. The server
averages S (n_k weights). After aggregation the round's clients receive the new S (the post-aggregation
download) and learn lambda on a held-out share of their training data with P and S frozen:
minimise CE(mix(p, s), y), plain SGD (lr 1e-3), 10 passes, lambda clipped to [0, 1] after every step.

Design decisions (each a Hyperparams field where it is a choice):
- The held-out "adaptability" split: `adapt_fraction` (5%) of each client's train indices, drawn once from
  the run seed and the client id (at least 1 sample, and at least 1 left for training; none when the
  client has a single sample, and then lambda stays put). Local training uses the rest.
- The client's S after the round is the new global S (it received it after aggregation); lambda is learned
  against that S, and prediction uses it: lambda P(x) + (1 - lambda) S(x).
- Mixing: `mix="logits"` (default) mixes the model outputs (logits), SPEC's formula on outputs, and the
  CE is taken on the mixed logits; `mix="probs"` mixes softmax probabilities and takes the NLL of their
  log (a proper probability mixture). The same mixing is used in training, lambda learning and inference.
- lambda learning: P and S are frozen and deterministic (eval mode, no augmentation), so their outputs on
  the held-out split are computed once and reused for the `lambda_epochs` passes (batches of the run's
  batch_size, in order); the forward passes count as client training FLOPs.
- Downloads: the round's start-of-round download of S is skipped for a client that already holds the
  current global S (it received it after the last aggregation and nothing changed since: always so under
  full participation), `skip_current_download=True`; False sends S every time.
- Aggregation weights: n_k is the client's whole train split (ctx.client_weights), not the 95% it trains on;
  `aggregation="uniform"` takes the plain mean, as the official code (zhenqincn/FedAPEN) does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from algorithms.base import (Algorithm, Payload, Phase, aggregation_weights, check_aggregation, kl_to, load_payload,
                             state_payload, weighted_average)
from bench.errors import UserError
from models.groups import ARCHITECTURES

ADAPT_STREAM = 4  # seed offset of the held-out split


@dataclass
class FedAPENHyperparams:
    shared_arch: str = "cnn5"         # the shared model S
    adapt_fraction: float = 0.05      # share of the train split held out to learn lambda
    lambda_init: float = 0.5
    lambda_lr: float = 1e-3
    lambda_epochs: int = 10           # passes over the held-out split
    mix: str = "logits"               # logits | probs
    skip_current_download: bool = True  # no start-of-round download when the client already holds the global S
    aggregation: str = "samples"      # samples: n_k-weighted average of S (SPEC) | uniform (official code)

    def validate(self) -> None:
        if self.shared_arch not in ARCHITECTURES:
            raise UserError(f"fedapen.shared_arch must be one of {', '.join(ARCHITECTURES)}, got {self.shared_arch!r}")
        if not 0 < self.adapt_fraction < 1:
            raise UserError(f"fedapen.adapt_fraction must be in (0, 1), got {self.adapt_fraction}")
        if not 0 <= self.lambda_init <= 1:
            raise UserError(f"fedapen.lambda_init must be in [0, 1], got {self.lambda_init}")
        if self.lambda_lr <= 0 or self.lambda_epochs < 0:
            raise UserError(f"fedapen.lambda_lr must be > 0 and fedapen.lambda_epochs >= 0, "
                            f"got {self.lambda_lr}, {self.lambda_epochs}")
        if self.mix not in ("logits", "probs"):
            raise UserError(f"fedapen.mix must be 'logits' or 'probs', got {self.mix!r}")
        check_aggregation("fedapen", self.aggregation)


def mixture_loss(p: torch.Tensor, s: torch.Tensor, lam: torch.Tensor, y: torch.Tensor, mix: str) -> torch.Tensor:
    """CE of the lambda mixture of two models' outputs."""
    if mix == "logits":
        return F.cross_entropy(lam * p + (1 - lam) * s, y)
    probs = lam * F.softmax(p, 1) + (1 - lam) * F.softmax(s, 1)
    return F.nll_loss(torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny)), y)


class FedAPEN(Algorithm):
    name = "fedapen"
    display_name, role, table_order, colour = "FedAPEN", "baseline", 60, "#e377c2"
    server_flops_by_upload_shapes = True
    description = "private + shared model by mutual learning, mixed with a learned per-client weight lambda"
    Hyperparams = FedAPENHyperparams
    # zhenqincn/FedAPEN node.py ServerNode.aggregate; HtFLlib has no FedAPEN (/tmp/fidelity/fedapen.md).
    profiles = {"official": {"aggregation": "uniform"}}

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        self.version = 0
        self.client_version: dict[int, int] = {}
        self.splits: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # client id -> (train part, held out)

    def init_server(self) -> None:
        self.global_shared = self.ctx.build_model(self.hp.shared_arch)

    def init_client(self, client) -> None:
        client.state["model"] = self.ctx.build_model(client.arch)
        client.state["shared"] = self.ctx.build_model(self.hp.shared_arch)
        client.state["lambda"] = torch.tensor(self.hp.lambda_init, device=self.ctx.device)
        self.splits[client.id] = adapt_split(client.split.train, self.hp.adapt_fraction, self.ctx.seed, client.id)

    # ---- round ----
    def server_payload(self, client, round_index: int) -> Payload:
        if self.hp.skip_current_download and self.client_version.get(client.id) == self.version:
            return {}
        self.client_version[client.id] = self.version
        return state_payload(self.global_shared)

    def loss_fn(self, client):
        private, shared = client.state["model"], client.state["shared"]
        lam = client.state["lambda"].detach()
        mix = self.hp.mix

        def loss(x, y):
            p, s = private(x), shared(x)
            loss_p = F.cross_entropy(p, y) + kl_to(p, s) + mixture_loss(p, s.detach(), lam, y, mix)
            loss_s = F.cross_entropy(s, y) + kl_to(s, p) + mixture_loss(p.detach(), s, lam, y, mix)
            return loss_p + loss_s

        return loss

    def client_update(self, client, payload: Payload, round_index: int):
        private, shared = client.state["model"], client.state["shared"]
        if payload:
            load_payload(shared, payload)
        private.train()
        shared.train()
        train_part = self.splits[client.id][0].to(self.ctx.device)
        yield Phase(f"mutual-{self.hp.shared_arch}", [private, shared], self.ctx.cfg.local_epochs,
                    loss=self.loss_fn(client), indices=train_part)
        return state_payload(shared)

    def aggregate(self, uploads: dict[int, Payload], round_index: int) -> None:
        load_payload(self.global_shared, weighted_average(uploads, aggregation_weights(self.ctx, self.hp.aggregation)))
        self.version += 1

    def after_aggregation_payload(self, client, round_index: int) -> Payload | None:
        self.client_version[client.id] = self.version
        return state_payload(self.global_shared)

    def receive_after_aggregation(self, client, payload: Payload, round_index: int) -> None:
        load_payload(client.state["shared"], payload)
        self.learn_lambda(client)
        self.ctx.record("lambda", client.state["lambda"].detach())

    def learn_lambda(self, client) -> None:
        """SGD on lambda alone over the held-out split (P and S frozen), clipped to [0, 1] after each step."""
        held_out = self.splits[client.id][1].to(self.ctx.device)
        if held_out.numel() == 0 or self.hp.lambda_epochs == 0:
            return
        private, shared = client.state["model"].eval(), client.state["shared"].eval()
        outputs = []
        with torch.no_grad():
            for x, y in self.ctx.data.eval_batches("train", held_out, self.ctx.cfg.batch_size):
                key = (self.name, f"lambda-{self.hp.shared_arch}", client.arch, len(y))
                with self.ctx.accountant.count("train", key, client.id):
                    outputs.append((private(x), shared(x), y))
        lam = client.state["lambda"].detach().clone()
        for _ in range(self.hp.lambda_epochs):
            for p, s, y in outputs:
                lam.requires_grad_(True)
                (grad,) = torch.autograd.grad(mixture_loss(p, s, lam, y, self.hp.mix), lam)
                lam = (lam.detach() - self.hp.lambda_lr * grad).clamp_(0.0, 1.0)
        client.state["lambda"] = lam.detach()

    def predict(self, client, x):
        lam = client.state["lambda"]
        p, s = client.state["model"](x), client.state["shared"](x)
        if self.hp.mix == "logits":
            return lam * p + (1 - lam) * s
        probs = lam * F.softmax(p, 1) + (1 - lam) * F.softmax(s, 1)
        return torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))


def adapt_split(train: torch.Tensor, fraction: float, seed: int, client_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train part, held-out part) of a client's train indices; deterministic from the run seed and client id."""
    n = train.numel()
    held = 0 if n < 2 else min(max(1, round(fraction * n)), n - 1)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 1009 * client_id + ADAPT_STREAM)
    perm = torch.randperm(n, generator=gen).to(train.device)
    return train[perm[held:]].sort().values, train[perm[:held]].sort().values
