"""Checkpoints: the complete state of one (algorithm, seed) run, so a killed run resumes bit-identically.

A checkpoint is ONE file written with `torch.save` of a flat `dict[str, Tensor]` (it loads with
`torch.load(weights_only=True)`; nothing is unpickled). Tensors (module parameters and buffers, optimizer
buffers, torch generator states) are entries of that dict; everything else (python scalars, containers,
numpy RNG states, the run's metric history) is a JSON document that travels in the same file as a uint8
tensor under `__meta__`, and refers to the tensors by key. The file is written to a temporary name,
fsynced and renamed over the previous one, so a kill at any moment leaves the last good checkpoint whole.

`pack` turns live objects into JSON + tensors; `unpack` reverses it against a *template*: the same
object freshly built (a new Simulation), so modules, optimizers and generators are restored in place and
keep their identity (an optimizer still points at its module's parameters).
Supported: None, bool, int, float, str, list, tuple, dict (any packable keys), set, deque, defaultdict,
torch.Size, torch.device, torch.dtype, Tensor (and Parameter), nn.Module, torch.optim.Optimizer,
torch.Generator, numpy arrays, numpy scalars and numpy Generators.
"""
from __future__ import annotations

import collections
import functools
import json
import os
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

META_KEY = "__meta__"
FORMAT = 1
TAG = "$"  # marks a JSON object that encodes a non-JSON value


class CheckpointError(Exception):
    """State that cannot be checkpointed or restored (names the offending path)."""


def is_state(value: Any) -> bool:
    """False for attributes that are behaviour, not state (functions, methods, classes, python modules)."""
    return not isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType,
                                  types.ModuleType, type, functools.partial))


class Packer:
    """Collects the tensors of everything packed; `pack` returns the JSON-able description."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def tensor(self, path: str, t: torch.Tensor) -> str:
        if path in self.tensors:
            raise CheckpointError(f"duplicate checkpoint key {path!r}")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        elif not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone(memory_format=torch.contiguous_format)  # a view would save its whole storage
        self.tensors[path] = t
        return path

    def pack(self, obj: Any, path: str) -> Any:
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, torch.Tensor):
            return {TAG: "tensor", "k": self.tensor(path, obj), "device": str(obj.device),
                    "grad": bool(obj.requires_grad), "param": isinstance(obj, nn.Parameter)}
        if isinstance(obj, nn.Module):
            state = obj.state_dict()
            for name, t in state.items():
                self.tensor(f"{path}/{name}", t)
            return {TAG: "module", "k": path, "keys": list(state),
                    "training": [m.training for m in obj.modules()],
                    "requires_grad": [p.requires_grad for p in obj.parameters()]}
        if isinstance(obj, torch.optim.Optimizer):
            return {TAG: "optimizer", "state": self.pack(obj.state_dict(), f"{path}/optim")}
        if isinstance(obj, torch.Generator):
            return {TAG: "generator", "k": self.tensor(path, obj.get_state()), "device": str(obj.device)}
        if isinstance(obj, np.random.Generator):
            return {TAG: "np_generator", "state": self.pack(obj.bit_generator.state, path)}
        if isinstance(obj, np.ndarray):
            if obj.dtype == object:
                raise CheckpointError(f"{path}: numpy object arrays cannot be checkpointed")
            return {TAG: "ndarray", "k": self.tensor(path, torch.from_numpy(np.ascontiguousarray(obj)))}
        if isinstance(obj, np.generic):
            return {TAG: "np_scalar", "dtype": str(obj.dtype), "v": obj.item()}
        if isinstance(obj, torch.device):
            return {TAG: "device", "v": str(obj)}
        if isinstance(obj, torch.dtype):
            return {TAG: "dtype", "v": str(obj).removeprefix("torch.")}
        if isinstance(obj, torch.Size):
            return {TAG: "size", "v": list(obj)}
        if isinstance(obj, collections.deque):
            return {TAG: "deque", "maxlen": obj.maxlen, "v": [self.pack(v, f"{path}/{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, tuple):
            return {TAG: "tuple", "v": [self.pack(v, f"{path}/{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.pack(v, f"{path}/{i}") for i, v in enumerate(obj)]
        if isinstance(obj, (set, frozenset)):
            items = sorted(obj, key=repr)
            return {TAG: "frozenset" if isinstance(obj, frozenset) else "set",
                    "v": [self.pack(v, f"{path}/{i}") for i, v in enumerate(items)]}
        if isinstance(obj, dict):
            factory = getattr(obj, "default_factory", None)
            if factory is None and type(obj) is dict and all(isinstance(k, str) and k != TAG for k in obj):
                return {k: self.pack(v, f"{path}/{k}") for k, v in obj.items()}
            if factory not in (None, int, float, list, dict, set):
                raise CheckpointError(f"{path}: defaultdict factory {factory!r} cannot be checkpointed")
            return {TAG: "dict", "factory": getattr(factory, "__name__", None),
                    "items": [[self.pack(k, f"{path}/k{i}"), self.pack(v, f"{path}/{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
        raise CheckpointError(f"{path}: cannot checkpoint a {type(obj).__module__}.{type(obj).__qualname__}; "
                              "give the algorithm state_dict/load_state_dict hooks or list it in checkpoint_exclude")


FACTORIES = {"int": int, "float": float, "list": list, "dict": dict, "set": set}


def _target_device(spec_device: str, device: torch.device) -> torch.device:
    """Where a tensor without a template goes: the CPU if it was saved from the CPU, else the run's device."""
    return torch.device("cpu") if spec_device.startswith("cpu") else device


def unpack(spec: Any, tensors: dict[str, torch.Tensor], template: Any = None,
           device: torch.device = torch.device("cpu"), path: str = "") -> Any:
    """Rebuild a packed value. Modules, optimizers, generators (and tensors that require grad) are restored
    into `template`, the same object freshly built, and keep their identity."""
    if isinstance(spec, list):
        items = list(template) if isinstance(template, (list, tuple, collections.deque)) else []
        return [unpack(v, tensors, items[i] if i < len(items) else None, device, f"{path}/{i}")
                for i, v in enumerate(spec)]
    if not isinstance(spec, dict):
        return spec
    kind = spec.get(TAG)
    if kind is None:
        tmpl = template if isinstance(template, dict) else {}
        return {k: unpack(v, tensors, tmpl.get(k), device, f"{path}/{k}") for k, v in spec.items()}
    if kind not in UNPACKERS:
        raise CheckpointError(f"{path}: unknown checkpoint entry type {kind!r}")
    return UNPACKERS[kind](spec, tensors, template, device, path)


def _tensor(spec, tensors, template, device, path):
    value = tensors[spec["k"]]
    if isinstance(template, torch.Tensor) and (template.requires_grad or isinstance(template, nn.Parameter)) \
            and template.shape == value.shape and template.dtype == value.dtype:
        with torch.no_grad():
            template.copy_(value)  # trainable: an optimizer may hold it, keep its identity
        return template
    target = template.device if isinstance(template, torch.Tensor) else _target_device(spec["device"], device)
    value = value.to(target)
    if spec["param"]:
        return nn.Parameter(value, requires_grad=spec["grad"])
    return value.requires_grad_(spec["grad"]) if spec["grad"] else value


def _module(spec, tensors, template, device, path):
    if not isinstance(template, nn.Module):
        raise CheckpointError(f"{path}: the checkpoint holds a module here but the fresh state has "
                              f"{type(template).__name__}")
    prefix = spec["k"]
    try:
        template.load_state_dict({name: tensors[f"{prefix}/{name}"] for name in spec["keys"]}, strict=True)
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(f"{path}: module does not match the checkpoint ({err})") from None
    for module, flag in zip(template.modules(), spec["training"]):
        module.training = flag
    for param, flag in zip(template.parameters(), spec["requires_grad"]):
        param.requires_grad_(flag)
    return template


def _optimizer(spec, tensors, template, device, path):
    if not isinstance(template, torch.optim.Optimizer):
        raise CheckpointError(f"{path}: the checkpoint holds an optimizer but the fresh state has "
                              f"{type(template).__name__}")
    template.load_state_dict(unpack(spec["state"], tensors, None, torch.device("cpu"), f"{path}/optim"))
    return template


def _generator(spec, tensors, template, device, path):
    gen = template if isinstance(template, torch.Generator) else \
        torch.Generator(device=_target_device(spec["device"], device))
    gen.set_state(tensors[spec["k"]])
    return gen


def _np_generator(spec, tensors, template, device, path):
    state = unpack(spec["state"], tensors, None, device, path)
    if isinstance(template, np.random.Generator) and type(template.bit_generator).__name__ == state["bit_generator"]:
        gen = template
    else:
        gen = np.random.Generator(getattr(np.random, state["bit_generator"])())
    gen.bit_generator.state = state
    return gen


def _sequence(spec, tensors, template, device, path):
    items = unpack(spec["v"], tensors, template, device, path)
    kind = spec[TAG]
    if kind == "tuple":
        return tuple(items)
    if kind == "deque":
        return collections.deque(items, maxlen=spec["maxlen"])
    return set(items) if kind == "set" else frozenset(items)


def _dict(spec, tensors, template, device, path):
    tmpl = template if isinstance(template, dict) else {}
    out: dict = collections.defaultdict(FACTORIES[spec["factory"]]) if spec["factory"] else {}
    for i, (k, v) in enumerate(spec["items"]):
        key = unpack(k, tensors, None, device, f"{path}/k{i}")
        out[key] = unpack(v, tensors, tmpl.get(key), device, f"{path}/{i}")
    return out


UNPACKERS: dict[str, Any] = {
    "tensor": _tensor, "module": _module, "optimizer": _optimizer, "generator": _generator,
    "np_generator": _np_generator, "tuple": _sequence, "deque": _sequence, "set": _sequence,
    "frozenset": _sequence, "dict": _dict,
    "ndarray": lambda spec, tensors, *_: tensors[spec["k"]].numpy().copy(),
    "np_scalar": lambda spec, *_: np.dtype(spec["dtype"]).type(spec["v"]),
    "device": lambda spec, tensors, template, *_: template if isinstance(template, torch.device)
    else torch.device(spec["v"]),
    "dtype": lambda spec, *_: getattr(torch, spec["v"]),
    "size": lambda spec, *_: torch.Size(spec["v"]),
}


# ---- the file ------------------------------------------------------------------------------------------

def save_file(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> int:
    """Write tensors + meta atomically (temporary file, fsync, rename); returns the file size in bytes."""
    if META_KEY in tensors:
        raise CheckpointError(f"{META_KEY} is a reserved checkpoint key")
    blob = json.dumps({"format": FORMAT, **meta}, allow_nan=True).encode()
    payload = {**tensors, META_KEY: torch.frombuffer(bytearray(blob), dtype=torch.uint8)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path.stat().st_size


def load_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and meta of a checkpoint file; torch.load with weights_only=True (no arbitrary unpickling)."""
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
        meta = json.loads(bytes(tensors.pop(META_KEY).numpy()).decode())
    except Exception as err:  # truncated, corrupt, not ours
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r}, expected {FORMAT}")
    return tensors, meta


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported everywhere (e.g. Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class RunCheckpoint:
    """The checkpoint of one run: <run dir>/checkpoint/state.pt, plus checkpoint.json, a small human-readable
    note of what the last good checkpoint holds (informational; state.pt is the truth)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.file = directory / "state.pt"

    def exists(self) -> bool:
        return self.file.exists()

    def save(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        size = save_file(self.file, tensors, meta)
        note = {"step": meta.get("step"), "file": self.file.name, "bytes": size}
        tmp = self.directory / ".checkpoint.json.tmp"
        tmp.write_text(json.dumps(note, indent=2))
        tmp.replace(self.directory / "checkpoint.json")

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return load_file(self.file)

    def remove(self) -> None:
        for path in (self.file, self.directory / "checkpoint.json"):
            path.unlink(missing_ok=True)
        for stale in self.directory.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        try:
            self.directory.rmdir()
        except OSError:
            pass


def rng_state(packer: Packer) -> dict[str, Any]:
    """The process-wide RNGs: torch (CPU and CUDA), numpy's legacy global, python's random."""
    import random

    state = {"torch": packer.pack(torch.get_rng_state(), "rng/torch"),
             "numpy": packer.pack(np.random.get_state(), "rng/numpy"),
             "python": packer.pack(random.getstate(), "rng/python")}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [packer.pack(s, f"rng/cuda{i}") for i, s in enumerate(torch.cuda.get_rng_state_all())]
    return state


def set_rng_state(state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    import random

    torch.set_rng_state(unpack(state["torch"], tensors))
    np.random.set_state(unpack(state["numpy"], tensors))
    random.setstate(unpack(state["python"], tensors))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([unpack(s, tensors) for s in state["cuda"]])

