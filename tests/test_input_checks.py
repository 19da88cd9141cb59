"""The input holes of issue 17, each closed: one line naming what is wrong and what is valid, exit code 2,
refused before the data loads where the check can be made up front, and nothing written. (SIGTERM, Ctrl-C
and resume: tests/test_signals.py; `bench ui`: tests/test_mlflow_ui.py; any mix of options: tests/test_fuzz.py.)"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from bench.config import RunConfig, load_config
from bench.errors import UserError
from tests.conftest import bench_main, small_arrays
from tests.unwritable import unwritable_folder

pytestmark = pytest.mark.usefixtures("one_thread")

MISSING = "/no/such/dataset.npz"  # a check that reports before this one is made before any data is loaded


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory) -> Path:
    """An .npz of 8x8 images (the paper's CNNs need at least 16x16)."""
    path = tmp_path_factory.mktemp("data") / "tiny8.npz"
    np.savez(path, **{k: v[:, :8, :8] if k.startswith("x") else v for k, v in small_arrays().items()})
    return path


STORE: list[str] = []  # one MLflow store for the module's runs (a new store's migrations take seconds)


@pytest.fixture(scope="module", autouse=True)
def store(tmp_path_factory):
    from bench.callbacks.mlflow_client import MlflowConnection

    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    MlflowConnection(uri).experiment("mhpfl-bench", folder / "mlartifacts")
    STORE[:] = [uri]
    yield


def args_for(out: Path, *extra: str, dataset: str | Path = MISSING) -> list[str]:
    return ["run", "--algo", "standalone", "--dataset", str(dataset), "--clients", "3", "--rounds", "1",
            "--model-group", "cnn5-homo", "--batch-size", "64", "--output-dir", str(out), "--quiet",
            "--tracking-uri", STORE[0], *extra]


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def refused(monkeypatch, capsys, args: list[str], out: Path) -> str:
    """Run `bench ARGS`; assert one `error:` line, exit 2, no traceback and nothing new under `out`."""
    before = files_under(out)
    code, _, err = bench_main(monkeypatch, capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert files_under(out) == before, "a refused run wrote something"
    return lines[0]


# ---- non-finite optimiser settings: refused by the config check, before the data loads -------------------------
@pytest.mark.parametrize("setting", ["lr=nan", "momentum=nan", "weight_decay=nan", "lr=inf", "grad_clip=-inf",
                                     "dirichlet_alpha=nan"])
def test_non_finite_settings_are_refused_up_front(setting, tmp_path, monkeypatch, capsys):
    key, _, value = setting.partition("=")
    line = refused(monkeypatch, capsys, args_for(tmp_path / "out", "--set", setting), tmp_path / "out")
    assert line == f"error: {key} must be a finite number, got {float(value)}"


@pytest.mark.parametrize("setting, message", [
    ("fedgh.server_lr=nan", "fedgh.server_lr must be a finite number, got nan"),
    ("fedapen.lambda_lr=inf", "fedapen.lambda_lr must be a finite number, got inf"),
    ("pfedlora.rank=100000000000000000000", "pfedlora.rank=100000000000000000000 is out of range; valid: at most "
                                            "2147483647 in size"),
])
def test_non_finite_or_huge_hyperparameters_are_refused_up_front(setting, message, tmp_path, monkeypatch, capsys):
    """Checked by Algorithm.make_hparams for every algorithm's hyper-parameters (here of algorithms in the config
    that do not even run: a typo in a config file is caught too)."""
    line = refused(monkeypatch, capsys, args_for(tmp_path / "out", "--set", setting), tmp_path / "out")
    assert line == f"error: {message}"


def test_a_nan_in_a_config_file_is_refused(tmp_path, monkeypatch, capsys):
    config = tmp_path / "c.toml"
    config.write_text("lr = nan\n")
    line = refused(monkeypatch, capsys, args_for(tmp_path / "out", "--config", str(config)), tmp_path / "out")
    assert line == "error: lr must be a finite number, got nan"


# ---- the output dir: checked before the data loads -------------------------------------------------------
def test_output_dir_under_proc_is_refused(tmp_path, monkeypatch, capsys):
    line = refused(monkeypatch, capsys, args_for(Path("/proc/bench-test")), tmp_path)
    assert line.startswith("error: --output-dir /proc/bench-test: cannot create a folder in /proc")
    assert "valid: a place you can write" in line and not Path("/proc/bench-test").exists()


@pytest.mark.parametrize("how", ["option", "set", "below"])
def test_output_dir_that_is_a_file_is_refused(how, tmp_path, monkeypatch, capsys):
    target = tmp_path / "a_file"
    target.write_text("x")
    if how == "option":  # the option's own type refuses it
        line = refused(monkeypatch, capsys, args_for(target), tmp_path)
        assert line == f"error: Invalid value for '--output-dir': Directory '{target}' is a file."
        return
    where = target if how == "set" else target / "below" / "deeper"
    line = refused(monkeypatch, capsys, args_for(tmp_path / "x", "--set", f'output_dir="{where}"'), tmp_path)
    assert line == (f"error: --output-dir {where}: {target} is a file, not a folder; valid: a path whose "
                    "existing parts are folders")


def test_a_run_name_that_is_a_file_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "taken").write_text("x")
    line = refused(monkeypatch, capsys, args_for(tmp_path, "--run-name", "taken"), tmp_path)
    assert f"--run-name taken: {tmp_path / 'taken'} is a file, not a folder" in line


def test_an_unwritable_output_dir_is_refused(tmp_path, monkeypatch, capsys):
    with unwritable_folder(tmp_path / "locked") as locked:
        if locked is None:
            pytest.skip("cannot make a folder unwritable here")
        line = refused(monkeypatch, capsys, args_for(locked / "results"), tmp_path)
        assert line.startswith(f"error: --output-dir {locked / 'results'}: cannot create a folder in {locked}")


def test_empty_paths_and_names_are_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    line = refused(monkeypatch, capsys, args_for(out, "--run-name", ""), out)
    assert line.startswith("error: run_name must be a folder name (not empty, no '/', not '.' or '..', at most "
                           "255 bytes), got ''")
    for name in ("a/b", "..", " "):
        assert "run_name must be a folder name" in refused(monkeypatch, capsys, args_for(out, "--run-name", name), out)
    line = refused(monkeypatch, capsys, [*args_for(out), "--output-dir", ""], out)
    assert line == "error: Invalid value for '--output-dir': an empty path; give a folder, e.g. results"


# ---- images too small for the model group: refused before any model is built; no stub folder ----------------
def test_images_too_small_for_the_cnns_are_refused_without_a_stub_folder(tiny8, small_npz, tmp_path, monkeypatch,
                                                                          capsys):
    out = tmp_path / "out"
    line = refused(monkeypatch, capsys, args_for(out, "--run-name", "r", dataset=tiny8), tmp_path)
    assert line == ("error: the dataset's 8x8 images do not fit model group 'cnn5-homo': cnn5 needs square images "
                    "of at least 16x16; valid: a group for any size (tv-hetero, resnet18-homo), or images resized "
                    "to at least 16x16")
    assert not out.exists()
    code, _, err = bench_main(monkeypatch, capsys, *args_for(out, "--run-name", "r", dataset=small_npz))
    assert code == 0, err  # the same --run-name is free


def test_a_folder_of_too_small_images_is_refused_on_resume(tiny8, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "r8"
    folder.mkdir()
    config = load_config(None, "quick", [], {"dataset": str(tiny8), "algorithms": ["standalone"]}).to_dict()
    (folder / "config.json").write_text(json.dumps(config))
    line = refused(monkeypatch, capsys, ["resume", str(folder)], tmp_path)
    assert line.startswith("error: the dataset's 8x8 images do not fit model group 'cnn-hetero'")


def test_an_algorithms_own_architecture_is_checked_too(tiny8, tmp_path, monkeypatch, capsys):
    line = refused(monkeypatch, capsys, ["run", "--algo", "fedkd", "--dataset", str(tiny8), "--model-group",
                                         "resnet18-homo", "--output-dir", str(tmp_path / "o"), "--quiet"], tmp_path)
    assert line.startswith("error: the dataset's 8x8 images do not fit fedkd.mentee_arch=cnn5: cnn5 needs square")
    assert "valid: fedkd.mentee_arch one of resnet18, resnet34, mobilenetv2" in line


def test_image_size_rule_matches_the_models():
    """The rule the check applies is the models' own: the smallest size that builds and trains, and one less."""
    import torch

    from models.groups import CNN_MIN_SIDE, TORCHVISION_ARCHS, build_model, image_size_problem

    def trains(arch: str, h: int, w: int) -> bool:
        try:
            build_model(arch, 10, 3, h)(torch.zeros(2, 3, h, w)).sum().backward()
        except (RuntimeError, ValueError):
            return False
        return True

    for arch in ("cnn1", "cnn5"):
        for h, w in ((CNN_MIN_SIDE, CNN_MIN_SIDE), (CNN_MIN_SIDE - 1, CNN_MIN_SIDE - 1), (32, 24)):
            assert (image_size_problem(arch, h, w) is None) == trains(arch, h, w), (arch, h, w)
    assert all(image_size_problem(a, 8, 8) is None for a in TORCHVISION_ARCHS)  # stems and pooling for any size


# ---- numbers beyond what the generators and tensors take ------------------------------------------------------
def test_huge_seed_and_counts_are_refused(tmp_path, monkeypatch, capsys):
    line = refused(monkeypatch, capsys, args_for(tmp_path, "--seed", "99999999999999999"), tmp_path)
    assert line == "error: seeds must be at most 4294967295 (2**32 - 1), got [99999999999999999]"
    line = refused(monkeypatch, capsys, args_for(tmp_path, "--batch-size", "99999999999999999999"), tmp_path)
    assert line == "error: batch_size must be at most 2147483647 (2**31 - 1), got 99999999999999999999"


def test_the_largest_seed_runs(small_npz, tmp_path, monkeypatch, capsys):
    code, _, err = bench_main(monkeypatch, capsys, *args_for(tmp_path, "--seed", "4294967295", dataset=small_npz))
    assert code == 0, err


def test_more_clients_than_samples_is_refused_before_partitioning(small_npz, tmp_path, monkeypatch, capsys):
    line = refused(monkeypatch, capsys, args_for(tmp_path, "--clients", "100000", dataset=small_npz), tmp_path)
    assert line == ("error: num_clients=100000 exceeds the 240 training samples left after the validation "
                    "hold-out; valid: 1..240 clients (each needs a sample)")


# ---- participation: ceil(C x N), at least 1; said, recorded, warned -------------------------------------------
@pytest.mark.parametrize("c, n, k, exact", [(0.1, 3, 1, False), (0.25, 10, 3, False), (0.35, 10, 4, False),
                                            (0.1, 30, 3, True), (0.3, 10, 3, True), (1.0, 7, 7, True),
                                            (0.01, 5, 1, False), (0.9, 100, 90, True)])
def test_clients_per_round_is_ceil_of_c_times_n(c, n, k, exact):
    cfg = RunConfig(participation=c, num_clients=n)
    assert (cfg.clients_per_round, cfg.participation_is_exact) == (k, exact)


def test_participation_is_printed_recorded_and_warned(small_npz, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    args = args_for(out, "--participation", "0.1", "--run-name", "p", "--rounds", "2", dataset=small_npz)
    args.remove("--quiet")
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # shown even if an earlier test met the same warning
        code, _, err = bench_main(monkeypatch, capsys, *args)
    assert code == 0, err
    warned = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warned == ["warning: participation C=0.1 of 3 clients is 0.3 clients; each round samples ceil(C x N) = 1 "
                      "(C = 0.3333 in effect)"]
    assert "(3 clients, C=0.1: 1 per round, 2 rounds" in err
    config = json.loads((out / "p" / "config.json").read_text())
    assert (config["participation"], config["clients_per_round"]) == (0.1, 1)
    rows = (out / "p" / "runs" / "standalone-seed0" / "metrics.csv").read_text().splitlines()
    sampled = rows[0].split(",").index("clients_sampled")
    assert [float(r.split(",")[sampled]) for r in rows[2:]] == [1.0, 1.0]  # the run really samples 1
    info = json.loads((out / "p" / "mlflow.json").read_text())
    client = MlflowClient(info["tracking_uri"])
    child = json.loads((out / "p" / "runs" / "standalone-seed0" / "mlflow.json").read_text())["run_id"]
    for run_id in (info["parent_run_id"], child):
        params = client.get_run(run_id).data.params
        assert (params["participation"], params["clients_per_round"]) == ("0.1", "1")


def test_exact_participation_is_not_warned(small_npz, tmp_path, monkeypatch, capsys):
    code, _, err = bench_main(monkeypatch, capsys, *args_for(tmp_path, "--participation", "0.5", "--clients", "4",
                                                              dataset=small_npz))
    assert code == 0 and "warning: participation" not in err, err


# ---- messages that now say what is wrong and what is valid ------------------------------------------------
def test_unknown_keys_suggest_the_close_key_and_list_the_valid_ones(tmp_path, monkeypatch, capsys):
    line = refused(monkeypatch, capsys, args_for(tmp_path, "--set", "alpha=0"), tmp_path)
    assert line.startswith("error: --set alpha: unknown key 'alpha' (did you mean 'dirichlet_alpha'?); valid keys: "
                           "algo, algorithms, augment, batch_size,")
    assert "weight_decay, or an algorithm table (" in line and "pfedlora" in line
    line = refused(monkeypatch, capsys, args_for(tmp_path, "--set", "clients=3"), tmp_path)
    assert "(did you mean 'num_clients'?)" in line


def test_an_algorithm_name_without_a_hyper_parameter_says_how(tmp_path, monkeypatch, capsys):
    line = refused(monkeypatch, capsys, args_for(tmp_path, "--set", "pfedlora=5"), tmp_path)
    assert line == ("error: --set pfedlora: pfedlora is an algorithm; set its hyper-parameters as pfedlora.NAME=VALUE "
                    "(e.g. --set pfedlora.rank=8) or in a [pfedlora] table, got 5")
    line = refused(monkeypatch, capsys, args_for(tmp_path, "--set", "algo=5"), tmp_path)
    assert line.startswith("error: --set algo: algo must be a table of algorithm tables")


def test_a_corrupt_config_json_is_called_unreadable(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text("{ not json")
    for command in ("resume", "sync"):
        line = refused(monkeypatch, capsys, [command, str(folder)], tmp_path)
        assert line == (f"error: {folder / 'config.json'} is unreadable (not a JSON object: a damaged or foreign "
                        "file); restore it from a copy, or give another results folder")
    (folder / "config.json").write_bytes(b"\xff\xfe\x00")  # not even text
    assert "is unreadable" in refused(monkeypatch, capsys, ["resume", str(folder)], tmp_path)


@pytest.mark.parametrize("scheme, advice", [
    ("label-skew", "use fewer clients, more classes per client (--classes-per-client), or another partitioner "
                   "(--partition iid or dirichlet)"),
    ("dirichlet", "use fewer clients, a larger dirichlet_alpha (less skew, e.g. --set dirichlet_alpha=1.0)"),
])
def test_a_client_without_data_gets_advice_for_its_partitioner(scheme, advice):
    from data.partition import partition

    labels = np.arange(300) % 10
    with pytest.raises(UserError, match="partition leaves client") as err:
        partition(labels, labels[:100], 200, scheme, seed=0)
    assert advice in str(err.value)
    if scheme == "label-skew":
        assert "alpha" not in str(err.value)  # label skew has no Dirichlet parameter to raise


def test_label_skew_takes_any_number_of_clients(small_npz, tmp_path, monkeypatch, capsys):
    """No divisibility error left to misadvise: 3 clients x 2 classes of 10 (not a multiple) runs."""
    code, _, err = bench_main(monkeypatch, capsys, *args_for(tmp_path, "--partition", "label-skew",
                                                              "--classes-per-client", "2", dataset=small_npz))
    assert code == 0, err


def test_device_names_are_checked(tmp_path, monkeypatch, capsys):
    line = refused(monkeypatch, capsys, args_for(tmp_path, "--device", "cuda:x"), tmp_path)
    assert line == "error: unknown device 'cuda:x'; valid: auto, cpu, cuda, cuda:N (N = a GPU's index)"


def test_partition_export_checks_its_out_before_loading(tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("x")
    for out in ("/proc/bench-test.json", str(tmp_path / "a_file" / "p.json")):
        line = refused(monkeypatch, capsys, ["partition", "export", "--dataset", MISSING, "--clients", "3",
                                             "--out", out], tmp_path)
        assert line.startswith(f"error: --out {out}: ")


def test_paths_too_long_for_the_filesystem_are_refused(tmp_path, monkeypatch, capsys):
    long = "/tmp/" + "x" * 300
    cases = {("--dataset", long + ".npz"): "error: dataset /tmp/xxx",
             ("--config", long + ".toml"): "error: config file",
             ("--partition", f"file:{long}.json"): "error: partition /tmp/xxx",
             ("--output-dir", str(tmp_path / "new" / ("y" * 300))): "error: output_dir "}
    for (option, value), start in cases.items():
        line = refused(monkeypatch, capsys, [*args_for(tmp_path / "out"), option, value], tmp_path)
        assert line.startswith(start) and "(File name too long)" in line, line
    line = refused(monkeypatch, capsys, args_for(tmp_path / "out", "--run-name", "y" * 300), tmp_path)
    assert line.startswith("error: run_name must be a folder name (not empty, no '/', not '.' or '..', at most 255 "
                           "bytes), got 'yyyy")


def test_threads_beyond_any_machine_are_refused(tmp_path, monkeypatch, capsys):
    line = refused(monkeypatch, capsys, args_for(tmp_path, "--threads", "100000"), tmp_path)
    assert line == "error: threads must be at most 1024, got 100000; e.g. the number of CPU cores"


@pytest.mark.parametrize("setting, message", [
    ("subset=[5]", "subset must be two positive integers [train, test] (images of a stratified subset) or [] "
                   "(every image), got [5]; e.g. --set subset=[10000,2000]"),
    ("subset=[100,0]", "subset must be two positive integers [train, test] (images of a stratified subset) or [] "
                       "(every image), got [100, 0]; e.g. --set subset=[10000,2000]"),
    ("parallel_clients=-1", "parallel_clients must be an integer from 0 (auto) to 1024, got -1; e.g. the number "
                            "of CPU cores"),
])
def test_speed_and_subset_settings_are_refused_up_front(setting, message, tmp_path, monkeypatch, capsys):
    line = refused(monkeypatch, capsys, args_for(tmp_path / "out", "--set", setting), tmp_path / "out")
    assert line == f"error: {message}"
