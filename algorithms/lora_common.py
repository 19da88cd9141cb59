"""What the heterogeneous-LoRA methods (HetLoRA, FLoRA, FedSA-LoRA) share: each client's model is a base model
(a common random initialisation per architecture family, or the user's checkpoint, `model_init`) with LoRA on
the target linear layers (models/lora.py), the base frozen; the LoRA factors and the header train; the header
stays local (personalised). What travels, and how the server combines it, is each method's own.

Heterogeneous models: the server keys every LoRA layer by its name and base shape (models/lora.layer_key), so
a layer is federated among the clients whose architecture has a layer of that name and shape: with the
vit-hetero group, block i's q of the width-256 clients (ViT-1/2/3, blocks 0-3 shared by three clients, 4-5 by
two, 6-7 by ViT-1 alone) and of the width-128 ones (ViT-4/5, blocks 0-3) are separate layers. Clients of one
width share the initial weights of those blocks (the common initialisation is seeded by the width), so the
factors they exchange adapt the same frozen weights, as in the methods' papers.

Server hooks never read client.state (under Flower the server holds none): a client's layer keys come from its
architecture (`server_keys`, noted when the layers are checked), and what else the server needs (HetLoRA's
current ranks) it keeps itself, learnt from the uploads.
"""
from __future__ import annotations

import torch

from algorithms.base import Algorithm
from bench.errors import UserError
from models.groups import MODEL_GROUPS, build_model
from models.lora import LoRALinear, add_lora, freeze_all_but_lora, layer_key, lora_layers, shared_init_seed
from models.vit import VIT_SPECS

def spread_rank(level: int, levels: int, min_rank: int, max_rank: int) -> int:
    """The rank of the level-th of `levels` architectures: max_rank for the first, evenly down to min_rank for
    the last (one architecture: max_rank)."""
    if levels == 1:
        return max_rank
    return max_rank - round((max_rank - min_rank) * level / (levels - 1))


def arch_rank(group: str, arch: str, min_rank: int, max_rank: int) -> int:
    """A client's rank follows its architecture (a device's capability): the group's architectures in order get
    ranks spread from max_rank to min_rank (vit-hetero: ViT-1 16, ..., ViT-5 4). Tied to the architecture, not the
    client id, so that every computation of one architecture has one cost (the harness counts FLOPs per
    architecture and batch shape)."""
    archs = list(dict.fromkeys(MODEL_GROUPS[group][0]))
    return spread_rank(archs.index(arch), len(archs), min_rank, max_rank)


def init_family(arch: str) -> str:
    """Architectures that share initial weights layer by layer: ViTs of one width (their blocks are drawn in the
    same order), every other architecture on its own."""
    return f"vit-width{VIT_SPECS[arch][1]}" if arch in VIT_SPECS else arch


def check_common(algo: str, targets: str, scaling: float, dropout: float) -> None:
    if not targets.strip():
        raise UserError(f"{algo}.targets is empty; valid: comma-separated linear layer names, e.g. q,v")
    if scaling <= 0:
        raise UserError(f"{algo}.scaling must be > 0 (alpha / r), got {scaling}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"{algo}.dropout must be in [0, 1), got {dropout}")


class LoRAMethod(Algorithm):
    """The client side shared by the LoRA methods. Subclasses give `client_rank` and the hooks that move
    factors. hp must have: targets (str), scaling (alpha / r), dropout, train_base (bool)."""

    server_flops_by_upload_shapes = True
    checkpoint_exclude = ("layer_shapes", "arch_keys")  # rebuilt identically by __init__

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        self.check_layers()

    # ---- the client's model ----------------------------------------------------------------------------
    def client_rank(self, client_id: int) -> int:
        raise NotImplementedError

    def check_layers(self) -> None:
        """Build every (architecture, rank) of the run on the meta device (no memory, no RNG) so that a target
        matching nothing or a rank larger than a layer is one clear error before anything runs; note each
        federated layer's key -> (out, in, the largest rank among the clients that have it), and each
        architecture's keys (a layer's key is its name and base shape: the same at every rank)."""
        self.layer_shapes: dict[str, tuple[int, int, int]] = {}
        self.arch_keys: dict[str, list[str]] = {}
        seen = set()
        for cid, arch in enumerate(self.ctx.client_archs):
            rank = self.client_rank(cid)
            if (arch, rank) in seen:
                continue
            seen.add((arch, rank))
            with torch.device("meta"):
                model = build_model(arch, self.ctx.num_classes, self.ctx.in_channels, self.ctx.image_size)
                add_lora(model, self.hp.targets, rank, self.hp.scaling * rank, what=arch,
                         where=f"{self.name}.{self.rank_option()} (client {cid}, {arch})")
            self.arch_keys[arch] = [layer_key(name, layer) for name, layer in lora_layers(model).items()]
            for name, layer in lora_layers(model).items():
                key = layer_key(name, layer)
                known = self.layer_shapes.get(key, (0, 0, 0))[2]
                self.layer_shapes[key] = (layer.base.out_features, layer.base.in_features, max(known, rank))

    def rank_option(self) -> str:
        """The option(s) that set the ranks, for error messages."""
        return "rank"

    def base_model(self, arch: str, rank: int):
        """The client's model: the base (common initialisation of its family, or the user's checkpoint) with
        LoRA on the targets, drawn from a generator of its own (the global RNG stream is untouched)."""
        family_seed = shared_init_seed(self.ctx.seed, init_family(arch))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(family_seed)
            model = build_model(arch, self.ctx.num_classes, self.ctx.in_channels, self.ctx.image_size)
            init = getattr(self.ctx.cfg, "model_init", None)
            if init:
                from models.pretrained import load_model_init

                load_model_init(model, init, arch)
            add_lora(model, self.hp.targets, rank, self.hp.scaling * rank, self.hp.dropout)
        model = model.to(self.ctx.device)
        self.freeze(model)
        return model

    def freeze(self, model) -> None:
        """Train LoRA factors and the header; the base too when train_base (an ablation: not the papers')."""
        if self.hp.train_base:
            model.requires_grad_(True)
        else:
            freeze_all_but_lora(model, also=[model.header])

    def init_client(self, client) -> None:
        client.state["model"] = self.base_model(client.arch, self.client_rank(client.id))

    def layers(self, client) -> dict[str, LoRALinear]:
        return lora_layers(client.state["model"])

    def keyed_layers(self, client) -> dict[str, LoRALinear]:
        """The client's LoRA layers under the server's keys (name@out x in)."""
        return {layer_key(name, layer): layer for name, layer in self.layers(client).items()}

    def server_keys(self, client) -> list[str]:
        """The server's keys of the client's LoRA layers, from its architecture alone (server side: no
        client.state), in the order of keyed_layers."""
        return self.arch_keys[client.arch]

    def predict(self, client, x):
        return client.state["model"](x)


def factors_payload(layers: dict[str, LoRALinear], parts: str = "AB", rank: int | None = None) -> dict:
    """The LoRA factors of the keyed layers as a payload: "<key>.lora_A" (r x in) and/or "<key>.lora_B"
    (out x r), restricted to the leading `rank` ranks (default: each layer's own)."""
    out = {}
    for key, layer in layers.items():
        r = layer.rank if rank is None else rank
        if "A" in parts:
            out[f"{key}.lora_A"] = layer.lora_A[:r].detach()
        if "B" in parts:
            out[f"{key}.lora_B"] = layer.lora_B[:, :r].detach()
    return out


@torch.no_grad()
def load_factors(layers: dict[str, LoRALinear], payload: dict) -> None:
    """Copy the payload's factors into the leading ranks of each keyed layer (the layers it has entries for)."""
    for key, layer in layers.items():
        if f"{key}.lora_A" in payload:
            a = payload[f"{key}.lora_A"]
            layer.lora_A[:a.shape[0]].copy_(a)
        if f"{key}.lora_B" in payload:
            b = payload[f"{key}.lora_B"]
            layer.lora_B[:, :b.shape[1]].copy_(b)


def uploaders_of(uploads: dict[int, dict], entry: str) -> list[int]:
    """The client ids whose upload holds `entry`, in id order."""
    return sorted(cid for cid, payload in uploads.items() if entry in payload)


def server_factors(layers_by_key: dict[str, tuple[int, int, int]], generator: torch.Generator,
                   device: torch.device, parts: str = "AB") -> dict[str, torch.Tensor]:
    """A server's initial global factors for each key -> (out, in, rank): A Kaiming-uniform as LoRA's, B zero."""
    out = {}
    for key, (fan_out, fan_in, rank) in layers_by_key.items():
        if "A" in parts:
            a = torch.empty(rank, fan_in)
            torch.nn.init.kaiming_uniform_(a, a=5 ** 0.5, generator=generator)
            out[f"{key}.lora_A"] = a.to(device)
        if "B" in parts:
            out[f"{key}.lora_B"] = torch.zeros(fan_out, rank, device=device)
    return out


class ArchRankedLoRAMethod(LoRAMethod):
    """A LoRA method whose clients' ranks follow their architecture, spread over min_rank..max_rank (HetLoRA,
    FLoRA): ranks keyed by architecture keep the FLOP cache, which is keyed by architecture, exact."""

    def client_rank(self, client_id: int) -> int:
        return arch_rank(self.ctx.cfg.model_group, self.ctx.client_archs[client_id], self.hp.min_rank,
                         self.hp.max_rank)

    def rank_option(self) -> str:
        return "min_rank..max_rank"
