"""pFedLoRA's small homogeneous adapter G(theta) in its three placements (SPEC section 2).

- "model" (default): conv part of CNN-5 -> A (800->r, bias) -> B (r->classes, bias); its logits are
  added to the private model's logits: F_k(x) + G(x).
- "representation": same trunk, B maps r->rep_dim and is added to F_k's representation before F_k's header.
- "header-lora": LoRA on the header: y = W3 h + b3 + B A h with A: rep_dim->r, B: r->classes (no biases).
- "block-lora" (transformer groups): true LoRA inside F_k, on the attention query and value (q, v) of every block
  that all clients' models have at one shape: each such layer computes W x + b + 2 B_l A_l x (scaling
  alpha / r = 2, as the LoRA methods here), with A_l: in->r, B_l: r->out; G is the set of (A_l, B_l).
  Which layers: those whose name and shape every client architecture shares, e.g. blocks 0-3 for vit-depth-hetero
  (width 256, depth 8/6/4) and every block for vit5-homo. Groups whose widths differ (vit-hetero,
  vit-small-hetero) share no block layer of one shape: there pFedLoRA federates the model-level adapter, the
  representation or the header (header-lora), which have one shape whatever the depth and width.
B starts at zero in every placement, so F_k + G starts equal to F_k.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from models.cnn import CNN_SPECS, SplitModel, conv_trunk, trunk_out_dim

PLACEMENTS = ("model", "representation", "header-lora", "block-lora")
BLOCK_LORA_TARGETS = ("q", "v")
BLOCK_LORA_SCALING = 2.0
A_INITS = ("kaiming", "gaussian")


class LoRAAdapter(nn.Module):
    def __init__(self, placement: str, num_classes: int, rank: int = 64, *, rep_dim: int = 500,
                 in_channels: int = 3, image_size: int = 32, a_init: str = "kaiming",
                 layers: dict[str, tuple[int, int]] | None = None):
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown adapter placement {placement!r}; valid: {', '.join(PLACEMENTS)}")
        self.placement = placement
        if placement == "block-lora":
            self.init_block_lora(layers or {}, rank, a_init)
            return
        if placement == "header-lora":
            self.trunk = nn.Identity()
            self.A = nn.Linear(rep_dim, rank, bias=False)
            self.B = nn.Linear(rank, num_classes, bias=False)
        else:
            conv2 = CNN_SPECS["cnn5"][0]
            self.trunk = conv_trunk(in_channels, conv2)
            out_dim = num_classes if placement == "model" else rep_dim
            self.A = nn.Linear(trunk_out_dim(conv2, image_size), rank)
            self.B = nn.Linear(rank, out_dim)
        if a_init == "gaussian":
            nn.init.normal_(self.A.weight, std=1.0 / math.sqrt(rank))
        elif a_init != "kaiming":  # kaiming-uniform is nn.Linear's own default init, as in LoRA
            raise ValueError(f"unknown a_init {a_init!r}; valid: {', '.join(A_INITS)}")
        nn.init.zeros_(self.B.weight)
        if self.B.bias is not None:
            nn.init.zeros_(self.B.bias)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Images for "model"/"representation"; the representation h for "header-lora"."""
        return self.B(self.A(self.trunk(inputs)))

    # ---- block-lora: factors for named layers of F_k ------------------------------------------------------
    def init_block_lora(self, layers: dict[str, tuple[int, int]], rank: int, a_init: str) -> None:
        """One (A, B) per layer name -> (out, in); A as nn.Linear's default init (or Gaussian), B zero."""
        if not layers:
            raise ValueError("placement block-lora needs the layers to adapt")
        self.layer_names = list(layers)
        self.A, self.B = nn.ParameterList(), nn.ParameterList()
        for fan_out, fan_in in layers.values():
            a = nn.Parameter(torch.empty(rank, fan_in))
            if a_init == "gaussian":
                nn.init.normal_(a, std=1.0 / math.sqrt(rank))
            elif a_init == "kaiming":
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            else:
                raise ValueError(f"unknown a_init {a_init!r}; valid: {', '.join(A_INITS)}")
            self.A.append(a)
            self.B.append(nn.Parameter(torch.zeros(fan_out, rank)))

    @contextmanager
    def applied_to(self, model: nn.Module):
        """Within the block, each adapted layer of `model` outputs W x + b + s B A x (forward hooks)."""
        handles = []
        for name, a, b in zip(self.layer_names, self.A, self.B):
            def hook(module, args, out, a=a, b=b):
                return out + (args[0] @ a.T @ b.T) * BLOCK_LORA_SCALING
            handles.append(model.get_submodule(name).register_forward_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def block_lora_layers(models: list[nn.Module], group: str, rank: int) -> dict[str, tuple[int, int]]:
    """The block-lora layers of a group: the q and v linear layers whose name and (out, in) shape every one of
    `models` (one per client architecture) has. None in common, or a rank above a layer's dimensions, is a
    UserError naming what is valid."""
    from bench.errors import UserError

    def candidates(model: nn.Module) -> dict[str, tuple[int, int]]:
        return {name: (m.out_features, m.in_features) for name, m in model.named_modules()
                if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in BLOCK_LORA_TARGETS
                and ".blocks." in f".{name}"}

    shared = candidates(models[0])
    for model in models[1:]:
        theirs = candidates(model)
        shared = {k: v for k, v in shared.items() if theirs.get(k) == v}
    if not shared:
        others = ", ".join(p for p in PLACEMENTS if p != "block-lora")
        raise UserError(f"pfedlora.placement=block-lora needs transformer blocks of one shape in every client's "
                        f"model; model group {group!r} has none; valid: placement one of {others}, or a "
                        f"group of one width (vit5-homo, vit-depth-hetero)")
    limit = min(min(shape) for shape in shared.values())
    if rank > limit:
        raise UserError(f"pfedlora.rank={rank} does not fit the block-lora layers of {group!r} (the smallest is "
                        f"{limit} wide); valid: rank 1..{limit}")
    return shared


def personalised_logits(model: SplitModel, adapter: LoRAAdapter, x: torch.Tensor) -> torch.Tensor:
    """The pFedLoRA prediction F_k (+) G for the adapter's placement."""
    if adapter.placement == "block-lora":
        with adapter.applied_to(model):
            return model(x)
    if adapter.placement == "model":
        return model(x) + adapter(x)
    if adapter.placement == "representation":
        return model.header(model.extractor(x) + adapter(x))
    h = model.extractor(x)
    return model.header(h) + adapter(h)


def local_and_personalised_logits(model: SplitModel, adapter: LoRAAdapter,
                                  x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(F_k(x), F_k (+) G) with F_k's extractor run once (pFedLoRA's phase1_mix needs both)."""
    if adapter.placement == "block-lora":  # G acts inside the extractor: two passes
        return model(x), personalised_logits(model, adapter, x)
    if adapter.placement == "model":
        local = model(x)
        return local, local + adapter(x)
    h = model.extractor(x)
    local = model.header(h)
    if adapter.placement == "representation":
        return local, model.header(h + adapter(x))
    return local, local + adapter(h)
