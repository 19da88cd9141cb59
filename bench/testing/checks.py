"""The conformance checks (see bench/testing/__init__.py): the runs they compare and each check."""
from __future__ import annotations

import dataclasses
import math
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from bench.checkpoint import load_file, save_file
from bench.errors import UserError
from bench.simulator import Simulation, eval_mode
from bench.testing.setup import _PayloadLog, _Run, _Setup

FLOP_COLUMNS = ("train_flops", "eval_flops", "server_flops")
UNKNOWN_KEY = "__conformance_no_such_hyperparameter__"
STATE_PREFIXES = ("client/", "server/")  # what checkpoint check compares besides the metrics


def is_timing(column: str) -> bool:
    """Wall-clock columns (round_time, cum_round_time, a plugin's *_time): never compared."""
    return column.endswith("time")


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
