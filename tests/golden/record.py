"""Record the golden metrics: every built-in algorithm on a fixed synthetic setting (N=5, 3 rounds, seed 0,
CPU, 1 thread), through the real CLI. tests/test_golden.py reruns the same and requires every metrics column
except timings to be bit-identical, so a refactor that changes a number fails.

    .venv/bin/python -m tests.golden.record        # records the algorithms that have no golden file yet
    .venv/bin/python -m tests.golden.record --all  # only when a change is MEANT to change the numbers
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETTING = ["--dataset", "synthetic", "--clients", "5", "--rounds", "3", "--seed", "0", "--device", "cpu",
           "--threads", "1", "--batch-size", "32", "--quiet", "--set", "eval_batch_size=256"]
# FedAvg needs a model-homogeneous group; the others run on the paper's heterogeneous CNNs.
GROUPS = {"cnn-hetero": ["pfedlora", "feddistill", "fml", "fedkd", "lgfedavg", "fedgh", "fedapen", "standalone",
                         "fedproto", "fedtgp", "fedmrl", "pfedes"],
          "cnn5-homo": ["fedavg"]}
TIMINGS = ("round_time", "cum_round_time")


def run_all(out: Path, only: set[str] | None = None) -> dict[str, Path]:
    """{algorithm: its metrics.csv} of the golden setting (of the algorithms in `only`, or all), run under `out`."""
    found = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for group, algos in GROUPS.items():
        algos = [a for a in algos if only is None or a in only]
        if not algos:
            continue
        args = [sys.executable, "-m", "bench.cli", "run", *[a for algo in algos for a in ("--algo", algo)],
                "--model-group", group, "--output-dir", str(out), "--run-name", group, *SETTING]
        subprocess.run(args, check=True, env=env, capture_output=True, text=True)
        for algo in algos:
            found[algo] = out / group / "runs" / f"{algo}-seed0" / "metrics.csv"
    return found


def main() -> None:
    """Records the algorithms without a golden file; `--all` re-records every one."""
    every = [a for algos in GROUPS.values() for a in algos]
    only = None if "--all" in sys.argv[1:] else {a for a in every if not (HERE / f"{a}.csv").exists()}
    with tempfile.TemporaryDirectory() as tmp:
        for algo, path in run_all(Path(tmp), only).items():
            shutil.copy(path, HERE / f"{algo}.csv")
            print(f"recorded {HERE / f'{algo}.csv'}")


if __name__ == "__main__":
    main()
