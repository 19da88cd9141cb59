"""Checkpoint and resume: a run killed at any round and resumed gives the same numbers as an uninterrupted
one, its results folder and MLflow run continue without duplicated or missing steps, and a checkpoint is a
weights-only file that a kill mid-write cannot corrupt."""
from __future__ import annotations

import collections
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bench.checkpoint import CheckpointError, Packer, RunCheckpoint, load_file, save_file, unpack
from bench.config import RunConfig
from bench.registry import algorithms
from bench.runner import client_splits
from bench.simulator import Simulation
from data.device_data import DeviceData
from tests.conftest import bench_main
from data.sources import synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
TIME_KEYS = ("round_time", "cum_round_time", "wall_time")

_SMALL: dict[str, object] = {}


def small_data():
    """300 train / 100 test synthetic images: one or two batches per client and round."""
    if "ds" not in _SMALL:
        ds = synthetic_dataset(num_classes=10, train_size=300, test_size=100, seed=0)
        _SMALL["ds"] = ds
        _SMALL["data"] = DeviceData(ds, torch.device("cpu"), augment=True)
    return _SMALL["ds"], _SMALL["data"]


def small_simulation(name: str) -> Simulation:
    cls = algorithms()[name]
    cfg = RunConfig(dataset="synthetic", num_clients=5, participation=0.6, rounds=3, batch_size=32,
                    local_epochs=1, classes_per_client=2, eval_batch_size=256,
                    model_group=cls.example_group())
    ds, data = small_data()
    return Simulation(cfg, cls, 0, data, client_splits(cfg, ds, 0, torch.device("cpu")), torch.device("cpu"))


def without_time(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIME_KEYS}


def client_tensors(sim: Simulation) -> dict[str, torch.Tensor]:
    tensors, _ = sim.state_dict()
    return {k: v for k, v in tensors.items() if k.startswith(("client/", "server/"))}


@pytest.mark.parametrize("name", list(algorithms()))
def test_checkpoint_round_trip_continues_identically(name, tmp_path):
    """Every registered algorithm: checkpoint after round 1, load into a fresh Simulation, run round 2:
    the same metrics, client states and server state as running rounds 1-2 without a break. Participation
    0.6 and augmentation make round 2 depend on the sampler and augmentation RNG states."""
    straight = small_simulation(name)
    straight.initial_metrics()
    straight.run_round(0)
    expected = without_time(straight.run_round(1))

    first = small_simulation(name)
    first.initial_metrics()
    first.run_round(0)
    tensors, meta = first.state_dict()
    save_file(tmp_path / "state.pt", tensors, {"sim": meta})
    raw = torch.load(tmp_path / "state.pt", weights_only=True)  # a flat dict of tensors, nothing unpickled
    assert all(isinstance(v, torch.Tensor) for v in raw.values())

    resumed = small_simulation(name)
    loaded_tensors, loaded_meta = load_file(tmp_path / "state.pt")
    resumed.load_state_dict(loaded_tensors, loaded_meta["sim"])
    assert resumed.rounds_done == 1
    assert without_time(resumed.run_round(1)) == expected
    want, got = client_tensors(straight), client_tensors(resumed)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


def test_pack_restores_values_and_identity():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    model[2].eval()
    model[0].weight.requires_grad_(False)
    gen = torch.Generator().manual_seed(7)
    rng = np.random.default_rng(3)
    state = {
        "model": model, "opt": opt, "gen": gen, "rng": rng,
        "lam": torch.tensor(0.25), "param": nn.Parameter(torch.ones(2)),
        "versions": {3: 1, 0: 2}, "cache": {("train", "a", 32): 10**20},
        "history": collections.deque([({"w": torch.arange(3.0)}, 12)], maxlen=5),
        "classes": {1, 4}, "shape": torch.Size([2, 3]), "counts": collections.defaultdict(int, {1: 2}),
        "arr": np.arange(4, dtype=np.int16), "f": np.float32(0.5), "nan": float("nan"), "none": None,
        "where": torch.device("cpu"), "dtype": torch.bfloat16,
    }
    packer = Packer()
    spec = json.loads(json.dumps(packer.pack(state, "s")))  # the JSON part really round-trips through text
    expected_draws = (torch.rand(2, generator=gen), rng.random())

    fresh_model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    fresh_opt = torch.optim.SGD(fresh_model.parameters(), lr=0.1, momentum=0.9)
    template = {"model": fresh_model, "opt": fresh_opt, "gen": torch.Generator(), "rng": np.random.default_rng(0),
                "param": nn.Parameter(torch.zeros(2))}
    param_before = template["param"]
    out = unpack(spec, packer.tensors, template)

    assert out["model"] is fresh_model and out["opt"] is fresh_opt and out["param"] is param_before
    for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values()):
        assert torch.equal(a, b)
    assert [m.training for m in fresh_model.modules()] == [m.training for m in model.modules()]
    assert not fresh_model[0].weight.requires_grad
    assert torch.equal(fresh_opt.state[fresh_model[0].bias]["momentum_buffer"], opt.state[model[0].bias]["momentum_buffer"])
    assert (torch.rand(2, generator=out["gen"]).tolist(), out["rng"].random()) == \
        (expected_draws[0].tolist(), expected_draws[1])
    assert out["versions"] == {3: 1, 0: 2} and out["cache"] == {("train", "a", 32): 10**20}
    assert isinstance(out["history"], collections.deque) and out["history"].maxlen == 5
    assert torch.equal(out["history"][0][0]["w"], torch.arange(3.0)) and out["history"][0][1] == 12
    assert out["classes"] == {1, 4} and out["shape"] == torch.Size([2, 3]) and isinstance(out["shape"], torch.Size)
    assert isinstance(out["counts"], collections.defaultdict) and out["counts"][9] == 0
    assert out["arr"].dtype == np.int16 and out["arr"].tolist() == [0, 1, 2, 3]
    assert out["f"] == np.float32(0.5) and isinstance(out["f"], np.float32)
    assert np.isnan(out["nan"]) and out["none"] is None and float(out["lam"]) == 0.25
    assert out["where"] == torch.device("cpu") and out["dtype"] is torch.bfloat16


def test_unsupported_state_is_named():
    class Opaque:
        pass

    with pytest.raises(CheckpointError, match=r"server/thing: cannot checkpoint .*Opaque"):
        Packer().pack({"thing": Opaque()}, "server")


def test_kill_mid_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    ckpt = RunCheckpoint(tmp_path / "checkpoint")
    ckpt.save({"w": torch.ones(3)}, {"step": 1})

    def dies_mid_write(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # stands for the kill: the temporary file is left half-written

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save({"w": torch.zeros(3)}, {"step": 2})
    monkeypatch.undo()
    tensors, meta = ckpt.load()
    assert meta["step"] == 1 and torch.equal(tensors["w"], torch.ones(3))
    (tmp_path / "checkpoint" / "state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        ckpt.load()


# ---- end to end -------------------------------------------------------------------------------------------

def run_args(npz: Path, out: Path, name: str, rounds: int, *extra: str) -> list[str]:
    return ["run", "--algo", "standalone", "--algo", "pfedlora", "--dataset", str(npz), "--clients", "5",
            "--model-group", "cnn5-homo", "--participation", "0.6", "--rounds", str(rounds), "--batch-size", "64",
            "--output-dir", str(out),
            "--run-name", name, "--set", "pfedlora.rank=4", "--set", "eval_batch_size=256", "--quiet", *extra]


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIME_KEYS} for row in csv.DictReader(f)]


def assert_same_results(root: Path, ref: Path, keys: list[str]) -> None:
    for key in keys:
        got, want = root / "runs" / key, ref / "runs" / key
        assert rows(got / "metrics.csv") == rows(want / "metrics.csv"), key
        assert (got / "clients.csv").read_text() == (want / "clients.csv").read_text(), key
        summaries = [{k: v for k, v in json.loads((d / "summary.json").read_text()).items() if k not in TIME_KEYS}
                     for d in (got, want)]
        assert summaries[0] == summaries[1], key
        assert summaries[0]["status"] == "FINISHED"


def assert_mlflow_run_continues(root: Path, keys: list[str], run_ids: dict[str, str]) -> None:
    """Each child run is the one created before the interruption; every metric holds each step once,
    with the results folder's values; parent and children FINISHED."""
    from mlflow.tracking import MlflowClient

    info = json.loads((root / "mlflow.json").read_text())
    client = MlflowClient(info["tracking_uri"])
    assert client.get_run(info["parent_run_id"]).info.status == "FINISHED"
    for key in keys:
        run_id = json.loads((root / "runs" / key / "mlflow.json").read_text())["run_id"]
        if key in run_ids:
            assert run_id == run_ids[key], f"{key}: the resumed process opened a new MLflow run"
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == info["parent_run_id"]
        with open(root / "runs" / key / "metrics.csv", newline="") as f:
            table = list(csv.DictReader(f))
        for metric in ("acc_mean", "train_loss", "cum_train_flops", "bytes_up", "round_time"):
            history = client.get_metric_history(run_id, metric)
            want = [(int(r["step"]), float(r[metric])) for r in table if r.get(metric) not in ("", None)]
            assert sorted(m.step for m in history) == [step for step, _ in want], f"{key} {metric}: steps"
            if metric not in TIME_KEYS:  # a step replayed after the checkpoint keeps MLflow's first wall time
                assert sorted((m.step, m.value) for m in history) == want, f"{key} {metric}"


def test_sigkill_at_an_arbitrary_round_then_resume_is_bit_identical(small_npz, tmp_path, monkeypatch, capsys):
    """A real `bench run` process is SIGKILLed while pfedlora (the second run) is past a random round;
    `bench resume` finishes it. Metrics, per-client results and summaries equal an uninterrupted run's
    (wall times aside), standalone (finished before the kill) is kept, MLflow continues the same runs."""
    rounds = 5
    kill_after = random.randint(1, rounds - 2)  # at least one more round to go, so the kill lands mid-run
    print(f"killing pfedlora once round {kill_after} is in its metrics.csv")  # shown if the test fails
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "bench.cli", *run_args(small_npz, out, "killed", rounds)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "killed" / "runs" / "pfedlora-seed0" / "metrics.csv"
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after + 2:  # header + steps 0..k
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before the kill: {proc.communicate()[0][-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed = out / "killed"
    assert json.loads((killed / "runs" / "standalone-seed0" / "summary.json").read_text())["status"] == "FINISHED"
    assert not (killed / "runs" / "pfedlora-seed0" / "summary.json").exists()
    run_ids = {key: json.loads((killed / "runs" / key / "mlflow.json").read_text())["run_id"]
               for key in ("standalone-seed0", "pfedlora-seed0")}

    code, _, err = bench_main(monkeypatch, capsys, "resume", str(killed), "--quiet")
    assert code == 0, err
    code, _, err = bench_main(monkeypatch, capsys, *run_args(small_npz, out, "straight", rounds))
    assert code == 0, err

    keys = ["standalone-seed0", "pfedlora-seed0"]
    assert_same_results(killed, out / "straight", keys)
    assert_mlflow_run_continues(killed, keys, run_ids)
    assert not (killed / "runs" / "pfedlora-seed0" / "checkpoint").exists()  # removed once the run finished
    assert [r["run"] for r in csv.DictReader(open(killed / "summary.csv"))] == keys


class Interrupted(BaseException):
    """Stands for a crash: not an Exception, so no failure handling catches it."""


def test_resume_when_mlflow_is_ahead_of_the_checkpoint(small_npz, tmp_path, monkeypatch, capsys):
    """checkpoint_every=2: round 3 is logged to the results folder and MLflow, then the process dies in
    round 4. `bench run --resume` goes back to the round-2 checkpoint: the folder drops row 3 and writes it
    again, MLflow keeps each step once."""
    out = tmp_path / "out"
    real_round = Simulation.run_round

    def crash_in_round_4(self, round_index):
        if round_index == 3 and self.algo.name == "pfedlora":
            raise Interrupted
        return real_round(self, round_index)

    monkeypatch.setattr(Simulation, "run_round", crash_in_round_4)
    args = run_args(small_npz, out, "crashed", 4, "--checkpoint-every", "2")
    with pytest.raises(Interrupted):
        bench_main(monkeypatch, capsys, *args)
    monkeypatch.setattr(Simulation, "run_round", real_round)
    run_dir = out / "crashed" / "runs" / "pfedlora-seed0"
    assert [int(r["step"]) for r in rows(run_dir / "metrics.csv")] == [0, 1, 2, 3]
    assert RunCheckpoint(run_dir / "checkpoint").load()[1]["step"] == 2
    run_id = json.loads((run_dir / "mlflow.json").read_text())["run_id"]

    code, _, err = bench_main(monkeypatch, capsys, *run_args(small_npz, out, "crashed", 4, "--resume"))
    assert code == 0, err
    code, _, err = bench_main(monkeypatch, capsys, *run_args(small_npz, out, "straight", 4))
    assert code == 0, err
    keys = ["standalone-seed0", "pfedlora-seed0"]
    assert_same_results(out / "crashed", out / "straight", keys)
    assert_mlflow_run_continues(out / "crashed", keys, {"pfedlora-seed0": run_id})
