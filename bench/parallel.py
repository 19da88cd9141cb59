"""Independent clients at once on a CPU: one Python thread per client, one torch thread each.

Small models at batch 64 use a second core poorly inside one operation (torch's intra-op threads), and well
as a second client: on 2 cores, 10 CNN clients train about 1.2x faster as two single-threaded streams than
one after the other on two threads (benchmarks/speed.py measures it). torch releases the GIL inside its
operations, so threads suffice, and they share the clients' tensors without copies.

Numbers do not depend on the number of workers: each client draws its batches from its own stream
(RunContext.client_generator) and every operation runs on one thread, so a run equals the same run with
parallel_clients=1 and threads=1 bitwise (tests/test_parallel.py). Algorithms whose client updates share
state (batchable_clients = False), or whose models use dropout (torch's global RNG), run one client after the
other.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence, TypeVar

import torch
from torch import nn

from bench.config import RunConfig

if TYPE_CHECKING:
    from algorithms.base import Algorithm

T = TypeVar("T")
R = TypeVar("R")


def client_workers(cfg: RunConfig, device: torch.device, algo: "Algorithm", modules: Iterable[nn.Module]) -> int:
    """How many clients run at once: cfg.parallel_clients, 0 meaning the run's torch threads on a CPU and 1
    on an accelerator (whose kernels one stream already keeps busy; batched_training is its lever). One when
    the clients' updates share state, or when their models hold dropout: it draws from torch's global RNG,
    which is one for the process, so parallel clients would draw in a racy order."""
    if cfg.batched_training or not algo.batchable_clients or any(
            isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for module in modules for m in module.modules()):
        return 1
    if cfg.parallel_clients:
        return cfg.parallel_clients
    return (cfg.threads or torch.get_num_threads()) if torch.device(device).type == "cpu" else 1


class ClientPool:
    """Maps a function over clients on `workers` threads (in order, like map); one worker: a plain loop."""

    def __init__(self, workers: int):
        self.workers = workers
        self._executor: ThreadPoolExecutor | None = None

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        if self.workers <= 1 or len(items) <= 1:
            return [fn(item) for item in items]
        if self._executor is None:  # torch's thread count is per thread: each worker sets its own once
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="client",
                                                initializer=torch.set_num_threads, initargs=(1,))
        return list(self._executor.map(fn, items))

    @contextlib.contextmanager
    def threads(self) -> Iterator[None]:
        """With several workers, this thread's own operations (downloads, aggregation) single-threaded too, so
        that the whole run computes as one with threads=1 does."""
        if self.workers <= 1:
            yield
            return
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __del__(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
