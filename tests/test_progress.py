"""Progress lines and their ETAs, fed synthetic timings through an injected clock (no sleeping, nothing
timed): the ETA arithmetic (current run at its measured rate + the runs not started at the header's estimate
rescaled by measured / estimated), zero after the last round, resumed runs counting only what remains, and the
live line within a round on a terminal only."""
from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest
import torch

from bench import estimate
from bench.callbacks.base import RunInfo
from bench.callbacks.progress import LiveRound, ProgressCallback, samples_counter
from bench.estimate import RunCost, checkpoint_step, estimate_runs, per_algorithm
from bench.observe import Observers
from bench.progress import Progress, fmt_duration


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def progress(total_rounds: int, stream=None) -> tuple[Progress, Clock, io.StringIO]:
    clock, stream = Clock(), stream if stream is not None else io.StringIO()
    return Progress(total_rounds, stream=stream, clock=clock), clock, stream


def etas(stream: io.StringIO) -> list[tuple[str, str]]:
    """(ETA run, ETA all) of each round line."""
    out = []
    for line in stream.getvalue().splitlines():
        if "ETA run" in line:
            words = line.split()
            out.append((words[words.index("run") + 1], words[words.index("all") + 1]))
    return out


def seconds(text: str) -> int:
    m, s = text.split(":")[-2:]
    return 60 * int(m) + int(s) + (3600 * int(text.split(":")[0]) if text.count(":") == 2 else 0)


def test_eta_all_is_the_current_run_at_its_rate_plus_the_others_at_the_rescaled_estimate():
    p, clock, stream = progress(6)
    p.expect({"a-seed0": 100.0, "b-seed0": 300.0})
    p.run_started("a-seed0", 3)
    clock.now = 10.0                      # the untrained model's evaluation took 10 s
    p.rounds_start("a-seed0", 0)
    clock.now = 60.0                      # round 1: 50 s
    p.round_done("a-seed0", 1, 3, {"acc_mean": 0.5, "train_loss": 1.0}, 0.5)
    # run a: 2 rounds left at 50 s = 100 s; projected whole run 60 + 100 = 160 s against 100 estimated: x1.6;
    # b not started: 300 x 1.6 = 480 s. All: 580 s.
    assert etas(stream)[-1] == ("1:40", "9:40")
    clock.now = 110.0
    p.round_done("a-seed0", 2, 3, {"train_loss": 1.0}, 0.5)
    assert etas(stream)[-1] == ("0:50", fmt_duration(50 + 1.6 * 300))
    clock.now = 170.0                     # round 3 took 60 s; run a ends at 175 s
    p.round_done("a-seed0", 3, 3, {"train_loss": 1.0}, 0.5)
    # a: 0 left, its measured 170 s against 100: x1.7 on b's 300 s
    assert etas(stream)[-1] == ("0:00", fmt_duration(1.7 * 300))
    clock.now = 175.0
    p.run_ended("a-seed0")
    p.run_started("b-seed0", 3)
    # b started, no round timed: its estimate at a's ratio (175 / 100)
    assert p.eta_all() == 1.75 * 300
    clock.now = 185.0
    p.rounds_start("b-seed0", 0)
    clock.now = 285.0
    p.round_done("b-seed0", 1, 3, {"train_loss": 1.0}, 0.5)
    assert etas(stream)[-1] == ("3:20", "3:20")  # only b left: its 2 rounds at 100 s
    for step in (2, 3):
        clock.now += 100.0
        p.round_done("b-seed0", step, 3, {"train_loss": 1.0}, 0.5)
    assert etas(stream)[-1] == ("0:00", "0:00")  # zero after the last round
    p.run_ended("b-seed0")
    assert p.eta_all() == 0.0


def test_all_is_never_below_run():
    p, clock, stream = progress(4)
    p.expect({"a-seed0": 10.0, "b-seed0": 1000.0})  # b estimated far dearer than a
    p.run_started("a-seed0", 2)
    p.rounds_start("a-seed0", 0)
    for step in (1, 2):
        clock.now += 30.0
        p.round_done("a-seed0", step, 2, {"train_loss": 1.0}, 0.0)
    assert len(etas(stream)) == 2
    for run, all_ in etas(stream):
        assert seconds(all_) >= seconds(run)


def test_a_resumed_run_counts_only_its_rounds_after_the_checkpoint():
    p, clock, stream = progress(8)        # the executor's count: 2 pending runs x 4 rounds
    # a-seed0 finished before the resume: not expected; b resumes after round 2 of 4; c has not started
    p.expect({"b-seed0": 200.0, "c-seed0": 100.0})  # b: the estimate of its rounds 3 and 4
    p.run_started("b-seed0", 4, from_step=2)
    # no round timed yet: the estimates as they are
    assert p.eta_all() == 200.0 + 100.0
    clock.now = 20.0                      # round 3, timed from the run's start (no untrained evaluation)
    p.round_done("b-seed0", 3, 4, {"train_loss": 1.0}, 0.0)
    # b: 1 round left at 20 s; measured 20 + 20 = 40 s against the 200 s estimated: x0.2 on c's 100 s
    assert etas(stream)[-1] == ("0:20", fmt_duration(20 + 0.2 * 100))
    clock.now = 40.0
    p.round_done("b-seed0", 4, 4, {"train_loss": 1.0}, 0.0)
    p.run_ended("b-seed0")
    assert p.eta_all() == 40.0 / 200.0 * 100.0


def test_without_an_estimate_the_runs_not_started_cost_the_mean_measured_round():
    p, clock, stream = progress(6)        # 2 runs x 3 rounds, no up-front estimate (it failed)
    p.run_started("a-seed0", 3)
    p.rounds_start("a-seed0", 0)
    clock.now = 40.0
    p.round_done("a-seed0", 1, 3, {"train_loss": 1.0}, 0.0)
    assert etas(stream)[-1] == ("1:20", fmt_duration(2 * 40 + 3 * 40))


def fake_sim(train_sizes: list[int]) -> SimpleNamespace:
    clients = [SimpleNamespace(split=SimpleNamespace(train=torch.arange(n))) for n in train_sizes]
    return SimpleNamespace(observers=Observers(), clients=clients)


def one_round(sim: SimpleNamespace, clock: Clock) -> None:
    """What the simulator's observers see of a round of clients 0 and 1: a phase (2 epochs) and an upload each."""
    phase = SimpleNamespace(epochs=2, indices=None)
    with sim.observers.span("round", round=0, clients=[0, 1]):
        for cid in (0, 1):
            with sim.observers.span("phase", clients=[cid], phase=phase, round=0):
                clock.now += 2.0
            with sim.observers.span("upload", client=cid, round=0):
                pass
        with sim.observers.span("evaluation", clients=[0, 1]):
            pass
    clock.now += 1.0


def drive(stream: io.StringIO) -> tuple[str, SimpleNamespace]:
    p, clock, _ = progress(1, stream)
    callback = ProgressCallback(p)
    run = RunInfo("a-seed0", {}, {}, rounds=1)
    callback.on_run_start(run, None)
    run.sim = sim = fake_sim([50, 150])
    callback.on_round_end(run, 0, {"acc_mean": 0.1})
    one_round(sim, clock)
    callback.on_round_end(run, 1, {"acc_mean": 0.2, "train_loss": 1.0})
    callback.on_run_end(run, {}, [], "FINISHED")
    return stream.getvalue(), sim


def test_a_terminal_gets_a_live_line_within_the_round_overwritten_in_place():
    text, sim = drive(Terminal())
    live = [part for part in text.split("\r\033[K") if part and not part.endswith("\n")]
    # after client 0's phase: 2 epochs x 50 samples in 2 s; after both: 2 x 200 samples in 4 s
    assert any("clients   0/2" in part and "50 samples/s" in part for part in live)
    assert any("clients   1/2" in part for part in live)
    assert any("clients   2/2" in part and "100 samples/s" in part and "evaluating" in part for part in live)
    assert all("\n" not in part for part in live)       # overwritten, never scrolled
    (line,) = [part for part in text.split("\r\033[K") if "round    1/1" in part and part.endswith("\n")]
    assert "ETA run 0:00" in line and "all 0:00" in line  # the round line replaces the live one
    assert sim.observers.observers == []                 # detached at the run's end


def test_a_log_gets_plain_round_lines_only():
    text, sim = drive(io.StringIO())
    assert "\r" not in text and "\033" not in text and "samples/s" not in text
    assert len(text.splitlines()) == 1 and "round    1/1" in text


def test_a_run_that_failed_early_rescales_by_the_rounds_it_ran():
    p, clock, stream = progress(6)
    p.expect({"a-seed0": 300.0, "b-seed0": 100.0})
    p.run_started("a-seed0", 3)
    p.rounds_start("a-seed0", 0)
    clock.now = 50.0
    p.round_done("a-seed0", 1, 3, {"train_loss": 1.0}, 0.0)
    p.run_ended("a-seed0")                # FAILED in round 2: its 50 s against a third of 300 s: x0.5
    assert p.eta_all() == 0.5 * 100.0


def test_the_live_line_is_for_terminals_only():
    for stream, shown in ((io.StringIO(), ""), (Terminal(), "\r\033[Kworking")):
        p, _, _ = progress(1, stream)
        p.live("working")
        assert stream.getvalue() == shown


def test_the_estimate_of_a_run_counts_its_rounds_after_the_checkpoint(tmp_path, monkeypatch):
    cfg = SimpleNamespace(rounds=5, eval_every=2)
    cost = RunCost(per_round=10.0, per_evaluation=3.0, initial=7.0)
    assert cost.seconds(cfg) == 5 * 10 + 3 * 3 + 7        # evaluated after rounds 2, 4 and 5; initial once
    assert cost.seconds(cfg, done=2) == 3 * 10 + 2 * 3    # rounds 3-5, evaluated after 4 and 5; no initial
    resumed = tmp_path / "a-seed0"
    resumed.mkdir()
    (resumed / "state.pt").write_bytes(b"")
    (resumed / "checkpoint.json").write_text(json.dumps({"step": 3}))
    noted_only = tmp_path / "b-seed0"  # a note without its state: no checkpoint to continue from
    noted_only.mkdir()
    (noted_only / "checkpoint.json").write_text(json.dumps({"step": 4}))
    assert (checkpoint_step(resumed), checkpoint_step(noted_only), checkpoint_step(None)) == (3, 0, 0)
    timed = []
    monkeypatch.setattr(estimate, "time_run", lambda cfg, spec, *a: timed.append(spec.name) or cost)
    specs = [SimpleNamespace(name=n, key=f"{n}-seed{s}", checkpoint=c)
             for n, s, c in (("a", 0, resumed), ("a", 1, None), ("b", 0, noted_only))]
    per_run = estimate_runs(cfg, None, [], torch.device("cpu"), specs)
    assert per_run == {"a-seed0": 2 * 10 + 3 * 2, "a-seed1": 66.0, "b-seed0": 66.0}
    assert timed == ["a", "b"]                                # each algorithm timed once
    assert per_algorithm(per_run) == {"a": 26.0 + 66.0, "b": 66.0}


def test_from_round_2_the_live_line_counts_clients_done_by_their_samples_before_any_upload():
    p, clock, stream = progress(2, Terminal())
    sim = fake_sim([50, 150, 100])
    sim.observers.add(LiveRound(p, "a-seed0", 2, samples_counter(sim)))
    one_round(sim, clock)                 # clients 0 and 1: 2 epochs x 50 and 2 x 150 samples
    assert "trained" not in stream.getvalue()

    def live() -> str:
        return stream.getvalue().rsplit("\r\033[K", 1)[1]

    # round 2 samples clients 1 (300 samples last time) and 2 (new: the mean, 200): 500 expected
    with sim.observers.span("round", round=1, clients=[1, 2]):
        few = SimpleNamespace(epochs=2, indices=torch.arange(25))
        with sim.observers.span("phase", clients=[1], phase=few, round=1):
            clock.now += 1.0
        assert live() == "a-seed0                round    2/2  clients   0/2  ~ 10% trained       50 samples/s  0:01 in round"
        with sim.observers.span("phase", clients=[1], phase=SimpleNamespace(epochs=2, indices=None), round=1):
            clock.now += 6.0
        # client 1 trained 350 >= its 300: done, no upload yet; 350 of 500
        assert live().startswith("a-seed0                round    2/2  clients   1/2  ~ 70% trained       50 samples/s")
    # round 3: client 0 again, remembered from round 1 (100 samples) though it sat out round 2
    with sim.observers.span("round", round=2, clients=[0]):
        with sim.observers.span("phase", clients=[0], phase=SimpleNamespace(epochs=2, indices=None), round=2):
            clock.now += 1.0
        assert "clients   1/1  ~100% trained" in live()


def test_the_estimates_stopwatch_counts_overlapping_phases_once():
    clock = Clock()
    watch = estimate.Stopwatch(torch.device("cpu"), clock=clock)
    observers = Observers([watch])
    first = observers.span("phase")      # two clients' phases in parallel threads: 0-5 s and 3-9 s
    first.__enter__()
    clock.now = 3.0
    second = observers.span("phase")
    second.__enter__()
    clock.now = 5.0
    first.__exit__(None, None, None)
    clock.now = 9.0
    second.__exit__(None, None, None)
    with observers.span("upload"):       # other events: not counted
        clock.now = 20.0
    with observers.span("phase"):
        clock.now = 21.0
    assert watch.seconds == 9.0 + 1.0


def test_a_resumed_run_that_failed_early_rescales_by_the_rounds_it_ran_here():
    p, clock, stream = progress(8)
    p.expect({"b-seed0": 200.0, "c-seed0": 100.0})  # b: its rounds 3 and 4 after the checkpoint
    p.run_started("b-seed0", 4, from_step=2)
    clock.now = 30.0
    p.round_done("b-seed0", 3, 4, {"train_loss": 1.0}, 0.0)
    p.run_ended("b-seed0")                # FAILED in round 4: 30 s against half of its 200 s: x0.3
    assert p.eta_all() == 0.3 * 100.0


def test_the_estimate_scales_batches_without_the_set_up_of_each_phase():
    """20 phases, each 0.5 s of set-up then 0.01 s a batch, 510 batches in all; 1 s outside the phases. The
    passes cut to 2 and 4 batches a phase (the run uses 4 and 8) give exactly the full updates' 20 x 0.5 + 510 x 0.01 + 1 s (scaling
    the short pass up, 40 batches in 10.4 s, would say 133.6 s)."""
    def cut(batches: int) -> estimate.Pass:
        phases = 20 * 0.5 + 0.01 * batches
        return estimate.Pass(seconds=phases + 1.0, phase_seconds=phases, batches=batches)

    assert estimate.full_updates_seconds(cut(40), cut(80), 510) == pytest.approx(20 * 0.5 + 510 * 0.01 + 1.0)
    # timing noise that makes the longer pass no slower, or a batch dearer than the long pass's plain average
    # (which includes the set-up): that average
    for short_phases in (10.5, 1.0):
        short, long = estimate.Pass(11.0, short_phases, 40), estimate.Pass(11.0, 10.0, 80)
        assert estimate.full_updates_seconds(short, long, 160) == pytest.approx(11.0 + 80 * (10.0 / 80))
