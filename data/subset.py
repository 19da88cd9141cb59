"""A fixed stratified subset of a dataset: the same images on every machine, for quick runs and smoke scales."""
from __future__ import annotations

import dataclasses

import numpy as np

from bench.errors import UserError
from data.sources import ArrayDataset, channel_stats


def stratified_subset(ds: ArrayDataset, n_train: int, n_test: int) -> ArrayDataset:
    """n_train // K training and n_test // K test images of each of the K classes, the first ones after a fixed
    shuffle (seed 0), in their original order; normalisation statistics measured on the subset's train images."""
    if n_train < ds.num_classes or n_test < ds.num_classes:
        raise UserError(f"subset [{n_train}, {n_test}] holds fewer images than {ds.name}'s {ds.num_classes} "
                        f"classes; valid: at least {ds.num_classes} train and test images each")
    if n_train >= len(ds.y_train) and n_test >= len(ds.y_test):  # a dataset no larger than the subset: as it is
        return ds
    rng = np.random.default_rng(0)

    def pick(y: np.ndarray, n: int) -> np.ndarray:
        per = n // ds.num_classes
        return np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == k))[:per] for k in range(ds.num_classes)]))

    train, test = pick(ds.y_train, n_train), pick(ds.y_test, n_test)
    mean, std = channel_stats(ds.x_train[train])
    return dataclasses.replace(ds, name=f"{ds.name} subset {n_train}/{n_test}", x_train=ds.x_train[train],
                               y_train=ds.y_train[train], x_test=ds.x_test[test], y_test=ds.y_test[test],
                               mean=mean, std=std)
