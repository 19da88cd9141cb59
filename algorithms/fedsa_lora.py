"""FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning", ICLR 2025):
the A factors learn what is general and are shared (averaged by the server), the B factors learn what is
client-specific and stay local, as does the classifier (the official code keeps `classifier` in
personalization.local_param).

Round, per client: load the global A of every LoRA layer (the server's initialisation in round 0, so all clients
start from the same A), train A, its own B and its own header for E epochs on CE, upload A. Server, per layer
(its name and base shape: see lora_common): the n_k-weighted mean of the uploaded A's (FederatedScope's default
aggregator weights by sample size; option uniform). Defaults of the official GLUE configuration: rank 8,
lora_alpha 16 (scaling 2), dropout 0.05, the PEFT default targets query and value (here q, v).

Bytes per client and round: 4 x sum over its LoRA layers of r x in, each way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from algorithms.base import Payload, Phase, aggregation_weights, check_aggregation
from algorithms.lora_common import (LoRAMethod, check_common, factors_payload, load_factors, server_factors,
                                    uploaders_of)
from bench.errors import UserError


@dataclass
class FedSALoRAHyperparams:
    rank: int = 8                # r, every client (official lora r)
    targets: str = "q,v"         # LoRA on these linear layers
    scaling: float = 2.0         # alpha / r (official lora_alpha 16 / r 8)
    dropout: float = 0.05        # LoRA dropout (official lora_dropout)
    aggregation: str = "samples"  # mean of the A's: samples = n_k-weighted (official), uniform
    train_base: bool = False     # also train the (private) base weights: an ablation, not the paper's

    def validate(self) -> None:
        if self.rank < 1:
            raise UserError(f"fedsalora.rank must be >= 1, got {self.rank}")
        check_common("fedsalora", self.targets, self.scaling, self.dropout)
        check_aggregation("fedsalora", self.aggregation)


class FedSALoRA(LoRAMethod):
    name = "fedsalora"  # `--algo fedsa-lora` works too (names are canonicalised)
    example_model_group = "vit-small-hetero"  # LoRA targets the transformer blocks' linear layers
    display_name, role, table_order, colour = "FedSA-LoRA", "baseline", 78, "#637939"
    description = "LoRA with A shared (averaged) and B kept local"
    Hyperparams = FedSALoRAHyperparams

    def client_rank(self, client_id: int) -> int:
        return self.hp.rank

    def init_server(self) -> None:
        gen = torch.Generator().manual_seed(self.ctx.seed)
        self.global_a = server_factors(self.layer_shapes, gen, self.ctx.device, parts="A")

    def server_payload(self, client, round_index: int) -> Payload:
        return {f"{key}.lora_A": self.global_a[f"{key}.lora_A"] for key in self.server_keys(client)}

    def client_update(self, client, payload: Payload, round_index: int):
        model = client.state["model"]
        layers = self.keyed_layers(client)
        load_factors(layers, payload)
        yield Phase("train", [model], self.ctx.cfg.local_epochs)  # CE(model(x), y): A, own B, own header
        return factors_payload(layers, parts="A")

    def aggregate(self, uploads: dict[int, Payload], round_index: int) -> None:
        weights = aggregation_weights(self.ctx, self.hp.aggregation)
        for key in self.layer_shapes:
            entry = f"{key}.lora_A"
            ids = uploaders_of(uploads, entry)
            if ids:
                total = sum(weights[c] for c in ids)
                self.global_a[entry] = sum(uploads[c][entry] * (weights[c] / total) for c in ids)
