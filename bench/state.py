"""The client state store: every client's personal state (private models, persistent tensors, ...),
owned by the simulator. By default it lives on the run's device; with `offload=True` it rests in host
memory and only the clients of the current round are moved to the device."""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn


def move_state(state: dict[str, Any], device: torch.device) -> None:
    """Move every module and tensor of a state dict to `device`, in place (modules keep their identity)."""
    for key, value in state.items():
        if isinstance(value, nn.Module):
            value.to(device)
        elif isinstance(value, torch.Tensor):
            state[key] = value.to(device)


class ClientStore:
    def __init__(self, device: torch.device, offload: bool = False):
        self.device = device
        self.rest_device = torch.device("cpu") if offload else device
        self._states: dict[int, dict[str, Any]] = {}

    def put(self, client_id: int, state: dict[str, Any]) -> None:
        move_state(state, self.rest_device)
        self._states[client_id] = state

    def checkout(self, client_id: int) -> dict[str, Any]:
        """The client's state, on the run's device, for training or evaluation."""
        state = self._states[client_id]
        if self.rest_device != self.device:
            move_state(state, self.device)
        return state

    def checkin(self, client_id: int) -> None:
        if self.rest_device != self.device:
            move_state(self._states[client_id], self.rest_device)

    def __iter__(self) -> Iterator[int]:
        return iter(self._states)

    def state_bytes(self, client_id: int) -> int:
        """Bytes held for one client (parameters, buffers and tensors)."""
        total = 0
        for value in self._states[client_id].values():
            if isinstance(value, nn.Module):
                tensors = list(value.parameters()) + list(value.buffers())
            elif isinstance(value, torch.Tensor):
                tensors = [value]
            else:
                tensors = []
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total
