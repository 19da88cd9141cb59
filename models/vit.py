"""Small Vision Transformers for 32x32 images, built from plain torch modules (no hub, no download), with the
extractor/header split every model of the zoo exposes.

A ViT (Dosovitskiy et al. 2021) with pre-norm blocks: 4x4 patches -> linear patch embedding (a strided
convolution) -> a learned [CLS] token and position embeddings -> `depth` blocks of
x + attn(LN(x)), x + mlp(LN(x)) -> LN -> the [CLS] token -> a "pre-logits" Linear(width, rep_dim) + tanh, as the
ViT paper's representation layer. That last layer gives every width the same representation size (REP_DIM),
so the header Linear(REP_DIM, classes) has one shape across the group and the methods that share the header
(FedGH, LG-FedAvg, pFedLoRA's header-lora and representation placements) run on it.

Each linear layer of a block has its own nn.Linear and name, so LoRA can target it (models/lora.py):
blocks.<i>.attn.q / .k / .v / .o (width x width) and blocks.<i>.mlp.fc1 (width -> 4 width) / .fc2 (4 width ->
width). Attention is written with explicit matmuls (not scaled_dot_product_attention) so FlopCounterMode
counts it on every device.

Parameters (10 classes; 100 classes add 128 x 90 + 90 = 11,610 to the header) and forward FLOPs per 32x32 sample
(FlopCounterMode: matmuls and the patch convolution, 2 FLOPs per multiply-add; LayerNorm, softmax, GELU not
counted), both checked against the models and a hand formula by tests/test_vit.py:

| arch  | depth | width | heads | parameters | forward FLOPs / sample |
|-------|-------|-------|-------|------------|------------------------|
| vit1  | 8     | 256   | 8     | 6,382,218  | 854,141,440            |
| vit2  | 6     | 256   | 8     | 4,802,698  | 641,016,320            |
| vit3  | 4     | 256   | 8     | 3,223,178  | 427,891,200            |
| vit4  | 8     | 128   | 4     | 1,618,954  | 222,599,680            |
| vit5  | 4     | 128   | 4     | 825,866    | 111,710,720            |
| vits1 | 4     | 64    | 2     | 217,034    | 30,297,600             |
| vits2 | 3     | 64    | 2     | 167,050    | 22,826,240             |
| vits3 | 2     | 64    | 2     | 117,066    | 15,354,880             |
| vits4 | 4     | 32    | 1     | 60,074     | 8,760,320              |
| vits5 | 2     | 32    | 1     | 34,666     | 4,483,840              |

(For scale: CNN-1, the largest of the paper's CNNs, has 2,621,558 parameters and 9,651,600 forward FLOPs; one
ViT-1 forward costs about 88 CNN-1 forwards, so the vit-hetero group is for GPUs, and vit-small-hetero is the
group a CPU trains in minutes: benchmarks/results/vit_speed.md.)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.cnn import SplitModel

REP_DIM = 128      # the representation every ViT of the zoo ends with (pre-logits output)
PATCH = 4          # patch side: 32x32 images -> 8x8 = 64 patches (+ [CLS] = 65 tokens)
MLP_RATIO = 4

# name -> (depth, width, heads); head dimension 32 throughout. Widths 128 and 256 only, so that clients of one
# width share the shapes (and, under LoRA methods, the initialisation) of their first min(depth) blocks.
VIT_SPECS: dict[str, tuple[int, int, int]] = {
    "vit1": (8, 256, 8),
    "vit2": (6, 256, 8),
    "vit3": (4, 256, 8),
    "vit4": (8, 128, 4),
    "vit5": (4, 128, 4),
    # the small family: the CPU-sized group (vit-small-hetero) for real-data checks on a laptop
    "vits1": (4, 64, 2),
    "vits2": (3, 64, 2),
    "vits3": (2, 64, 2),
    "vits4": (4, 32, 1),
    "vits5": (2, 32, 1),
}
LORA_TARGETS = ("q", "k", "v", "o", "fc1", "fc2")  # the names of a block's linear layers


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        split = lambda z: z.reshape(n, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        out = scores.softmax(-1) @ v
        return self.o(out.transpose(1, 2).reshape(n, t, d))


class MLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, MLP_RATIO * width)
        self.fc2 = nn.Linear(MLP_RATIO * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width), Attention(width, heads)
        self.norm2, self.mlp = nn.LayerNorm(width), MLP(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTExtractor(nn.Module):
    """Images -> the [CLS] token's pre-logits representation (REP_DIM, after tanh)."""

    def __init__(self, depth: int, width: int, heads: int, in_channels: int = 3, image_size: int = 32,
                 rep_dim: int = REP_DIM):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, width, PATCH, stride=PATCH)
        tokens = (image_size // PATCH) ** 2 + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.pre_logits = nn.Linear(width, rep_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)  # (n, patches, width)
        cls = self.cls_token.expand(len(x), -1, -1)
        h = self.blocks(torch.cat([cls, patches], 1) + self.pos_embed)
        return torch.tanh(self.pre_logits(self.norm(h)[:, 0]))


class ViT(SplitModel):
    def __init__(self, arch: str, num_classes: int, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        depth, width, heads = VIT_SPECS[arch]
        self.arch = arch
        self.extractor = ViTExtractor(depth, width, heads, in_channels, image_size)
        self.header = nn.Linear(REP_DIM, num_classes)


def vit_image_size_problem(arch: str, height: int, width: int) -> str | None:
    """Why ViT `arch` cannot take height x width images (None: it can): its position embeddings are sized for
    a square image whose side is a multiple of the patch size."""
    if height != width or height % PATCH or height < PATCH:
        return f"{arch} needs square images whose side is a multiple of its {PATCH}x{PATCH} patches"
    return None


def vit_width(arch: str) -> int:
    return VIT_SPECS[arch][1]
