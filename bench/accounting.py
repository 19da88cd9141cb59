"""Cost accounting inside the simulator: FLOPs of the operations really executed, bytes of the payloads
really exchanged. Algorithms never report their own costs."""
from __future__ import annotations

import threading
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


def upload_signature(uploads: Mapping[int, Mapping[str, torch.Tensor]]) -> tuple:
    """The names, shapes and dtypes of a round's uploads, in client order (not their ids): the FLOP-cache key
    of an aggregate() whose counted FLOPs depend on nothing else (Algorithm.server_flops_by_upload_shapes)."""
    return tuple(tuple((name, tuple(t.shape), str(t.dtype)) for name, t in payload.items())
                 for payload in uploads.values())


class FlopAccountant:
    """Counts FLOPs with torch's FlopCounterMode.

    Counting every step is slow, so a step whose computation is identified by `key` (e.g. algorithm,
    phase, architecture, batch size, frozen set) is counted once and the cached figure is added for
    later steps with the same key. `cache=False` counts every step (the reference the tests compare to).

    When a key ends with an int, that int is taken as the batch size (the simulator's and the algorithms'
    keys end with len(y)). The FLOPs FlopCounterMode counts (matmuls, convolutions; element-wise ops are
    free) are affine in the batch size for a step whose per-sample work does not depend on the other
    samples, so for each group (the key without its batch size) the accountant fits
    flops = slope * size + intercept from the first two measured sizes, checks it against a third, and
    from then on fills every new size from the line (exact integers). A group that fails the check keeps
    counting each new size. Without this, every client's smaller last batch and every new evaluation-set
    size would be counted again, which at N=100 clients costs a large share of the early rounds.
    """

    def __init__(self, cache: bool = True):
        self.cache_enabled = cache
        self._cache: dict[tuple, int] = {}
        self.totals: dict[str, int] = defaultdict(int)
        self.by_client: dict[int, int] = defaultdict(int)  # training FLOPs per client id
        self._measured: dict[tuple, dict[int, int]] = defaultdict(dict)  # group -> {batch size: flops}
        self._lines: dict[tuple, tuple[int, int]] = {}                   # group -> (slope, intercept), verified
        self._rejected: set[tuple] = set()                               # groups that are not affine
        self.predicted = 0  # keys filled from a fitted line instead of counted (for tests and reports)
        self._lock = threading.Lock()  # clients may run in parallel threads (FlopCounterMode is per thread)

    @contextmanager
    def count(self, kind: str, key: tuple | None = None, client_id: int | None = None) -> Iterator[None]:
        if kind not in FLOP_KINDS:
            raise ValueError(f"unknown FLOP kind {kind!r}; valid: {', '.join(FLOP_KINDS)}")
        key = None if key is None else (kind, *key)
        with self._lock:
            cached = self._lookup(key)
        if cached is not None:
            yield
            flops = cached
        else:
            with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as mode:
                yield
            flops = mode.get_total_flops()
        with self._lock:
            if cached is None and self.cache_enabled and key is not None and key not in self._cache:
                self._cache[key] = flops
                if _batch_size(key) is not None:
                    self._fit(key[:-1], key[-1], flops)
            self.totals[kind] += flops
            if client_id is not None and kind == "train":
                self.by_client[client_id] += flops

    def _lookup(self, key: tuple | None) -> int | None:
        """The cached FLOPs of a full key, filling a new batch size from its group's line; None: count it."""
        if not self.cache_enabled or key is None:
            return None
        cached = self._cache.get(key)
        if cached is None and _batch_size(key) is not None and key[:-1] in self._lines:
            slope, intercept = self._lines[key[:-1]]
            cached = self._cache[key] = slope * key[-1] + intercept
            self.predicted += 1
        return cached

    def _fit(self, group: tuple, size: int, flops: int) -> None:
        """Fit flops = slope * size + intercept from two measured sizes; use it once a third agrees."""
        points = self._measured[group]
        points[size] = flops
        if group in self._lines or group in self._rejected or len(points) < 3:
            return
        (b1, f1), (b2, f2), *rest = sorted(points.items())
        if (f2 - f1) % (b2 - b1):
            self._rejected.add(group)
            return
        slope = (f2 - f1) // (b2 - b1)
        intercept = f1 - slope * b1
        if all(slope * b + intercept == f for b, f in rest):
            self._lines[group] = (slope, intercept)
        else:
            self._rejected.add(group)

    def cache_state(self) -> dict[tuple, int]:
        """The per-key cache, for checkpoints."""
        return dict(self._cache)

    def load_cache(self, cache: dict[tuple, int]) -> None:
        """Restore a checkpointed cache and refit the lines from it (every entry is exact: counted, or
        filled from a line that agreed with a third count)."""
        self._cache = {}
        self._measured.clear()
        self._lines.clear()
        self._rejected.clear()
        for key, flops in cache.items():
            key = tuple(key)
            self._cache[key] = flops
            if _batch_size(key) is not None:
                self._fit(key[:-1], key[-1], flops)

    def is_cached(self, kind: str, key: tuple) -> bool:
        """True when a step with this key will add a cached (or line-filled) figure without counting."""
        full = (kind, *key)
        return self.cache_enabled and (full in self._cache or
                                       (_batch_size(full) is not None and full[:-1] in self._lines))

    def snapshot(self) -> dict[str, int]:
        return {kind: self.totals[kind] for kind in FLOP_KINDS}


def _batch_size(key: tuple) -> int | None:
    """The batch size a cache key ends with (a plain int, not a bool), or None."""
    size = key[-1] if len(key) > 1 else None
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None
