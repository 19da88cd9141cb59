"""The whole dataset on the run's device, so a batch is an index gather rather than a DataLoader trip.

Images stay uint8 (a quarter of the memory of float32; CIFAR-10 is about 180 MB); augmentation works on
uint8 batches with one gather, and only then are they converted and normalised. No host syncs happen in
the batch loops, so the GPU never waits for Python.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from bench.errors import UserError
from data.sources import ArrayDataset

PAD = 4  # random crop with padding 4 (SPEC section 1)


class DeviceData:
    """Whole dataset on the run's device as uint8 NCHW tensors; batches are index gathers, augmentation and normalisation batched on the device."""

    def __init__(self, ds: ArrayDataset, device: torch.device, *, augment: bool = True):
        self.device = torch.device(device)
        self.augment = augment
        self.num_classes = ds.num_classes
        self.classes = list(ds.classes)
        self.split = ds.split  # which train/test split the arrays are (data/sources.py SPLITS)
        to_nchw = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(self.device)  # noqa: E731
        self.x_train, self.x_test = to_nchw(ds.x_train), to_nchw(ds.x_test)
        self.y_train = torch.from_numpy(ds.y_train).to(self.device, torch.int64)
        self.y_test = torch.from_numpy(ds.y_test).to(self.device, torch.int64)
        # Fold the 0-255 scale into the statistics: x_norm = x * scale + shift.
        mean = torch.tensor(ds.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(ds.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._scale, self._shift = 1 / (255 * std), -mean / std
        # Layout of the float batches: channels_last when the run's convolutions use it (bench/context.py).
        self.memory_format = torch.contiguous_format

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def set_memory_format(self, memory_format: torch.memory_format) -> None:
        """The layout of the batches from now on (a method, so that wrappers of this object pass it on)."""
        self.memory_format = memory_format

    def normalise(self, x_uint8: Tensor) -> Tensor:
        """uint8 NCHW -> float32, standardised per channel, in self.memory_format."""
        return torch.addcmul(self._shift, x_uint8.float(), self._scale).contiguous(memory_format=self.memory_format)

    def train_batches(self, idx: Tensor, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch over the train-array indices `idx` in random order; the last batch may be smaller."""
        _check_batch_size(batch_size)
        idx = idx.to(self.device)
        order = idx[torch.randperm(idx.numel(), generator=generator, device=self.device)]
        for start in range(0, order.numel(), batch_size):
            batch = order[start : start + batch_size]
            x = self.x_train[batch]
            if self.augment:
                x = self.crop_and_flip(x, generator)
            yield self.normalise(x), self.y_train[batch]

    def eval_batches(self, split: str, idx: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches of `idx` in the given order, unaugmented. "train"/"val" index the train arrays, "test" the test arrays."""
        _check_batch_size(batch_size)
        if split in ("train", "val"):
            xs, ys = self.x_train, self.y_train
        elif split == "test":
            xs, ys = self.x_test, self.y_test
        else:
            raise UserError(f"unknown split {split!r}; valid: train, val, test")
        idx = idx.to(self.device)
        for start in range(0, idx.numel(), batch_size):
            batch = idx[start : start + batch_size]
            yield self.normalise(xs[batch]), ys[batch]

    def crop_and_flip(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Random crop (zero padding PAD) and horizontal flip (p = 0.5) of a uint8 NCHW batch, in one gather."""
        n, c, h, w = x.shape
        padded = torch.nn.functional.pad(x, (PAD, PAD, PAD, PAD))
        dy = torch.randint(0, 2 * PAD + 1, (n, 1), generator=generator, device=x.device)
        dx = torch.randint(0, 2 * PAD + 1, (n, 1), generator=generator, device=x.device)
        flip = torch.rand((n, 1), generator=generator, device=x.device) < 0.5
        cols = torch.arange(w, device=x.device)
        cols = torch.where(flip, w - 1 - cols, cols) + dx  # (n, w); flipping = reading columns backwards
        rows = dy + torch.arange(h, device=x.device)  # (n, h)
        # one gather over each padded image flattened to rows * width + col (4x faster than advanced indexing
        # with four broadcast index tensors on CPU; the same draws and bitwise the same batch)
        flat = (rows.unsqueeze(2) * (w + 2 * PAD) + cols.unsqueeze(1)).view(n, 1, h * w).expand(n, c, h * w)
        return padded.view(n, c, -1).gather(2, flat).view(n, c, h, w)


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise UserError(f"batch_size is {batch_size}; it must be at least 1")
