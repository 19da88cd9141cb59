"""Seconds per round of the Vision Transformer groups beside the paper's CNN group, on the same federation.

    .venv/bin/python -m benchmarks.vit_speed                     # CPU: about 10 minutes on an idle 2-core machine
    .venv/bin/python -m benchmarks.vit_speed --device cuda       # on a GPU (adds the vit-hetero group at full size)
    .venv/bin/python -m benchmarks.vit_speed --tiny --out /tmp/v  # seconds: a smoke run
    .venv/bin/python -m benchmarks.vit_speed --groups cnn-hetero,vit-hetero --algos standalone,fedsalora \
        --rounds 1 --tag vit-hetero                                # the full-size ViTs on a CPU (slow)

Per (model group, algorithm): one warm-up round (it also counts the FLOPs once per step shape), then timed
rounds through the real simulator (bench.simulator.Simulation.run_round: local training, payloads, aggregation,
evaluation of the sampled clients), their median in seconds, training FLOPs per round (the harness's count)
and the achieved FLOP/s. Federation: CIFAR-10-shaped synthetic data (2,000 training images, 10 clients,
2 classes each, all sampled), E=1, batch 64. Writes vit_speed.json and vit_speed.md into --out
(default benchmarks/results/; with --tag T: vit_speed-T.json / .md).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from bench.config import RunConfig  # noqa: E402
from bench.plan import client_splits  # noqa: E402
from bench.registry import resolve_algorithms  # noqa: E402
from bench.simulator import Simulation  # noqa: E402
from data.device_data import DeviceData  # noqa: E402
from data.sources import synthetic_dataset  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
MHPFL = ("standalone", "pfedlora", "fedgh")          # run on every group
LORA = ("fedsalora", "hetlora", "flora")              # LoRA on q, v: transformer groups only


def groups_for(device: str, tiny: bool) -> tuple[str, ...]:
    if tiny:
        return ("cnn-hetero", "vit-small-hetero")
    # the full-size ViTs take about 90 CNN-1 steps per step: on a CPU only with --with-vit-hetero
    return ("cnn-hetero", "vit-small-hetero", "vit-hetero") if device != "cpu" else ("cnn-hetero", "vit-small-hetero")


def time_group(group: str, algo: str, args, data, dataset) -> dict:
    cfg = RunConfig(dataset="synthetic", num_clients=args.clients, rounds=args.rounds + 1, batch_size=64,
                    local_epochs=1, classes_per_client=2, model_group=group, algorithms=[algo], device=args.device,
                    eval_batch_size=1024, checkpoint_every=0)
    device = torch.device(args.device)
    sim = Simulation(cfg, resolve_algorithms([algo])[0], 0, data, client_splits(cfg, dataset, 0, device), device)
    times, flops = [], []
    for r in range(args.rounds + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        metrics = sim.run_round(r)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if r > 0:  # round 0: warm-up and the FLOP counting of each new step shape
            times.append(time.perf_counter() - start)
            flops.append(metrics["train_flops"])
    seconds = statistics.median(times)
    return {"group": group, "algorithm": algo, "s_per_round": round(seconds, 3),
            "train_flops_per_round": int(statistics.median(flops)),
            "gflop_per_s": round(statistics.median(flops) / seconds / 1e9, 2), "rounds_timed": len(times)}


def write(rows: list[dict], args, out: Path, wall: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python -m benchmarks.vit_speed " + " ".join(args.argv), "device": args.device,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor()
            or platform.machine(), "cores": os.cpu_count(), "load_average": [round(v, 2) for v in os.getloadavg()],
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "wall_s": round(wall, 1),
            "clients": args.clients, "train_size": args.train_size, "rounds_timed": args.rounds}
    stem = f"vit_speed-{args.tag}" if args.tag else "vit_speed"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    cnn = {r["algorithm"]: r["s_per_round"] for r in rows if r["group"] == "cnn-hetero"}
    lines = ["# Transformer vs CNN group: seconds per round", "",
             f"Command: `{meta['command']}`  ",
             f"Machine: {meta['machine']}, {meta['cores']} cores, torch threads {meta['torch_threads']}, device "
             f"{args.device}, torch {meta['torch']}; {meta['date']}; load average at the end {meta['load_average']} "
             "(the machine was shared: absolute times vary with the load, the ratios less).  ",
             f"Federation: synthetic CIFAR-10-shaped data, {args.train_size} training images, {args.clients} clients "
             f"(2 classes each, all sampled), E=1, batch 64; median of {args.rounds} timed rounds after a warm-up "
             "round.", "",
             "`x CNN group`: s/round over the same algorithm's on cnn-hetero (the LoRA methods run on transformers only).",
             "",
             "| group | algorithm | s/round | x CNN group | train GFLOP/round | GFLOP/s |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['s_per_round'] / cnn[r['algorithm']]:.1f}" if cnn.get(r["algorithm"]) else "—"
        lines.append(f"| {r['group']} | {r['algorithm']} | {r['s_per_round']:.2f} | {ratio} | "
                     f"{r['train_flops_per_round'] / 1e9:.1f} | {r['gflop_per_s']:.1f} |")
    if args.device == "cpu":
        lines += ["", "CPU only: no GPU was lent to this run (on a GPU: --device cuda). The full-size vit-hetero "
                  "group costs about 90 CNN-1 steps per ViT-1 step (models/vit.py); on a CPU it is timed separately "
                  "(vit_speed-vit-hetero.md)."]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds after the warm-up round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="a smoke run: 2 groups, 2 algorithms, 200 images")
    parser.add_argument("--with-vit-hetero", action="store_true", help="also time vit-hetero on a CPU")
    parser.add_argument("--groups", help="comma-separated model groups instead of the default ones")
    parser.add_argument("--algos", help="comma-separated algorithms instead of the default ones")
    parser.add_argument("--tag", help="write vit_speed-TAG.json/.md")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else __import__("sys").argv[1:]
    torch.set_num_threads(args.threads)
    if args.tiny:
        args.train_size, args.rounds, args.clients = 200, 1, 5
    dataset = synthetic_dataset(num_classes=10, train_size=args.train_size, test_size=max(100, args.train_size // 5))
    data = DeviceData(dataset, torch.device(args.device), augment=True)
    groups = groups_for(args.device, args.tiny) + (("vit-hetero",) if args.with_vit_hetero and not args.tiny else ())
    if args.groups:
        groups = tuple(args.groups.split(","))
    start, rows = time.perf_counter(), []
    for group in groups:
        algos = MHPFL + (LORA if group.startswith("vit") else ())
        if args.algos:
            algos = tuple(a for a in args.algos.split(",") if a in algos)
        for algo in (algos[:2] if args.tiny else algos):
            rows.append(time_group(group, algo, args, data, dataset))
            print(f"{group:18s} {algo:12s} {rows[-1]['s_per_round']:8.2f} s/round", flush=True)
    write(rows, args, args.out, time.perf_counter() - start)


if __name__ == "__main__":
    main()
