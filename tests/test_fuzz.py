"""A fuzzer for the command line: random combinations of options and config values, valid and invalid (NaN,
inf, negative, zero, huge, empty, wrong types, unknown keys, paths that are files, missing or unwritable),
drawn by hypothesis with a fixed seed and a bounded count. Whatever the draw, `bench` either works (exit 0)
or refuses in one line (exit 2: exactly one line starting with `error:`, and nothing written); never a
traceback, never another exit code.

The CLI runs in-process (its real entry point, `bench.cli.main`: no 4 s of imports per example) on a
300-image .npz, 3 clients, CNN-5, one round, so a draw that passes every check finishes in about a second
(the figures of a finished run are not drawn: they read the results folder, not the command line). Valid
values are small on purpose: a huge but valid round count would only run long; huge values are drawn where
they must be refused (beyond the count and seed limits)."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import cli
from tests.conftest import small_arrays
from tests.unwritable import unwritable_folder

pytestmark = pytest.mark.usefixtures("one_thread")

HUGE = "99999999999999999999"
LONG = "/tmp/" + "x" * 300  # a name longer than any filesystem takes
FILES: dict[str, Path] = {}  # name -> path of the prepared inputs (module fixture `inputs`)


@pytest.fixture(scope="module", autouse=True)
def inputs(tmp_path_factory):
    """The files the draws name: datasets (good, 8x8 images, a text file), configs, paths that are files,
    missing or unwritable, and one MLflow store shared by every example (created once: a new store's
    migrations take seconds)."""
    root = tmp_path_factory.mktemp("fuzz")
    arrays = small_arrays()
    np.savez(root / "small.npz", **arrays)
    np.savez(root / "tiny8.npz", **{k: v[:, :8, :8] if k.startswith("x") else v for k, v in arrays.items()})
    (root / "text.npz").write_text("not a numpy file\n")
    (root / "a_file").write_text("a file, not a folder\n")
    (root / "folder").mkdir()
    configs = {"good.toml": "rounds = 1\nlr = 0.05\n", "typo.toml": "roundz = 1\n", "nan.toml": "lr = nan\n",
               "type.toml": 'rounds = "one"\n', "broken.toml": "rounds = = 1\n", "empty.toml": "",
               "table.toml": "[standalone]\nunknown = 1\n"}
    for name, text in configs.items():
        (root / name).write_text(text)
    broken = root / "broken_results"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    from bench.callbacks.mlflow_client import MlflowConnection

    store = f"sqlite:///{root / 'mlflow.db'}"
    MlflowConnection(store).experiment("mhpfl-bench", root / "mlartifacts")
    FILES.update({p.name: p for p in root.iterdir()}, store=store, root=root)
    with unwritable_folder(root / "locked") as locked, pytest.MonkeyPatch.context() as patch:
        FILES["unwritable"] = locked or root / "a_file" / "sub"  # a file on the way, where nothing is unwritable
        # The figures of a finished run take 3 of its 4 seconds and read no input: not drawn here
        # (tests/test_reports.py covers them), so that the fuzzer tries more inputs in its minute.
        patch.setattr("reports.report.run_report", lambda *args, **kwargs: [])
        yield


def path(name: str) -> str:
    return str(FILES[name]) if name in FILES else name


# ---- what a draw may hold ---------------------------------------------------------------------------------
VALUES = {
    "--clients": ["3", "1", "0", "-2", "2.5", "abc", "", HUGE, "100000"],
    "--participation": ["1", "0.5", "0.1", "0", "-0.5", "1.5", "nan", "inf", "abc", ""],
    "--rounds": ["1", "0", "-1", "1.5", "x", "", HUGE],
    "--local-epochs": ["1", "0", "-3", "abc", HUGE],
    "--batch-size": ["64", "7", "0", "-5", "100000", "abc", HUGE],
    "--seed": ["0", "7", "-1", "1,1", "0,1", "99999999999999999", "4294967296", "abc", ""],
    "--partition": ["iid", "label-skew", "dirichlet", "shards", "", "file:/no/such.json", "file:text.npz",
                    f"file:{LONG}.json"],
    "--classes-per-client": ["1", "2", "10", "11", "0", "-1", HUGE],
    "--model-group": ["cnn5-homo", "cnn-hetero", "vit", ""],
    "--dataset": ["small.npz", "synthetic:3", "tiny8.npz", "text.npz", "folder", "/no/such.npz", "", "mnist",
                  "synthetic:1", "synthetic:x", LONG + ".npz"],
    "--device": ["cpu", "tpu", "", "cuda:x", "cuda:99"],
    "--output-dir": ["fresh", "a_file", "/proc/bench-fuzz", "unwritable", "", LONG],
    "--run-name": ["r1", "", "a/b", "..", " ", "y" * 300],
    "--checkpoint-every": ["0", "1", "-1", "x"],
    "--threads": ["1", "0", "-1", "1025", HUGE],
    "--profile": ["spec", "official", "nope", ""],
    "--config": ["good.toml", "typo.toml", "nan.toml", "type.toml", "broken.toml", "empty.toml", "table.toml",
                 "/no/such.toml", "folder", LONG + ".toml"],
    "--executor": ["local", "bogus"],
    "--cpus-per-run": ["1", "0", "nan", "-1"],
    "--gpus-per-run": ["0.5", "-1", "nan"],
    "--max-retries": ["1", "-1"],
    "--tracking-uri": ["", "store"],
}
SETS = ["lr=nan", "lr=0.05", "lr=-1", "lr=inf", 'lr="abc"', "lr=1e400", "momentum=nan", "momentum=0.5",
        "weight_decay=inf", "weight_decay=0", "grad_clip=nan", "grad_clip=0", "val_fraction=0", "val_fraction=1",
        "val_fraction=0.5", "eval_every=0", "eval_batch_size=1", "alpha=0", "dirichlet_alpha=0",
        "dirichlet_alpha=1e-300", "target_accuracy=2", "target_accuracy=nan", "seeds=[]", "seeds=[1,1]",
        'seeds="a"', f"seeds=[{HUGE}]", "algorithms=[]", 'algorithms=["nope"]', "algo=5", "standalone=5",
        "standalone.x=1", 'pfedlora.rank="big"', "pfedlora.rank=0", "unknown=1", "=1", "noequals", "rounds=",
        "checkpoint_every=-1", "augment=false", 'augment="yes"', "threads=0", 'experiment=""', 'run_name=""',
        'profile="x"', "keep_checkpoints=true", 'output_dir=""', 'data_dir=""', "num_clients=1",
        "batched_training=true", "flop_cache=false", "offload_state=true", 'device="cuda:x"']
DEFAULTS = {"--algo": "standalone", "--dataset": "small.npz", "--clients": "3", "--rounds": "1",
            "--model-group": "cnn5-homo", "--batch-size": "64", "--output-dir": "fresh", "--tracking-uri": "store",
            "--device": "cpu"}


@st.composite
def run_args(draw) -> list[str]:
    """`bench run` with a few drawn options (each replacing its default) and --set values."""
    chosen = draw(st.dictionaries(st.sampled_from(sorted(VALUES)), st.none(), min_size=1, max_size=4))
    options = dict(DEFAULTS)
    for option in chosen:
        options[option] = draw(st.sampled_from(VALUES[option]))
    args = ["run", "--quiet"]
    for option, value in options.items():
        args += [option, value]
    for item in draw(st.lists(st.sampled_from(SETS), max_size=3)):
        args += ["--set", item]
    if draw(st.booleans()) and draw(st.booleans()):
        args.append("--resume")
    return args


OTHER = st.one_of(
    st.tuples(st.sampled_from(["resume", "sync"]),
              st.sampled_from(["folder", "a_file", "/no/such/folder", "broken_results", ""])).map(list),
    st.tuples(st.just("ui"), st.sampled_from(["--port", "--output-dir"]),
              st.sampled_from(["0", "70000", "x", "", "folder", "a_file"])).map(list),
    st.just(["run", "--bogus"]),
)


def resolve(args: list[str], out: Path) -> list[str]:
    """Prepared names to paths; "fresh" is this example's own new output dir, "store" the shared store."""
    def one(value: str) -> str:
        if value == "fresh":
            return str(out)
        if value == "store":
            return FILES["store"]
        if value.startswith("file:") and value[5:] in FILES:
            return "file:" + path(value[5:])
        return path(value)
    return [one(a) for a in args]


def invoke(args: list[str]) -> tuple[int, str]:
    """The real entry point in-process: (exit code, stderr)."""
    err, saved = io.StringIO(), (sys.argv, warnings.showwarning)
    sys.argv = ["bench", *args]
    cli.DEBUG = False
    code = 0
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("always")  # each example's warnings shown, not deduplicated across examples
        try:
            cli.main()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            sys.argv, warnings.showwarning = saved
    return code, err.getvalue()


def check(args: list[str]) -> None:
    out = Path(tempfile.mkdtemp(prefix="fuzz-out-", dir=FILES["root"])) / "out"
    try:
        code, err = invoke(resolve(args, out))
        shown = f"bench {' '.join(args)}\n{err}"
        assert "Traceback" not in err, shown
        assert code in (0, 2), shown
        if code == 2:
            errors = [line for line in err.splitlines() if line.startswith("error:")]
            assert len(errors) == 1, shown
            written = sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.is_dir() else []
            assert written == [], f"{shown}\nrefused, yet wrote {written}"
        else:
            (root,) = [p for p in out.iterdir() if p.is_dir()]
            assert json.loads((root / "config.json").read_text())["clients_per_round"] >= 1
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


FUZZ = settings(max_examples=60, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@FUZZ
@given(run_args())
def test_fuzz_bench_run(args):
    check(args)


@settings(FUZZ, max_examples=15)
@given(OTHER)
def test_fuzz_other_commands(args):
    check(args)
