"""pFedLoRA's small homogeneous adapter G(theta) in its three placements (SPEC section 2).

- "model" (default): conv part of CNN-5 -> A (800->r, bias) -> B (r->classes, bias); its logits are
  added to the private model's logits: F_k(x) + G(x).
- "representation": same trunk, B maps r->rep_dim and is added to F_k's representation before F_k's header.
- "header-lora": LoRA on the header: y = W3 h + b3 + B A h with A: rep_dim->r, B: r->classes (no biases).
B starts at zero in every placement, so F_k + G starts equal to F_k.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from models.cnn import CNN_SPECS, SplitModel, conv_trunk, trunk_out_dim

PLACEMENTS = ("model", "representation", "header-lora")
A_INITS = ("kaiming", "gaussian")


class LoRAAdapter(nn.Module):
    def __init__(self, placement: str, num_classes: int, rank: int = 64, *, rep_dim: int = 500,
                 in_channels: int = 3, image_size: int = 32, a_init: str = "kaiming"):
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown adapter placement {placement!r}; valid: {', '.join(PLACEMENTS)}")
        self.placement = placement
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


def personalised_logits(model: SplitModel, adapter: LoRAAdapter, x: torch.Tensor) -> torch.Tensor:
    """The pFedLoRA prediction F_k (+) G for the adapter's placement."""
    if adapter.placement == "model":
        return model(x) + adapter(x)
    if adapter.placement == "representation":
        return model.header(model.extractor(x) + adapter(x))
    h = model.extractor(x)
    return model.header(h) + adapter(h)


def local_and_personalised_logits(model: SplitModel, adapter: LoRAAdapter,
                                  x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(F_k(x), F_k (+) G) with F_k's extractor run once (pFedLoRA's phase1_mix needs both)."""
    if adapter.placement == "model":
        local = model(x)
        return local, local + adapter(x)
    h = model.extractor(x)
    local = model.header(h)
    if adapter.placement == "representation":
        return local, model.header(h + adapter(x))
    return local, local + adapter(h)
