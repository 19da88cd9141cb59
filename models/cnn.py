"""The paper's five heterogeneous CNNs (SPEC section 1) and the extractor/header split every model exposes."""
from __future__ import annotations

import torch
from torch import nn

REPRESENTATION_DIM = 500  # fc2 output, the "representation" every CNN shares


class SplitModel(nn.Module):
    """A classifier split into a feature extractor (x -> representation) and a linear header."""

    extractor: nn.Module
    header: nn.Linear

    @property
    def rep_dim(self) -> int:
        return self.header.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.header(self.extractor(x))


# name -> (conv2 out channels, fc1 width); conv1 always has 16 channels, fc2 500.
CNN_SPECS: dict[str, tuple[int, int]] = {
    "cnn1": (32, 2000),
    "cnn2": (16, 2000),
    "cnn3": (32, 1000),
    "cnn4": (32, 800),
    "cnn5": (32, 500),
}


def conv_trunk(in_channels: int, conv2_channels: int) -> nn.Sequential:
    """conv5x5 -> ReLU -> maxpool2, twice, then flatten (800-d for 32x32 inputs and 32 channels)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, conv2_channels, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
    )


def trunk_out_dim(conv2_channels: int, image_size: int) -> int:
    side = ((image_size - 4) // 2 - 4) // 2
    return conv2_channels * side * side


class CNN(SplitModel):
    def __init__(self, arch: str, num_classes: int, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        conv2, fc1 = CNN_SPECS[arch]
        flat = trunk_out_dim(conv2, image_size)
        self.arch = arch
        self.extractor = nn.Sequential(
            conv_trunk(in_channels, conv2),
            nn.Linear(flat, fc1), nn.ReLU(),
            nn.Linear(fc1, REPRESENTATION_DIM), nn.ReLU(),
        )
        self.header = nn.Linear(REPRESENTATION_DIM, num_classes)
