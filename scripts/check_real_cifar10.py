"""Real-data check: every algorithm learns on real CIFAR-10 (N=10, 2 classes per client, a few rounds).

Personalised accuracy must be clearly above 50%, the chance level of a 2-class client. Needs
<data-dir>/cifar10.npz (see README) or internet. Usage:
    python scripts/check_real_cifar10.py [--rounds 2] [--output-dir results/real-check]
"""
from __future__ import annotations

import argparse
import sys

from bench.config import load_config
from bench.runner import run_invocation

SEVEN = ["pfedlora", "feddistill", "fml", "fedkd", "lgfedavg", "fedgh", "fedapen"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output-dir", default="results/real-check")
    parser.add_argument("--threshold", type=float, default=0.6)
    args = parser.parse_args()
    cfg = load_config(options={"algorithms": SEVEN, "dataset": "cifar10", "num_clients": 10, "rounds": args.rounds,
                               "output_dir": args.output_dir})
    outcome = run_invocation(cfg)
    print(f"\n{'run':<18} {'final acc':>9} {'best acc':>9}")
    ok = not outcome.failed
    for key, summary in outcome.summaries.items():
        final = summary.get("final_acc", float("nan"))
        print(f"{key:<18} {final:9.2%} {summary.get('best_acc', float('nan')):9.2%}")
        ok &= final > args.threshold
    print("PASS" if ok else f"FAIL: an algorithm failed or stayed at or below {args.threshold:.0%}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
