"""Cost accounting inside the simulator: FLOPs of the operations really executed, bytes of the payloads
really exchanged. Algorithms never report their own costs."""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import torch
from torch.utils.flop_counter import FlopCounterMode

Payload = dict[str, torch.Tensor]

# Extra aten op -> flop formula entries (e.g. SVD for FedKD), passed to every FlopCounterMode.
EXTRA_FLOP_FORMULAS: dict[Any, Callable[..., int]] = {}

FLOP_KINDS = ("train", "eval", "server")


def payload_bytes(payload: Mapping[str, torch.Tensor]) -> int:
    """Bytes on the wire: numel * element size of every tensor, at the dtype sent. Key names are
    metadata and cost nothing (like the parameter names of a state dict)."""
    return sum(t.numel() * t.element_size() for t in payload.values())


def transmit(payload: Mapping[str, torch.Tensor], device: torch.device) -> tuple[Payload, int]:
    """Simulate sending a payload: a detached copy on the receiver's device, and its size in bytes.
    Copying means the receiver can never alias the sender's tensors."""
    if not isinstance(payload, Mapping):
        raise TypeError(f"a payload must be a dict of tensors, got {type(payload).__name__}")
    sent: Payload = {}
    for name, tensor in payload.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"payload entry {name!r} is {type(tensor).__name__}, not a tensor")
        sent[name] = tensor.detach().to(device, copy=True)
    return sent, payload_bytes(sent)


class FlopAccountant:
    """Counts FLOPs with torch's FlopCounterMode.

    Counting every step is slow, so a step whose computation is identified by `key` (e.g. algorithm,
    phase, architecture, batch size, frozen set) is counted once and the cached figure is added for
    later steps with the same key. `cache=False` counts every step (the reference the tests compare to).
    """

    def __init__(self, cache: bool = True):
        self.cache_enabled = cache
        self._cache: dict[tuple, int] = {}
        self.totals: dict[str, int] = defaultdict(int)
        self.by_client: dict[int, int] = defaultdict(int)  # training FLOPs per client id

    @contextmanager
    def count(self, kind: str, key: tuple | None = None, client_id: int | None = None) -> Iterator[None]:
        if kind not in FLOP_KINDS:
            raise ValueError(f"unknown FLOP kind {kind!r}; valid: {', '.join(FLOP_KINDS)}")
        key = None if key is None else (kind, *key)
        cached = self._cache.get(key) if (self.cache_enabled and key is not None) else None
        if cached is not None:
            yield
            flops = cached
        else:
            with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as mode:
                yield
            flops = mode.get_total_flops()
            if self.cache_enabled and key is not None:
                self._cache[key] = flops
        self.totals[kind] += flops
        if client_id is not None and kind == "train":
            self.by_client[client_id] += flops

    def snapshot(self) -> dict[str, int]:
        return {kind: self.totals[kind] for kind in FLOP_KINDS}
