"""Larger torchvision backbones adapted to 32x32 inputs, with the same extractor/header split."""
from __future__ import annotations

import torch
from torch import nn
import torchvision

from models.cnn import SplitModel


class TorchvisionModel(SplitModel):
    """ResNet-18/34 or MobileNetV2 from torchvision (random init), stem adapted to small images."""

    def __init__(self, arch: str, num_classes: int, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        self.arch = arch
        if arch in ("resnet18", "resnet34"):
            net = getattr(torchvision.models, arch)(weights=None)
            # 32x32 inputs: a 3x3 stride-1 stem and no max-pool keep enough spatial resolution.
            net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
            rep_dim = net.fc.in_features
            net.fc = nn.Identity()
        elif arch == "mobilenetv2":
            net = torchvision.models.mobilenet_v2(weights=None)
            first = net.features[0][0]
            net.features[0][0] = nn.Conv2d(in_channels, first.out_channels, 3, 1, 1, bias=False)
            rep_dim = net.classifier[-1].in_features
            net.classifier = nn.Identity()
        else:
            raise ValueError(f"unknown torchvision architecture {arch!r}")
        self.extractor = net
        self.header = nn.Linear(rep_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.header(self.extractor(x))
