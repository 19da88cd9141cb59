"""HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models", EMNLP
2024): clients hold LoRA of different ranks r_k on one (frozen) base; the server keeps global factors of rank
r_max and sends each client the leading r_k ranks (truncation); clients train with a rank self-pruning
regulariser and may prune their rank; the server zero-pads the uploads to r_max and averages them weighted by
their sparsity, ||B_k A_k||_F.

Round, per client (models/lora.py, algorithms/lora_common.py for the model): load the truncated global A[:r_k],
B[:, :r_k] into every LoRA layer; train the LoRA factors and the local header for E epochs on
CE + lambda * sum over layers ||A_tail|| ||B_tail||, the tail being the ranks floor(gamma r_k) .. r_k; if that
tail's norm product ended lower than it started (the downloaded factors'), prune: r_k <- floor(gamma r_k) (at
least 1), zeroing the pruned ranks; upload A[:r_k], B[:, :r_k] (the new rank). Server, per layer (a layer is
its name and base shape: see lora_common): weights w_k = ||s B_k A_k||_F / sum (uniform if all are zero), then
A = sum_k w_k pad(A_k), B = sum_k w_k pad(B_k), zero-padded to the layer's r_max. The server keeps each client's
r_k for its next download, learnt from its upload (never read from the client's state).

Ranks follow the architecture (a device's capability): the group's architectures in order get ranks spread from
max_rank down to min_rank (vit-hetero: ViT-1 16, ViT-2 13, ViT-3 10, ViT-4 7, ViT-5 4; a homogeneous group: all
max_rank, then only pruning makes ranks differ). The paper spreads ranks between r_min and r_max over clients; tying
them to the architecture gives every computation of one architecture one cost, which the FLOP cache needs. The
paper has no released code; the rule "prune when the tail's norm decreased during local training" is this
harness's reading of its text. Training runs at the client's current rank (FLOPs counted at that rank); the
prediction runs the stored factors, whose pruned ranks are zero (the same logits; FLOPs of the initial rank).

Bytes per client and round: 4 x sum over its LoRA layers of r_k (in + out), down (at the rank before training)
and up (after pruning).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from algorithms.base import Payload, Phase, aggregation_weights
from algorithms.lora_common import (ArchRankedLoRAMethod, check_common, factors_payload, load_factors, server_factors,
                                    uploaders_of)
from bench.errors import UserError

AGGREGATIONS = ("sparsity", "samples", "uniform")


@dataclass
class HetLoRAHyperparams:
    min_rank: int = 4            # r_min: the smallest client rank
    max_rank: int = 16           # r_max: the largest client rank and the global factors' rank
    targets: str = "q,v"         # LoRA on these linear layers (the attention query and value, as LoRA's paper)
    scaling: float = 2.0         # alpha / r (alpha = 2 r, so every rank has the same scaling)
    dropout: float = 0.0         # LoRA dropout on the layer input
    self_pruning: bool = True    # the regulariser and the pruning (False: plain heterogeneous-rank LoRA)
    prune_gamma: float = 0.9     # gamma: the tail is the ranks floor(gamma r) .. r; pruning keeps floor(gamma r)
    prune_lambda: float = 0.01   # lambda: weight of sum ||A_tail|| ||B_tail|| in the local loss
    aggregation: str = "sparsity"  # sparsity: w_k ~ ||B_k A_k||_F (the paper); samples: n_k; uniform
    train_base: bool = False     # also train the (private) base weights: an ablation, not the paper's

    def validate(self) -> None:
        if not 1 <= self.min_rank <= self.max_rank:
            raise UserError(f"hetlora needs 1 <= min_rank <= max_rank, got min_rank={self.min_rank}, "
                            f"max_rank={self.max_rank}")
        check_common("hetlora", self.targets, self.scaling, self.dropout)
        if not 0.0 < self.prune_gamma < 1.0:
            raise UserError(f"hetlora.prune_gamma must be in (0, 1), got {self.prune_gamma}")
        if self.prune_lambda < 0:
            raise UserError(f"hetlora.prune_lambda must be >= 0, got {self.prune_lambda}")
        if self.aggregation not in AGGREGATIONS:
            raise UserError(f"hetlora.aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}")


class HetLoRA(ArchRankedLoRAMethod):
    name = "hetlora"
    example_model_group = "vit-small-hetero"  # LoRA targets the transformer blocks' linear layers
    display_name, role, table_order, colour = "HetLoRA", "baseline", 76, "#393b79"
    description = "heterogeneous LoRA ranks: truncation down, rank self-pruning, sparsity-weighted zero-padded mean"
    Hyperparams = HetLoRAHyperparams

    def init_server(self) -> None:
        gen = torch.Generator().manual_seed(self.ctx.seed)
        self.global_factors = server_factors(self.layer_shapes, gen, self.ctx.device)
        # the server's own record of each client's current rank r_k (it never reads client.state): the initial
        # rank, then the rank of the client's last upload (pruning lowers it)
        self.ranks = {cid: self.client_rank(cid) for cid in range(len(self.ctx.client_archs))}

    def init_client(self, client) -> None:
        super().init_client(client)
        client.state["rank"] = self.client_rank(client.id)  # the client's side of r_k

    def server_payload(self, client, round_index: int) -> Payload:
        rank = self.ranks[client.id]
        out = {}
        for key in self.server_keys(client):
            out[f"{key}.lora_A"] = self.global_factors[f"{key}.lora_A"][:rank]
            out[f"{key}.lora_B"] = self.global_factors[f"{key}.lora_B"][:, :rank]
        return out

    def client_update(self, client, payload: Payload, round_index: int):
        model, rank = client.state["model"], client.state["rank"]
        layers = self.keyed_layers(client)
        load_factors(layers, payload)
        set_rank(layers, rank)
        with torch.no_grad():
            start = float(tail_norm(layers, rank, self.hp.prune_gamma))
        yield Phase(f"train-r{rank}", [model], self.ctx.cfg.local_epochs, loss=self.loss(model, layers, rank))
        if self.hp.self_pruning and rank > 1 and self.tail_decreased(layers, rank, start):
            rank = client.state["rank"] = max(1, math.floor(self.hp.prune_gamma * rank))
            prune(layers, rank)
        upload = factors_payload(layers, rank=rank)
        set_rank(layers, None)  # predictions run the stored factors (pruned ranks are zero)
        return upload

    @torch.no_grad()
    def tail_decreased(self, layers, rank: int, start: float) -> bool:
        """The pruning test: the tail's norm product ended lower than it started this round."""
        return float(tail_norm(layers, rank, self.hp.prune_gamma)) < start

    def loss(self, model, layers, rank: int):
        """CE + lambda * sum ||A_tail|| ||B_tail|| (the self-pruning regulariser), or CE alone."""
        lam = self.hp.prune_lambda if self.hp.self_pruning else 0.0

        def loss(x, y):
            ce = F.cross_entropy(model(x), y)
            return ce + lam * tail_norm(layers, rank, self.hp.prune_gamma) if lam else ce

        return loss

    def aggregate(self, uploads: dict[int, Payload], round_index: int) -> None:
        for cid, upload in uploads.items():  # an upload is at the client's rank after pruning
            self.ranks[cid] = upload_rank(upload, self.ranks[cid])
        samples = aggregation_weights(self.ctx, "samples" if self.hp.aggregation == "samples" else "uniform")
        for key, (_, _, max_rank) in self.layer_shapes.items():
            ids = uploaders_of(uploads, f"{key}.lora_A")
            if not ids:
                continue
            factors = [(uploads[c][f"{key}.lora_A"].float(), uploads[c][f"{key}.lora_B"].float()) for c in ids]
            if self.hp.aggregation == "sparsity":
                weights = [float(torch.linalg.matrix_norm(self.hp.scaling * (b @ a))) for a, b in factors]
            else:
                weights = [samples[c] for c in ids]
            total = sum(weights)
            weights = [w / total for w in weights] if total > 0 else [1.0 / len(ids)] * len(ids)
            a_new = sum(w * F.pad(a, (0, 0, 0, max_rank - a.shape[0])) for w, (a, _) in zip(weights, factors))
            b_new = sum(w * F.pad(b, (0, max_rank - b.shape[1])) for w, (_, b) in zip(weights, factors))
            self.global_factors[f"{key}.lora_A"] = a_new
            self.global_factors[f"{key}.lora_B"] = b_new


def upload_rank(upload: Payload, default: int) -> int:
    """The rank of a client's upload (every layer's A has the client's rank rows); `default` if it has none."""
    return next((v.shape[0] for k, v in upload.items() if k.endswith(".lora_A")), default)


def tail_norm(layers, rank: int, gamma: float) -> torch.Tensor:
    """sum over layers of ||A[p:r]||_F ||B[:, p:r]||_F with p = floor(gamma r): the regularised tail."""
    start = math.floor(gamma * rank)
    total = 0.0
    for layer in layers.values():
        total = total + torch.linalg.vector_norm(layer.lora_A[start:rank]) * \
            torch.linalg.vector_norm(layer.lora_B[:, start:rank])
    return torch.as_tensor(total)


def set_rank(layers, rank: int | None) -> None:
    """Run the layers at `rank` (None: every stored rank)."""
    for layer in layers.values():
        layer.rank = layer.lora_A.shape[0] if rank is None else rank


@torch.no_grad()
def prune(layers, rank: int) -> None:
    """Drop the ranks from `rank` on: zero them (they stay zero: both factors of a pair are zero, so SGD gives
    them no gradient) and leave them out of every payload."""
    for layer in layers.values():
        layer.lora_A[rank:].zero_()
        layer.lora_B[:, rank:].zero_()
