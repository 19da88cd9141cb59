"""The Flower adapter: every built-in method, run through Flower's simulation engine (its clients in ClientApps,
their state in the Flower context), gives the built-in simulator's numbers round by round: accuracy within float
tolerance, bytes and FLOPs exactly. One Flower simulation serves every case (one Ray start)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from algorithms.standalone import Standalone
from bench import registry
from bench.config import RunConfig, resolve_dataset_defaults
from bench.errors import UserError
from bench.executors.flower import FlowerExecutor
from bench.executors.local import LocalExecutor
from bench.plan import client_splits
from bench.registry import resolve_algorithms
from bench.runner import run_invocation
from bench.simulator import Simulation
from data.device_data import DeviceData
from data.portable import partition_sha256
from data.sources import load_dataset, synthetic_dataset

HAVE_FLOWER = importlib.util.find_spec("flwr") is not None


@pytest.fixture(scope="module")
def flower():
    """The adapter's modules; skips the test where Flower is not installed (the `flower` extra)."""
    pytest.importorskip("flwr")
    from bench.flower import link, run, server

    return types.SimpleNamespace(ClientLink=link.ClientLink, simulate=run.simulate,
                                 FlowerSimulation=server.FlowerSimulation)


N, ROUNDS, SEED = 4, 3, 0
EXACT = ("bytes_up", "bytes_down", "train_flops", "eval_flops", "server_flops", "clients_sampled")
CLOSE = ("acc_mean", "acc_std", "val_acc_mean", "test_loss", "train_loss")


@dataclass(frozen=True)
class Case:
    algorithm: str
    hparams: tuple = ()
    model_group: str = "cnn-hetero"

    @property
    def key(self) -> str:
        return "-".join([self.algorithm, *(f"{k}={v}" for k, v in self.hparams)])


# Built-ins whose default options need another model group than the conformance kit's (LoRA on attention layers)
GROUPS = {"hetlora": "vit-small-hetero", "flora": "vit-small-hetero", "fedsalora": "vit-small-hetero"}


def builtin_cases() -> list[Case]:
    """Every built-in algorithm (this distribution's entry points), on the conformance kit's model group."""
    from importlib.metadata import entry_points

    from bench.registry import DISTRIBUTION, ENTRY_POINT_GROUP

    names = sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)
                    if ep.dist is not None and ep.dist.name == DISTRIBUTION})
    return [Case(cls.name, (), GROUPS.get(cls.name, "cnn5-homo" if cls.homogeneous_only else "cnn-hetero"))
            for cls in resolve_algorithms(names)]


# Every built-in, plus the variants whose clients receive after aggregation or whose prediction reads server
# state (FedAvg's global model, LG-FedAvg's and FedGH's broadcast header) and one whose client updates share
# algorithm state (pFedLoRA's shared momentum).
CASES = builtin_cases() + [
    Case("pfedlora", (("persistent_optimizer", "shared"),)),
    Case("lgfedavg", (("eval_header", "global"),)), Case("fedgh", (("eval_header", "global"),)),
    Case("fedavg", (("eval_model", "local"),), "cnn5-homo"),
]


@pytest.fixture(scope="module")
def dataset_file(tmp_path_factory) -> Path:
    """A small synthetic dataset as an .npz both sides load (the ClientApps run in another process)."""
    ds = synthetic_dataset(num_classes=10, train_size=400, test_size=200, seed=0)
    path = tmp_path_factory.mktemp("flower") / "synthetic-small.npz"
    np.savez(path, x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test)
    return path


def config(case: Case, dataset: Path) -> RunConfig:
    cfg = RunConfig(algorithms=[case.algorithm], dataset=str(dataset), num_clients=N, participation=0.5,
                    rounds=ROUNDS, batch_size=32, eval_batch_size=128, model_group=case.model_group, seeds=[SEED],
                    device="cpu", threads=1, checkpoint_every=0, algo={case.algorithm: dict(case.hparams)})
    return resolve_dataset_defaults(cfg, 10)


def inputs(cfg: RunConfig):
    ds = load_dataset(cfg.dataset)
    return DeviceData(ds, torch.device("cpu"), augment=cfg.augment), client_splits(cfg, ds, SEED, torch.device("cpu"))


def history(sim: Simulation) -> dict:
    rounds = [sim.initial_metrics()] + [sim.run_round(r) for r in range(ROUNDS)]
    return {"rounds": rounds, "clients": sim.client_table()}


def simulation(case: Case, dataset: Path, flower_link=None, cls: type | None = None) -> Simulation:
    cfg = config(case, dataset)
    data, splits = inputs(cfg)
    cls = cls or resolve_algorithms([case.algorithm])[0]
    if flower_link is None:
        return Simulation(cfg, cls, SEED, data, splits, torch.device("cpu"))
    from bench.flower.server import FlowerSimulation

    return FlowerSimulation(cfg, cls, SEED, data, splits, torch.device("cpu"), cls.hparams_for(cfg), flower_link,
                            case.key, partition_sha256(splits))


def invocation_config(output_dir: Path, name: str, dataset: Path) -> RunConfig:
    return RunConfig(algorithms=["pfedlora", "fedgh"], dataset=str(dataset), num_clients=N, participation=0.5,
                     rounds=2, batch_size=32, eval_batch_size=128, seeds=[SEED], device="cpu", threads=1,
                     output_dir=str(output_dir), run_name=name, checkpoint_every=0)


def attempt(run):
    """The run's result, or the exception it raised (reported by its case's test, not by every test)."""
    try:
        return run()
    except Exception as err:  # noqa: BLE001
        return err


@pytest.fixture(scope="module")
def runs(flower, dataset_file, tmp_path_factory):
    """(built-in histories, Flower histories, results root) of every case, from ONE Flower simulation (one Ray
    start): the built-in runs and a local invocation are computed in the ServerApp while Ray starts its actor,
    then every case and an invocation through FlowerExecutor (results folder and MLflow) run over the grid."""
    out = tmp_path_factory.mktemp("results")
    builtin: dict = {}
    over_flower: dict = {}

    def main(grid) -> None:
        for case in CASES:
            builtin[case] = attempt(lambda: history(simulation(case, dataset_file)))
        run_invocation(invocation_config(out, "local", dataset_file), show_progress=False, executor=LocalExecutor())
        link = flower.ClientLink(grid, reply_timeout=300)
        link.connect(N)
        for case in CASES:
            if not isinstance(builtin[case], Exception):
                over_flower[case] = attempt(lambda: history(simulation(case, dataset_file, link)))
        run_invocation(invocation_config(out, "flower", dataset_file), show_progress=False,
                       executor=FlowerExecutor(grid=grid))
        over_flower["peeker"] = attempt(lambda: history(simulation(Case("standalone"), dataset_file, link, Peeker)))
        with pytest.MonkeyPatch.context() as patch:  # `bench run --executor flower --algo opaque`, a plugin's way
            registry.algorithms()
            patch.setitem(registry._REGISTRY, "opaque", Opaque)
            config_ = dataclasses.replace(invocation_config(out, "opaque", dataset_file), algorithms=["opaque"])
            over_flower["opaque"] = attempt(lambda: run_invocation(config_, show_progress=False,
                                                                   executor=FlowerExecutor(grid=grid)))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        flower.simulate(main, N)
    finally:
        torch.set_num_threads(threads)
    return builtin, over_flower, out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.key)
def test_flower_equals_builtin_simulator(case, runs):
    builtin, flower, _ = runs
    if isinstance(builtin[case], UserError):  # a setting the algorithm refuses (e.g. its model group): no run
        pytest.skip(f"{case.key} refuses this setting in the built-in simulator: {builtin[case]}")
    if isinstance(builtin[case], Exception):
        pytest.fail(f"the built-in simulator itself fails on {case.key}: {builtin[case]!r}")
    if isinstance(flower[case], UserError) and "server hook reads client" in str(flower[case]):
        pytest.xfail(f"{case.key} cannot run on Flower as written: {flower[case]}")
    if isinstance(flower[case], Exception):
        raise flower[case]
    ours, theirs = builtin[case]["rounds"], flower[case]["rounds"]
    assert len(theirs) == len(ours) == ROUNDS + 1
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for key in EXACT:
            assert b.get(key) == a.get(key), f"{case.key} step {step}: {key} {b.get(key)} != {a.get(key)}"
        for key in CLOSE + tuple(k for k in a if k.startswith(("acc_phase", "lambda", "upload_fraction"))):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9, nan_ok=True), f"{case.key} step {step}: {key}"
    for a, b in zip(builtin[case]["clients"], flower[case]["clients"]):
        assert {k: b[k] for k in a if k != "test_loss"} == {k: a[k] for k in a if k != "test_loss"}
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-6)


def test_extra_traffic_is_reported_apart(runs):
    """The initial client states go once, at step 0; server state only where client code reads it (FedAvg's
    global model for every evaluation; pFedLoRA's shared momentum with every update); RNG states always."""
    _, flower, _ = runs

    def extra(case: Case) -> list[int]:
        return [r["flower_state_bytes"] for r in flower[case]["rounds"]]

    # FML too: each client update takes its own working meme, which the download overwrites
    for case in (Case("standalone"), Case("lgfedavg", (("eval_header", "global"),)),
                 Case("fedavg", (("eval_model", "local"),), "cnn5-homo"), Case("fml")):
        assert extra(case)[0] > 0 and extra(case)[1:] == [0] * ROUNDS, case.key
    for case in (Case("fedavg", (), "cnn5-homo"), Case("pfedlora", (("persistent_optimizer", "shared"),))):
        assert all(b > 0 for b in extra(case)[1:]), case.key
    assert all(r["flower_rng_bytes"] > 0 for r in flower[Case("standalone")]["rounds"])


def test_executor_writes_results_and_mlflow_as_a_local_run(runs):
    """`bench run --executor flower`'s executor: the same metrics.csv, clients.csv and summaries as the local
    executor, and the same MLflow runs (FINISHED, every step)."""
    import mlflow

    from bench.store import ResultsStore

    *_, out = runs
    local, flwr_root = ResultsStore(out / "local"), ResultsStore(out / "flower")
    for key in ("pfedlora-seed0", "fedgh-seed0"):
        a, b = local.rows(key), flwr_root.rows(key)
        assert [r["step"] for r in b] == [r["step"] for r in a] == ["0", "1", "2"]
        for ra, rb in zip(a, b):
            for column in ("acc_mean", "val_acc_mean", "bytes_up", "bytes_down", "train_flops", "eval_flops",
                           "server_flops"):
                assert float(rb[column]) == pytest.approx(float(ra[column]), rel=1e-9), (key, column)
        assert json.loads((out / "flower" / "runs" / key / "summary.json").read_text())["status"] == "FINISHED"
    client = mlflow.tracking.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs_ = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()],
                                           filter_string="tags.algorithm = 'pfedlora'")
             if "mlflow.parentRunId" in r.data.tags]  # the (algorithm, seed) runs, not their parents
    assert len(runs_) == 2 and {r.info.status for r in runs_} == {"FINISHED"}
    for r in runs_:
        assert [m.step for m in client.get_metric_history(r.info.run_id, "acc_mean")] == [0, 1, 2]


class Peeker(Standalone):
    """A plugin whose server hook reads a client's state, which the server cannot see under Flower (the
    ClientApps import this class by its module path: it is not registered)."""
    name = "peeker"

    def server_payload(self, client, round_index: int):
        return {"bias": client.state["model"].header.bias.detach()}


def test_server_hook_reading_client_state_is_one_clear_line(runs):
    _, flower, _ = runs
    err = flower["peeker"]
    assert isinstance(err, UserError), err
    message = str(err)
    assert "\n" not in message and message.startswith("peeker: a server hook reads client ")
    assert "state['model']" in message and "client.id, client.arch and client.split" in message


def test_payload_records_keep_values_dtypes_and_bytes(flower):
    """Any tensor dtype goes into an ArrayRecord and back unchanged (bfloat16 as raw bytes); the record's bytes
    are the simulator's count."""
    from bench.accounting import payload_bytes
    from bench.flower import records

    payload = {"w": torch.randn(3, 4), "half": torch.randn(5, dtype=torch.bfloat16),
               "classes": torch.tensor([0, 7, 9], dtype=torch.uint8), "empty": torch.zeros(0, 2)}
    record, size = records.payload_record(payload)
    back = records.record_payload(record, torch.device("cpu"))
    assert size == records.record_bytes(record) == payload_bytes(payload) == 4 * 12 + 2 * 5 + 3
    assert list(back) == list(payload)
    for name, tensor in payload.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


class Unpicklable:
    """Client state the Flower records cannot hold (neither tensor, module nor plain value)."""


class Opaque(Standalone):
    """A plugin whose client state holds an object Flower records cannot hold."""
    name = "opaque"

    def init_client(self, client) -> None:
        super().init_client(client)
        client.state["scorer"] = Unpicklable()


def test_unserialisable_client_state_is_one_clear_line(flower, dataset_file):
    cfg = config(Case("standalone"), dataset_file)
    data, splits = inputs(cfg)
    with pytest.raises(UserError) as err:
        flower.FlowerSimulation(cfg, Opaque, SEED, data, splits, torch.device("cpu"), Opaque.hparams_for(cfg), None,
                         "opaque-seed0", partition_sha256(splits))
    message = str(err.value)
    assert "\n" not in message and "opaque" in message and "client state" in message
    assert "scorer" in message and "Unpicklable" in message and "cannot be put in a Flower record" in message


def test_batched_training_is_refused(flower, dataset_file):
    cfg = dataclasses.replace(config(Case("standalone"), dataset_file), batched_training=True)
    data, splits = inputs(cfg)
    with pytest.raises(UserError, match="batched_training"):
        flower.FlowerSimulation(cfg, resolve_algorithms(["standalone"])[0], SEED, data, splits, torch.device("cpu"), None,
                         None, "x", partition_sha256(splits))


def test_unserialisable_state_stops_a_flower_run_with_one_line_and_marks_it_failed(runs):
    """Through the executor (`bench run --executor flower`): the UserError propagates (the CLI prints it as its one
    error line, exit 2) and the results folder records the run FAILED with that reason."""
    _, flower, out = runs
    err = flower["opaque"]
    assert isinstance(err, UserError), err
    assert "\n" not in str(err) and str(err).startswith("opaque: client state cannot be put in a Flower record")
    summary = json.loads((out / "opaque" / "runs" / "opaque-seed0" / "summary.json").read_text())
    assert summary["status"] == "FAILED" and summary["error"] == str(err)


def test_a_clientapp_process_does_not_import_torchvision(flower):
    """Flower starts a fresh ClientApp process for every message: torchvision (over a second to import) loads only
    where a model needs it (models/torchvision_models.py), not for the ClientApp the Flower App names."""
    import tomllib

    app = tomllib.loads((Path(__file__).parents[1] / "bench/flower/app/pyproject.toml").read_text())
    module = app["tool"]["flwr"]["app"]["components"]["clientapp"].partition(":")[0]
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchvision'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


@pytest.mark.skipif(HAVE_FLOWER, reason="checks the message an install without Flower gives")
def test_executor_without_flower_says_how_to_install():
    with pytest.raises(UserError, match=r"pip install 'mhpfl-bench\[flower\]'"):
        FlowerExecutor()
