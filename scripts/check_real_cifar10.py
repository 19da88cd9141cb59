"""Real-data check: every algorithm learns on real CIFAR-10 (N=10, 2 classes per client, a few rounds).

Personalised accuracy must be clearly above 50%, the chance level of a 2-class client. Needs
<data-dir>/cifar10.npz (see README) or internet. Usage:
    python scripts/check_real_cifar10.py [--rounds 2] [--profile spec --profile official ...]
        [--output-dir results/real-check] [--table benchmarks/results/real_cifar10.md]
One run per profile (reference profiles: algorithms/README.md); the table of final accuracies is printed and
written to --table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.config import load_config
from bench.runner import run_invocation

SEVEN = ["pfedlora", "feddistill", "fml", "fedkd", "lgfedavg", "fedgh", "fedapen"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output-dir", default="results/real-check")
    parser.add_argument("--threshold", type=float, default=0.6)
    parser.add_argument("--profile", action="append", help="reference profile (repeatable; default: spec)")
    parser.add_argument("--table", type=Path, help="also write the table (Markdown) here")
    args = parser.parse_args()
    ok = True
    lines = [f"Real CIFAR-10, N=10, 2 classes per client, {args.rounds} rounds, quick preset "
             f"(`python scripts/check_real_cifar10.py --rounds {args.rounds}`)", "",
             "| profile | run | final acc | best acc |", "|---|---|---|---|"]
    for profile in args.profile or ["spec"]:
        cfg = load_config(options={"algorithms": SEVEN, "dataset": "cifar10", "num_clients": 10,
                                   "rounds": args.rounds, "output_dir": args.output_dir, "profile": profile})
        outcome = run_invocation(cfg)
        ok &= not outcome.failed
        for key, summary in outcome.summaries.items():
            final = summary.get("final_acc", float("nan"))
            lines.append(f"| {profile} | {key} | {final:.2%} | {summary.get('best_acc', float('nan')):.2%} |")
            ok &= final > args.threshold
    lines += ["", "PASS" if ok else f"FAIL: an algorithm failed or stayed at or below {args.threshold:.0%}"]
    print("\n" + "\n".join(lines))
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text("\n".join(lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
