"""Wall time of one small grid with the local executor and with Ray, back to back on this machine, and a
check that both give the same per-round metrics.

    .venv/bin/python -m benchmarks.ray_grid                     # about 5 minutes on a 2-core CPU
    .venv/bin/python -m benchmarks.ray_grid --rounds 1 --out /tmp/rg

The grid: two algorithms x two seeds (four runs) on the synthetic CIFAR-10-shaped set (2000 train / 500
test images), N=10, the paper's CNN group. Local: the runs one after the other with torch's default
threads, then again with one thread (to check identity: CPU results are bit-identical only at equal thread
counts). Ray: a fresh local Ray instance (its start-up is included), one CPU per run, so as many runs in
parallel as there are cores. Writes ray-grid.json and ray-grid.md into --out (default benchmarks/results/).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench/__init__.py: no spin-waiting on a shared CPU

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from bench.config import RunConfig  # noqa: E402
from bench.executors import ExecutorOptions  # noqa: E402
from bench.runner import run_invocations  # noqa: E402
from bench.store import read_csv  # noqa: E402
from benchmarks.speed import stamp  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TIME_KEYS = ("round_time", "cum_round_time")


def grid(out: Path, rounds: int, algorithms: list[str], threads: int | None = None) -> RunConfig:
    return RunConfig(algorithms=algorithms, dataset="synthetic", num_clients=10, rounds=rounds, seeds=[0, 1],
                     device="cpu", output_dir=str(out), run_name="grid", threads=threads)


def metrics(root: Path) -> dict[str, list[dict[str, str]]]:
    return {d.name: [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in read_csv(d / "metrics.csv")]
            for d in sorted((root / "runs").iterdir())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--algo", action="append", help="algorithms (default: pfedlora, fedkd)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    algos = args.algo or ["pfedlora", "fedkd"]
    info = stamp(torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        run_invocations([grid(tmp / "local", args.rounds, algos)], show_progress=False)
        local_s = time.perf_counter() - start
        start = time.perf_counter()
        run_invocations([grid(tmp / "local1", args.rounds, algos, threads=1)], show_progress=False)
        local1_s = time.perf_counter() - start
        torch.set_num_threads(os.cpu_count())
        start = time.perf_counter()
        [outcome] = run_invocations([grid(tmp / "ray", args.rounds, algos)], show_progress=False,
                                    executor=ExecutorOptions(kind="ray", cpus_per_run=1))
        ray_s = time.perf_counter() - start
        same = metrics(tmp / "local1" / "grid") == metrics(tmp / "ray" / "grid")
    import ray

    result = {**info, "grid": {"algorithms": algos, "seeds": [0, 1], "rounds": args.rounds, "num_clients": 10,
                               "dataset": "synthetic (2000 train / 500 test)", "runs": 2 * len(algos)},
              "local_s": round(local_s, 1), "local_1_thread_s": round(local1_s, 1), "ray_s": round(ray_s, 1), "ray_parallel_runs": os.cpu_count(),
              "speedup": round(local_s / ray_s, 2), "identical_metrics_ray_vs_local_1_thread": same, "failed": outcome.failed,
              "ray": ray.__version__, "load_average_end": list(os.getloadavg())}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ray-grid.json").write_text(json.dumps(result, indent=2))
    (args.out / "ray-grid.md").write_text(
        f"# Small grid: local executor vs Ray\n\n{result['grid']['runs']} runs "
        f"({', '.join(algos)} x seeds 0, 1; {args.rounds} rounds; N=10; synthetic CIFAR-10-shaped data) on "
        f"{info['cpu']} ({info['cpu_count']} cores), torch {info['torch']}, Ray {ray.__version__}, commit "
        f"{info['commit']}, {info['date_utc']}; load average at start {info['load_average_start']}.\n\n"
        "| executor | wall time (s) |\n|---|---|\n"
        f"| local (one run after the other, {info['torch_threads']} torch threads) | {result['local_s']} |\n"
        f"| local, `--threads 1` | {result['local_1_thread_s']} |\n"
        f"| ray (one CPU per run, {os.cpu_count()} in parallel, Ray start-up included) | {result['ray_s']} |\n\n"
        f"Speed-up local / Ray: {result['speedup']}x. Per-round metrics of Ray and of the local `--threads 1` run "
        f"(the same thread count per run as the Ray workers) identical: {same}. (With a different thread "
        "count, CPU kernels reduce in another order: numbers differ at float rounding, about 1e-8.)\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
