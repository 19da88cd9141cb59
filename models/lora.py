"""LoRA (Hu et al. 2022) on chosen nn.Linear layers of any model: y = W x + b + (alpha / r) B A dropout(x), with
A (r x in) Kaiming-uniform and B (out x r) zero at initialisation (so a wrapped model starts equal to its base),
merge (W += (alpha/r) B A) and unmerge.

Why our own module and not PEFT: PEFT (0.21) installs transformers, accelerate and huggingface_hub with it, a
large download for a harness that must not touch a hub; and the heterogeneous-LoRA methods need what PEFT does not
give directly: HetLoRA prunes a client's rank in place (here `rank`, the number of leading rows of A / columns of
B in use, which keeps parameter shapes, and so checkpoints, fixed), FLoRA merges a stack of other clients'
factors into the base weight every round. A plain module of ~100 lines is exactly countable by FlopCounterMode
(two extra matmuls per wrapped layer: 2 n r (in + out) FLOPs forward) and its parameters are ordinary entries
of the module's state_dict, which bench/checkpoint.py saves like any other.

Targets are named like PEFT's target_modules: a target matches every nn.Linear whose name is the target or
ends with "." + target (e.g. "q" matches "extractor.blocks.3.attn.q").
"""
from __future__ import annotations

import math
import zlib
from typing import Iterable, Sequence

import torch
from torch import nn

from bench.errors import UserError


class LoRALinear(nn.Module):
    """A frozen-or-not base nn.Linear plus a rank-r low-rank update. `rank` <= the stored factors' rank: the
    leading `rank` rows of A and columns of B are in use (HetLoRA's pruning lowers it; the rest stays zero)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.alpha = float(alpha)
        self.rank = rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora(generator)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        """A: Kaiming-uniform (a = sqrt(5), nn.Linear's and LoRA's init), B: zero."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
            self.lora_B.zero_()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) restricted to the ranks in use."""
        return self.lora_A[:self.rank], self.lora_B[:, :self.rank]

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return (b @ a) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged or self.rank == 0:
            return out
        a, b = self.factors()
        return out + (self.dropout(x) @ a.T @ b.T) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (inference without the extra matmuls)."""
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """"q,v" or ["q", "v"] -> ("q", "v")."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    return tuple(t.strip() for t in items if t.strip())


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def find_targets(model: nn.Module, targets: str | Sequence[str], what: str = "the model") -> list[str]:
    """The names of the nn.Linear layers the targets match (in module order); a target that matches nothing
    is a UserError naming the layer names that exist."""
    wanted = parse_targets(targets)
    names = linear_names(model)
    if not wanted:
        raise UserError(f"LoRA targets are empty; valid: names of linear layers of {what}, e.g. q,v")
    hits = []
    for target in wanted:
        matched = [n for n in names if n == target or n.endswith("." + target)]
        if not matched:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise UserError(f"LoRA target {target!r} matches no linear layer of {what}; valid: "
                            f"{', '.join(leaves)} (or a dotted suffix of a layer name)"
                            + ("; the default targets are the ViTs' attention layers: use a ViT model group, e.g. "
                               "--model-group vit-small-hetero" if not what.startswith("vit") else ""))
        hits += matched
    return [n for n in names if n in set(hits)]


def check_rank(rank: int, base: nn.Linear, name: str, where: str) -> None:
    """A LoRA rank must be between 1 and min(in, out) of the layer it adapts."""
    limit = min(base.in_features, base.out_features)
    if not 1 <= rank <= limit:
        raise UserError(f"{where}: LoRA rank {rank} does not fit layer {name} ({base.out_features}x"
                        f"{base.in_features}); valid: ranks 1..{limit}")


def add_lora(model: nn.Module, targets: str | Sequence[str], rank: int, alpha: float, dropout: float = 0.0,
             generator: torch.Generator | None = None, what: str = "the model", where: str = "lora") -> list[str]:
    """Wrap the target layers of `model` in LoRALinear, in place; return their names."""
    names = find_targets(model, targets, what)
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, leaf)
        check_rank(rank, base, name, where)
        setattr(parent, leaf, LoRALinear(base, rank, alpha, dropout, generator))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def freeze_all_but_lora(model: nn.Module, also: Iterable[nn.Module] = ()) -> None:
    """Only LoRA factors (and the modules in `also`, e.g. the header) train; the base is frozen."""
    model.requires_grad_(False)
    for layer in lora_layers(model).values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    for module in also:
        module.requires_grad_(True)


def layer_key(name: str, layer: LoRALinear) -> str:
    """The server's key for a layer: its name and base shape. Clients whose layer of that name has the same
    shape share it (e.g. block 2 of every width-256 ViT); other shapes are other layers."""
    return f"{name}@{layer.base.out_features}x{layer.base.in_features}"


def lora_flops_per_token(in_features: int, out_features: int, rank: int) -> tuple[int, int]:
    """(forward, backward) FLOPs per token of a LoRA-wrapped layer whose base is frozen and whose input needs no
    gradient: forward W x, A x, B (A x); backward dB, d(Ax), dA (2 FLOPs per multiply-add)."""
    forward = 2 * (in_features * out_features + rank * in_features + out_features * rank)
    backward = 2 * (2 * out_features * rank + rank * in_features)
    return forward, backward


def shared_init_seed(seed: int, family: str) -> int:
    """The seed of a 'common random initialisation': the same for every client whose architecture belongs to
    `family` in a run with seed `seed` (independent of the global RNG stream)."""
    return (seed * 1_000_003 + zlib.crc32(family.encode())) % (2 ** 63)
