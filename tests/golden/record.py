"""Record the golden metrics: every built-in algorithm on a fixed synthetic setting (N=5, 3 rounds, seed 0,
CPU, 1 thread), through the real CLI. tests/test_golden.py reruns the same and requires every metrics column
except timings to be bit-identical, so a refactor that changes a number fails.

    .venv/bin/python -m tests.golden.record      # only when a change is MEANT to change the numbers
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
GROUPS = {"cnn-hetero": ["pfedlora", "feddistill", "fml", "fedkd", "lgfedavg", "fedgh", "fedapen", "standalone"],
          "cnn5-homo": ["fedavg"]}
TIMINGS = ("round_time", "cum_round_time")


def run_all(out: Path) -> dict[str, Path]:
    """{algorithm: its metrics.csv} of the golden setting, run under `out`."""
    found = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for group, algos in GROUPS.items():
        args = [sys.executable, "-m", "bench.cli", "run", *[a for algo in algos for a in ("--algo", algo)],
                "--model-group", group, "--output-dir", str(out), "--run-name", group, *SETTING]
        subprocess.run(args, check=True, env=env, capture_output=True, text=True)
        for algo in algos:
            found[algo] = out / group / "runs" / f"{algo}-seed0" / "metrics.csv"
    return found


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for algo, path in run_all(Path(tmp)).items():
            shutil.copy(path, HERE / f"{algo}.csv")
            print(f"recorded {HERE / f'{algo}.csv'}")


if __name__ == "__main__":
    main()
