"""Conversions between the harness's objects and Flower's records.

- A payload (dict of tensors) is an ArrayRecord with one Array per tensor, in the payload's order; its bytes are
  the arrays' element bytes (numel x element size, as bench.accounting counts them), not the serialised
  framing around them.
- Live state (a client's personal state, the algorithm's server state, the RNG states) is packed with the
  checkpoint format (bench/checkpoint.py): its tensors become an ArrayRecord, its JSON description a
  ConfigRecord, and it is unpacked against a freshly built template, as a checkpoint is restored.
- Tensors numpy cannot hold (bfloat16, ...) travel as raw bytes with their torch dtype named.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from bench.accounting import transmit
from bench.checkpoint import CheckpointError, Packer, rng_state, set_rng_state, unpack
from bench.errors import UserError

RAW = "bench.torch-raw"  # Array.stype of a tensor sent as its raw bytes (a dtype numpy lacks)


# ---- payloads ------------------------------------------------------------------------------------------------
def to_array(tensor: torch.Tensor) -> Array:
    tensor = tensor.detach().cpu().contiguous()
    try:
        return Array(tensor.numpy())
    except TypeError:  # e.g. bfloat16: numpy has no such dtype
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        return Array(dtype=str(tensor.dtype), shape=tuple(tensor.shape), stype=RAW, data=raw)


def from_array(array: Array, device: torch.device) -> torch.Tensor:
    if array.stype == RAW:
        dtype = getattr(torch, array.dtype.removeprefix("torch."))
        flat = torch.frombuffer(bytearray(array.data), dtype=torch.uint8).view(dtype)
        return flat.reshape(array.shape).to(device)
    return torch.from_numpy(array.numpy().copy()).to(device)


def array_bytes(array: Array) -> int:
    """The array's element bytes: numel x element size."""
    numel = int(np.prod(array.shape, dtype=np.int64))
    if array.stype == RAW:
        dtype = getattr(torch, array.dtype.removeprefix("torch."))
        return numel * torch.empty((), dtype=dtype).element_size()
    return numel * np.dtype(array.dtype).itemsize


def record_bytes(record: ArrayRecord) -> int:
    """Bytes a payload costs on the wire: the element bytes of every array in the record."""
    return sum(array_bytes(a) for a in record.values())


def payload_record(payload: Mapping[str, torch.Tensor]) -> tuple[ArrayRecord, int]:
    """A payload as the ArrayRecord put in a message, and its bytes (checked through accounting.transmit, the
    simulator's own measure: the two must agree)."""
    sent, size = transmit(payload, torch.device("cpu"))
    record = ArrayRecord({name: to_array(t) for name, t in sent.items()})
    measured = record_bytes(record)
    if measured != size:  # a dtype whose element size numpy and torch disagree on
        raise AssertionError(f"payload record holds {measured} bytes, the payload {size}")
    return record, size


def record_payload(record: ArrayRecord, device: torch.device) -> dict[str, torch.Tensor]:
    return {name: from_array(array, device) for name, array in record.items()}


# ---- live state ----------------------------------------------------------------------------------------------
def pack_state(obj: Any, what: str, algorithm: str) -> tuple[ArrayRecord, ConfigRecord, int]:
    """(tensors, JSON description, tensor bytes) of live state; state the format cannot hold is a UserError
    naming the algorithm and the offending entry."""
    packer = Packer()
    try:
        spec = packer.pack(obj, what)
    except CheckpointError as err:
        raise UserError(f"{algorithm}: {what} cannot be put in a Flower record ({err}); keep only tensors, "
                        "modules, optimizers, generators, numpy arrays and plain Python values there") from None
    arrays = ArrayRecord({key: to_array(t) for key, t in packer.tensors.items()})
    return arrays, ConfigRecord({"json": json.dumps(spec, allow_nan=True)}), record_bytes(arrays)


def unpack_state(arrays: ArrayRecord, meta: ConfigRecord, template: Any, device: torch.device, what: str) -> Any:
    """Rebuild packed state into `template` (the same objects freshly built: they keep their identity)."""
    tensors = {key: from_array(a, torch.device("cpu")) for key, a in arrays.items()}
    return unpack(json.loads(str(meta["json"])), tensors, template, device, what)


def put_state(content: RecordDict, name: str, packed: tuple[ArrayRecord, ConfigRecord, int]) -> int:
    """Store packed state under `name` (two records: name.arrays, name.meta); returns its bytes."""
    arrays, meta, size = packed
    content[f"{name}.arrays"] = arrays
    content[f"{name}.meta"] = meta
    return size


def has_state(content: RecordDict, name: str) -> bool:
    return f"{name}.meta" in content


def get_state(content: RecordDict, name: str, template: Any, device: torch.device, what: str) -> Any:
    return unpack_state(content.array_records[f"{name}.arrays"], content.config_records[f"{name}.meta"],
                        template, device, what)


# ---- the RNG states that travel with every message ----------------------------------------------------------
def rng_pack(generator: torch.Generator) -> tuple[ArrayRecord, ConfigRecord, int]:
    """The run's augmentation generator and the process-wide RNGs (torch, numpy, python)."""
    packer = Packer()
    spec = {"augment": packer.pack(generator, "rng/augment"), **rng_state(packer)}
    arrays = ArrayRecord({key: to_array(t) for key, t in packer.tensors.items()})
    return arrays, ConfigRecord({"json": json.dumps(spec)}), record_bytes(arrays)


def rng_restore(content: RecordDict, generator: torch.Generator) -> None:
    """Set the generator and the process-wide RNGs to the states `rng_pack` put in `content`."""
    tensors = {key: from_array(a, torch.device("cpu")) for key, a in content.array_records["rng.arrays"].items()}
    spec = json.loads(str(content.config_records["rng.meta"]["json"]))
    unpack(spec["augment"], tensors, generator)
    set_rng_state(spec, tensors)
