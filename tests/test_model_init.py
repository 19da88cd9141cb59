"""--set model.init=PATH: every client model starts from the user's checkpoint (read with weights_only=True)."""
from __future__ import annotations

import pytest
import torch

from bench.config import load_config
from bench.errors import UserError
from models.groups import build_model
from tests.conftest import make_simulation


def test_clients_start_from_the_checkpoint(tmp_path):
    reference = build_model("cnn5", 10)
    with torch.no_grad():
        for p in reference.parameters():
            p.uniform_(-0.1, 0.1)
    path = tmp_path / "init.pt"
    torch.save(reference.state_dict(), path)
    cfg = load_config(None, sets=[f"model.init={path}"])
    assert cfg.model_init == str(path)
    sim = make_simulation("standalone", model_group="cnn5-homo", model_init=str(path))
    for client in sim.clients:
        got = client.state["model"].state_dict()
        for name, tensor in reference.state_dict().items():
            if not name.startswith("header."):
                assert torch.equal(got[name], tensor), name


def test_a_missing_checkpoint_is_one_line(tmp_path):
    with pytest.raises(UserError, match="model.init=.*no such file"):
        load_config(None, sets=[f"model.init={tmp_path / 'none.pt'}"])


def test_unknown_model_setting_is_refused():
    with pytest.raises(UserError, match="unknown model setting 'depth'; valid: model.init"):
        load_config(None, sets=["model.depth=3"])
