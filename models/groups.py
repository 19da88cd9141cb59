"""Model groups: which architecture each client gets. The paper's default gives client i CNN-((i mod 5)+1)."""
from __future__ import annotations

from models.cnn import CNN, CNN_SPECS, SplitModel
from models.vit import VIT_SPECS, ViT, vit_image_size_problem

TORCHVISION_ARCHS = ("resnet18", "resnet34", "mobilenetv2")
VIT_ARCHS = tuple(VIT_SPECS)
ARCHITECTURES = tuple(CNN_SPECS) + TORCHVISION_ARCHS + VIT_ARCHS

# group name -> (architectures assigned round-robin by client id, description)
MODEL_GROUPS: dict[str, tuple[tuple[str, ...], str]] = {
    "cnn-hetero": (tuple(CNN_SPECS), "paper default: client i gets CNN-((i mod 5)+1)"),
    "cnn1-homo": (("cnn1",), "model-homogeneous: every client gets CNN-1"),
    "cnn5-homo": (("cnn5",), "model-homogeneous: every client gets CNN-5 (small, fast)"),
    "tv-hetero": (TORCHVISION_ARCHS, "client i gets ResNet-18 / ResNet-34 / MobileNetV2 in turn (32x32 stems)"),
    "resnet18-homo": (("resnet18",), "model-homogeneous: every client gets ResNet-18 (32x32 stem)"),
    # Vision Transformers (models/vit.py): depth 8/6/4 at width 256, 8/4 at width 128; patch 4, representation 128.
    "vit-hetero": (("vit1", "vit2", "vit3", "vit4", "vit5"),
                   "client i gets ViT-((i mod 5)+1): depth 8/6/4 x width 256, depth 8/4 x width 128 (patch 4)"),
    "vit5-homo": (("vit5",), "model-homogeneous: every client gets ViT-5 (depth 4, width 128)"),
    "vit-depth-hetero": (("vit1", "vit2", "vit3"), "one width (256), depth 8/6/4: blocks 0-3 have one shape across "
                                                   "clients (pFedLoRA's block-lora placement)"),
    "vit-small-hetero": (("vits1", "vits2", "vits3", "vits4", "vits5"),
                         "CPU-sized ViTs: depth 4/3/2 x width 64, depth 4/2 x width 32 (patch 4)"),
}


def build_model(arch: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> SplitModel:
    if arch in CNN_SPECS:
        return CNN(arch, num_classes, in_channels, image_size)
    if arch in TORCHVISION_ARCHS:
        # imported here: torchvision costs ~1.5 s to import, paid by every process (each Flower ClientApp) otherwise
        from models.torchvision_models import TorchvisionModel

        return TorchvisionModel(arch, num_classes, in_channels, image_size)
    if arch in VIT_SPECS:
        return ViT(arch, num_classes, in_channels, image_size)
    raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHITECTURES)}")


def client_arch(group: str, client_id: int) -> str:
    archs = MODEL_GROUPS[group][0]
    return archs[client_id % len(archs)]


def is_homogeneous(group: str) -> bool:
    return len(MODEL_GROUPS[group][0]) == 1


# ---- which image sizes an architecture takes ----------------------------------------------------------------
# The paper's CNNs: two 5x5 convolutions, each followed by 2x2 max-pooling, flattened for a linear layer sized
# for a square input; 16x16 is the smallest input that leaves a 1x1 map. The torchvision backbones' 3x3
# stride-1 stems and adaptive pooling take any size. The ViTs need square images whose side is a multiple of their
# 4x4 patches (position embeddings are sized for that grid; other sides would drop pixels).
CNN_MIN_SIDE = 16


def image_size_problem(arch: str, height: int, width: int) -> str | None:
    """Why `arch` cannot take height x width images (None: it can)."""
    if arch in CNN_SPECS and (height != width or height < CNN_MIN_SIDE):
        return f"{arch} needs square images of at least {CNN_MIN_SIDE}x{CNN_MIN_SIDE}"
    if arch in VIT_SPECS:
        return vit_image_size_problem(arch, height, width)
    return None


def _resize_hint(arch: str) -> str:
    if arch in VIT_SPECS:
        return "or square images whose side is a multiple of 4"
    return f"or images resized to at least {CNN_MIN_SIDE}x{CNN_MIN_SIDE}"


def check_image_size(group: str, height: int, width: int, extra_archs: dict[str, str] | None = None) -> None:
    """Refuse (one line) images that a client architecture of `group`, or an extra one an algorithm builds
    (`extra_archs`: arch -> the option naming it, e.g. FedKD's "fedkd.mentee_arch"), cannot take; checked before
    any model is built."""
    from bench.errors import UserError

    size = f"the dataset's {height}x{width} images"
    for arch in dict.fromkeys(MODEL_GROUPS[group][0]):
        problem = image_size_problem(arch, height, width)
        if problem:
            fits = [g for g, (members, _) in MODEL_GROUPS.items() if all(a in TORCHVISION_ARCHS for a in members)]
            raise UserError(f"{size} do not fit model group {group!r}: {problem}; valid: a group for any size "
                            f"({', '.join(fits)}), {_resize_hint(arch)}")
    for arch, option in (extra_archs or {}).items():
        problem = image_size_problem(arch, height, width)
        if problem:
            fits = [a for a in ARCHITECTURES if not image_size_problem(a, height, width)]
            raise UserError(f"{size} do not fit {option}={arch}: {problem}; valid: {option} one of "
                            f"{', '.join(fits)}, {_resize_hint(arch)}")
