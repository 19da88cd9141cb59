"""The LoRA module (models/lora.py): the forward formula, B = 0 at init, scaling alpha / r, dropout on the
adapter's input only, merge / unmerge, the targets and ranks it accepts, FLOPs per step of a wrapped layer
against a hand count, and bad input through the CLI (one line, exit 2)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench.errors import UserError
from models.groups import build_model
from models.lora import LoRALinear, add_lora, find_targets, lora_flops_per_token, lora_layers
from tests.conftest import bench_main

pytestmark = pytest.mark.usefixtures("one_thread")


def wrapped(in_features=6, out_features=5, rank=3, alpha=12.0, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return LoRALinear(nn.Linear(in_features, out_features), rank, alpha, dropout)


def by_hand(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    w, b = layer.base.weight, layer.base.bias
    return x @ w.T + b + (alpha_over_r(layer)) * (x @ layer.lora_A.T @ layer.lora_B.T)


def alpha_over_r(layer: LoRALinear) -> float:
    return layer.alpha / layer.lora_A.shape[0]


def test_starts_equal_to_its_base_with_b_zero_and_a_kaiming():
    layer = wrapped(in_features=64, out_features=8, rank=4)
    x = torch.randn(7, 64)
    assert not layer.lora_B.any() and layer.lora_A.shape == (4, 64) and layer.lora_B.shape == (8, 4)
    assert torch.equal(layer(x), layer.base(x))
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as nn.Linear
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound


def test_forward_is_w_x_plus_alpha_over_r_b_a_x():
    layer = wrapped(rank=3, alpha=12.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    assert layer.scaling == 4.0
    x = torch.randn(4, 2, 6)  # any leading dimensions (tokens)
    torch.testing.assert_close(layer(x), by_hand(layer, x))


def test_merge_and_unmerge():
    layer = wrapped()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 6)
    before, weight = layer(x), layer.base.weight.clone()
    layer.merge()
    torch.testing.assert_close(layer.base.weight, weight + 4.0 * layer.lora_B @ layer.lora_A)
    torch.testing.assert_close(layer(x), before)
    with FlopCounterMode(display=False) as counter:  # merged: the base matmul alone
        layer(x)
    assert counter.get_total_flops() == 2 * 5 * 6 * 5
    layer.merge()  # idempotent
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, weight)
    torch.testing.assert_close(layer(x), before)


def test_dropout_applies_to_the_adapters_input_only():
    layer = wrapped(dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(8, 6)
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    expected = x @ layer.base.weight.T + layer.base.bias + 4.0 * (dropped @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(out, expected)
    layer.eval()
    torch.testing.assert_close(layer(x), by_hand(layer, x))


def test_a_lower_rank_uses_the_leading_factors():
    layer = wrapped(rank=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.rank = 2
    x = torch.randn(3, 6)
    expected = layer.base(x) + (6.0 / 2) * (x @ layer.lora_A[:2].T @ layer.lora_B[:, :2].T)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("in_features, out_features, rank, tokens",
                         [(64, 64, 8, 65), (32, 128, 4, 10), (128, 32, 1, 3)])
def test_flops_of_a_training_step_equal_the_hand_count(in_features, out_features, rank, tokens):
    """Frozen base, input without gradient (the first LoRA layer, or one after frozen layers): forward
    2 N (in out + r in + r out); backward dB = g^T (A x): 2 N out r, d(Ax) = g B: 2 N out r, dA: 2 N r in."""
    layer = wrapped(in_features, out_features, rank)
    layer.base.requires_grad_(False)
    x = torch.randn(2, tokens, in_features)
    n = 2 * tokens
    with FlopCounterMode(display=False) as counter:
        layer(x).sum().backward()
    forward = 2 * n * (in_features * out_features + rank * in_features + rank * out_features)
    backward = 2 * n * (2 * out_features * rank + rank * in_features)
    assert counter.get_total_flops() == forward + backward
    per_token = lora_flops_per_token(in_features, out_features, rank)
    assert (n * per_token[0], n * per_token[1]) == (forward, backward)


# ---- targets and ranks --------------------------------------------------------------------------------------

def test_targets_match_names_and_dotted_suffixes():
    model = build_model("vits5", 10)  # depth 2
    assert find_targets(model, "q,v") == ["extractor.blocks.0.attn.q", "extractor.blocks.0.attn.v",
                                          "extractor.blocks.1.attn.q", "extractor.blocks.1.attn.v"]
    assert find_targets(model, ["blocks.1.mlp.fc2"]) == ["extractor.blocks.1.mlp.fc2"]
    names = add_lora(model, "q,k,v,o,fc1,fc2", rank=2, alpha=4.0)
    assert len(names) == 12 and set(lora_layers(model)) == set(names)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_bad_targets_and_ranks_are_user_errors():
    model = build_model("vits5", 10)
    with pytest.raises(UserError, match=r"LoRA target 'query' matches no linear layer of vits5; valid: fc1, fc2, "
                                        r"header, k, o, pre_logits, q, v"):
        add_lora(model, "q,query", rank=2, alpha=4.0, what="vits5")
    assert not lora_layers(model)  # nothing wrapped on a refused call
    with pytest.raises(UserError, match=r"LoRA rank 33 does not fit layer extractor.blocks.0.attn.q \(32x32\); "
                                        r"valid: ranks 1..32"):
        add_lora(model, "q", rank=33, alpha=66.0)
    with pytest.raises(UserError, match=r"valid: ranks 1..32"):
        add_lora(build_model("vits5", 10), "fc1", rank=0, alpha=1.0)


# ---- bad input through the CLI: one line, exit 2, before anything runs --------------------------------------

def refused(monkeypatch, capsys, tmp_path, small_npz, *extra: str) -> str:
    args = ["run", "--dataset", str(small_npz), "--clients", "5", "--rounds", "1", "--model-group",
            "vit-small-hetero", "--output-dir", str(tmp_path / "out"), "--quiet", *extra]
    code, _, err = bench_main(monkeypatch, capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("metrics.csv"))
    return lines[0]


def test_cli_refuses_a_rank_larger_than_the_layer(monkeypatch, capsys, tmp_path, small_npz):
    line = refused(monkeypatch, capsys, tmp_path, small_npz, "--algo", "fedsa-lora", "--set", "fedsa-lora.rank=40")
    assert line == ("error: fedsalora.rank (client 3, vits4): LoRA rank 40 does not fit layer "
                    "extractor.blocks.0.attn.q (32x32); valid: ranks 1..32")
    # ranks 60, 55, 50 fit the width-64 clients; client 3's 45 does not fit its width 32
    line = refused(monkeypatch, capsys, tmp_path, small_npz, "--algo", "hetlora", "--set", "hetlora.max_rank=60",
                   "--set", "hetlora.min_rank=40")
    assert line == ("error: hetlora.min_rank..max_rank (client 3, vits4): LoRA rank 45 does not fit layer "
                    "extractor.blocks.0.attn.q (32x32); valid: ranks 1..32")


def test_cli_refuses_targets_that_match_nothing(monkeypatch, capsys, tmp_path, small_npz):
    line = refused(monkeypatch, capsys, tmp_path, small_npz, "--algo", "flora", "--set", "flora.targets=q_proj")
    assert line.startswith("error: LoRA target 'q_proj' matches no linear layer of vits1; valid: fc1, fc2, header")


def test_cli_refuses_lora_methods_on_a_group_without_the_targets(monkeypatch, capsys, tmp_path, small_npz):
    line = refused(monkeypatch, capsys, tmp_path, small_npz, "--algo", "hetlora", "--model-group", "cnn5-homo")
    assert line.startswith("error: LoRA target 'q' matches no linear layer of cnn5; valid: ")


# ---- the LoRA methods' server side: never reads client.state -----------------------------------------------------
class NoState(dict):
    """A client's state as a Flower server sees it: nothing (any read fails)."""

    def __getitem__(self, key):
        raise AssertionError(f"a server hook read client.state[{key!r}]")

    def get(self, key, default=None):
        return self[key]


def hide_states_from_server(sim) -> None:
    """Every client's state reads as NoState while the server's hooks run (its payloads, its aggregation)."""
    def hidden(hook):
        def call(*args):
            states = {c.id: c.state for c in sim.clients}
            for c in sim.clients:
                c.state = NoState()
            try:
                return hook(*args)
            finally:
                for c in sim.clients:
                    c.state = states[c.id]
        return call

    sim.algo.server_payload = hidden(sim.algo.server_payload)
    sim.algo.aggregate = hidden(sim.algo.aggregate)


@pytest.mark.parametrize("algorithm", ["hetlora", "flora", "fedsalora"])
def test_server_hooks_never_read_the_clients_state(algorithm):
    """Rounds that change what the server sends (HetLoRA prunes ranks, FLoRA's clients miss stacks) run the
    same, to the byte and the metric, when the server's hooks see no client state (as under Flower)."""
    from tests.conftest import make_hand_simulation
    from tests.lora_handcalc import FULL

    hp = {"prune_lambda": 5.0, "prune_gamma": 0.75} if algorithm == "hetlora" else {}
    runs = []
    for hide in (False, True):
        sim = make_hand_simulation(algorithm, model_group="vit-small-hetero", batch_size=FULL, lr=0.05, hp=hp,
                                   participation=0.6)
        if algorithm == "hetlora":  # a non-zero global B, so that ranks get pruned from round 0 on
            gen = torch.Generator().manual_seed(0)
            for key, value in sim.algo.global_factors.items():
                sim.algo.global_factors[key] = torch.randn(value.shape, generator=gen) * 0.05
        if hide:
            hide_states_from_server(sim)
        metrics = [{k: v for k, v in sim.run_round(r).items() if "time" not in k} for r in range(3)]  # no clocks
        runs.append((metrics, dict(sim.bytes_down), dict(sim.bytes_up)))
        if algorithm == "hetlora":  # the server's ranks are the clients' own, and some were pruned
            assert sim.algo.ranks == {c.id: c.state["rank"] for c in sim.clients}
            assert any(c.state["rank"] < sim.algo.client_rank(c.id) for c in sim.clients)
    assert runs[0] == runs[1]
