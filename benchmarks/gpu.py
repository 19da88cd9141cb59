"""The GPU benchmark, one command on a CUDA machine:

    python -m benchmarks.gpu --out DIR [--budget SECONDS]
    python -m benchmarks.gpu --tiny --device cpu --out /tmp/gpu   # seconds; checks the script itself

What it measures, in this order, stopping before a step that no longer fits in --budget (every finished step is
written to DIR/gpu.json and DIR/gpu.md at once, so a cut-off run keeps what it measured):

1. The paper's T1 recipe at full protocol (SPEC: E=10, batch 512, eval every round, CNN-1..5 group) in its
   first setting, N=10 and C=1: seconds per round of each of the seven methods, one client after the other
   (the default on CUDA), with the GPU's utilisation sampled every 50 ms (NVML) and the peak device memory.
2. The same with same-architecture clients trained together (cfg.batched_training, bench/batched.py).
3. The other two T1 settings (N=50, C=0.2 and N=100, C=0.1) for every method, for the projection.
4. Several runs on one GPU at once: K processes, each one run (the Ray executor's fractional GPUs do the
   same), their combined rounds per second against one run alone.
5. The projected time of the full T1 grid (7 methods x 2 datasets x 3 settings x 3 seeds x 500 rounds), one
   run at a time and with K runs per GPU.

Data: CIFAR-10-shaped synthetic images of the full size (50,000 train, 10,000 test): the real files do not
travel to the GPU machine, and the time of a round does not depend on the pixel values. CIFAR-100 rounds cost
the same but for the 100-way header, so the projection counts CIFAR-10's times twice (stated in the report).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from bench.config import RunConfig
from bench.plan import client_splits
from bench.registry import resolve_algorithms
from bench.simulator import Simulation
from data.device_data import DeviceData
from data.sources import synthetic_dataset

T1_METHODS = ("pfedlora", "feddistill", "fml", "fedkd", "lgfedavg", "fedgh", "fedapen")
T1_SETTINGS = ((10, 1.0), (50, 0.2), (100, 0.1))
GRID = {"datasets": 2, "seeds": 3, "rounds": 500}
FULL = {"train": 50_000, "test": 10_000, "local_epochs": 10, "batch_size": 512}
TINY = {"train": 600, "test": 200, "local_epochs": 1, "batch_size": 32}


class UtilisationSampler:
    """The GPU's utilisation (% of time a kernel ran) and memory in use, sampled every 50 ms on a thread."""

    def __init__(self, device: torch.device):
        self.samples: list[tuple[float, float]] = []
        self.handle = None
        if device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                self.nvml = pynvml
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            except Exception as err:  # no NVML: utilisation is reported as unknown
                print(f"[gpu] no NVML ({err}); utilisation not sampled", file=sys.stderr)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "UtilisationSampler":
        if self.handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            rates = self.nvml.nvmlDeviceGetUtilizationRates(self.handle)
            memory = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
            self.samples.append((float(rates.gpu), memory.used / 2**30))

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def mean_utilisation(self) -> float | None:
        return statistics.fmean(s[0] for s in self.samples) if self.samples else None

    @property
    def max_memory_gib(self) -> float | None:
        return max(s[1] for s in self.samples) if self.samples else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_DATA: dict[tuple, tuple] = {}


def dataset_on(device: torch.device, sizes: dict[str, int]):
    key = (str(device), sizes["train"], sizes["test"])
    if key not in _DATA:
        ds = synthetic_dataset(num_classes=10, train_size=sizes["train"], test_size=sizes["test"], seed=0)
        _DATA[key] = (ds, DeviceData(ds, device, augment=True))
    return _DATA[key]


def time_method(method: str, clients: int, participation: float, device: torch.device, sizes: dict[str, int],
                batched: bool = False, timed_rounds: int = 1) -> dict[str, Any]:
    """One warm-up round (FLOP counting, kernel selection) then `timed_rounds` timed ones, each with evaluation
    of the clients (eval every round, as the recipe runs)."""
    cfg = RunConfig(algorithms=[method], dataset="synthetic", num_clients=clients, participation=participation,
                    rounds=GRID["rounds"], local_epochs=sizes["local_epochs"], batch_size=sizes["batch_size"],
                    device=str(device), batched_training=batched)
    ds, data = dataset_on(device, sizes)
    splits = client_splits(cfg, ds, 0, device)
    algo = resolve_algorithms([method])[0]
    start = time.perf_counter()
    sim = Simulation(cfg, algo, 0, data, splits, device)
    build = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    sim.run_round(0)
    sync(device)
    warm = time.perf_counter() - start
    times = []
    with UtilisationSampler(device) as sampler:
        for r in range(1, 1 + timed_rounds):
            start = time.perf_counter()
            metrics = sim.run_round(r)
            sync(device)
            times.append(time.perf_counter() - start)
    flops = sum(metrics[k] for k in ("train_flops", "eval_flops", "server_flops"))
    return {"method": method, "clients": clients, "participation": participation, "batched": batched,
            "build_seconds": build, "warmup_round_seconds": warm, "seconds_per_round": statistics.median(times),
            "rounds_timed": len(times), "gpu_utilisation_percent": sampler.mean_utilisation,
            "gpu_memory_used_gib_max": sampler.max_memory_gib,
            "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "train_samples_per_round": sum(len(splits[c].train) for c in range(clients)) * participation
            * sizes["local_epochs"], "acc_mean": metrics.get("acc_mean"),
            "flops_per_round": flops, "achieved_tflops": flops / statistics.median(times) / 1e12}


def concurrent_runs(method: str, k: int, rounds: int, device: torch.device, tiny: bool) -> dict[str, Any]:
    """K processes at once, each one run of `method` (N=10, C=1): combined rounds per second vs one alone."""
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--worker", method, "--worker-rounds", str(rounds),
           "--device", str(device)] + (["--tiny"] if tiny else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with UtilisationSampler(device) as sampler:
        start = time.perf_counter()
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(k)]
        outs = [p.communicate()[0] for p in procs]
        wall = time.perf_counter() - start
    per_run = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    return {"method": method, "processes": k, "rounds_each": rounds, "wall_seconds": wall,
            "seconds_per_round_each": [r["seconds_per_round"] for r in per_run],
            # each process's rate in its timed rounds, summed (their warm-ups overlap, so the timed rounds do too)
            "combined_rounds_per_second": sum(rounds / r["timed_seconds"] for r in per_run),
            "gpu_utilisation_percent": sampler.mean_utilisation, "gpu_memory_used_gib_max": sampler.max_memory_gib}


def worker(method: str, rounds: int, device: torch.device, sizes: dict[str, int]) -> None:
    """One run for concurrent_runs: prints {seconds_per_round, timed_seconds} as its last line."""
    r = time_method(method, 10, 1.0, device, sizes, timed_rounds=rounds)
    print(json.dumps({"seconds_per_round": r["seconds_per_round"], "timed_seconds": r["seconds_per_round"] * rounds}))


def projection(results: dict[str, Any], concurrency: dict[str, Any] | None) -> dict[str, Any]:
    """Seconds of the full T1 grid from the measured s/round per (method, setting), one run at a time; and with
    K runs per GPU at the measured combined speed-up."""
    per_run = {}
    for n, c in T1_SETTINGS:
        for m in T1_METHODS:
            found = results.get(f"N={n}", {}).get(m)
            if found is not None:
                per_run[(m, n)] = found["seconds_per_round"] * GRID["rounds"]
    complete = len(per_run) == len(T1_METHODS) * len(T1_SETTINGS)
    sequential = sum(per_run.values()) * GRID["datasets"] * GRID["seeds"]
    out = {"complete": complete, "measured_cells": len(per_run), "sequential_seconds": sequential,
           "sequential_gpu_hours": sequential / 3600}
    if concurrency:
        alone = concurrency["alone_seconds_per_round"]
        speedup = concurrency["combined_rounds_per_second"] * alone
        out.update(concurrent_speedup=speedup, processes=concurrency["processes"],
                   concurrent_gpu_hours=sequential / speedup / 3600)
    return out


def grid_flops(device: torch.device, methods: list[str], sizes: dict[str, int] = FULL) -> dict[str, Any]:
    """The FLOPs of the full T1 grid, as the harness counts them (executed forward and backward operations):
    one round of each (method, setting) at the full data size with E=1, its training FLOPs scaled to the
    protocol's E (every epoch takes the same batches), its evaluation and server FLOPs as counted. Any
    device: FLOPs do not depend on it (on a CPU this takes minutes)."""
    one_epoch = dict(sizes, local_epochs=1)
    cells = {}
    for n, c in T1_SETTINGS:
        for m in methods:
            cfg = RunConfig(algorithms=[m], dataset="synthetic", num_clients=n, participation=c,
                            rounds=GRID["rounds"], local_epochs=1, batch_size=sizes["batch_size"], device=str(device))
            ds, data = dataset_on(device, one_epoch)
            sim = Simulation(cfg, resolve_algorithms([m])[0], 0, data, client_splits(cfg, ds, 0, device), device)
            sim.run_round(0)
            metrics = sim.run_round(1)  # not the first round: no evaluation before training in it
            cells[f"{m} N={n}"] = {"train": metrics["train_flops"] * sizes["local_epochs"],
                                   "eval": metrics["eval_flops"], "server": metrics["server_flops"]}
            print(f"[flops] {m} N={n}: {sum(cells[f'{m} N={n}'].values()) / 1e12:.1f} TFLOP/round",
                  file=sys.stderr, flush=True)
    per_seed = sum(sum(cell.values()) for cell in cells.values()) * GRID["rounds"]
    total = per_seed * GRID["datasets"] * GRID["seeds"]
    return {"cells": cells, "total_flops": total, "methods": methods,
            "sustained_tflops_for_one_hour": total / 3600 / 1e12}


def flops_lines(flops: dict[str, Any], results: dict[str, Any] | None = None) -> list[str]:
    """The grid's FLOPs, and the rate the one-hour target needs beside the rates measured (when there are)."""
    lines = ["## Compute of the full T1 grid", "",
             "FLOPs per round as the harness counts them (training E=10, evaluation, server), per (method, setting);"
             " achieved TFLOP/s = those FLOPs / the measured s/round (one run at a time).", "",
             "| method | setting | TFLOP/round | achieved TFLOP/s |", "|---|---|---|---|"]
    rates = []
    for key, cell in flops["cells"].items():
        m, n = key.split(" ")
        found = (results or {}).get(n, {}).get(m)
        if found:
            rates.append(sum(cell.values()) / found["seconds_per_round"] / 1e12)
        lines.append(f"| {m} | {n} | {sum(cell.values()) / 1e12:.2f} | {f'{rates[-1]:.2f}' if found else '-'} |")
    lines += ["", f"Whole grid ({len(flops['methods'])} methods x 2 datasets x 3 settings x 3 seeds x 500 rounds, CIFAR-100 counted as "
              f"CIFAR-10): {flops['total_flops']:.3g} FLOPs, so one GPU-hour needs {flops['sustained_tflops_for_one_hour']:.0f}"
              " TFLOP/s sustained, every second of the hour."]
    if rates:
        lines.append(f"Measured one run at a time: {min(rates):.2f}-{max(rates):.2f} TFLOP/s, so the one-hour target "
                     f"needs {flops['sustained_tflops_for_one_hour'] / max(rates):.0f}x the best of them.")
    return lines + [""]


def write(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(report, indent=1, default=str))
    lines = ["# GPU benchmark", "", f"Command: `python -m benchmarks.gpu {' '.join(report['argv'])}`  ",
             f"Device: {report['device_name']}; torch {report['torch']}; {report['date_utc']}.  ",
             f"Protocol: T1 at full protocol (E={report['sizes']['local_epochs']}, batch {report['sizes']['batch_size']},"
             f" eval every round, cnn-hetero) on CIFAR-10-shaped synthetic data ({report['sizes']['train']} train /"
             f" {report['sizes']['test']} test images; the real files do not travel to the GPU machine, and a round's"
             " time does not depend on pixel values). One warm-up round, then timed rounds.", ""]
    for key, title in (("N=10", "N=10, C=1.0 (one client after the other)"),
                       ("N=10 batched", "N=10, C=1.0, same-architecture clients trained together"),
                       ("N=50", "N=50, C=0.2"), ("N=100", "N=100, C=0.1")):
        rows = report["results"].get(key)
        if not rows:
            continue
        lines += [f"## {title}", "", "| method | s/round | warm-up s | GPU util % | peak alloc GiB | train samples/round |",
                  "|---|---|---|---|---|---|"]
        for m, r in rows.items():
            util = "-" if r["gpu_utilisation_percent"] is None else f"{r['gpu_utilisation_percent']:.0f}"
            peak = "-" if r["peak_allocated_gib"] is None else f"{r['peak_allocated_gib']:.2f}"
            lines.append(f"| {m} | {r['seconds_per_round']:.2f} | {r['warmup_round_seconds']:.2f} | {util} | {peak} |"
                         f" {r['train_samples_per_round']:.0f} |")
        lines.append("")
    conc = report.get("concurrency")
    if conc:
        util = "-" if conc["gpu_utilisation_percent"] is None else f"{conc['gpu_utilisation_percent']:.0f}%"
        lines += ["## Several runs per GPU", "",
                  f"{conc['processes']} processes of {conc['method']} (N=10, C=1) at once: s/round each "
                  f"{', '.join(f'{s:.2f}' for s in conc['seconds_per_round_each'])} against {conc['alone_seconds_per_round']:.2f}"
                  f" alone; combined {conc['combined_rounds_per_second']:.3f} rounds/s, GPU utilisation {util}.", ""]
    proj = report.get("projection")
    if proj:
        lines += ["## Projected full T1 grid", "",
                  f"7 methods x 2 datasets x 3 settings x 3 seeds x 500 rounds ({proj['measured_cells']} of 21 "
                  f"(method, setting) cells measured{'' if proj['complete'] else '; INCOMPLETE, a lower bound'}): "
                  f"{proj['sequential_gpu_hours']:.2f} GPU-hours one run at a time"
                  + (f"; {proj['concurrent_gpu_hours']:.2f} GPU-hours with {proj['processes']} runs per GPU "
                     f"(measured combined speed-up {proj['concurrent_speedup']:.2f}x)" if "concurrent_gpu_hours" in proj
                     else "") + ". CIFAR-100 is counted at CIFAR-10's measured times.", ""]
    if report.get("grid_flops"):
        lines += flops_lines(report["grid_flops"], report["results"])
    if report.get("skipped"):
        lines += ["Not measured (out of --budget): " + "; ".join(report["skipped"]), ""]
    (out / "gpu.md").write_text("\n".join(lines))


def write_flops(out: Path, flops: dict[str, Any], measured: Path | None) -> None:
    """`--flops`: t1-grid-flops.json/md, with the achieved rates of an earlier GPU run's gpu.json if given."""
    results = json.loads(measured.read_text())["results"] if measured else None
    out.mkdir(parents=True, exist_ok=True)
    (out / "t1-grid-flops.json").write_text(json.dumps(flops, indent=1))
    source = f" (measured s/round: {measured})" if measured else ""
    command = "python -m benchmarks.gpu --flops" + (f" --results {measured}" if measured else "")
    text = "\n".join([f"# FLOPs of the full T1 grid{source}", "", f"Command: `{command}` (FLOPs do not depend on the "
                      "device: counted on a CPU).", ""] + flops_lines(flops, results))
    (out / "t1-grid-flops.md").write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--budget", type=float, default=480, help="seconds; no step starts that would not fit")
    ap.add_argument("--tiny", action="store_true", help="small data and E=1: checks the script in seconds")
    ap.add_argument("--processes", type=int, default=4, help="runs at once in the several-runs-per-GPU step")
    ap.add_argument("--methods", nargs="*", default=list(T1_METHODS))
    ap.add_argument("--flops", action="store_true",
                    help="only count the full T1 grid's FLOPs (any device, minutes on a CPU); with --results "
                         "GPU.JSON, beside that run's measured s/round")
    ap.add_argument("--results", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-rounds", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    sizes = TINY if args.tiny else FULL
    if args.worker:
        return worker(args.worker, args.worker_rounds, device, sizes)
    if args.flops:
        return write_flops(args.out, grid_flops(device, args.methods, sizes), args.results)
    start = time.perf_counter()
    report: dict[str, Any] = {
        "argv": sys.argv[1:] if argv is None else argv, "device": str(device), "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "sizes": sizes, "results": {},
        "skipped": []}

    def left() -> float:
        return args.budget - (time.perf_counter() - start)

    def measure(key: str, method: str, n: int, c: float, batched: bool = False) -> None:
        spent = [r["warmup_round_seconds"] + 2 * r["seconds_per_round"] for rows in report["results"].values()
                 for r in rows.values()]
        guess = max(spent) if spent else 0.0
        if left() < guess:
            report["skipped"].append(f"{key} {method}")
            return
        r = time_method(method, n, c, device, sizes, batched=batched)
        report["results"].setdefault(key, {})[method] = r
        print(f"[gpu {time.perf_counter() - start:6.0f}s] {key} {method}: {r['seconds_per_round']:.2f} s/round, "
              f"util {r['gpu_utilisation_percent']}", file=sys.stderr, flush=True)
        write(args.out, report)

    for m in args.methods:
        measure("N=10", m, 10, 1.0)
    for m in args.methods:
        measure("N=10 batched", m, 10, 1.0, batched=True)
    for n, c in T1_SETTINGS[1:]:
        for m in args.methods:
            measure(f"N={n}", m, n, c)
    alone = report["results"].get("N=10", {}).get("fedgh")
    if alone and left() > 3 * (alone["warmup_round_seconds"] + 2 * alone["seconds_per_round"]) + 30:
        conc = concurrent_runs("fedgh", args.processes, 2, device, args.tiny)
        conc["alone_seconds_per_round"] = alone["seconds_per_round"]
        report["concurrency"] = conc
    else:
        report["skipped"].append("several runs per GPU")
    report["projection"] = projection(report["results"], report.get("concurrency"))
    if left() > 0:
        report["grid_flops"] = grid_flops(device, args.methods, sizes)
    report["wall_seconds"] = time.perf_counter() - start
    write(args.out, report)
    print((args.out / "gpu.md").read_text())


if __name__ == "__main__":
    main()
