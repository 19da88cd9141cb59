"""Real-data check: every algorithm learns on real CIFAR-10 or CIFAR-100 (N=10, a few rounds, the dataset's
classes per client: 2 on CIFAR-10, 10 on CIFAR-100).

Personalised accuracy must be clearly above the chance level of a client's classes: 50% with 2 classes
(threshold 60%), 10% with 10 classes (threshold 20%). Needs <data-dir>/<dataset>.npz (README: set-up) or
internet. Usage:
    python scripts/check_real_data.py [--dataset cifar10|cifar100] [--rounds 2] [--profile spec ...]
        [--algo NAME ...] [--threads 1] [--output-dir results/real-check] [--table benchmarks/results/real_X.md]
One run per profile (reference profiles: algorithms/README.md); the table of final accuracies, with the
data split the runs used, is printed and written to --table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench.config import load_config
from bench.runner import run_invocation
from data.sources import load_dataset

SEVEN = ["pfedlora", "feddistill", "fml", "fedkd", "lgfedavg", "fedgh", "fedapen"]
# dataset -> (classes per client, chance level of a client, default threshold)
CHECKS = {"cifar10": (2, 0.5, 0.6), "cifar100": (10, 0.1, 0.2)}


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(CHECKS), default="cifar10")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output-dir", default="results/real-check")
    parser.add_argument("--threshold", type=float, help="minimum final accuracy [default: per dataset, 60%% / 20%%]")
    parser.add_argument("--profile", action="append", help="reference profile (repeatable; default: spec)")
    parser.add_argument("--algo", action="append", help="algorithm (repeatable; default: the seven MHPFL methods)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is much faster on a busy machine)")
    parser.add_argument("--table", type=Path, help="also write the table (Markdown) here")
    return parser.parse_args()


def main() -> int:
    args = parse()
    classes, chance, default = CHECKS[args.dataset]
    threshold = default if args.threshold is None else args.threshold
    split = load_dataset(args.dataset).split  # the same data every run below loads (config.json: dataset_split)
    ok, rows = True, []
    start = time.perf_counter()
    for profile in args.profile or ["spec"]:
        options = {"algorithms": args.algo or SEVEN, "dataset": args.dataset, "num_clients": 10,
                   "classes_per_client": classes, "rounds": args.rounds, "output_dir": args.output_dir,
                   "profile": profile}
        if args.threads is not None:
            options["threads"] = args.threads
        outcome = run_invocation(load_config(options=options))
        ok &= not outcome.failed
        for key, summary in outcome.summaries.items():
            final = summary.get("final_acc", float("nan"))
            rows.append(f"| {profile} | {key} | {final:.2%} | {summary.get('best_acc', float('nan')):.2%} "
                        f"| {summary.get('wall_time', float('nan')):.0f} s |")
            ok &= final > threshold
    command = " ".join(["python scripts/check_real_data.py", *sys.argv[1:]])
    lines = [f"Real {args.dataset.upper().replace('CIFAR', 'CIFAR-')} (data split: {split}), N=10, {classes} classes "
             f"per client (chance {chance:.0%}), {args.rounds} rounds, quick preset (E=1, batch 64), seed 0.",
             f"Command: `{command}` ({time.perf_counter() - start:.0f} s in all).", "",
             "| profile | run | final acc | best acc | training time |", "|---|---|---|---|---|", *rows, "",
             f"PASS: every run above {threshold:.0%}" if ok else
             f"FAIL: an algorithm failed or stayed at or below {threshold:.0%}"]
    print("\n" + "\n".join(lines))
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text("\n".join(lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
