"""Prototypes of the overhead fixes this benchmark proposes for bench/ (measured with
`python -m benchmarks.speed --accounting affine`; the patch text is in benchmarks/results/speed.md).

AffineFlopAccountant: the FLOP cache keyed by (algorithm, phase, architecture, batch size) counts a step
again for every new batch size. With many clients (N=100) every client brings its own last-batch size and
its own evaluation-set sizes, so the first rounds keep running FlopCounterMode. The FLOPs FlopCounterMode
counts (matmuls, convolutions; element-wise ops are free) are affine in the batch size for every step whose
per-sample work does not depend on the other samples: flops(b) = slope * b + intercept. This accountant
fits that line per key-without-batch-size from two measured sizes, verifies it on a third, and from then on
fills new sizes from the line (exact integers); a group that fails the check keeps counting every new
size. The last element of a key is taken as the batch size when it is an int (the simulator's and the
plugins' keys all end with len(y)).
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

from bench.accounting import FlopAccountant


class AffineFlopAccountant(FlopAccountant):
    def __init__(self, cache: bool = True):
        super().__init__(cache=cache)
        self._measured: dict[tuple, dict[int, int]] = defaultdict(dict)  # group -> {batch size: flops}
        self._lines: dict[tuple, tuple[int, int]] = {}                   # group -> (slope, intercept)
        self._rejected: set[tuple] = set()
        self.predicted = 0  # keys filled from a line (for the report)

    @contextmanager
    def count(self, kind: str, key: tuple | None = None, client_id: int | None = None) -> Iterator[None]:
        full = None if key is None else (kind, *key)
        batched = self.cache_enabled and full is not None and isinstance(full[-1], int)
        measuring = batched and full not in self._cache
        if measuring and full[:-1] in self._lines:
            slope, intercept = self._lines[full[:-1]]
            self._cache[full] = slope * full[-1] + intercept
            self.predicted += 1
            measuring = False
        with super().count(kind, key, client_id):
            yield
        if measuring:
            self._record(full[:-1], full[-1], self._cache[full])

    def _record(self, group: tuple, size: int, flops: int) -> None:
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
