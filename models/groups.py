"""Model groups: which architecture each client gets. The paper's default gives client i CNN-((i mod 5)+1)."""
from __future__ import annotations

from models.cnn import CNN, CNN_SPECS, SplitModel
from models.torchvision_models import TorchvisionModel

TORCHVISION_ARCHS = ("resnet18", "resnet34", "mobilenetv2")
ARCHITECTURES = tuple(CNN_SPECS) + TORCHVISION_ARCHS

# group name -> (architectures assigned round-robin by client id, description)
MODEL_GROUPS: dict[str, tuple[tuple[str, ...], str]] = {
    "cnn-hetero": (tuple(CNN_SPECS), "paper default: client i gets CNN-((i mod 5)+1)"),
    "cnn1-homo": (("cnn1",), "model-homogeneous: every client gets CNN-1"),
    "cnn5-homo": (("cnn5",), "model-homogeneous: every client gets CNN-5 (small, fast)"),
    "tv-hetero": (TORCHVISION_ARCHS, "client i gets ResNet-18 / ResNet-34 / MobileNetV2 in turn (32x32 stems)"),
    "resnet18-homo": (("resnet18",), "model-homogeneous: every client gets ResNet-18 (32x32 stem)"),
}


def build_model(arch: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> SplitModel:
    if arch in CNN_SPECS:
        return CNN(arch, num_classes, in_channels, image_size)
    if arch in TORCHVISION_ARCHS:
        return TorchvisionModel(arch, num_classes, in_channels, image_size)
    raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHITECTURES)}")


def client_arch(group: str, client_id: int) -> str:
    archs = MODEL_GROUPS[group][0]
    return archs[client_id % len(archs)]


def is_homogeneous(group: str) -> bool:
    return len(MODEL_GROUPS[group][0]) == 1
