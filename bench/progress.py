"""Per-round progress with ETA: plain lines when not on a terminal, a live line within a round on one.

"ETA run" is the current run's remaining rounds at its measured time per round. "ETA all" adds the runs not
started yet, at the header's up-front estimate (`expect`) rescaled by how far off that estimate was on the
runs seen so far (measured / estimated). Runs that finished before a resume are not expected; a resumed run
counts only the rounds after its checkpoint."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, TextIO


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class RunClock:
    """One started run's timing: rounds are timed from `mark_at` (after round `mark_step`, or the run's start)."""

    rounds: int
    first_step: int     # the rounds done before this invocation started it (resumed: its checkpoint's)
    started_at: float
    mark_at: float
    mark_step: int
    step: int
    last_at: float
    ended: bool = False

    def per_round(self) -> float | None:
        """Measured seconds per round (None before its first timed round)."""
        return (self.last_at - self.mark_at) / (self.step - self.mark_step) if self.step > self.mark_step else None

    def remaining(self) -> float | None:
        rate = self.per_round()
        return 0.0 if self.ended or self.step >= self.rounds else (
            None if rate is None else rate * (self.rounds - self.step))

    def share(self) -> float:
        """The fraction of its rounds to run here that it ran or will run (less than 1 where it ended early)."""
        todo = self.rounds - self.first_step
        return (self.step - self.first_step) / todo if self.ended and todo > 0 else 1.0


class Progress:
    def __init__(self, total_rounds: int, stream: TextIO | None = None, enabled: bool = True,
                 clock: Callable[[], float] = time.perf_counter):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.clock = clock
        self.total_rounds = total_rounds  # over every (algorithm, seed) run of the invocation
        self.done_rounds = 0
        self.start = clock()
        self.estimates: dict[str, float] = {}  # run key -> estimated seconds of its rounds still to run
        self.runs: dict[str, RunClock] = {}    # the runs started so far

    # ---- output ------------------------------------------------------------------------------------------
    def echo(self, text: str) -> None:
        """A line (on a terminal it replaces the live line)."""
        if self.enabled:
            self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
            self.stream.flush()

    def live(self, text: str) -> None:
        """Overwrite the live line (a terminal only: a log gets the round lines alone)."""
        if self.enabled and self.tty:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()

    # ---- timing ------------------------------------------------------------------------------------------
    def expect(self, estimates: dict[str, float]) -> None:
        """The up-front estimate (bench/estimate.py: estimate_runs): run key -> seconds of the rounds it has
        still to run, for every run of the invocation not finished yet."""
        self.estimates = dict(estimates)

    def run_started(self, key: str, rounds: int, from_step: int = 0) -> None:
        now = self.clock()
        self.runs[key] = RunClock(rounds, from_step, now, now, from_step, from_step, now)

    def rounds_start(self, key: str, step: int) -> None:
        """Time the run's rounds from now (after its round `step`: 0, the untrained model's evaluation)."""
        run = self.runs[key]
        run.mark_at, run.mark_step, run.step = self.clock(), step, step

    def run_ended(self, key: str) -> None:
        if key in self.runs:
            self.runs[key].ended = True
            self.runs[key].last_at = self.clock()

    def ratio(self) -> float:
        """Measured / estimated over the runs seen (ended: their wall time; running: elapsed + remaining at
        its rate); 1 before any has a timed round."""
        measured = estimated = 0.0
        for key, run in self.runs.items():
            remaining = run.remaining()
            if key in self.estimates and remaining is not None and run.step > run.mark_step:
                measured += run.last_at - run.started_at + remaining
                estimated += self.estimates[key] * run.share()
        return measured / estimated if measured > 0 and estimated > 0 else 1.0

    def eta_all(self) -> float:
        """Seconds left for every run of the invocation (0 once the last round is done)."""
        running = [r for r in self.runs.values() if not r.ended]
        if len(running) > 1:  # runs in parallel (Ray): rounds left at the wall-clock rate so far
            elapsed = self.clock() - self.start
            return elapsed / self.done_rounds * (self.total_rounds - self.done_rounds) if self.done_rounds else 0.0
        ratio = self.ratio()
        timed = [r for r in self.runs.values() if r.step > r.mark_step]
        mean_rate = (sum(r.last_at - r.mark_at for r in timed) / sum(r.step - r.mark_step for r in timed)
                     if timed else 0.0)
        left = 0.0
        for key, run in self.runs.items():
            remaining = run.remaining()
            if remaining is None:  # started, no round timed yet
                remaining = (self.estimates[key] * ratio if key in self.estimates
                             else mean_rate * (run.rounds - run.step))
            left += remaining
        if self.estimates:
            left += ratio * sum(v for k, v in self.estimates.items() if k not in self.runs)
        else:  # no up-front estimate: the runs not started cost the mean measured round
            left += mean_rate * max(0, self.total_rounds - sum(r.rounds for r in self.runs.values()))
        return left

    def round_done(self, key: str, step: int, rounds: int, metrics: dict[str, float], best: float) -> None:
        if key not in self.runs:  # a round of a run not announced: timed from here on
            self.run_started(key, rounds, step - 1)
        run = self.runs[key]
        run.step, run.last_at = step, self.clock()
        self.done_rounds += 1
        per_round = run.per_round() or 0.0
        acc = metrics.get("acc_mean")
        acc_text = f"acc {acc:6.2%} (best {best:6.2%})" if acc is not None else "acc   (not evaluated)"
        self.echo(f"{key:<22} round {step:>4}/{rounds}  {acc_text}  loss {metrics.get('train_loss', float('nan')):.3f}"
                  f"  {per_round:5.1f}s/round  ETA run {fmt_duration(run.remaining() or 0.0)}"
                  f"  all {fmt_duration(self.eta_all())}")

    def within_round(self, key: str, step: int, rounds: int, done: int, clients: int, samples: int,
                     seconds: float, evaluating: bool = False, expected: float = 0) -> None:
        """The live line of round `step` of run `key`: clients done, training samples per second so far and,
        where the round's samples can be told in advance (`expected`: from its clients' previous rounds), the
        share trained."""
        rate = f"{samples / seconds:7.0f} samples/s" if seconds > 0 else "      - samples/s"
        share = f"  ~{min(samples / expected, 1.0):4.0%} trained" if expected else ""
        state = "  evaluating" if evaluating else ""
        self.live(f"{key:<22} round {step:>4}/{rounds}  clients {done:>3}/{clients}{share}  {rate}"
                  f"  {fmt_duration(seconds)} in round{state}")
