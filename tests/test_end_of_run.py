"""The end of a run tells the user what happened: a compact table per algorithm (final, best and
validation-selected accuracy, total FLOPs, total bytes, wall time), where report.md is, and the command that
opens MLflow on these runs."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench.callbacks.base import InvocationInfo, RunInfo
from bench.callbacks.progress import ProgressCallback, final_table
from bench.cli import cli
from bench.progress import Progress
from reports.synthetic import fresh_mlflow_store, tiny_npz

pytestmark = pytest.mark.usefixtures("one_thread")


def summary(final, best, selected, flops, up, down, wall):
    return {"final_acc": final, "best_acc": best, "val_selected_acc": selected, "total_train_flops": flops,
            "total_bytes_up": up, "total_bytes_down": down, "wall_time": wall}


def test_final_table_means_each_algorithm_over_its_seeds(tmp_path):
    (tmp_path / "mlflow.db").touch()
    stream = io.StringIO()
    callback = ProgressCallback(Progress(4, stream=stream))
    callback.on_invocation_start(InvocationInfo("x", {"output_dir": str(tmp_path), "tracking_uri": None,
                                                      "dataset_split": "re-split"}), False)
    callback.on_run_kept("fedkd-seed0", summary(0.40, 0.42, 0.41, 3e12, 1e6, 1e6, 10.0))
    runs = {"pfedlora-seed0": summary(0.50, 0.55, 0.52, 2e12, 1e6, 3e6, 30.0),
            "pfedlora-seed1": summary(0.60, 0.65, 0.62, 4e12, 3e6, 5e6, 90.0)}
    for key, s in runs.items():
        callback.on_run_end(RunInfo(key, {}, {}), s, [], "FINISHED")
    callback.on_run_end(RunInfo("fedkd-seed1", {}, {}), {"error": "boom"}, [], "FAILED")
    callback.on_invocation_end([tmp_path / "summary.csv", tmp_path / "plots" / "report.md"], "FAILED")
    lines = stream.getvalue().splitlines()
    title = next(i for i, line in enumerate(lines) if line.startswith("results ("))
    assert "data split: re-split" in lines[title]
    header, first, second = lines[title + 1:title + 4]
    assert header.split()[:4] == ["algorithm", "final", "%", "best"]
    # pFedLoRA first (registry order): means of its two seeds; FedKD from its kept seed, its failure counted.
    assert first.split() == ["pFedLoRA", "55.00", "60.00", "57.00", "3", "TFLOP", "6", "MB", "1:00"]
    assert second.split()[:5] == ["FedKD", "(1", "failed)", "40.00", "42.00"]
    assert f"report: {tmp_path / 'plots' / 'report.md'}" in lines
    assert f"MLflow: bench ui --output-dir {tmp_path}" in lines
    table = final_table({"a-seed0": (summary(0.5, 0.5, 0.5, 1.0, 0, 0, 1.0), "FINISHED")})
    assert "mean over 1 seed;" in table[0] and "data split" not in table[0]


def test_bench_run_ends_with_the_table_and_where_to_look(tmp_path):
    out = tmp_path / "results"
    fresh_mlflow_store(out / "mlflow.db")
    data = tiny_npz(tmp_path / "tiny.npz")
    result = CliRunner().invoke(cli, [
        "run", "--algo", "pfedlora", "--algo", "standalone", "--dataset", str(data), "--clients", "4",
        "--rounds", "1", "--batch-size", "32", "--output-dir", str(out), "--run-name", "end", "--device", "cpu",
        "--set", "pfedlora.rank=4"])
    assert result.exit_code == 0, result.output
    text = result.output
    start = text.index("results (mean over 1 seed")
    rows = text[start:].splitlines()
    for name, key in (("pFedLoRA", "pfedlora"), ("Standalone", "standalone")):
        row = next(r for r in rows if r.startswith(name))
        s = json.loads((out / "end" / "runs" / f"{key}-seed0" / "summary.json").read_text())
        assert row.split()[1:4] == [f"{100 * s[k]:.2f}" for k in ("final_acc", "best_acc", "val_selected_acc")]
    assert f"report: {Path(out) / 'end' / 'plots' / 'report.md'}" in text
    assert f"MLflow: bench ui --output-dir {out}" in text
    assert text.index("MLflow: bench ui") < text.index("done: results in")
