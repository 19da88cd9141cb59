"""pFedES (Yi et al., AAAI 2025): a small homogeneous proxy feature extractor G shared by all clients, placed
in front of each client's heterogeneous model F_k: G maps an image to an image-shaped output (two 3x3 'same'
convolutions with ReLU, in_channels -> `proxy_channels` -> in_channels), which F_k then takes.

Round: the client loads the global G, then
  phase 1: G frozen, F_k trains E epochs on (1 - mu) CE(F_k(x), y) + mu CE(F_k(G(x)), y)   (the mu-mixed loss);
  phase 2: F_k frozen, G trains E + `proxy_extra_epochs` epochs on CE(F_k(G(x)), y);
and uploads G. Server: the n_k-weighted mean of the uploaded G (option: uniform). Inference: F_k(x), the local
model alone (the official code evaluates `net(img)`). Only G travels (4 x its parameter count bytes each way).

`persistent_optimizer="shared"` reproduces the official code's proxy optimizer, created once for the whole
run: one SGD momentum for G that passes from client to client and round to round (clients then train one
after the other)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.base import (Algorithm, Payload, Phase, aggregation_weights, check_aggregation, load_payload,
                             state_payload, weighted_average)
from algorithms.pfedlora import set_trainable, zero_momentum
from bench.errors import UserError

PERSISTENCE = ("none", "shared")


@dataclass
class PFedESHyperparams:
    mu: float = 0.5              # weight of the proxy path CE(F_k(G(x))) in phase 1; 1 - mu on CE(F_k(x))
    proxy_channels: int = 8      # G's hidden channels
    proxy_extra_epochs: int = 0  # phase 2 trains G for E + this many epochs (official: +10)
    aggregation: str = "samples"  # samples: n_k-weighted mean (official); uniform: plain mean
    persistent_optimizer: str = "none"  # none: G's SGD new every phase (SPEC); shared: one for the run (official)

    def validate(self) -> None:
        if not 0.0 <= self.mu <= 1.0:
            raise UserError(f"pfedes.mu must be in [0, 1], got {self.mu}")
        if self.proxy_channels < 1:
            raise UserError(f"pfedes.proxy_channels must be >= 1, got {self.proxy_channels}")
        check_aggregation("pfedes", self.aggregation)
        if self.persistent_optimizer not in PERSISTENCE:
            raise UserError(f"pfedes.persistent_optimizer must be one of {', '.join(PERSISTENCE)}, "
                            f"got {self.persistent_optimizer!r}")


class ProxyExtractor(nn.Module):
    """G: conv3x3(c -> k) ReLU conv3x3(k -> c) ReLU, 'same' padding: an image-shaped output for F_k."""

    def __init__(self, in_channels: int = 3, channels: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))))


class PFedES(Algorithm):
    name = "pfedes"
    display_name, role, table_order, colour = "pFedES", "baseline", 75, "#ff9896"
    server_flops_by_upload_shapes = True
    description = "shared proxy feature extractor in front of each local model, trained alternately (mu-mixed loss)"
    Hyperparams = PFedESHyperparams
    # Sources and line numbers: algorithms/README.md (fidelity notes).
    profiles = {
        "official": {"proxy_extra_epochs": 10, "persistent_optimizer": "shared"},
        "htfllib": {},  # HtFLlib has no pFedES: SPEC defaults
    }

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        if ctx.cfg.local_epochs + hp.proxy_extra_epochs < 1:
            raise UserError(f"pfedes.proxy_extra_epochs must be >= {1 - ctx.cfg.local_epochs} with local_epochs="
                            f"{ctx.cfg.local_epochs} (phase 2 needs at least one epoch), got {hp.proxy_extra_epochs}")
        self.batchable_clients = hp.persistent_optimizer != "shared"  # one momentum passed from client to client

    def new_proxy(self) -> ProxyExtractor:
        return ProxyExtractor(self.ctx.in_channels, self.hp.proxy_channels).to(self.ctx.device)

    def init_server(self) -> None:
        self.global_proxy = self.new_proxy()
        if self.hp.persistent_optimizer == "shared":
            self.proxy_momentum = zero_momentum(self.global_proxy)

    def init_client(self, client) -> None:
        client.state["model"] = self.ctx.build_model(client.arch)
        client.state["proxy"] = self.new_proxy()

    def server_payload(self, client, round_index: int) -> Payload:
        return state_payload(self.global_proxy)

    def phase1_loss(self, model, proxy):
        mu = self.hp.mu

        def mixed(x, y):
            return (1 - mu) * F.cross_entropy(model(x), y) + mu * F.cross_entropy(model(proxy(x)), y)

        return mixed

    @staticmethod
    def proxy_loss(model, proxy):
        return lambda x, y: F.cross_entropy(model(proxy(x)), y)

    def client_update(self, client, payload: Payload, round_index: int):
        model, proxy = client.state["model"], client.state["proxy"]
        load_payload(proxy, payload)
        epochs = self.ctx.cfg.local_epochs
        set_trainable(proxy, False)
        set_trainable(model, True)
        yield Phase("phase1-train-model", [model], epochs, loss=self.phase1_loss(model, proxy))
        set_trainable(model, False)
        set_trainable(proxy, True)
        yield from self.train_proxy(model, proxy, epochs + self.hp.proxy_extra_epochs)
        set_trainable(model, True)
        return state_payload(proxy)

    def train_proxy(self, model, proxy, epochs: int):
        """Phase 2; under persistent_optimizer="shared" G's SGD starts from the kept momentum and keeps it."""
        phase = Phase("phase2-train-proxy", [proxy], epochs, loss=self.proxy_loss(model, proxy))
        if self.hp.persistent_optimizer == "none":
            return (yield phase)
        params, optimizers = phase.optimizers = self.ctx.optimizers_for([proxy])
        kept, opt = params[0], optimizers[0]
        for p, buf in zip(kept, self.proxy_momentum.split([p.numel() for p in kept])):
            opt.state[p]["momentum_buffer"] = buf.view_as(p).clone()
        mean_loss = yield phase
        self.proxy_momentum = torch.cat([opt.state[p]["momentum_buffer"].flatten() for p in kept])
        return mean_loss

    def aggregate(self, uploads: dict[int, Payload], round_index: int) -> None:
        load_payload(self.global_proxy, weighted_average(uploads, aggregation_weights(self.ctx, self.hp.aggregation)))

    def predict(self, client, x):
        return client.state["model"](x)
