"""Hand computations for the LoRA methods' mechanism tests. A LoRA client's logits are computed in the merged
form, the plain ViT run through torch.func.functional_call with W + s B A in place of each adapted weight, not
through LoRALinear's additive forward; the SGD step is tests/handcalc.sgd_step. So an expected value never comes
from the code under test."""
from __future__ import annotations

import torch
from torch.func import functional_call

from models.groups import build_model
from tests.handcalc import cross_entropy, sgd_step

FULL = 100_000  # a batch size above every client's n_k: one full batch per epoch


def params_of(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def lora_names(p: dict) -> list[str]:
    """The adapted layers' names (those with a lora_A), in order."""
    return [k[:-len(".lora_A")] for k in p if k.endswith(".lora_A")]


def hand_logits(arch: str, num_classes: int, p: dict, x: torch.Tensor, scaling: float) -> torch.Tensor:
    """Logits of a LoRA client with parameters p (its named_parameters) in the merged form."""
    plain = build_model(arch, num_classes)
    params = {k.replace(".base.", "."): v for k, v in p.items() if ".lora_" not in k}
    for name in lora_names(p):
        params[f"{name}.weight"] = p[f"{name}.base.weight"] + scaling * p[f"{name}.lora_B"] @ p[f"{name}.lora_A"]
    return functional_call(plain, params, (x,))


def trainable_names(p: dict) -> list[str]:
    """What a LoRA client trains: every factor and the header (the base is frozen)."""
    return [k for k in p if ".lora_" in k or k.startswith("header.")]


def hand_step(arch, num_classes, p, x, y, cfg, scaling, extra=None):
    """One SGD step (a fresh optimizer: clipping over the whole group, weight decay) on CE (+ extra(p))."""
    def loss(q):
        value = cross_entropy(hand_logits(arch, num_classes, q, x, scaling), y)
        return value + extra(q) if extra is not None else value

    new, _ = sgd_step(p, trainable_names(p), loss, cfg.lr, cfg.weight_decay, cfg.grad_clip)
    return new


def assert_close_update(before: dict, after: dict, expected: dict, rel: float = 1e-3) -> None:
    """after equals expected to `rel` of the size of the expected update (all entries together), and the update
    is not zero."""
    err = sum(((after[k] - expected[k]).double() ** 2).sum() for k in expected)
    size = sum(((expected[k] - before[k]).double() ** 2).sum() for k in expected)
    assert size > 0
    assert float((err / size).sqrt()) < rel, float((err / size).sqrt())


def capture_uploads(sim) -> dict[int, dict]:
    """The uploads the server aggregates, per round: {round: {client: payload}} (clones)."""
    seen: dict[int, dict] = {}
    aggregate = sim.algo.aggregate

    def spy(uploads, round_index):
        seen[round_index] = {c: {k: v.clone() for k, v in u.items()} for c, u in uploads.items()}
        return aggregate(uploads, round_index)

    sim.algo.aggregate = spy
    return seen


def factor_bytes(shapes: list[tuple[int, int]], rank: int, parts: str = "AB") -> int:
    """fp32 bytes of rank-r factors of layers of shapes (out, in): A r x in, B out x r."""
    return 4 * sum(rank * ((fan_in if "A" in parts else 0) + (fan_out if "B" in parts else 0))
                   for fan_out, fan_in in shapes)
