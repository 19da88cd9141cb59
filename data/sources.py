"""Where the images come from: CIFAR-10/100, a user's .npz file, or a small synthetic set.

Every source returns an `ArrayDataset`: uint8 images in (N, H, W, C) order (as CIFAR ships them),
int64 labels, class names and the per-channel normalisation statistics.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.errors import UserError

DATASETS: dict[str, str] = {
    "cifar10": "CIFAR-10, 32x32 RGB, 10 classes (50k train / 10k test); <data-dir>/cifar10.npz or torchvision",
    "cifar100": "CIFAR-100, 32x32 RGB, 100 classes (50k train / 10k test); <data-dir>/cifar100.npz (the shared "
                "copy: a seeded 500/100-per-class re-split) or torchvision (official split)",
    "synthetic": "small learnable 32x32 RGB set (2000 train / 500 test), 10 classes; 'synthetic:K' for K classes",
    "PATH.npz": "any .npz with x_train, y_train, x_test, y_test (uint8 NHWC images, integer labels), classes optional",
}

# Normalisation fixed by the protocol (SPEC section 1), not measured from the data.
CIFAR_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}
VALID_NAMES = "cifar10, cifar100, synthetic, or a path to an .npz file"
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
NPZ_FORMAT = ("an .npz written by numpy.savez with arrays x_train, y_train, x_test, y_test (uint8 images "
              "N x H x W x C, integer labels 0..K-1) and optionally classes")

# Which train/test split a dataset's arrays are. Every results table and figure says it (config.json records
# `dataset_split`), because the shared CIFAR-100 copy is not the official split.
SPLIT_OFFICIAL, SPLIT_RESPLIT, SPLIT_GIVEN, SPLIT_GENERATED, SPLIT_UNKNOWN = (
    "official", "re-split", "as given", "generated", "unknown")
SPLITS = {
    SPLIT_OFFICIAL: "the official train/test split",
    SPLIT_RESPLIT: "a seeded stratified re-split of the 60,000 images, 500 train / 100 test per class, NOT the "
                   "official split (../shared/data/cifar100/README.md)",
    SPLIT_GIVEN: "the file's own x_train / x_test",
    SPLIT_GENERATED: "generated train and test sets",
    SPLIT_UNKNOWN: "a <data-dir>/<name>.npz not recognised as the official split or the shared re-split",
}
# Fingerprints (labels_fingerprint) of the copies in ../shared/data, as unpack.py writes them: CIFAR-10 in the
# official order, CIFAR-100 re-split (its source merged the official sets).
KNOWN_COPIES = {
    "35a8f6ac4c98434fcc252b5a1c5b8f47c1b53cfb0816e2aeeccf7583e3399512": SPLIT_OFFICIAL,   # cifar10
    "ef24f9f1e7b4790d317eec90ee4753f71607c98d2882de3acd009ea351385df9": SPLIT_RESPLIT,    # cifar100
}


@dataclass
class ArrayDataset:
    name: str
    x_train: np.ndarray  # uint8 (N, H, W, C)
    y_train: np.ndarray  # int64 (N,)
    x_test: np.ndarray  # uint8 (M, H, W, C)
    y_test: np.ndarray  # int64 (M,)
    classes: list[str]
    mean: tuple[float, ...]  # per channel, on the 0-1 scale
    std: tuple[float, ...]
    split: str = SPLIT_GIVEN  # which train/test split the arrays are (a key of SPLITS)

    @property
    def split_note(self) -> str:
        return SPLITS.get(self.split, self.split)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        _, h, w, c = self.x_train.shape
        return (c, h, w)


def default_data_dir() -> Path:
    return Path(os.environ.get("BENCH_DATA_DIR") or "~/.cache/bench/data").expanduser()


def load_dataset(name: str, data_dir: Path | None = None, *, seed: int = 0, download: bool = True) -> ArrayDataset:
    """Load a dataset by name (see DATASETS). `seed` only matters for the synthetic set."""
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    key = name.strip().lower()
    if key.endswith(".npz"):
        return load_npz(Path(name).expanduser())
    if key in CIFAR_STATS:
        return _load_cifar(key, data_dir, download)
    if key == "synthetic" or key.startswith("synthetic:"):
        return synthetic_dataset(num_classes=_synthetic_classes(key), seed=seed)
    raise UserError(f"unknown dataset {name!r}; valid: {VALID_NAMES}")


def _synthetic_classes(key: str) -> int:
    if key == "synthetic":
        return 10
    count = key.split(":", 1)[1]
    if not count.isdigit() or int(count) < 2:
        raise UserError(f"bad dataset {key!r}; use 'synthetic' or 'synthetic:K' with an integer K >= 2 classes")
    return int(count)


def _load_cifar(name: str, data_dir: Path, download: bool) -> ArrayDataset:
    mean, std = CIFAR_STATS[name]
    npz = data_dir / f"{name}.npz"
    source = npz if npz.exists() else data_dir
    if npz.exists():
        ds = load_npz(npz, name=name, stats=(mean, std))
        if ds.split == SPLIT_GIVEN:  # no `split` key: recognise the shared copies, else say we cannot tell
            ds.split = KNOWN_COPIES.get(labels_fingerprint(ds), SPLIT_UNKNOWN)
    else:
        x_train, y_train, x_test, y_test, classes = _torchvision_cifar(name, data_dir, download)
        validate_arrays(name, x_train, y_train, x_test, y_test, classes)
        ds = ArrayDataset(name, x_train, y_train, x_test, y_test, classes, mean, std, SPLIT_OFFICIAL)
    if ds.num_classes != CIFAR_CLASSES[name] or ds.image_shape != (3, 32, 32):
        raise UserError(
            f"{source}: has {ds.num_classes} classes of shape {ds.image_shape}; "
            f"{name} needs {CIFAR_CLASSES[name]} classes of 3x32x32 images"
        )
    return ds


def _torchvision_cifar(name: str, data_dir: Path, download: bool):
    """The standard torchvision path, for users with internet (or torchvision's files already in data_dir)."""
    import torchvision  # heavy import, only needed here

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        train = cls(root=str(data_dir), train=True, download=download)
        test = cls(root=str(data_dir), train=False, download=download)
    except Exception as e:  # offline, corrupt archive, unwritable dir: all mean "not available here"
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UserError(
            f"{name} is missing in {data_dir} and could not be loaded by torchvision ({reason}); "
            f"provide it with `python ../shared/data/unpack.py ../shared/data/{name} {data_dir}/{name}.npz`, "
            f"point --data-dir or BENCH_DATA_DIR at a folder holding {name}.npz, or go online"
        ) from None
    y_train, y_test = (np.asarray(split.targets, dtype=np.int64) for split in (train, test))
    return train.data, y_train, test.data, y_test, list(train.classes)


def load_npz(
    path: Path, name: str | None = None, stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None
) -> ArrayDataset:
    """A user's arrays: keys x_train, y_train, x_test, y_test, and optionally classes.

    Normalisation is measured on x_train unless `stats` (mean, std) is given.
    """
    try:
        exists = path.is_file()
    except OSError as err:  # e.g. a parent folder this user may not search
        raise UserError(f"dataset file {path} cannot be read ({err.strerror}); give the path to a readable .npz "
                        "file") from None
    if not exists:
        raise UserError(f"dataset file {path} does not exist; give the path to an existing .npz file")
    check_npz_container(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in NPZ_KEYS if k not in npz.files]
            if missing:
                raise UserError(
                    f"{path}: missing key(s) {', '.join(missing)}; an .npz dataset needs "
                    f"{', '.join(NPZ_KEYS)} (and optionally classes); found {', '.join(npz.files) or 'none'}"
                )
            x_train, y_train, x_test, y_test = (npz[k] for k in NPZ_KEYS)
            classes = [str(c) for c in npz["classes"].reshape(-1)] if "classes" in npz.files else None
            split = str(npz["split"]) if "split" in npz.files else SPLIT_GIVEN
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        reason = " ".join(str(e).split())
        if "pickle" in reason:  # an object array inside a real .npz: say so, not "use allow_pickle"
            reason = "it holds Python objects (pickled arrays), which are not read for safety"
        raise UserError(f"{path}: not a valid .npz dataset ({reason}); expected {NPZ_FORMAT}") from None
    label = name or str(path)
    validate_arrays(label, x_train, y_train, x_test, y_test, classes)
    if classes is None:
        classes = inferred_classes(label, y_train, y_test)
    mean, std = stats or channel_stats(x_train)
    return ArrayDataset(
        label, x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64), classes, mean, std, split
    )


def check_npz_container(path: Path) -> None:
    """An .npz is a zip archive: anything else (a text file, a single .npy, a pickle) gets one line saying what
    the file is and what is expected, before numpy reads it (numpy would talk about allow_pickle)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK"):
        return
    if head.startswith(b"\x93NUMPY"):
        kind = "a single .npy array"
    elif not head:
        kind = "an empty file"
    elif all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        kind = "a text file"
    else:
        kind = "not a zip archive"
    raise UserError(f"{path}: not a valid .npz dataset ({kind}); expected {NPZ_FORMAT}")


def inferred_classes(name: str, y_train: np.ndarray, y_test: np.ndarray) -> list[str]:
    """Class names 0..max label for a file without `classes`; a label with no training image below the
    maximum (labels 1..10: class 0 empty) is refused, since it would be an empty class."""
    count = int(max(y_train.max(), y_test.max(initial=0))) + 1
    empty = sorted(set(range(count)) - set(np.unique(y_train).tolist()))
    if empty:
        shown = ("class " if len(empty) == 1 else "classes ") + ", ".join(map(str, empty[:5])) + (
            ", ..." if len(empty) > 5 else "") + (" has" if len(empty) == 1 else " have")
        low, high = int(y_train.min()), int(y_train.max())
        hint = f"; relabel to 0..{high - low} (y - {low})" if low > 0 and empty == list(range(low)) else ""
        raise UserError(
            f"{name}: y_train has labels {low}..{high}, so without a classes key there are {count} classes "
            f"(0..{count - 1}) and {shown} no training image; labels must be 0..K-1 with every "
            f"class present{hint}, or add a classes key naming every label"
        )
    return [str(k) for k in range(count)]


def labels_fingerprint(ds: ArrayDataset) -> str:
    """sha256 of the labels (int64) and the first 64 images of each split: tells the known copies apart
    (same images in another order, or another split, give another fingerprint) in milliseconds."""
    h = hashlib.sha256()
    for y in (ds.y_train, ds.y_test):
        h.update(np.ascontiguousarray(y.astype("<i8")).tobytes())
    for x in (ds.x_train, ds.x_test):
        h.update(np.ascontiguousarray(x[:64]).tobytes())
    return h.hexdigest()


def validate_arrays(name, x_train, y_train, x_test, y_test, classes) -> None:
    """Raise UserError (one line) for the first problem with the arrays of dataset `name`."""
    for split, x in (("x_train", x_train), ("x_test", x_test)):
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8:
            dtype = getattr(x, "dtype", type(x).__name__)
            raise UserError(f"{name}: {split} has dtype {dtype}; expected uint8 images (0-255)")
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise UserError(f"{name}: {split} has shape {x.shape}; expected (N, H, W, C) with C = 1 or 3")
        if x.shape[0] == 0:
            raise UserError(f"{name}: {split} has no images; expected at least one")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise UserError(
            f"{name}: train images are {x_train.shape[1:]} (H, W, C) but test images are {x_test.shape[1:]}; "
            "they must match"
        )
    for split, y, x in (("y_train", y_train, x_train), ("y_test", y_test, x_test)):
        if not isinstance(y, np.ndarray) or y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            desc = f"shape {y.shape} dtype {y.dtype}" if isinstance(y, np.ndarray) else type(y).__name__
            raise UserError(f"{name}: {split} has {desc}; expected a 1-D array of integer labels")
        if len(y) != len(x):
            raise UserError(f"{name}: {split} has {len(y)} labels for {len(x)} images; expected one per image")
    if classes is not None and len(classes) == 0:
        raise UserError(f"{name}: classes is empty; expected one name per class or no classes key")
    for split, y in (("y_train", y_train), ("y_test", y_test)):
        low, high = int(y.min()), int(y.max())
        if low < 0 or (classes is not None and high >= len(classes)):
            valid = f"[0, {len(classes)})" if classes is not None else "non-negative"
            raise UserError(f"{name}: {split} has labels in [{low}, {high}]; expected {valid} labels")


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the 0-1 scale, exact, from a histogram (no float copy of the images)."""
    levels = np.arange(256, dtype=np.float64) / 255
    means, stds = [], []
    for c in range(x.shape[-1]):
        hist = np.bincount(x[..., c].ravel(), minlength=256).astype(np.float64)
        hist /= hist.sum()
        mean = float(hist @ levels)
        std = float(np.sqrt(max(hist @ (levels - mean) ** 2, 0.0)))
        means.append(mean)
        stds.append(std if std > 1e-6 else 1.0)  # a constant channel must not divide by zero
    return tuple(means), tuple(stds)


def synthetic_dataset(
    num_classes: int = 10, train_size: int = 2000, test_size: int = 500, image_size: int = 32, seed: int = 0
) -> ArrayDataset:
    """Balanced, learnable images: a fixed smooth random prototype per class, plus per-sample noise."""
    if num_classes < 2 or train_size < num_classes or test_size < 1 or image_size < 4:
        raise UserError(
            f"synthetic dataset: num_classes={num_classes}, train_size={train_size}, test_size={test_size}, "
            f"image_size={image_size}; need num_classes >= 2, train_size >= num_classes, test_size >= 1, image_size >= 4"
        )
    rng = np.random.default_rng(seed)
    # 4x4 random colour grids, upsampled bilinearly: smooth, distinct, and spatial (a CNN has something to find).
    protos = _upsample(rng.uniform(40, 215, size=(num_classes, 4, 4, 3)), image_size).astype(np.float32)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
        brightness = rng.normal(0, 20, size=(n, 1, 1, 1)).astype(np.float32)  # global shifts: not pixel matching
        noise = rng.standard_normal(size=(n, image_size, image_size, 3), dtype=np.float32) * 45
        return np.clip(protos[y] + brightness + noise, 0, 255).astype(np.uint8), y

    x_train, y_train = sample(train_size)
    x_test, y_test = sample(test_size)
    mean, std = channel_stats(x_train)
    name = "synthetic" if num_classes == 10 else f"synthetic:{num_classes}"
    return ArrayDataset(name, x_train, y_train, x_test, y_test, [str(k) for k in range(num_classes)], mean, std,
                        SPLIT_GENERATED)


def _upsample(coarse: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of (K, g, g, C) grids to (K, size, size, C)."""
    g = coarse.shape[1]
    pos = np.linspace(0, g - 1, size)
    lo = np.minimum(pos.astype(int), g - 2)
    f = pos - lo
    rows = coarse[:, lo] * (1 - f)[None, :, None, None] + coarse[:, lo + 1] * f[None, :, None, None]
    return rows[:, :, lo] * (1 - f)[None, None, :, None] + rows[:, :, lo + 1] * f[None, None, :, None]
