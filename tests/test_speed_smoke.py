"""The speed benchmark in its tiny mode (CI): it runs end to end for every registered algorithm and writes
the JSON and Markdown reports with every field present and positive. No timing assertions: CI machines are
noisy, the committed full results (benchmarks/results/) carry the figures."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.registry import algorithms

REPO = Path(__file__).resolve().parents[1]


def test_tiny_speed_benchmark(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--tiny", "--no-mlflow", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "speed.json").read_text())
    assert (tmp_path / "speed.md").read_text().startswith("# Speed benchmark")

    stamp = report["stamp"]
    for key in ("machine", "cpu", "device", "torch", "commit", "date_utc", "load_average_start"):
        assert key in stamp
    assert stamp["torch"] and stamp["device"]

    expected = {n for n, cls in algorithms().items()
                if n not in ("standalone", "fedavg") and cls.example_model_group is None}
    assert report["results"], "no setting measured"
    for setting, per_algo in report["results"].items():
        assert set(per_algo) == expected, setting
        for name, r in per_algo.items():
            assert "error" not in r, f"{setting} {name}: {r.get('error')}"
            for loop in ("ours", "peer_style", "floor"):
                assert r["seconds_per_round"][loop] > 0
            for key in ("peer_ratio", "floor_ratio", "peer_over_floor", "train_samples_per_second",
                        "train_flop_per_second", "eval_all_clients_seconds", "one_local_epoch_all_clients_seconds",
                        "eval_over_epoch"):
                assert r[key] > 0, (setting, name, key)
            shares = r["breakdown_share"]
            for part in ("compute", "data", "payload_aggregation", "evaluation", "flop_accounting",
                         "algorithm_other", "harness_loop", "tracking_results_folder"):
                assert shares[part] is not None and shares[part] >= 0, (setting, name, part)
            assert shares["compute"] > 0
            assert r["flop_accounting_share"] >= 0
            mem = r["memory"]
            assert mem["state_bytes_per_client_mean"] > 0 and mem["state_bytes_total"] > 0
            assert mem["peak_rss_bytes"] > 0
    levers = report["levers"]["by_algorithm"]
    assert levers and all(r[lever]["floor_ratio"] > 0 for r in levers.values() for lever in r)
    assert all(r["max_abs_logit_diff"] < 1e-3 for k, r in report["compile_and_batched_eval"].items()
               if k.startswith("batched-eval"))
    assert report["batched"] and all(b["speedup"] > 0 for b in report["batched"].values())
    assert all(b["max_abs_param_diff"] < 1e-3 for b in report["batched"].values())
    assert isinstance(report["targets"], list) and report["targets"]


def test_tiny_grid_flops_of_the_gpu_benchmark(tmp_path):
    """`benchmarks.gpu --flops` counts each (method, setting) cell's FLOPs per round and totals the grid:
    500 rounds x 2 datasets x 3 seeds of every cell; training scaled from one epoch to the protocol's E."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--flops", "--tiny", "--device", "cpu",
                           "--methods", "fedgh", "fml", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    flops = json.loads((tmp_path / "t1-grid-flops.json").read_text())
    assert set(flops["cells"]) == {f"{m} N={n}" for m in ("fedgh", "fml") for n in (10, 50, 100)}
    for cell in flops["cells"].values():
        assert cell["train"] > 0 and cell["eval"] > 0
    # FML trains its private model and the meme, FedGH the private model only: more FLOPs in every setting
    for n in (10, 50, 100):
        assert flops["cells"][f"fml N={n}"]["train"] > flops["cells"][f"fedgh N={n}"]["train"]
    total = sum(sum(cell.values()) for cell in flops["cells"].values()) * 500 * 2 * 3
    assert flops["total_flops"] == total
    assert "TFLOP/s sustained" in (tmp_path / "t1-grid-flops.md").read_text()
