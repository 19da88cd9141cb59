"""Per-round progress with ETA: plain lines when not on a terminal, a live line within a round on one."""
from __future__ import annotations

import sys
import time
from typing import TextIO


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    def __init__(self, total_rounds: int, stream: TextIO | None = None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.total_rounds = total_rounds  # over every (algorithm, seed) run of the invocation
        self.done_rounds = 0
        self.start = time.perf_counter()

    def echo(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
            self.stream.flush()

    def round_done(self, key: str, step: int, rounds: int, metrics: dict[str, float], best: float,
                   run_seconds: float) -> None:
        self.done_rounds += 1
        per_round = run_seconds / max(step, 1)
        elapsed = time.perf_counter() - self.start
        eta_all = elapsed / self.done_rounds * (self.total_rounds - self.done_rounds)
        acc = metrics.get("acc_mean")
        acc_text = f"acc {acc:6.2%} (best {best:6.2%})" if acc is not None else "acc   (not evaluated)"
        self.echo(f"{key:<22} round {step:>4}/{rounds}  {acc_text}  loss {metrics.get('train_loss', float('nan')):.3f}"
                  f"  {per_round:5.1f}s/round  ETA run {fmt_duration(per_round * (rounds - step))}"
                  f"  all {fmt_duration(eta_all)}")
