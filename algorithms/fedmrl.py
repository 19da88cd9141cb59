"""FedMRL (Yi et al., NeurIPS 2024): a small homogeneous model G (extractor G_ex, header G_hd) beside each
client's heterogeneous model F_k (extractor F_ex, header F_hd), their representations fused by a personal
projector P_k into Matryoshka representations.

Each step, for a batch x: r = P_k([G_ex(x), F_ex(x)]) (concatenated, P_k a Linear(d1 + d2, d2), d1 = G's
representation size, d2 = F_k's); the coarse representation r[:, :d1] goes to G_hd, the full r to F_hd; loss
= m1 CE(G_hd(r[:, :d1]), y) + m2 CE(F_hd(r), y). F_k, G and P_k train together for E epochs, each with its own
optimizer and gradient clipping. Only G is federated: the client loads the global G, trains, and uploads it;
the server takes the n_k-weighted mean (option: uniform). F_k and P_k stay on the client. Inference: F_hd(r),
with the client's own trained G_ex (`eval_extractor="local"`, the official code) or the server's current
G_ex (`"global"`, HtFLlib: then every client is evaluated after every aggregation with the new G, which it
receives then).

`share`: "model" = G's extractor and header travel (the paper, the official code and HtFLlib all average the
whole small model); "extractor" = only G_ex travels, each client keeps its own G_hd.

G is CNN-5-like (`homo_arch`, conv part and fc1 of that CNN) with its fc2 giving `homo_rep_dim` = d1 features,
and a Linear(d1, classes) header. d1 <= d2 for every client (the coarse representation nests in the full one)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.base import (Algorithm, Payload, Phase, aggregation_weights, check_aggregation, load_payload,
                             state_payload, weighted_average)
from bench.errors import UserError
from models.cnn import CNN_SPECS, SplitModel, conv_trunk, trunk_out_dim

SHARES = ("model", "extractor")
EVAL_EXTRACTORS = ("local", "global")


@dataclass
class FedMRLHyperparams:
    homo_arch: str = "cnn5"      # the small homogeneous model's CNN (conv part and fc1)
    homo_rep_dim: int = 100      # d1: its representation size (the coarse Matryoshka granularity)
    m1: float = 1.0              # weight of the small header's CE on r[:, :d1]
    m2: float = 1.0              # weight of the local header's CE on r
    share: str = "model"         # model: G_ex and G_hd travel (paper, codes); extractor: G_ex only
    aggregation: str = "samples"  # samples: n_k-weighted mean (paper, official); uniform: plain mean (HtFLlib)
    eval_extractor: str = "local"  # local: the client's trained G_ex (official); global: the server's G_ex

    def validate(self) -> None:
        if self.homo_arch not in CNN_SPECS:
            raise UserError(f"fedmrl.homo_arch must be one of {', '.join(CNN_SPECS)}, got {self.homo_arch!r}")
        if self.homo_rep_dim < 1:
            raise UserError(f"fedmrl.homo_rep_dim must be >= 1, got {self.homo_rep_dim}")
        for field in ("m1", "m2"):
            if not getattr(self, field) >= 0:
                raise UserError(f"fedmrl.{field} must be >= 0, got {getattr(self, field)}")
        if self.share not in SHARES:
            raise UserError(f"fedmrl.share must be one of {', '.join(SHARES)}, got {self.share!r}")
        check_aggregation("fedmrl", self.aggregation)
        if self.eval_extractor not in EVAL_EXTRACTORS:
            raise UserError(f"fedmrl.eval_extractor must be one of {', '.join(EVAL_EXTRACTORS)}, "
                            f"got {self.eval_extractor!r}")


class SmallModel(SplitModel):
    """The homogeneous small model: a CNN's conv part and fc1, fc2 -> d1 (ReLU), header d1 -> classes."""

    def __init__(self, arch: str, rep_dim: int, num_classes: int, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        conv2, fc1 = CNN_SPECS[arch]
        self.extractor = nn.Sequential(
            conv_trunk(in_channels, conv2),
            nn.Linear(trunk_out_dim(conv2, image_size), fc1), nn.ReLU(),
            nn.Linear(fc1, rep_dim), nn.ReLU(),
        )
        self.header = nn.Linear(rep_dim, num_classes)


def fused(model, small, projector, x: torch.Tensor) -> torch.Tensor:
    """r = P_k([G_ex(x), F_ex(x)]), the full Matryoshka representation."""
    return projector(torch.cat([small.extractor(x), model.extractor(x)], dim=1))


class FedMRL(Algorithm):
    name = "fedmrl"
    display_name, role, table_order, colour = "FedMRL", "baseline", 72, "#98df8a"
    server_flops_by_upload_shapes = True
    description = "small shared homogeneous model fused with the local model into Matryoshka representations"
    Hyperparams = FedMRLHyperparams
    # Sources and line numbers: algorithms/README.md (fidelity notes).
    profiles = {
        "official": {"homo_rep_dim": 500},
        "htfllib": {"homo_rep_dim": 128, "aggregation": "uniform", "eval_extractor": "global"},
    }

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        dims = {ctx.representation_dim(arch) for arch in set(ctx.client_archs)}
        if hp.homo_rep_dim > min(dims):
            raise UserError(f"fedmrl.homo_rep_dim must be <= every client's representation size "
                            f"(here {min(dims)}), got {hp.homo_rep_dim}")
        self.broadcast_after_aggregation = hp.eval_extractor == "global"
        self.prediction_uses_server_state = hp.eval_extractor == "global"

    def new_small(self) -> SmallModel:
        ctx = self.ctx
        return SmallModel(self.hp.homo_arch, self.hp.homo_rep_dim, ctx.num_classes, ctx.in_channels,
                          ctx.image_size).to(ctx.device)

    def init_server(self) -> None:
        self.global_small = self.new_small()

    def init_client(self, client) -> None:
        client.state["model"] = model = self.ctx.build_model(client.arch)
        client.state["small"] = self.new_small()  # the client's copy of G, loaded from each download
        client.state["projector"] = nn.Linear(self.hp.homo_rep_dim + model.rep_dim, model.rep_dim).to(self.ctx.device)

    def shared(self, small: SmallModel) -> nn.Module:
        """The federated part of G: the whole small model, or its extractor only."""
        return small if self.hp.share == "model" else small.extractor

    def server_payload(self, client, round_index: int) -> Payload:
        if self.hp.eval_extractor == "global" and round_index > 0:
            return {}  # the broadcast after the last aggregation already delivered it
        return state_payload(self.shared(self.global_small))

    def loss(self, model, small, projector):
        d1, m1, m2 = self.hp.homo_rep_dim, self.hp.m1, self.hp.m2

        def matryoshka(x, y):
            r = fused(model, small, projector, x)
            return m1 * F.cross_entropy(small.header(r[:, :d1]), y) + m2 * F.cross_entropy(model.header(r), y)

        return matryoshka

    def client_update(self, client, payload: Payload, round_index: int):
        model, small, projector = (client.state[k].train() for k in ("model", "small", "projector"))
        if payload:
            load_payload(self.shared(small), payload)
        yield Phase("matryoshka", [model, small, projector], self.ctx.cfg.local_epochs,
                    loss=self.loss(model, small, projector))
        return state_payload(self.shared(small))

    def aggregate(self, uploads: dict[int, Payload], round_index: int) -> None:
        weights = aggregation_weights(self.ctx, self.hp.aggregation)
        load_payload(self.shared(self.global_small), weighted_average(uploads, weights))

    def after_aggregation_payload(self, client, round_index: int) -> Payload | None:
        return state_payload(self.shared(self.global_small)) if self.hp.eval_extractor == "global" else None

    def receive_after_aggregation(self, client, payload: Payload, round_index: int) -> None:
        load_payload(self.shared(client.state["small"]), payload)

    def predict(self, client, x):
        """F_hd(P_k([G_ex(x), F_ex(x)])) with the client's copy of G_ex (its trained one, or the broadcast)."""
        model = client.state["model"]
        return model.header(fused(model, client.state["small"], client.state["projector"], x))
