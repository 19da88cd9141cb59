"""The conformance kit: `check_algorithm(cls)` runs a tiny synthetic federation of an algorithm plugin
(built-in or third-party) through the real Simulation and checks what every plugin must guarantee:

1. checkpoint round trip: rounds after a checkpoint (state_dict -> file -> fresh Simulation ->
   load_state_dict) give the same metrics and the same client/server state as the uninterrupted run;
2. cached FLOPs equal full counting: flop_cache=True and flop_cache=False give the same train, eval and
   server FLOPs in every round (and per client);
3. finite loss: every round's train_loss is finite (NaN means no client yielded a training Phase);
4. bytes counted equal payload sizes: the bytes_up/bytes_down of every round, and each client's totals,
   equal the summed numel * element_size of the payloads the algorithm handed to the simulator;
5. determinism under a seed: two fresh runs with the same seed give the same metrics;
6. basic contract: predict returns finite (batch, num_classes) float logits; the Hyperparams dataclass
   defaults (and every reference profile) validate; make_hparams rejects an unknown key with a UserError.

Every check runs (one whose run crashed fails as "not checked", giving the run's error); then the failures are
raised together as one AssertionError naming the plugin and each failed check. Metrics are compared exactly,
except timing columns (names ending in "time"). The runs are: the reference run (cached FLOPs, payloads
observed), a second fresh run of the same seed that is checkpointed after round 1 and continued, the fresh
Simulation restored from that checkpoint, and a run counting every FLOP: 3 full runs and one partial one.

How payloads are observed (check 4): no module global is patched. The reference run's algorithm *instance*
gets wrappers around its payload hooks (server_payload, after_aggregation_payload, and client_update, whose
generator's return value is the upload) that record the size of each dict they return: exactly the dicts the
simulator passes to bench.accounting.transmit, with no algorithm code in between. The wrappers are
plain functions, which Algorithm.state_dict never checkpoints.

    from bench.testing import check_algorithm
    check_algorithm(MyAlgo)                       # tiny defaults; raises AssertionError on failure
    check_algorithm(MyAlgo, hparams={"rank": 4}, model_group="cnn1-homo", num_clients=4)
    # settings: the fields of bench.testing.setup.Tiny; any other keyword is a RunConfig field
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from algorithms.base import Algorithm
from bench.testing.checks import _Checker, is_timing  # noqa: F401 (is_timing: part of the kit's API)
from bench.testing.setup import Tiny, _Setup

CHECKS = ("checkpoint round trip", "cached FLOPs equal full counting", "finite loss",
          "bytes counted equal payload sizes", "determinism under a seed", "basic contract")


@dataclass
class ConformanceResult:
    """What check_algorithm returns when every check passed."""
    algorithm: str
    checks: tuple[str, ...]
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)


class ConformanceError(AssertionError):
    """Raised by check_algorithm: `failures` maps each failed check to its messages."""

    def __init__(self, algorithm: str, failures: dict[str, list[str]]):
        self.algorithm, self.failures = algorithm, failures
        lines = [f"algorithm plugin {algorithm!r} fails {len(failures)} conformance check(s) "
                 f"({', '.join(failures)}):"]
        for check, messages in failures.items():
            lines += [f"- {check}: {messages[0]}", *(f"    {m}" for m in messages[1:])]
        super().__init__("\n".join(lines))


def check_algorithm(cls: type[Algorithm] | str, *, hparams: Mapping[str, Any] | None = None,
                    threads: int | None = 1, **settings: Any) -> ConformanceResult:
    """Run the conformance checks on an algorithm class (or a registered name); raise ConformanceError
    (an AssertionError) listing every failed check, else return a ConformanceResult.

    hparams: the algorithm's hyper-parameter overrides. threads: torch CPU threads during the check (restored
    after; None leaves them). settings: fields of `Tiny` (the tiny federation: model_group, dataset,
    num_clients, participation, rounds, seed, batch_size, train_size, test_size, profile, device); any other
    keyword is a RunConfig field (e.g. batched_training=True, local_epochs=2)."""
    if isinstance(cls, str):
        from bench.registry import resolve_algorithms

        cls = resolve_algorithms([cls])[0]
    tiny, config = Tiny.split(settings)
    if tiny.rounds < 2:
        raise ValueError(f"check_algorithm needs rounds >= 2 (a checkpoint after round 1), got {tiny.rounds}")
    name = getattr(cls, "name", None) or getattr(cls, "__name__", repr(cls))
    start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        setup = _Setup.build(cls, name, tiny, hparams, config)
        failures = _Checker(setup).run()
    finally:
        torch.set_num_threads(previous_threads)
    if failures:
        raise ConformanceError(name, failures)
    return ConformanceResult(name, CHECKS, time.perf_counter() - start,
                             {"model_group": setup.cfg.model_group, "num_clients": tiny.num_clients,
                              "rounds": tiny.rounds, "seed": tiny.seed, "batch_size": tiny.batch_size})
