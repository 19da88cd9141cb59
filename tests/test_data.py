"""Tests of the data package: sources, partitions, on-device batching."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.errors import UserError
from data import DeviceData, load_dataset, partition, synthetic_dataset, validate_arrays

SHARED_CIFAR10 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10"
SHARED_CIFAR100 = SHARED_CIFAR10.parent / "cifar100"

# CIFAR-like label arrays: 10 classes, 5000 train and 1000 test images each.
Y_TRAIN = np.repeat(np.arange(10), 5000)
Y_TEST = np.repeat(np.arange(10), 1000)


def class_counts(y: np.ndarray, idx: torch.Tensor) -> np.ndarray:
    return np.bincount(y[idx.numpy()], minlength=int(y.max()) + 1)


def check_cover(splits, y_train=Y_TRAIN, y_test=Y_TEST, val_fraction=0.2):
    """Pools are covered exactly once: no sample lost or duplicated, val apart from train."""
    train = np.concatenate([s.train.numpy() for s in splits])
    val = np.concatenate([s.val.numpy() for s in splits])
    test = np.concatenate([s.test.numpy() for s in splits])
    n_val = round(val_fraction * len(y_train))
    assert len(train) == len(np.unique(train)) == len(y_train) - n_val
    assert len(val) == len(np.unique(val)) == n_val
    assert np.union1d(train, val).tolist() == list(range(len(y_train)))  # train + val pools = official train
    assert np.sort(test).tolist() == list(range(len(y_test)))
    for s in splits:
        assert s.train.dtype == s.val.dtype == s.test.dtype == torch.int64


def check_same_distribution(splits, y_train=Y_TRAIN, y_test=Y_TEST, tol=2.0):
    """A client's val and test class counts are its train counts rescaled to the pool sizes."""
    train_pool = class_counts(y_train, torch.cat([s.train for s in splits]))
    val_pool = class_counts(y_train, torch.cat([s.val for s in splits]))
    test_pool = class_counts(y_test, torch.cat([s.test for s in splits]))
    for s in splits:
        share = class_counts(y_train, s.train) / train_pool
        assert np.abs(share * val_pool - class_counts(y_train, s.val)).max() <= tol
        assert np.abs(share * test_pool - class_counts(y_test, s.test)).max() <= tol


def same(a, b) -> bool:
    return all(torch.equal(x.train, y.train) and torch.equal(x.val, y.val) and torch.equal(x.test, y.test) for x, y in zip(a, b))


# ---- partitions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_clients, m", [(10, 2), (50, 10), (100, 20)])
def test_label_skew_classes(num_clients, m):
    splits = partition(Y_TRAIN, Y_TEST, num_clients, "label-skew", classes_per_client=2, seed=1)
    assert len(splits) == num_clients
    users = np.zeros(10, dtype=int)
    for s in splits:
        held = class_counts(Y_TRAIN, s.train) > 0
        assert held.sum() == 2
        # The same two classes in validation and test.
        assert ((class_counts(Y_TRAIN, s.val) > 0) == held).all()
        assert ((class_counts(Y_TEST, s.test) > 0) == held).all()
        users += held
    assert (users == m).all()
    check_cover(splits)
    check_same_distribution(splits)


def test_label_skew_shares_follow_uniform_weights():
    # Each class is shared by m clients with weights from U(0.4, 0.6), normalised: shares within [0.4, 0.6] / sum.
    splits = partition(Y_TRAIN, Y_TEST, 50, classes_per_client=2, seed=3)
    counts = np.stack([class_counts(Y_TRAIN, s.train) for s in splits])  # (clients, classes)
    pool = counts.sum(axis=0)
    shares = counts[counts > 0] / np.broadcast_to(pool, counts.shape)[counts > 0] * 10  # x m = 10
    assert shares.min() > 0.4 / 0.6 - 0.01 and shares.max() < 0.6 / 0.4 + 0.01
    assert shares.std() > 0.02  # not an equal split


def test_cifar100_style_label_skew():
    y_train, y_test = np.repeat(np.arange(100), 500), np.repeat(np.arange(100), 100)
    splits = partition(y_train, y_test, 50, classes_per_client=10, seed=0)
    held = np.stack([class_counts(y_train, s.train) > 0 for s in splits])
    assert (held.sum(axis=1) == 10).all() and (held.sum(axis=0) == 5).all()
    check_cover(splits, y_train, y_test)
    check_same_distribution(splits, y_train, y_test)


def split_digest(splits) -> str:
    digest = hashlib.sha256()
    for s in splits:
        for part in (s.train, s.val, s.test):
            a = part.numpy().astype("<i8")
            digest.update(len(a).to_bytes(8, "little") + a.tobytes())
    return digest.hexdigest()


# (classes, N, classes_per_client, seed, digest) of partitions drawn by label skew BEFORE it dealt uneven
# cases (the code of commit 2faad10): where classes_per_client * N is a multiple of the classes, the partition
# must stay bit-identical.
LABEL_SKEW_BEFORE = [
    (10, 10, 2, 0, "19b286ca2c567250547bda6a292e799ef120642df275af7bdc2dc7469557ba78"),
    (10, 50, 2, 1, "ae7f0bb8b4d18be4ae15c628bf1d070eb7cee3fde11f9846c573013b40d47d8f"),
    (10, 100, 2, 2, "4ca6c74b42da3e387bf9c93c9dde5a8e6bdbe2218a82c679654ef237be3357ca"),
    (10, 5, 2, 0, "823aa8b3400085ee61433a4c07bc56364471b2590e5126c9d55041df0591b6a0"),
    (10, 20, 4, 3, "89dbdb5865b98a2ad23f6b25948c167e57fa08278907c353018263b0ea92d509"),
    (10, 10, 3, 0, "e570e7726b0ae5296c66a0ded473f9febdc42228127b48e6edcc3d08e4715fce"),
    (10, 1, 10, 0, "2bb190da176531f3e4410479fc94a7a18baf38cdfcfb6c516847078bad611ba2"),
    (100, 50, 10, 0, "38b0b71f54d3249844883f889d7ec897159a985fd56d9f26d4b13fa23110dea7"),
    (100, 10, 10, 4, "83355925a323f4123e39cded20fb634ce55d6e61e6485f177b4ec44fed9df37b"),
    (100, 100, 10, 5, "78b2da3b65c1d60e7cfa59a3b2cd49fc85c4ce52cd328e129b91bdbb0d8ca305"),
]


@pytest.mark.parametrize("k, num_clients, cpc, seed, digest", LABEL_SKEW_BEFORE)
def test_even_label_skew_is_bit_identical_to_before(k, num_clients, cpc, seed, digest):
    y_train, y_test = np.repeat(np.arange(k), 5000 // k), np.repeat(np.arange(k), 1000 // k)
    assert split_digest(partition(y_train, y_test, num_clients, "label-skew", classes_per_client=cpc,
                                  seed=seed)) == digest


@pytest.mark.parametrize("scheme", ["label-skew", "dirichlet", "iid"])
def test_deterministic_from_seed(scheme):
    a = partition(Y_TRAIN, Y_TEST, 20, scheme, seed=7)
    b = partition(Y_TRAIN, Y_TEST, 20, scheme, seed=7)
    c = partition(Y_TRAIN, Y_TEST, 20, scheme, seed=8)
    assert same(a, b)
    assert not same(a, c)
    # The validation pool itself depends on the seed.
    assert not torch.equal(torch.cat([s.val for s in a]).sort().values, torch.cat([s.val for s in c]).sort().values)


def test_dirichlet():
    splits = partition(Y_TRAIN, Y_TEST, 20, "dirichlet", alpha=0.3, seed=0)
    check_cover(splits)
    check_same_distribution(splits)
    counts = np.stack([class_counts(Y_TRAIN, s.train) for s in splits])
    assert counts.std(axis=0).mean() > 50  # skewed, far from an equal 200 per client per class
    # A larger alpha is closer to IID.
    flat = np.stack([class_counts(Y_TRAIN, s.train) for s in partition(Y_TRAIN, Y_TEST, 20, "dirichlet", alpha=100)])
    assert flat.std(axis=0).mean() < counts.std(axis=0).mean() / 3


def test_iid():
    splits = partition(Y_TRAIN, Y_TEST, 10, "iid", seed=0)
    check_cover(splits)
    check_same_distribution(splits)
    train_pool = class_counts(Y_TRAIN, torch.cat([s.train for s in splits]))
    for s in splits:
        assert np.abs(class_counts(Y_TRAIN, s.train) - train_pool / 10).max() <= 1  # the pool split is random
        assert (class_counts(Y_TEST, s.test) == 100).all()


def test_val_fraction():
    splits = partition(Y_TRAIN, Y_TEST, 10, "iid", val_fraction=0.1)
    check_cover(splits, val_fraction=0.1)
    splits = partition(Y_TRAIN, Y_TEST, 10, "iid", val_fraction=0.0)
    assert sum(len(s.val) for s in splits) == 0


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(num_clients=10, classes_per_client=11), ["classes_per_client is 11", "valid: 1..10"]),
        (dict(num_clients=10, classes_per_client=0), ["classes_per_client is 0", "valid: 1..10"]),
        (dict(num_clients=10, scheme="pathological"), ["unknown partition scheme", "label-skew, dirichlet, iid"]),
        (dict(num_clients=0), ["num_clients"]),
        (dict(num_clients=10, scheme="dirichlet", alpha=0), ["alpha"]),
        (dict(num_clients=10, val_fraction=1.0), ["val_fraction"]),
        (dict(num_clients=2000, scheme="dirichlet", alpha=0.05), ["without training data"]),
    ],
)
def test_partition_errors(kwargs, words):
    with pytest.raises(UserError) as err:
        partition(Y_TRAIN[::10], Y_TEST[::10], **kwargs)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


# ---- sources ----------------------------------------------------------------------------------------


def write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def good_arrays(n=40, m=10, k=4, c=3):
    rng = np.random.default_rng(0)
    return dict(
        x_train=rng.integers(0, 256, (n, 8, 8, c), dtype=np.uint8),
        y_train=np.arange(n) % k,
        x_test=rng.integers(0, 256, (m, 8, 8, c), dtype=np.uint8),
        y_test=(np.arange(m) % k).astype(np.int32),
    )


def test_npz_round_trip(tmp_path):
    arrays = good_arrays()
    ds = load_dataset(str(write_npz(tmp_path / "mine.npz", **arrays, classes=np.array(list("abcd")))))
    assert ds.classes == list("abcd") and ds.num_classes == 4 and ds.image_shape == (3, 8, 8)
    for key, value in arrays.items():
        assert np.array_equal(getattr(ds, key), value)
    assert ds.y_test.dtype == ds.y_train.dtype == np.int64
    expected = arrays["x_train"].reshape(-1, 3) / 255
    assert np.allclose(ds.mean, expected.mean(0)) and np.allclose(ds.std, expected.std(0))
    # Without class names: "0".."K-1".
    ds = load_dataset(str(write_npz(tmp_path / "plain.npz", **good_arrays(c=1))))
    assert ds.classes == ["0", "1", "2", "3"] and ds.image_shape == (1, 8, 8)


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda a: a.pop("y_test"), ["missing key", "y_test"]),
        (lambda a: a.update(x_train=a["x_train"].astype(np.float32)), ["x_train", "float32", "uint8"]),
        (lambda a: a.update(x_test=a["x_test"][..., 0]), ["x_test", "shape", "(N, H, W, C)"]),
        (lambda a: a.update(x_test=a["x_test"][:, :4]), ["must match"]),
        (lambda a: a.update(y_train=a["y_train"][:-1]), ["y_train", "labels for"]),
        (lambda a: a.update(y_train=a["y_train"] * 1.0), ["y_train", "integer"]),
        (lambda a: a.update(y_test=a["y_test"] + 2, classes=np.array(list("abcd"))), ["y_test", "[0, 4)"]),
        (lambda a: a.update(y_train=a["y_train"] - 1), ["y_train", "non-negative"]),
    ],
)
def test_npz_errors(tmp_path, change, words):
    arrays = good_arrays()
    change(arrays)
    path = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserError) as err:
        load_dataset(str(path))
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_npz_not_a_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(str(tmp_path / "nothing.npz"))
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(UserError, match=r"not a valid .npz dataset \(a text file\)"):
        load_dataset(str(tmp_path / "junk.npz"))


@pytest.mark.parametrize("kind, content", [
    ("a text file", b"x_train,y_train\n1,2\n"),
    ("a single .npy array", None),
    ("an empty file", b""),
    ("not a zip archive", bytes(range(256))),
])
def test_a_file_that_is_not_an_npz_is_named_for_what_it_is(tmp_path, kind, content):
    """Issue 17: a text file given as a dataset was reported as "pickled data ... allow_pickle"."""
    path = tmp_path / "data.npz"
    if content is None:
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    else:
        path.write_bytes(content)
    with pytest.raises(UserError) as err:
        load_dataset(str(path))
    message = str(err.value)
    assert "\n" not in message and "pickle" not in message
    assert f"not a valid .npz dataset ({kind})" in message
    assert "numpy.savez" in message and "x_train, y_train, x_test, y_test" in message  # what is expected


def test_an_npz_with_object_arrays_does_not_suggest_allow_pickle(tmp_path):
    arrays = good_arrays()
    np.savez(tmp_path / "obj.npz", **{**arrays, "x_train": np.array([object()] * 3, dtype=object)})
    with pytest.raises(UserError) as err:
        load_dataset(str(tmp_path / "obj.npz"))
    assert "allow_pickle" not in str(err.value) and "Python objects" in str(err.value)


def test_labels_from_one_say_class_zero_is_empty(tmp_path):
    """Issue 17: labels 1..10 were reported as "11 classes" without saying class 0 is empty."""
    arrays = good_arrays(k=10, n=40)
    arrays["y_train"], arrays["y_test"] = arrays["y_train"] + 1, arrays["y_test"] + 1
    with pytest.raises(UserError) as err:
        load_dataset(str(write_npz(tmp_path / "from1.npz", **arrays)))
    message = str(err.value)
    assert "\n" not in message
    for words in ("labels 1..10", "11 classes", "class 0 has no training image", "relabel to 0..9 (y - 1)"):
        assert words in message, words
    # Gaps elsewhere are named too; a classes key naming every label is the user's explicit choice.
    arrays = good_arrays(k=4)
    arrays["y_train"] = np.where(arrays["y_train"] == 2, 3, arrays["y_train"])
    with pytest.raises(UserError, match="class 2 has no training image"):
        load_dataset(str(write_npz(tmp_path / "gap.npz", **arrays)))
    ds = load_dataset(str(write_npz(tmp_path / "named.npz", **arrays, classes=np.array(list("abcd")))))
    assert ds.num_classes == 4


def test_every_source_says_which_split_it_is(tmp_path):
    arrays = good_arrays()
    assert load_dataset(str(write_npz(tmp_path / "mine.npz", **arrays))).split == "as given"
    assert load_dataset(str(write_npz(tmp_path / "sub.npz", **arrays, split=np.array("official")))).split == "official"
    assert load_dataset("synthetic").split == "generated"
    # A <data-dir>/cifar10.npz that is not one of the known copies: not passed off as the official split.
    fake = {**arrays, "x_train": np.zeros((10, 32, 32, 3), np.uint8), "y_train": np.arange(10),
            "x_test": np.zeros((10, 32, 32, 3), np.uint8), "y_test": np.arange(10)}
    write_npz(tmp_path / "cifar10.npz", **fake)
    ds = load_dataset("cifar10", tmp_path, download=False)
    assert ds.split == "unknown" and "not recognised" in ds.split_note


def test_validate_arrays_accepts_good_arrays():
    a = good_arrays()
    validate_arrays("mine", a["x_train"], a["y_train"], a["x_test"], a["y_test"], ["a", "b", "c", "d"])


def test_unknown_dataset():
    with pytest.raises(UserError, match="unknown dataset 'mnist'; valid: cifar10, cifar100, synthetic"):
        load_dataset("mnist")
    with pytest.raises(UserError, match="synthetic:K"):
        load_dataset("synthetic:x")


def test_cifar_missing_offline(tmp_path):
    with pytest.raises(UserError) as err:
        load_dataset("cifar10", tmp_path, download=False)
    message = str(err.value)
    assert "\n" not in message and "cifar10 is missing in" in message and "unpack.py" in message


def test_synthetic_dataset():
    ds = load_dataset("synthetic", seed=3)
    assert ds.x_train.shape == (2000, 32, 32, 3) and ds.x_test.shape == (500, 32, 32, 3)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64
    assert (np.bincount(ds.y_train) == 200).all()  # balanced
    assert np.array_equal(ds.x_train, synthetic_dataset(seed=3).x_train)
    assert not np.array_equal(ds.x_train, synthetic_dataset(seed=4).x_train)
    assert load_dataset("synthetic:20").num_classes == 20


def test_synthetic_is_learnable():
    # A nearest-class-mean classifier is far above chance (10%): there is signal for a CNN to find.
    ds = synthetic_dataset()
    x_train = ds.x_train.reshape(len(ds.x_train), -1).astype(np.float32)
    x_test = ds.x_test.reshape(len(ds.x_test), -1).astype(np.float32)
    means = np.stack([x_train[ds.y_train == c].mean(0) for c in range(ds.num_classes)])
    dists = (x_test**2).sum(1)[:, None] - 2 * x_test @ means.T + (means**2).sum(1)[None]
    assert (dists.argmin(1) == ds.y_test).mean() > 0.8


def unpacked(pytestconfig, name: str) -> Path:
    """The shared copy of `name` unpacked once into .pytest_cache (the folder holding <name>.npz)."""
    folder = pytestconfig.cache.mkdir(name)
    if not (folder / f"{name}.npz").exists():
        unpack = SHARED_CIFAR10.parent / "unpack.py"
        subprocess.run([sys.executable, str(unpack), str(SHARED_CIFAR10.parent / name), str(folder / f"{name}.npz")],
                       check=True)
    return folder


@pytest.mark.skipif(not SHARED_CIFAR100.is_dir(), reason="no ../shared/data/cifar100 here")
def test_real_cifar100_offline_is_the_documented_resplit(pytestconfig):
    ds = load_dataset("cifar100", unpacked(pytestconfig, "cifar100"), download=False)
    assert ds.x_train.shape == (50000, 32, 32, 3) and ds.x_test.shape == (10000, 32, 32, 3)
    assert ds.num_classes == 100 and ds.classes[:3] == ["apple", "aquarium_fish", "baby"]
    assert (np.bincount(ds.y_train) == 500).all() and (np.bincount(ds.y_test) == 100).all()
    assert ds.mean == (0.5071, 0.4865, 0.4409)  # the protocol's statistics
    assert ds.split == "re-split" and "NOT the official split" in ds.split_note
    # 10 classes per client (SPEC for CIFAR-100), N = 10: every client holds 10 classes in train, val and test.
    splits = partition(ds.y_train, ds.y_test, 10, classes_per_client=10, seed=0)
    for s in splits:
        assert len(np.unique(ds.y_train[s.train.numpy()])) == 10
    check_cover(splits, ds.y_train, ds.y_test)
    check_same_distribution(splits, ds.y_train, ds.y_test)


@pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason="no ../shared/data/cifar10 here")
def test_real_cifar10(pytestconfig):
    ds = load_dataset("cifar10", unpacked(pytestconfig, "cifar10"), download=False)
    assert ds.split == "official"
    assert ds.x_train.shape == (50000, 32, 32, 3) and ds.x_test.shape == (10000, 32, 32, 3)
    assert ds.classes[:2] == ["airplane", "automobile"] and ds.num_classes == 10
    assert ds.mean == (0.485, 0.456, 0.406) and ds.std == (0.229, 0.224, 0.225)  # the protocol's, not measured
    assert (np.bincount(ds.y_train) == 5000).all() and (np.bincount(ds.y_test) == 1000).all()
    splits = partition(ds.y_train, ds.y_test, 100, classes_per_client=2, seed=0)
    check_cover(splits, ds.y_train, ds.y_test)
    check_same_distribution(splits, ds.y_train, ds.y_test)


# ---- on-device batches ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    return synthetic_dataset(train_size=300, test_size=50, seed=0)


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def test_train_batches_shapes_and_epoch(small):
    data = DeviceData(small, torch.device("cpu"))
    idx = torch.arange(5, 300, 3)  # 99 indices
    batches = list(data.train_batches(idx, 32, gen(0)))
    assert [len(y) for _, y in batches] == [32, 32, 32, 3]  # last partial batch kept
    x, y = batches[0]
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    # Recover which samples were drawn from the labels' order: shuffle the index set once more, unaugmented.
    plain = DeviceData(small, torch.device("cpu"), augment=False)
    seen = torch.cat([xb for xb, _ in plain.train_batches(idx, 32, gen(0))])
    order = idx[torch.randperm(len(idx), generator=gen(0))]
    assert torch.equal(seen, plain.normalise(plain.x_train[order]))  # each index exactly once, in randperm order
    assert sorted(order.tolist()) == idx.tolist()
    assert torch.equal(torch.cat([yb for _, yb in batches]), plain.y_train[order])


def test_no_augmentation_equals_normalised_gather(small):
    data = DeviceData(small, torch.device("cpu"), augment=False)
    idx = torch.tensor([4, 0, 17])
    x, y = next(data.eval_batches("val", idx, 8))
    raw = torch.from_numpy(small.x_train[[4, 0, 17]]).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(small.mean).view(1, 3, 1, 1), torch.tensor(small.std).view(1, 3, 1, 1)
    assert torch.allclose(x, (raw - mean) / std, atol=1e-5)
    assert y.tolist() == small.y_train[[4, 0, 17]].tolist()
    xt, yt = next(data.eval_batches("test", torch.tensor([1]), 8))
    assert torch.allclose(xt, data.normalise(data.x_test[1:2])) and yt.tolist() == [small.y_test[1]]
    with pytest.raises(UserError, match="valid: train, val, test"):
        next(data.eval_batches("holdout", idx, 8))


def test_augmentation_is_seeded(small):
    data = DeviceData(small, torch.device("cpu"))
    idx = torch.arange(64)
    a = torch.cat([x for x, _ in data.train_batches(idx, 16, gen(1))])
    b = torch.cat([x for x, _ in data.train_batches(idx, 16, gen(1))])
    assert torch.equal(a, b)
    # Another seed gives another order and other crops and flips.
    c = torch.cat([x for x, _ in data.train_batches(idx, 16, gen(2))])
    assert not torch.equal(a, c)


def test_crop_and_flip_are_shifts_of_the_padded_image(small):
    data = DeviceData(small, torch.device("cpu"))
    x = data.x_train[:120]
    out = data.crop_and_flip(x, gen(0))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flips, offsets = 0, set()
    for i in range(len(x)):  # test-only loop: find each output as a (flipped) window of the padded image
        for flip in (False, True):
            src = padded[i].flip(-1) if flip else padded[i]
            windows = src.unfold(1, 32, 1).unfold(2, 32, 1)  # (C, 9, 9, 32, 32)
            hits = (windows == out[i][:, None, None]).flatten(3).all(-1).all(0).nonzero()
            if len(hits):
                flips += flip
                offsets.add(tuple(hits[0].tolist()))
                break
        else:
            raise AssertionError(f"augmented sample {i} is not a crop of its padded image")
    assert 30 < flips < 90  # about half flipped
    assert len(offsets) > 30  # many of the 81 offsets used
    assert all(0 <= o <= 8 for pair in offsets for o in pair)


def test_normalisation_centres_the_data(small):
    data = DeviceData(small, torch.device("cpu"), augment=False)
    x = torch.cat([xb for xb, _ in data.eval_batches("train", torch.arange(300), 128)])
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.05
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 0.05
    assert data.num_classes == 10 and data.image_shape == (3, 32, 32)


def test_gather_augmentation_equals_advanced_indexing_bitwise():
    """crop_and_flip's one gather draws the same random numbers and returns exactly the batch of the
    straightforward advanced-indexing crop and flip it replaced."""
    from data.device_data import PAD

    def indexed_crop_and_flip(x, generator):
        n, c, h, w = x.shape
        padded = torch.nn.functional.pad(x, (PAD, PAD, PAD, PAD))
        dy = torch.randint(0, 2 * PAD + 1, (n, 1), generator=generator)
        dx = torch.randint(0, 2 * PAD + 1, (n, 1), generator=generator)
        flip = torch.rand((n, 1), generator=generator) < 0.5
        cols = torch.arange(w)
        cols = dx + torch.where(flip, w - 1 - cols, cols)
        rows = dy + torch.arange(h)
        batch, chan = torch.arange(n).view(n, 1, 1, 1), torch.arange(c).view(1, c, 1, 1)
        return padded[batch, chan, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]

    data = DeviceData(synthetic_dataset(train_size=100, test_size=10), torch.device("cpu"))
    for n in (1, 37):
        x = data.x_train[:n]
        a = data.crop_and_flip(x, torch.Generator().manual_seed(3))
        b = indexed_crop_and_flip(x, torch.Generator().manual_seed(3))
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_partition_files_record_the_split_they_index():
    from data.portable import dataset_info

    assert dataset_info(synthetic_dataset(train_size=40, test_size=10))["split"] == "generated"


def test_stratified_subset_takes_equal_shares_of_each_class_and_measures_its_own_statistics():
    """The quick preset's subset: n // K images of each class (train and test), fixed across calls, normalised
    with the statistics of its own training images."""
    from data.sources import channel_stats
    from data.subset import stratified_subset

    ds = synthetic_dataset(num_classes=4, train_size=400, test_size=200, seed=0)
    sub = stratified_subset(ds, 100, 40)
    assert np.bincount(sub.y_train, minlength=4).tolist() == [25] * 4
    assert np.bincount(sub.y_test, minlength=4).tolist() == [10] * 4
    again = stratified_subset(ds, 100, 40)
    assert np.array_equal(sub.x_train, again.x_train) and np.array_equal(sub.y_test, again.y_test)
    assert sub.mean == channel_stats(sub.x_train)[0] and sub.mean != ds.mean
    rows = {bytes(x) for x in ds.x_train.reshape(len(ds.x_train), -1)}
    assert all(bytes(x) in rows for x in sub.x_train.reshape(len(sub.x_train), -1))  # images of the dataset
    with pytest.raises(UserError, match="fewer images than"):
        stratified_subset(ds, 3, 40)


def test_quick_preset_runs_on_a_subset_and_paper_preset_on_every_image():
    from bench.config import load_config

    assert load_config(None, "quick").subset == [20000, 4000]
    assert not load_config(None, "paper").subset
    assert not load_config(None, "quick", ["subset=[]"]).subset


def test_a_dataset_no_larger_than_the_subset_is_used_as_it_is():
    from data.subset import stratified_subset

    ds = synthetic_dataset(num_classes=4, train_size=400, test_size=200, seed=0)
    assert stratified_subset(ds, 10000, 2000) is ds
