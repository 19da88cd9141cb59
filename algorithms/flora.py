"""FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024): instead of averaging A and B separately (whose product is not the average of the
products), the server stacks the clients' factors, A = [p_1 s A_1; p_2 s A_2; ...] (rows) and B = [B_1, B_2, ...]
(columns), so that B A = sum_k p_k s B_k A_k exactly, for any mix of ranks; it sends the stack, every client
merges it into its base weight (W += B A) and starts a fresh LoRA (A random, B = 0).

Round, per client: merge every stack it has not merged yet (the server sends the stacks of all rounds since the
client's last participation, concatenated: still an exact sum of products), re-initialise its LoRA factors
(A Kaiming-uniform from the run's generator, B = 0), train them and the local header for E epochs on CE, upload
A_k (r_k x in) and B_k (out x r_k) of every LoRA layer. Server, per layer (its name and base shape: see
lora_common): p_k = n_k / sum n over the uploaders (official: normalised local data sizes) and the stack above.
Ranks: by architecture as in HetLoRA (min_rank..max_rank; the official default list is 64, 32, 16, 16, 8,
8, 4, 4, 4, 4 for LLaMA, with alpha = 2 r: scaling 2). Targets q, v and dropout 0.05 as the official code.
The personalised prediction is the client's merged base + its own last LoRA + its header.

Bytes per client and round: up 4 x sum over its layers r_k (in + out); down 4 x sum over its layers of
R (in + out), R the summed ranks of the stacks it receives (every uploader of that layer since its last round):
FLoRA's download grows with the number of clients, as its paper discusses. Round 0 downloads nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from algorithms.base import Payload, Phase, aggregation_weights, check_aggregation
from algorithms.lora_common import ArchRankedLoRAMethod, check_common, factors_payload, uploaders_of
from bench.errors import UserError


@dataclass
class FLoRAHyperparams:
    min_rank: int = 4            # the smallest client rank
    max_rank: int = 16           # the largest client rank
    targets: str = "q,v"         # LoRA on these linear layers (the official lora_target_modules: q_proj, v_proj)
    scaling: float = 2.0         # alpha / r (official: lora_alpha = 2 r for heterogeneous ranks)
    dropout: float = 0.05        # LoRA dropout (official lora_dropout)
    aggregation: str = "samples"  # p_k: samples = n_k / sum n (official), uniform = 1 / K
    train_base: bool = False     # also train the (private) base weights: an ablation, not the paper's

    def validate(self) -> None:
        if not 1 <= self.min_rank <= self.max_rank:
            raise UserError(f"flora needs 1 <= min_rank <= max_rank, got min_rank={self.min_rank}, "
                            f"max_rank={self.max_rank}")
        check_common("flora", self.targets, self.scaling, self.dropout)
        check_aggregation("flora", self.aggregation)


class FLoRA(ArchRankedLoRAMethod):
    name = "flora"
    example_model_group = "vit-small-hetero"  # LoRA targets the transformer blocks' linear layers
    display_name, role, table_order, colour = "FLoRA", "baseline", 77, "#e7ba52"
    description = "stacked LoRA factors: the exact weighted sum of the clients' products, merged into the base"
    Hyperparams = FLoRAHyperparams

    def init_server(self) -> None:
        self.stacks: list[dict[str, torch.Tensor]] = []  # one per aggregation not yet merged by every client
        self.first_stack = 0                             # the round number of stacks[0]
        self.merged_upto = {cid: 0 for cid in range(len(self.ctx.client_archs))}  # next stack each one needs

    def server_payload(self, client, round_index: int) -> Payload:
        """The concatenation of the stacks the client has not merged: [B_t1, B_t2, ...][A_t1; A_t2; ...]."""
        pending = self.stacks[self.merged_upto[client.id] - self.first_stack:]
        out = {}
        for key in self.server_keys(client):
            parts = [s for s in pending if f"{key}.lora_A" in s]
            if parts:
                out[f"{key}.lora_A"] = torch.cat([s[f"{key}.lora_A"] for s in parts], 0)
                out[f"{key}.lora_B"] = torch.cat([s[f"{key}.lora_B"] for s in parts], 1)
        return out

    def client_update(self, client, payload: Payload, round_index: int):
        model = client.state["model"]
        layers = self.keyed_layers(client)
        if payload:
            self.merge(client, layers, payload)
        for layer in layers.values():
            layer.reset_lora(self.ctx.generator)  # a fresh LoRA on the merged base
        yield Phase("train", [model], self.ctx.cfg.local_epochs)  # CE(model(x), y): LoRA factors and header
        return factors_payload(layers)

    @torch.no_grad()
    def merge(self, client, layers, payload: Payload) -> None:
        """W += B_stack A_stack for every layer the payload holds (counted as the client's training FLOPs)."""
        with self.ctx.accountant.count("train", None, client.id):
            for key, layer in layers.items():
                if f"{key}.lora_A" in payload:
                    layer.base.weight += payload[f"{key}.lora_B"] @ payload[f"{key}.lora_A"]

    def aggregate(self, uploads: dict[int, Payload], round_index: int) -> None:
        weights = aggregation_weights(self.ctx, self.hp.aggregation)
        stack = {}
        for key in self.layer_shapes:
            ids = uploaders_of(uploads, f"{key}.lora_A")
            if not ids:
                continue
            total = sum(weights[c] for c in ids)
            # p_k s A_k: the weight and the LoRA scaling go into A, so that B_stack A_stack = sum p_k s B_k A_k
            stack[f"{key}.lora_A"] = torch.cat([uploads[c][f"{key}.lora_A"] * (weights[c] / total * self.hp.scaling)
                                                for c in ids], 0)
            stack[f"{key}.lora_B"] = torch.cat([uploads[c][f"{key}.lora_B"] for c in ids], 1)
        # the uploaders merged every earlier stack this round; this round's stack is new to everyone
        for cid in uploads:
            self.merged_upto[cid] = self.first_stack + len(self.stacks)
        self.stacks.append(stack)
        done = min(self.merged_upto.values()) - self.first_stack  # stacks every client has merged
        if done > 0:
            self.stacks = self.stacks[done:]
            self.first_stack += done
