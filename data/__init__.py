"""Datasets, client partitions and on-device batching for the benchmark."""
from data.device_data import DeviceData
from data.partition import PARTITIONERS, ClientSplit, partition
from data.sources import (
    DATASETS,
    SPLITS,
    ArrayDataset,
    default_data_dir,
    load_dataset,
    synthetic_dataset,
    validate_arrays,
)

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "SPLITS",
    "ArrayDataset",
    "ClientSplit",
    "DeviceData",
    "default_data_dir",
    "load_dataset",
    "partition",
    "synthetic_dataset",
    "validate_arrays",
]
