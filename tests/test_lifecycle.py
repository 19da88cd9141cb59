"""The run lifecycle: the plan builds each algorithm's hyper-parameters once; the run loop calls the callbacks
in the documented order (results folder, checkpoint, MLflow, progress), so a checkpoint never holds a round
the folder lacks and MLflow never gets a round before the folder; a resumed run's callbacks catch up from
its history; the results store's run keys and torn lines; which config fields change results is declared
once; one CLI vocabulary."""
from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench.callbacks import Callback, CallbackList, RunInfo, ordered
from bench.callbacks.checkpoint import CheckpointCallback
from bench.callbacks.results import ResultsFolderCallback
from bench.cli import cli
from bench.config import RunConfig, config_differences, results_fields, setup_fields
from bench.executors import ExecutorOptions, LocalExecutor, RayExecutor, make_executor
from bench.plan import plan_runs
from bench.runner import execute_run, open_invocation
from bench.store import ResultsStore, parse_run_key, run_key

pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(Callback):
    """Records every event as (name, event, details)."""

    def __init__(self, name: str, log: list, check=None):
        self.name, self.log, self.check = name, log, check

    def on_run_start(self, run, resumed_from):
        self.log.append((self.name, "run_start", resumed_from, [h["step"] for h in run.history]))

    def on_round_end(self, run, step, metrics):
        if self.check is not None:
            self.check(run, step)
        self.log.append((self.name, "round_end", step, len(run.history)))

    def on_run_end(self, run, summary, clients, status):
        self.log.append((self.name, "run_end", status, None))


def small_cfg(npz: Path, out: Path, **overrides) -> RunConfig:
    settings = dict(algorithms=["standalone"], dataset=str(npz), num_clients=5, model_group="cnn5-homo", rounds=3,
                    batch_size=64, eval_batch_size=256, device="cpu", output_dir=str(out), run_name="r")
    return RunConfig(**{**settings, **overrides})


@pytest.fixture
def invocation(small_npz, tmp_path):
    opened = []

    def make(**overrides):
        inv = open_invocation(small_cfg(small_npz, tmp_path, **overrides), use_mlflow=False)
        opened.append(inv)
        return inv
    yield make
    for inv in opened:
        inv.release()


def test_callbacks_are_called_in_the_documented_order(invocation):
    inv = invocation(checkpoint_every=1)
    [spec] = inv.pending
    log: list = []
    store = inv.store

    def folder_has_the_round(run, step):  # what checkpoint and mirror see: the folder already holds the round
        assert int(store.rows(run.key)[-1]["step"]) == step

    callbacks = ordered(record=CallbackList([ResultsFolderCallback(store), Recorder("record", log)]),
                        checkpoint=CallbackList([CheckpointCallback(1, keep=True),
                                                 Recorder("checkpoint", log, folder_has_the_round)]),
                        mirror=Recorder("mirror", log, folder_has_the_round), display=Recorder("display", log))
    summary, status = execute_run(spec, inv.env, callbacks)
    assert status == "FINISHED" and summary["rounds"] == 3
    names = ["record", "checkpoint", "mirror", "display"]
    assert log == [(n, "run_start", None, []) for n in names] + [
        (n, "round_end", step, step + 1) for step in range(4) for n in names] + [
        (n, "run_end", "FINISHED", None) for n in names]
    # The checkpoint of round 2 (the last one before the end) holds rounds 0-2.
    meta = json.loads((spec.checkpoint / "checkpoint.json").read_text())
    assert meta["step"] == 2


def test_a_resumed_run_continues_from_its_checkpoint_and_callbacks_catch_up(invocation):
    inv = invocation(checkpoint_every=1, keep_checkpoints=True)
    [spec] = inv.pending
    straight, _ = execute_run(spec, inv.env, ordered(record=ResultsFolderCallback(inv.store),
                                                     checkpoint=CheckpointCallback(1, keep=True)))
    inv.release()
    # The checkpoint after round 2, moved into a new folder: the run there continues after round 2.
    resumed = invocation(checkpoint_every=1, run_name="resumed")
    [rspec] = resumed.pending
    rspec.checkpoint.mkdir(parents=True)
    for f in spec.checkpoint.iterdir():
        (rspec.checkpoint / f.name).write_bytes(f.read_bytes())
    log: list = []
    folder = ResultsFolderCallback(resumed.store)
    env = dataclasses.replace(resumed.env, resume=True)
    summary, status = execute_run(rspec, env, ordered(record=folder, mirror=Recorder("mirror", log)))
    assert status == "FINISHED"
    assert log[0] == ("mirror", "run_start", 2, [0, 1, 2])  # the history a callback catches up from
    assert [e[2] for e in log[1:-1]] == [3]
    # The folder, empty before, got the checkpoint's rounds and then the new one: the same as straight through.
    assert [int(r["step"]) for r in resumed.store.rows(rspec.key)] == [0, 1, 2, 3]
    drop = {"wall_time"}
    assert {k: v for k, v in summary.items() if k not in drop} == {k: v for k, v in straight.items() if k not in drop}


def test_the_plan_builds_hyperparameters_once(small_npz, tmp_path, monkeypatch):
    from algorithms.pfedlora import PFedLoRA
    from algorithms.standalone import Standalone

    calls = []
    for cls in (PFedLoRA, Standalone):
        real = cls.hparams_for.__func__
        monkeypatch.setattr(cls, "hparams_for", classmethod(lambda c, cfg, real=real: calls.append(c.name)
                                                            or real(c, cfg)))
    cfg = small_cfg(small_npz, tmp_path, algorithms=["pfedlora", "standalone"], seeds=[0, 1],
                    algo={"pfedlora": {"rank": 4}})
    runs = plan_runs(cfg)
    assert sorted(calls) == ["pfedlora", "standalone"]  # once per algorithm, not per seed or per use
    assert [(r.name, r.seed, r.key) for r in runs] == [("pfedlora", 0, "pfedlora-seed0"),
                                                     ("standalone", 0, "standalone-seed0"),
                                                     ("pfedlora", 1, "pfedlora-seed1"),
                                                     ("standalone", 1, "standalone-seed1")]
    assert runs[0].hparams.rank == 4 and runs[0].hparams is runs[2].hparams
    with pytest.raises(dataclasses.FrozenInstanceError):
        runs[0].seed = 3


def test_the_store_owns_run_keys_and_drops_torn_lines(tmp_path):
    assert run_key("fedkd", 3) == "fedkd-seed3" and parse_run_key("fedkd-seed3") == ("fedkd", 3)
    assert parse_run_key(run_key("my-algo-seed", 12)) == ("my-algo-seed", 12)
    store = ResultsStore(tmp_path / "root")
    store.write_run_config("a-seed0", {"x": 1}, {"t": "v"})
    store.write_rows("a-seed0", [{"step": 0, "acc": 0.1}, {"step": 1, "acc": 0.2}])
    path = store.run_dir("a-seed0") / "metrics.csv"
    path.write_text(path.read_text() + "1,0.3\n2,0.")  # a repeated step, then a torn last line
    with open(path, "a") as f:
        f.write("\n3\n")
    assert [r["step"] for r in store.rows("a-seed0")] == ["0", "1", "2"]
    assert store.run_keys() == ["a-seed0"] and store.run_config("a-seed0") == {"params": {"x": 1}, "tags": {"t": "v"}}
    assert store.config() == {} and not store.listed_as_finished("a-seed0")
    store.write_summary_table([{"run": "a-seed0", "status": "FINISHED"}])
    assert store.listed_as_finished("a-seed0")


def test_which_fields_change_results_is_declared_once_on_the_field():
    assert set(setup_fields()) == {"data_dir", "device", "threads", "output_dir", "run_name", "tracking_uri",
                                   "experiment", "offload_state", "flop_cache", "checkpoint_every",
                                   "keep_checkpoints", "system_metrics", "parallel_clients", "channels_last"}
    assert set(results_fields()) | set(setup_fields()) == {f.name for f in dataclasses.fields(RunConfig)}
    stored = RunConfig().to_dict()
    moved = RunConfig(device="cpu", threads=1, checkpoint_every=3, output_dir="elsewhere", flop_cache=False)
    assert config_differences(stored, moved) == []  # setup fields may differ on resume
    assert config_differences(stored, RunConfig(lr=0.1)) == ["lr: 0.01 there, 0.1 here"]
    from reports import paper

    cell = paper.t1_grid(paper.SCALES["smoke"], ["standalone"])[0]
    assert set(cell.identity()["config"]) == set(results_fields()) - set(paper.OWN_ENTRIES)
    help_text = CliRunner().invoke(cli, ["run", "--help"]).output
    assert "checkpoint_every" in help_text and "keep_checkpoints" in help_text


def test_one_cli_vocabulary(tmp_path):
    for command in ("run", "paper"):
        text = CliRunner().invoke(cli, [command, "--help"]).output
        assert "--seed SEED" in text and "--output-dir" in text and "--seeds" not in text and "--out " not in text
    text = CliRunner().invoke(cli, ["report", "--help"]).output
    assert "--output-dir" in text and "--out " not in text
    from bench.cli import Seeds

    assert Seeds().convert("0,1 2", None, None) == [0, 1, 2]


def test_executors_are_objects_behind_one_interface():
    assert isinstance(make_executor(None), LocalExecutor)
    assert isinstance(make_executor(ExecutorOptions(kind="ray")), RayExecutor)
    ray = RayExecutor(ExecutorOptions(kind="ray"))
    assert make_executor(ray) is ray and ray.concurrent and not LocalExecutor().concurrent
    with pytest.raises(Exception, match="need --executor ray"):
        make_executor(ExecutorOptions(gpus_per_run=1))


def test_the_ray_worker_forwards_what_the_driver_replays():
    """The forwarded events, replayed on the driver, reach its callbacks as the worker's did (in-process
    queue: no Ray needed)."""
    from bench.callbacks.forward import ForwardingCallback, replay

    class Queue(list):  # as Ray's: what is put is a copy
        def put(self, item):
            self.append(pickle.loads(pickle.dumps(item)))

    queue, worker_log, driver_log = Queue(), [], []
    worker = ordered(record=ForwardingCallback(queue, 0), mirror=Recorder("worker", worker_log))
    run = RunInfo("a-seed0", {"p": 1}, {"t": "x"}, rounds=1, history=[{"step": 0, "acc_mean": 0.1}])
    worker.on_run_start(run, 0)
    run.history.append({"step": 1, "acc_mean": 0.2})
    worker.on_round_end(run, 1, {"acc_mean": 0.2})
    worker.on_run_end(run, {"final_acc": 0.2}, [], "FINISHED")
    driver_run = RunInfo("a-seed0", {}, {}, rounds=1)
    for invocation, pid, event, args in queue:
        replay(event, args, driver_run, CallbackList([Recorder("worker", driver_log)]))
    assert driver_log == worker_log
    assert driver_run.params == {"p": 1} and [h["step"] for h in driver_run.history] == [0, 1]
    with pytest.raises(ValueError):
        replay("bogus", ("a-seed0",), driver_run, CallbackList([]))


def test_a_failing_estimate_never_stops_the_run(small_npz, tmp_path, monkeypatch, capsys):
    """The up-front estimate is a convenience: if it raises, the run says so in its line and goes on."""
    from bench.runner import Invocation
    from tests.conftest import bench_main

    def broken(self):
        raise RuntimeError("Kernel size can't be greater than actual input size")
    monkeypatch.setattr(Invocation, "estimate", broken)
    code, _, err = bench_main(monkeypatch, capsys, "run", "--algo", "standalone", "--dataset", str(small_npz),
                              "--clients", "3", "--rounds", "1", "--model-group", "cnn5-homo", "--output-dir",
                              str(tmp_path), "--run-name", "e")
    assert code == 0, err
    assert "estimated time: estimate unavailable (RuntimeError: Kernel size can't be greater" in err
    assert (tmp_path / "e" / "runs" / "standalone-seed0" / "summary.json").exists()


def test_an_interrupt_ends_the_run_killed_for_every_callback(invocation):
    """Ctrl-C (or SIGTERM: a KeyboardInterrupt too) inside a round: each callback hears the run end KILLED,
    the folder keeps its rounds, and the interrupt goes on up (the executor ends the invocation KILLED)."""
    inv = invocation(checkpoint_every=1)
    [spec] = inv.pending
    log: list = []

    class Interrupt(Callback):
        def on_round_end(self, run, step, metrics):
            if step == 2:
                raise KeyboardInterrupt
    callbacks = ordered(record=CallbackList([ResultsFolderCallback(inv.store), Interrupt()]),
                        checkpoint=CheckpointCallback(1), mirror=Recorder("mirror", log))
    with pytest.raises(KeyboardInterrupt):
        execute_run(spec, inv.env, callbacks)
    assert log[-1] == ("mirror", "run_end", "KILLED", None)
    assert inv.store.summary(spec.key)["status"] == "KILLED"
    assert [int(r["step"]) for r in inv.store.rows(spec.key)] == [0, 1, 2]
    assert spec.checkpoint.is_dir()  # the checkpoint of round 1 is kept for the resume
