"""The run configuration: one typed dataclass, presets, TOML files and `--set key=value` overrides.

Which fields change a run's numbers is declared once, on the field: `metadata=SETUP` marks the ones that do
not (where things go, how runs are executed, tracked and checkpointed). `results_fields()` lists the others;
the resume check (`config_differences`), `bench paper`'s cell identity and the CLI help use it."""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.errors import UserError

SETUP = {"results": False}  # field metadata: the value does not change a run's numbers


@dataclass
class RunConfig:
    """Everything a run depends on. Defaults are the SPEC protocol shrunk to finish in minutes on a 2-core CPU;
    the quick preset (the CLI's default) also takes a subset of the images (PRESETS), `--preset paper` restores
    the SPEC's rounds, epochs and batch size on every image."""

    algorithms: list[str] = field(default_factory=lambda: ["pfedlora", "standalone"])
    dataset: str = "cifar10"          # cifar10, cifar100, synthetic[:K], or a path to an .npz
    # None: $BENCH_DATA_DIR or ~/.cache/bench/data
    data_dir: str | None = field(default=None, metadata=SETUP)
    # [train, test]: a fixed stratified subset of the dataset's images (data/subset.py); None or []: all of them
    subset: list[int] | None = None
    num_clients: int = 10             # N
    participation: float = 1.0        # C: fraction of clients sampled per round, in (0, 1]
    rounds: int = 10
    local_epochs: int = 1             # E
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-3
    grad_clip: float = 50.0           # max gradient norm; 0 disables clipping
    partition: str = "label-skew"     # label-skew (the paper's), dirichlet, iid, or file:PATH.json (a given partition)
    classes_per_client: int | None = None  # label-skew; None: dataset-aware, 2 (<= 10 classes) or 10 (more; SPEC)
    dirichlet_alpha: float = 0.5
    val_fraction: float = 0.2         # share of the official train set held out for validation (10k of 50k)
    model_group: str = "cnn-hetero"
    augment: bool = True              # random crop (padding 4) and horizontal flip
    seeds: list[int] = field(default_factory=lambda: [0])
    device: str = field(default="auto", metadata=SETUP)  # auto, cpu, cuda
    # torch CPU threads per run (None: torch's default here, --cpus-per-run on Ray); CPU results are
    # bit-identical only at equal thread counts
    threads: int | None = field(default=None, metadata=SETUP)
    output_dir: str = field(default="results", metadata=SETUP)
    # results subfolder and MLflow parent run name; None: timestamp
    run_name: str | None = field(default=None, metadata=SETUP)
    eval_every: int = 1               # evaluate every k rounds (and always after the last)
    eval_batch_size: int = 1024
    target_accuracy: float | None = None  # rounds-to-target; None: dataset-aware (default_target_accuracy)
    # keep client states in host memory between rounds (large N on GPU)
    offload_state: bool = field(default=False, metadata=SETUP)
    # count each distinct step once (False: count every step; the same FLOPs, tests/test_accounting.py)
    flop_cache: bool = field(default=True, metadata=SETUP)
    batched_training: bool = False    # train same-architecture clients together (bench/batched.py) where the
                                      # algorithm opts in (plain CE phases); equal to sequential per client on
                                      # the same batches, but draws batches in another order (other numbers
                                      # than a sequential run of the same seed); slower on CPU, unmeasured on GPU
    # clients trained (and evaluated) at once, each in its own thread with one torch thread; 0: auto (CPU:
    # the torch threads of the run, e.g. the machine's cores; CUDA: 1). Numbers do not depend on it: a client's
    # batches come from its own (seed, round, client) stream; on CPU they equal a sequential run with threads=1
    parallel_clients: int = field(default=0, metadata=SETUP)
    # convolutions in channels_last memory format; None: on CPU only (~1.2x faster steps there; equal to the
    # default layout within float tolerance, not bitwise, tests/test_training.py)
    channels_last: bool | None = field(default=None, metadata=SETUP)
    # None: sqlite store in output_dir, no server needed
    tracking_uri: str | None = field(default=None, metadata=SETUP)
    # save the run's complete state every k rounds (0: never), for --resume
    checkpoint_every: int = field(default=1, metadata=SETUP)
    # keep a finished run's last checkpoint (default: deleted when it finishes)
    keep_checkpoints: bool = field(default=False, metadata=SETUP)
    experiment: str = field(default="mhpfl-bench", metadata=SETUP)
    # log MLflow's system metrics (CPU, memory, GPU: system/...) on every run; needs psutil
    system_metrics: bool = field(default=False, metadata=SETUP)
    # initial weights for every client model from this checkpoint file (torch.save of a state_dict, or of
    # {arch: state_dict}; loaded with weights_only=True; headers may differ); None: a random initialisation.
    # --set model.init=PATH or a [model] table with init = PATH
    model_init: str | None = None
    profile: str = "spec"             # reference profile of every algorithm's options: spec (SPEC.md), official (the
                                      # authors' released code), htfllib (HtFLlib); algorithms/README.md has the tables
    # Per-algorithm hyper-parameters, e.g. {"pfedlora": {"rank": 32}}; TOML tables / --set pfedlora.rank=32.
    algo: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def clients_per_round(self) -> int:
        """The clients sampled each round: ceil(C x N), at least 1 (so C is never met from below: 0.1 of 3
        clients samples 1, 0.35 of 10 samples 4). A product within 1e-9 of an integer counts as that integer
        (0.1 x 30 is 3.0000000000000004 in floating point, and means 3)."""
        return max(1, math.ceil(round(self.participation * self.num_clients, 9)))

    @property
    def participation_is_exact(self) -> bool:
        """C x N is an integer, so exactly the fraction C of the clients takes part each round."""
        product = self.participation * self.num_clients
        return abs(product - round(product)) <= 1e-9 and round(product) >= 1


PRESETS: dict[str, dict[str, Any]] = {
    # 10 rounds on 16,000 training images (+4,000 validation) and 4,000 test images of CIFAR-10: the README's
    # main job in about 2.5 minutes on an idle 2-core CPU; --set subset=[] for every image (about 2.5x longer)
    "quick": {"subset": [20000, 4000]},
    "paper": {"rounds": 500, "local_epochs": 10, "batch_size": 512},
}

FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def results_fields() -> tuple[str, ...]:
    """The fields that change a run's numbers (all but those marked SETUP): a results folder may be resumed
    with other values for the others."""
    return tuple(name for name, f in FIELDS.items() if f.metadata.get("results", True))


def setup_fields() -> tuple[str, ...]:
    return tuple(name for name in FIELDS if name not in results_fields())


TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def closest(name: str, valid: list[str]) -> str:
    """' (did you mean X?)' for a near spelling, or a valid name holding `name` as a word (alpha ->
    dirichlet_alpha, clients -> num_clients); '' when nothing is close."""
    match = difflib.get_close_matches(name, valid, n=1)
    if not match:
        word = name.strip().lower().replace("-", "_")
        match = [v for v in valid if word and word in v.lower().replace("-", "_").split("_")]
    return f" (did you mean {match[0]!r}?)" if match else ""


def unknown_key(key: str, source: str) -> UserError:
    """An unknown config key: the closest valid one, and every valid key."""
    from bench.registry import algorithms

    names = list(algorithms())
    return UserError(f"{source}: unknown key {key!r}{closest(key, sorted(FIELDS) + names)}; valid keys: "
                     f"{', '.join(sorted(FIELDS))}, or an algorithm table ({', '.join(names)}) for its "
                     "hyper-parameters")


def parse_value(text: str) -> Any:
    """A --set value: a TOML literal (5, 0.1, true, [1, 2], "s"), else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: RunConfig, values: dict[str, Any], source: str) -> None:
    from bench.registry import canonical_algorithm_name, is_algorithm

    for key, value in values.items():
        if not isinstance(key, str) or not key.strip():
            raise UserError(f"{source}: empty key; expected key=value, e.g. rounds=5 or pfedlora.rank=32")
        if key == "algo":
            apply_algorithm_tables(cfg, value, source)
            continue
        if key == "model" and isinstance(value, dict) or key.startswith("model."):  # [model] init=..., model.init=
            table = value if key == "model" else {key.partition(".")[2]: value}
            extra = sorted(set(table) - {"init"})
            if extra:
                raise UserError(f"{source}: unknown model setting {extra[0]!r}; valid: model.init")
            key, value = "model_init", table.get("init")
        if key not in FIELDS and "." not in key and is_algorithm(key):
            if not isinstance(value, dict):
                raise UserError(f"{source}: {key} is an algorithm; set its hyper-parameters as {key}.NAME=VALUE "
                                f"(e.g. --set {key}.rank=8) or in a [{key}] table, got {value!r}")
            cfg.algo.setdefault(canonical_algorithm_name(key), {}).update(value)
            continue
        if "." in key:
            algo_name, _, hp = key.partition(".")
            if not is_algorithm(algo_name):
                raise unknown_key(algo_name, source)
            apply_overrides(cfg, {algo_name: {hp: value}}, source)
            continue
        if key not in FIELDS:
            raise unknown_key(key, source)
        setattr(cfg, key, coerce(key, value, source))


def apply_algorithm_tables(cfg: RunConfig, tables: Any, source: str) -> None:
    """`algo = {pfedlora = {rank = 8}}`: each entry an algorithm's table of hyper-parameters."""
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise UserError(f"{source}: algo must be a table of algorithm tables, e.g. --set pfedlora.rank=8 or a "
                        f"[pfedlora] table, got {tables!r}")
    for name, table in tables.items():
        apply_overrides(cfg, {name: table}, source)

def coerce(key: str, value: Any, source: str) -> Any:
    """Check a value against the field's declared type; ints are accepted for floats."""
    annotation = str(FIELDS[key].type)
    if value is None and "None" in annotation:
        return None
    if annotation.startswith("list"):
        value = value if isinstance(value, list) else [value]
        want = int if "int" in annotation else str
        if not all(isinstance(v, want) and not isinstance(v, bool) for v in value):
            raise UserError(f"{source}: {key} must be a list of {want.__name__}s, got {value!r}")
        return value
    for name, kind in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if annotation.startswith(name):
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                return float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise UserError(f"{source}: {key} must be {TYPE_NAMES[name]}, got {value!r}")
            return value
    return value


def load_config(config_file: str | Path | None = None, preset: str = "quick",
                sets: list[str] = (), options: dict[str, Any] | None = None) -> RunConfig:
    """Resolution order: defaults < preset < TOML file < command-line options < --set overrides."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    cfg = RunConfig()
    apply_overrides(cfg, PRESETS[preset], f"preset {preset}")
    if config_file is not None:
        path = Path(config_file)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as err:
            raise UserError(f"config file {path} is not valid TOML: {err}") from None
        except (OSError, UnicodeDecodeError) as err:  # a folder, unreadable, a path too long, not text
            raise UserError(f"config file {path} cannot be read ({getattr(err, 'strerror', None) or err}); "
                            "valid: a readable TOML file") from None
        apply_overrides(cfg, data, str(path))
    apply_overrides(cfg, {k: v for k, v in (options or {}).items() if v is not None}, "option")
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set rounds=5 or --set pfedlora.rank=32")
        apply_overrides(cfg, {key.strip(): parse_value(text.strip())}, f"--set {key.strip()}")
    validate(cfg)
    return cfg


# ---- dataset-aware defaults (SPEC sections 1 and 3), resolved once the dataset is loaded ----
DATASET_AWARE = ("classes_per_client", "target_accuracy")
# Rounds-to-target on CIFAR-100-like data (> 10 classes), by N: the authors' pFedES protocol. Another N takes
# the target of the nearest of these N, ties going to the smaller N (N <= 30: 0.7, 31..75: 0.6, > 75: 0.5).
MANY_CLASS_TARGETS = {10: 0.7, 50: 0.6, 100: 0.5}


def default_classes_per_client(num_classes: int) -> int:
    """SPEC: 2 classes per client on CIFAR-10 (<= 10 classes), 10 on CIFAR-100 (more)."""
    return 2 if num_classes <= 10 else 10


def default_target_accuracy(num_classes: int, num_clients: int) -> float:
    """SPEC: 0.9 on CIFAR-10 (<= 10 classes); on more classes 0.7 / 0.6 / 0.5 at N = 10 / 50 / 100 (nearest N)."""
    if num_classes <= 10:
        return 0.9
    nearest = min(MANY_CLASS_TARGETS, key=lambda n: (abs(n - num_clients), n))
    return MANY_CLASS_TARGETS[nearest]


def resolve_dataset_defaults(cfg: RunConfig, num_classes: int) -> RunConfig:
    """A copy of `cfg` with the dataset-aware defaults (None) filled in for a dataset of `num_classes`; explicit
    values are kept. The resolved values are what a results folder records."""
    cpc, target = cfg.classes_per_client, cfg.target_accuracy
    return dataclasses.replace(
        cfg, classes_per_client=default_classes_per_client(num_classes) if cpc is None else cpc,
        target_accuracy=default_target_accuracy(num_classes, cfg.num_clients) if target is None else target)


def config_differences(stored: dict[str, Any], cfg: RunConfig) -> list[str]:
    """The result-changing fields in which `cfg` (resolved) differs from a results folder's config.json.
    A stored None for a dataset-aware field (a folder written before they were resolved) stands for its
    default: the target the folder used (target_acc), else the same default as here."""
    current = json.loads(json.dumps(cfg.to_dict(), default=str))
    stored = dict(stored)
    if stored.get("target_accuracy") is None and stored.get("target_acc") is not None:
        stored["target_accuracy"] = stored["target_acc"]
    for key in DATASET_AWARE:
        if key in stored and stored[key] is None:
            stored[key] = current[key]
    return [f"{key}: {stored.get(key)!r} there, {current[key]!r} here" for key in results_fields()
            if key in stored and stored[key] != current[key]]


def from_results(stored: dict[str, Any]) -> RunConfig:
    """The RunConfig of a results folder's config.json (its extra keys, e.g. device_resolved, ignored)."""
    cfg = RunConfig()
    apply_overrides(cfg, {k: v for k, v in stored.items() if k in FIELDS and k != "algo"}, "config.json")
    cfg.algo = {name: dict(values) for name, values in (stored.get("algo") or {}).items()}
    if cfg.target_accuracy is None and stored.get("target_acc") is not None:
        cfg.target_accuracy = float(stored["target_acc"])  # a folder from before targets were resolved: its target
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Reject values outside their valid range, one line each, before any data is loaded (bench/checks.py)."""
    from bench.checks import validate_config

    validate_config(cfg)
