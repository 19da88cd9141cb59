"""Split a dataset among clients (SPEC section 1).

The official train set is split at random into a train pool and a validation pool; the official test
set is the test pool. A (classes x clients) proportion matrix P says which share of each class every
client gets, and the SAME P cuts all three pools, so a client's train, validation and test subsets have
the same label distribution.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bench.errors import UserError

PARTITIONERS: dict[str, str] = {
    "label-skew": "pathological (the paper's): each client holds classes_per_client classes (default 2; 10 on "
                  "datasets with more than 10 classes), with U(0.4, 0.6) weighted shares; when classes_per_client * N "
                  "is not a multiple of the classes, classes are dealt as evenly as possible: each held by floor or "
                  "ceil of classes_per_client * N / classes clients (unheld classes' samples unused)",
    "dirichlet": "each class split among all clients by Dirichlet(alpha) proportions (smaller alpha: more skew)",
    "iid": "every class split equally among all clients",
    "file:PATH.json": "a given partition: client index lists written by `bench partition export --format json` "
                      "(or converted from another tool); the same for every seed",
}
FILE_PREFIX = "file:"
# What to change when a partitioner leaves a client without training data (too many clients for the samples).
EMPTY_CLIENT_ADVICE = {
    "label-skew": "use fewer clients, more classes per client (--classes-per-client), or another partitioner "
                  "(--partition iid or dirichlet)",
    "dirichlet": "use fewer clients, a larger dirichlet_alpha (less skew, e.g. --set dirichlet_alpha=1.0), another "
                 "seed, or --partition iid",
    "iid": "use fewer clients or a larger dataset",
}


def is_file_partition(scheme: str) -> bool:
    return scheme.startswith(FILE_PREFIX)


@dataclass
class ClientSplit:
    train: torch.Tensor  # int64 indices into the official train arrays
    val: torch.Tensor  # int64 indices into the official train arrays (the held-out validation pool)
    test: torch.Tensor  # int64 indices into the official test arrays


def partition(
    y_train: np.ndarray,
    y_test: np.ndarray,
    num_clients: int,
    scheme: str = "label-skew",
    *,
    classes_per_client: int = 2,
    alpha: float = 0.5,
    val_fraction: float = 0.2,
    seed: int = 0,
    num_classes: int | None = None,
) -> list[ClientSplit]:
    """Per-client index sets, deterministic from `seed`. num_classes defaults to max label + 1."""
    y_train, y_test = np.asarray(y_train, dtype=np.int64), np.asarray(y_test, dtype=np.int64)
    if scheme not in PARTITIONERS or is_file_partition(scheme):
        raise UserError(f"unknown partition scheme {scheme!r}; valid: label-skew, dirichlet, iid")
    if num_clients < 1:
        raise UserError(f"num_clients is {num_clients}; it must be at least 1")
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction is {val_fraction}; it must be in [0, 1)")
    top = int(max(y_train.max(initial=0), y_test.max(initial=0)))
    k = num_classes if num_classes is not None else top + 1
    if min(y_train.min(initial=0), y_test.min(initial=0)) < 0 or top >= k:
        raise UserError(f"labels must be in [0, {k}); found labels outside it")

    n_val = int(round(val_fraction * len(y_train)))
    if num_clients > len(y_train) - n_val:  # before any (classes x clients) matrix is allocated
        raise UserError(f"num_clients={num_clients} exceeds the {len(y_train) - n_val} training samples left after "
                        f"the validation hold-out; valid: 1..{len(y_train) - n_val} clients (each needs a sample)")
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(y_train))
    val_pool, train_pool = shuffled[:n_val], shuffled[n_val:]

    if scheme == "label-skew":
        p = label_skew_proportions(k, num_clients, classes_per_client, rng)
    elif scheme == "dirichlet":
        p = dirichlet_proportions(k, num_clients, alpha, rng)
    else:
        p = np.full((k, num_clients), 1.0 / num_clients)

    train = _cut(train_pool, y_train[train_pool], p, rng)
    val = _cut(val_pool, y_train[val_pool], p, rng)
    test = _cut(np.arange(len(y_test)), y_test, p, rng)
    empty = [c for c, idx in enumerate(train) if len(idx) == 0]
    if empty:
        raise UserError(f"partition leaves client {empty[0]} without training data ({len(empty)} such clients); "
                        f"{EMPTY_CLIENT_ADVICE[scheme]}")
    as_tensor = torch.from_numpy
    return [ClientSplit(as_tensor(t), as_tensor(v), as_tensor(s)) for t, v, s in zip(train, val, test)]


def label_skew_proportions(
    num_classes: int, num_clients: int, classes_per_client: int, rng: np.random.Generator
) -> np.ndarray:
    """The paper's pathological split: every client gets classes_per_client distinct classes, every class
    m = classes_per_client * N / K clients. When cpc * N is not a multiple of K, classes are dealt as evenly
    as possible: each class is held by floor or ceil of cpc * N / K clients (none, for some classes, when
    cpc * N < K: their samples then belong to no client). A multiple of K gives the exact SPEC partition."""
    if not 1 <= classes_per_client <= num_classes:
        raise UserError(
            f"classes_per_client is {classes_per_client}; valid: 1..{num_classes} (the number of classes)"
        )
    # Every class offers `width` client slots (m when cpc * N is a multiple of K, else ceil(cpc * N / K)).
    width = -(-classes_per_client * num_clients // num_classes)
    weights = rng.uniform(0.4, 0.6, size=(num_classes, width))
    slots = np.full(num_classes, width)  # unused client slots per class
    held = np.zeros((num_classes, num_clients), dtype=bool)
    slot_of = np.zeros((num_classes, num_clients), dtype=np.int64)  # which weight a holder of the class gets
    for client in range(num_clients):
        for _ in range(classes_per_client):
            # Classes the client already holds are out of the running.
            open_slots = np.where(held[:, client], -1, slots)
            best = np.flatnonzero(open_slots == open_slots.max())
            c = rng.choice(best)
            # Picking from the fullest classes keeps slot counts within one of each other, so this never
            # fails, and the classes left with an unused slot at the end (uneven case) lose just that one.
            assert slots[c] > 0, "label-skew assignment ran out of slots"
            held[c, client] = True
            slot_of[c, client] = width - slots[c]
            slots[c] -= 1
    # Normalise each class's weights over the slots it used (all of them in the even case: as SPEC).
    weights = np.where(np.arange(width) < (width - slots)[:, None], weights, 0.0)
    totals = weights.sum(axis=1, keepdims=True)
    weights /= np.where(totals > 0, totals, 1.0)
    return np.where(held, np.take_along_axis(weights, slot_of, axis=1), 0.0)


def dirichlet_proportions(num_classes: int, num_clients: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    if not alpha > 0:
        raise UserError(f"alpha is {alpha}; the Dirichlet concentration must be > 0 (e.g. 0.1 to 1.0)")
    p = rng.dirichlet(np.full(num_clients, float(alpha)), size=num_classes)
    if not np.isfinite(p).all():
        raise UserError(f"alpha {alpha} is too small to sample Dirichlet proportions; use alpha >= 0.01")
    return p


def _cut(pool: np.ndarray, labels: np.ndarray, p: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Give client j the share p[c, j] of class c of this pool, in shuffled order; returns sorted indices."""
    num_classes, num_clients = p.shape
    # Shuffle, then stable-sort by label: indices grouped by class, in random order within each class.
    shuffled = rng.permutation(len(pool))
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]
    counts = np.bincount(labels, minlength=num_classes)
    # Cut each class at the rounded cumulative proportions, so no sample is lost or duplicated. A class no
    # client holds (label skew with cpc * N < K) has all its cuts at 0.
    totals = p.sum(axis=1, keepdims=True)
    cum = np.cumsum(p, axis=1) / np.where(totals > 0, totals, 1.0)
    cuts = np.rint(cum * counts[:, None]).astype(np.int64)
    per_client = np.diff(cuts, axis=1, prepend=0)  # (classes, clients) sample counts
    owner = np.repeat(np.tile(np.arange(num_clients), num_classes), per_client.ravel())
    members = pool[order]
    if (totals == 0).any():  # drop the samples of classes nobody holds (owner lists only the others)
        members = members[totals[labels[order], 0] > 0]
    members = members[np.lexsort((members, owner))]  # by client, then by index
    sizes = np.bincount(owner, minlength=num_clients)
    return np.split(members, np.cumsum(sizes)[:-1])
