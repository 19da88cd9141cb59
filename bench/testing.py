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
"""
from __future__ import annotations

import dataclasses
import functools
import math
import tempfile
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from algorithms.base import Algorithm
from bench.checkpoint import load_file, save_file
from bench.config import RunConfig, resolve_dataset_defaults
from bench.errors import UserError
from bench.plan import client_splits
from bench.simulator import Simulation, eval_mode
from data.device_data import DeviceData
from data.sources import ArrayDataset, load_dataset, synthetic_dataset
from models.groups import is_homogeneous

CHECKS = ("checkpoint round trip", "cached FLOPs equal full counting", "finite loss",
          "bytes counted equal payload sizes", "determinism under a seed", "basic contract")
FLOP_COLUMNS = ("train_flops", "eval_flops", "server_flops")
UNKNOWN_KEY = "__conformance_no_such_hyperparameter__"
STATE_PREFIXES = ("client/", "server/")  # what checkpoint check compares besides the metrics

_DATA: dict[tuple, tuple[ArrayDataset, DeviceData]] = {}


def is_timing(column: str) -> bool:
    """Wall-clock columns (round_time, cum_round_time, a plugin's *_time): never compared."""
    return column.endswith("time")


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


def check_algorithm(cls: type[Algorithm] | str, *, model_group: str | None = None,
                    dataset: str | ArrayDataset = "synthetic", num_clients: int = 5, participation: float = 0.6,
                    rounds: int = 2, seed: int = 0, batch_size: int = 16, train_size: int = 200,
                    test_size: int = 100, hparams: Mapping[str, Any] | None = None, profile: str = "spec",
                    threads: int | None = 1, device: str = "cpu", **config: Any) -> ConformanceResult:
    """Run the conformance checks on an algorithm class (or a registered name); raise ConformanceError
    (an AssertionError) listing every failed check, else return a ConformanceResult.

    model_group: None = "cnn-hetero", or "cnn5-homo" for a homogeneous_only algorithm. dataset: "synthetic"
    / "synthetic:K" (built with train_size/test_size images, seed 0), any other name bench.data loads, or an
    ArrayDataset. participation < 1 (default 3 of 5 clients) makes the later rounds depend on the sampler's
    state. rounds >= 2: the checkpoint is taken after round 1 and every later round compared. hparams: the
    algorithm's hyper-parameter overrides; profile: its reference profile. threads: torch CPU threads during
    the check (restored after; None leaves them). Any other keyword is a RunConfig field (e.g.
    batched_training=True, local_epochs=2)."""
    if isinstance(cls, str):
        from bench.registry import resolve_algorithms

        cls = resolve_algorithms([cls])[0]
    if rounds < 2:
        raise ValueError(f"check_algorithm needs rounds >= 2 (a checkpoint after round 1), got {rounds}")
    name = getattr(cls, "name", None) or getattr(cls, "__name__", repr(cls))
    start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        setup = _Setup.build(cls, name, model_group=model_group, dataset=dataset, num_clients=num_clients,
                             participation=participation, rounds=rounds, seed=seed, batch_size=batch_size,
                             train_size=train_size, test_size=test_size, hparams=hparams, profile=profile,
                             device=device, config=config)
        failures = _Checker(setup).run()
    finally:
        torch.set_num_threads(previous_threads)
    if failures:
        raise ConformanceError(name, failures)
    return ConformanceResult(name, CHECKS, time.perf_counter() - start,
                             {"model_group": setup.cfg.model_group, "num_clients": num_clients, "rounds": rounds,
                              "seed": seed, "batch_size": batch_size})


# ---- the tiny run ------------------------------------------------------------------------------------------

@dataclass
class _Setup:
    cls: type[Algorithm]
    name: str
    cfg: RunConfig
    data: DeviceData
    splits: list
    seed: int
    device: torch.device

    @classmethod
    def build(cls, algo_cls, name, *, model_group, dataset, num_clients, participation, rounds, seed,
              batch_size, train_size, test_size, hparams, profile, device, config) -> "_Setup":
        if model_group is None:
            model_group = "cnn5-homo" if getattr(algo_cls, "homogeneous_only", False) else "cnn-hetero"
        elif getattr(algo_cls, "homogeneous_only", False) and not is_homogeneous(model_group):
            raise ValueError(f"{name} is homogeneous_only; give a homogeneous model_group, not {model_group!r}")
        dev = torch.device(device)
        ds, data = _dataset(dataset, train_size, test_size, config.get("augment", True), dev)
        settings = dict(algorithms=[name], dataset=ds.name, num_clients=num_clients, participation=participation,
                        rounds=rounds, local_epochs=1, batch_size=batch_size, eval_batch_size=256,
                        model_group=model_group, seeds=[seed], device=device, profile=profile,
                        algo={name: dict(hparams)} if hparams else {}, checkpoint_every=0)
        settings.update(config)
        cfg = resolve_dataset_defaults(RunConfig(**settings), ds.num_classes)
        return cls(algo_cls, name, cfg, data, client_splits(cfg, ds, seed, dev), seed, dev)

    def simulation(self, **overrides: Any) -> Simulation:
        cfg = dataclasses.replace(self.cfg, **overrides)
        return Simulation(cfg, self.cls, self.seed, self.data, self.splits, self.device)


def _dataset(dataset, train_size: int, test_size: int, augment: bool, device: torch.device
             ) -> tuple[ArrayDataset, DeviceData]:
    if isinstance(dataset, ArrayDataset):
        return dataset, DeviceData(dataset, device, augment=augment)
    key = (dataset, train_size, test_size, augment, str(device))
    if key not in _DATA:
        text = dataset.strip().lower()
        if text == "synthetic" or text.startswith("synthetic:"):
            classes = 10 if text == "synthetic" else int(text.split(":", 1)[1])
            ds = synthetic_dataset(num_classes=classes, train_size=train_size, test_size=test_size, seed=0)
        else:
            ds = load_dataset(dataset)
        _DATA[key] = (ds, DeviceData(ds, device, augment=augment))
    return _DATA[key]


class _PayloadLog:
    """The payloads the algorithm hands to the simulator, recorded by wrapping the hooks of one algorithm
    instance (no module global is touched): (round index, "up"/"down", client id, bytes)."""

    def __init__(self, algo: Algorithm):
        self.records: list[tuple[int, str, int, int]] = []
        self._wrap(algo, "server_payload", "down", lambda args, out: {args[0].id: out})
        self._wrap(algo, "after_aggregation_payload", "down",
                   lambda args, out: {} if out is None else {args[0].id: out})
        self._wrap_update(algo)

    def _wrap_update(self, algo: Algorithm) -> None:
        """client_update: its generator's return value (or a plain function's result) is the upload."""
        original = algo.client_update

        @functools.wraps(original)
        def observed(client, payload, round_index):
            out = original(client, payload, round_index)
            if not hasattr(out, "send"):
                self.records.append((round_index, "up", client.id, _size(out or {})))
                return out

            def recorded():
                upload = yield from out
                self.records.append((round_index, "up", client.id, _size(upload or {})))
                return upload

            return recorded()

        algo.client_update = observed

    def _wrap(self, algo: Algorithm, hook: str, direction: str,
              payloads: Callable[[tuple, Any], dict[int, Any]]) -> None:
        original = getattr(algo, hook)

        @functools.wraps(original)
        def observed(*args, **kwargs):
            out = original(*args, **kwargs)
            round_index = kwargs.get("round_index", args[-1] if args else None)
            for cid, payload in payloads(args, out).items():
                self.records.append((round_index, direction, cid, _size(payload)))
            return out

        setattr(algo, hook, observed)  # an instance attribute: shadows the method for this run only

    def totals(self, round_index: int) -> dict[str, int]:
        out = {"up": 0, "down": 0}
        for r, direction, _, size in self.records:
            if r == round_index:
                out[direction] += size
        return out

    def by_client(self, direction: str) -> dict[int, int]:
        out: dict[int, int] = defaultdict(int)
        for _, d, cid, size in self.records:
            if d == direction:
                out[cid] += size
        return dict(out)


def _size(payload: Any) -> int:
    """numel * element_size summed over a payload's tensors (what goes on the wire); malformed payloads are
    left to the simulator, which rejects them."""
    if not isinstance(payload, Mapping):
        return 0
    return sum(t.numel() * t.element_size() for t in payload.values() if isinstance(t, torch.Tensor))


@dataclass
class _Run:
    history: list[dict[str, float]] = field(default_factory=list)  # step 0 (initial evaluation), rounds 1..R
    sim: Simulation | None = None
    error: str | None = None
    exception: BaseException | None = None


class _Checker:
    def __init__(self, setup: _Setup):
        self.s = setup
        self.failures: dict[str, list[str]] = {}

    def fail(self, check: str, message: str) -> None:
        self.failures.setdefault(check, []).append(message)

    def guarded(self, check: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as err:  # a check that crashes is a failed check, and the others still run
            self.fail(check, f"raised {_describe(err)}")

    # ---- the runs --------------------------------------------------------------------------------------
    def full_run(self, observe: bool = False, **overrides: Any) -> tuple[_Run, _PayloadLog | None]:
        run, log = _Run(), None
        try:
            run.sim = sim = self.s.simulation(**overrides)
            if observe:
                log = _PayloadLog(sim.algo)
            run.history.append(sim.initial_metrics())
            for r in range(sim.cfg.rounds):
                run.history.append(sim.run_round(r))
        except Exception as err:
            run.error, run.exception = _describe(err), err
        return run, log

    def resumed_runs(self) -> tuple[_Run, _Run]:
        """A fresh run of the same seed, checkpointed after round 1 (through a checkpoint file) and continued;
        and a fresh Simulation restored from that checkpoint and run over the same later rounds."""
        straight, resumed = _Run(), _Run()
        try:
            straight.sim = sim = self.s.simulation()
            straight.history.append(sim.initial_metrics())
            straight.history.append(sim.run_round(0))
            tensors, meta = sim.state_dict()
            with tempfile.TemporaryDirectory(prefix="bench-conformance-") as tmp:
                save_file(Path(tmp) / "state.pt", tensors, {"sim": meta})
                tensors, meta = load_file(Path(tmp) / "state.pt")
            for r in range(1, sim.cfg.rounds):
                straight.history.append(sim.run_round(r))
        except Exception as err:
            straight.error, straight.exception = _describe(err), err
            resumed.error = "not run: the run to checkpoint failed"
            return straight, resumed
        try:
            resumed.sim = sim = self.s.simulation()
            sim.load_state_dict(tensors, meta["sim"])
            for r in range(1, sim.cfg.rounds):
                resumed.history.append(sim.run_round(r))
        except Exception as err:
            resumed.error, resumed.exception = _describe(err), err
        return straight, resumed

    def run(self) -> dict[str, list[str]]:
        self.guarded("basic contract", self.check_hparams)
        reference, log = self.full_run(observe=True)
        straight, resumed = self.resumed_runs()
        uncached, _ = self.full_run(flop_cache=False)
        if reference.error:
            self.fail("finite loss" if isinstance(reference.exception, FloatingPointError) else "reference run",
                      f"the reference run raised {reference.error}" + (
                          " (a training loss went NaN/inf: the algorithm diverges or a Phase's loss is "
                          "broken)" if isinstance(reference.exception, FloatingPointError) else ""))
        self.guarded("finite loss", lambda: self.check_finite(reference))
        self.guarded("bytes counted equal payload sizes", lambda: self.check_bytes(reference, log))
        self.guarded("basic contract", lambda: self.check_predict(reference))
        self.guarded("determinism under a seed", lambda: self.check_determinism(reference, straight))
        self.guarded("checkpoint round trip", lambda: self.check_checkpoint(straight, resumed))
        self.guarded("cached FLOPs equal full counting", lambda: self.check_flops(reference, uncached))
        return self.failures

    # ---- the checks --------------------------------------------------------------------------------------
    def check_hparams(self) -> None:
        cls, check = self.s.cls, "basic contract"
        if not isinstance(getattr(cls, "name", None), str) or not cls.name:
            self.fail(check, "the class has no `name` (a non-empty str: its registry and entry-point name)")
        hp_cls = getattr(cls, "Hyperparams", None)
        if not (isinstance(hp_cls, type) and dataclasses.is_dataclass(hp_cls)):
            self.fail(check, f"Hyperparams must be a dataclass, got {hp_cls!r}")
            return
        try:
            cls.make_hparams()
        except Exception as err:
            self.fail(check, f"the Hyperparams defaults do not validate: make_hparams() raised {_describe(err)} "
                             "(every field needs a default, and validate() must accept the defaults)")
        for profile, values in (getattr(cls, "profiles", None) or {}).items():
            try:
                cls.make_hparams(values)
            except Exception as err:
                self.fail(check, f"reference profile {profile!r} does not validate: {_describe(err)}")
        try:
            cls.make_hparams({UNKNOWN_KEY: 1})
        except UserError:
            pass
        except Exception as err:
            self.fail(check, f"make_hparams with an unknown key raised {_describe(err)}, not a UserError")
        else:
            self.fail(check, f"make_hparams accepted the unknown key {UNKNOWN_KEY!r}; it must raise a UserError "
                             "naming the valid keys (keep Algorithm.make_hparams)")

    def check_finite(self, run: _Run) -> None:
        for step, metrics in enumerate(run.history[1:], start=1):
            loss = metrics.get("train_loss", math.nan)
            if not math.isfinite(loss):
                self.fail("finite loss", f"round {step}: train_loss is {loss}: no finite training loss was recorded "
                                         "for the sampled clients; yield the local training as Phases from client_update "
                                         "(the simulator runs them, counts their FLOPs and records the loss)")
                return

    def check_bytes(self, run: _Run, log: _PayloadLog | None) -> None:
        check = "bytes counted equal payload sizes"
        if log is None:
            self.fail(check, f"not checked: the reference run could not start ({run.error})")
            return
        for step, metrics in enumerate(run.history[1:], start=1):
            sent = log.totals(step - 1)
            for direction in ("up", "down"):
                counted = metrics.get(f"bytes_{direction}")
                if counted != sent[direction]:
                    self.fail(check, f"round {step}: bytes_{direction} = {counted}, but the payloads handed to the "
                                     f"simulator hold {sent[direction]} bytes (numel * element_size)")
        if run.sim is not None and not run.error:
            for direction, counted in (("up", run.sim.bytes_up), ("down", run.sim.bytes_down)):
                sent = log.by_client(direction)
                wrong = {cid: (b, sent.get(cid, 0)) for cid, b in counted.items() if b != sent.get(cid, 0)}
                if wrong:
                    self.fail(check, f"per-client bytes_{direction} (counted, sent): {wrong}")

    def check_predict(self, run: _Run) -> None:
        check = "basic contract"
        sim = run.sim
        if sim is None or not run.history:
            self.fail(check, f"predict not checked: the reference run failed ({run.error})")
            return
        num_classes = sim.ctx.num_classes
        for client in sim.clients:
            client.state = sim.store.checkout(client.id)
            try:
                x, _ = next(sim.ctx.data.eval_batches("test", client.split.test, 8))
                with torch.no_grad(), eval_mode(sim.ctx.prediction_modules(client)):
                    logits = sim.algo.predict(client, x)
            finally:
                sim.store.checkin(client.id)
            if not isinstance(logits, torch.Tensor):
                self.fail(check, f"predict returned {type(logits).__name__}, not a tensor of logits")
                return
            if tuple(logits.shape) != (len(x), num_classes):
                self.fail(check, f"predict (client {client.id}, arch {client.arch}) returned shape "
                                 f"{tuple(logits.shape)}; expected (batch, num_classes) = ({len(x)}, {num_classes})")
                return
            if not logits.is_floating_point() or not bool(torch.isfinite(logits).all()):
                self.fail(check, f"predict (client {client.id}) returned non-finite or non-float logits "
                                 f"({logits.dtype})")
                return

    def check_determinism(self, first: _Run, second: _Run) -> None:
        check = "determinism under a seed"
        if first.error or second.error:
            self.fail(check, "not checked: " + "; ".join(f"{label} run failed ({run.error})" for label, run in
                                                         (("the reference", first), ("the second", second))
                                                         if run.error))
            return
        for step, (a, b) in enumerate(zip(first.history, second.history)):
            diff = _differences(a, b)
            if diff:
                self.fail(check, f"two fresh runs with seed {self.s.seed} differ at {_step(step)}: {diff}; draw all "
                                 "randomness from the run's seeded sources (ctx.generator, or torch's global RNG "
                                 "that the Simulation seeds), never a freshly seeded generator, the clock or "
                                 "unseeded numpy/python RNGs")
                return

    def check_checkpoint(self, straight: _Run, resumed: _Run) -> None:
        check = "checkpoint round trip"
        if straight.error:
            self.fail(check, f"the run to checkpoint failed: {straight.error}")
            return
        if resumed.error:
            hint = "" if resumed.history else (" (state_dict/load_state_dict: give the algorithm its own hooks, or "
                                               "list caches that init rebuilds in checkpoint_exclude)")
            self.fail(check, f"restoring the checkpoint taken after round 1 into a fresh Simulation, or running "
                             f"it on, raised {resumed.error}{hint}")
            return
        advice = ("state the later rounds depend on is not in Algorithm.state_dict() (an attribute listed in "
                  "checkpoint_exclude, a module-level global, an object the default state_dict skips): keep it "
                  "as an attribute, or override state_dict/load_state_dict")
        for step, (a, b) in enumerate(zip(straight.history[2:], resumed.history), start=2):
            diff = _differences(a, b)
            if diff:
                self.fail(check, f"resumed from the checkpoint taken after round 1, {_step(step)} differs from the "
                                 f"uninterrupted run: {diff}; {advice}")
                return
        left, right = (_state_tensors(run.sim) for run in (straight, resumed))
        differing = sorted(k for k in left.keys() | right.keys()
                           if k not in left or k not in right or not _same_tensor(left[k], right[k]))
        if differing:
            more = f" and {len(differing) - 5} more" if len(differing) > 5 else ""
            self.fail(check, f"after the last round the resumed run's state differs from the uninterrupted run's "
                             f"in {', '.join(differing[:5])}{more}; {advice}")

    def check_flops(self, cached: _Run, full: _Run) -> None:
        check = "cached FLOPs equal full counting"
        if cached.error or full.error:
            self.fail(check, "not checked: " + "; ".join(f"{label} run failed ({run.error})" for label, run in
                                                         (("the cached", cached), ("the counting", full))
                                                         if run.error))
            return
        for step, (a, b) in enumerate(zip(cached.history, full.history)):
            wrong = [f"{col} {a.get(col)} cached vs {b.get(col)} counted" for col in FLOP_COLUMNS
                     if a.get(col) != b.get(col)]
            if wrong:
                self.fail(check, f"{_step(step)}: {', '.join(wrong)}; a FLOP-cache key (a Phase name, or an "
                                 "accountant key) covers computations of different cost, or server work declared "
                                 "shape-determined (server_flops_by_upload_shapes) is not: give each distinct "
                                 "computation its own phase name")
                return
        a, b = dict(cached.sim.accountant.by_client), dict(full.sim.accountant.by_client)
        if a != b:
            self.fail(check, f"per-client training FLOPs differ: cached {a}, counted {b}")


# ---- helpers ---------------------------------------------------------------------------------------------

def _describe(err: BaseException) -> str:
    where = traceback.extract_tb(err.__traceback__)
    place = f" at {Path(where[-1].filename).name}:{where[-1].lineno}" if where else ""
    return f"{type(err).__name__}: {err}{place}"


def _step(step: int) -> str:
    return "step 0 (the evaluation before training)" if step == 0 else f"round {step}"


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _differences(a: Mapping[str, Any], b: Mapping[str, Any], limit: int = 4) -> str:
    """The non-timing columns in which two metric rows differ, as text ('' when equal)."""
    out = []
    for key in sorted(a.keys() | b.keys()):
        if is_timing(key):
            continue
        if key not in a or key not in b:
            out.append(f"{key} only in {'the first' if key in a else 'the second'}")
        elif not _same_value(a[key], b[key]):
            out.append(f"{key} {a[key]!r} vs {b[key]!r}")
    if len(out) > limit:
        out = out[:limit] + [f"{len(out) - limit} more columns"]
    return ", ".join(out)


def _state_tensors(sim: Simulation) -> dict[str, torch.Tensor]:
    tensors, _ = sim.state_dict()
    return {k: v for k, v in tensors.items() if k.startswith(STATE_PREFIXES)}


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b) or (
        a.is_floating_point() and torch.equal(torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0))
        and torch.equal(a.isnan(), b.isnan())))
