"""Model initialisation from a checkpoint file the user supplies (`--set model.init=PATH`): nothing is downloaded.

The file is read with torch.load(weights_only=True) (tensors and plain containers only; nothing is unpickled)
and holds either
- one state_dict (parameter name -> tensor) that fits an architecture: every client of that architecture
  starts from it, or
- a dict architecture name -> state_dict (one file for a whole heterogeneous group, e.g. {"vit1": {...},
  "vit2": {...}}).
The header may be missing or of another shape (a checkpoint trained on other classes): it then keeps its random
initialisation. Every other parameter and buffer of the model must be present with its shape.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.errors import UserError

_LOADED: dict[str, Any] = {}  # path -> file contents: a run builds many clients from one file


def read_init_file(path: str) -> dict[str, Any]:
    if path not in _LOADED:
        file = Path(path).expanduser()
        if not file.is_file():
            raise UserError(f"model.init={path}: no such file; valid: a checkpoint saved with torch.save(state_dict)")
        try:
            contents = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"model.init={path}: not a weights-only torch checkpoint ({first}); valid: a file saved "
                            "with torch.save(model.state_dict()) or torch.save({arch: state_dict})") from None
        if not isinstance(contents, dict) or not contents:
            raise UserError(f"model.init={path}: holds {type(contents).__name__}, not a state_dict; valid: a dict of "
                            "parameter name -> tensor, or architecture name -> such a dict")
        _LOADED[path] = contents
    return _LOADED[path]


def state_for(contents: dict[str, Any], arch: str, path: str) -> dict[str, torch.Tensor]:
    """The state_dict in the file for `arch`."""
    if all(isinstance(v, torch.Tensor) for v in contents.values()):
        return contents
    if arch in contents and isinstance(contents[arch], dict):
        return contents[arch]
    archs = [k for k, v in contents.items() if isinstance(v, dict)]
    raise UserError(f"model.init={path}: has no weights for architecture {arch!r}; it holds "
                    f"{', '.join(archs) or 'no architecture entries'}")


@torch.no_grad()
def load_model_init(model: nn.Module, path: str, arch: str) -> nn.Module:
    """Copy the file's weights for `arch` into `model` (in place, on the model's device); returns the model."""
    state = state_for(read_init_file(path), arch, path)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.startswith("header.")]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape and not k.startswith("header.")]
    if missing or wrong:
        problem = f"missing {', '.join(missing[:3])}" if missing else f"shape {', '.join(wrong[:3])}"
        raise UserError(f"model.init={path}: does not fit architecture {arch!r} ({problem}); valid: a state_dict "
                        f"of {arch} (the header may differ)")
    for key, tensor in own.items():
        if key in state and state[key].shape == tensor.shape:
            tensor.copy_(state[key])
    return model
