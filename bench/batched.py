"""Same-architecture batched local training through torch.func.

The clients of one architecture train in lockstep as ONE vmapped functional model: their parameters are
stacked (torch.func.stack_module_state), each step runs vmap(grad_and_value(loss of functional_call))
over the stacked parameters and the clients' own batches, and a functional SGD updates every client at
once. The update reproduces, per client, what RunContext.train does with one model:

    torch.optim.SGD(lr, momentum, dampening=0, weight_decay, nesterov=False)  created anew for the call
    nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)                 before every step

so the result equals sequential training within float tolerance (tests/test_batched.py checks it per
client). Clients with different numbers of batches: clients are ordered by step count (descending), so at
step t the clients that still have a batch are a prefix of the stack and train on views of it (no copies,
no masked updates). Batches of different sizes within a step (the last, smaller batch of a client) are
zero-padded to the largest and the loss is a weighted mean over the real samples only.

Scope: models without buffers whose forward treats samples independently (no BatchNorm, no Dropout),
e.g. the paper's CNN-1..5 and pFedLoRA's adapters; `can_batch` says whether a list of models qualifies.
There is no host-device synchronisation inside the step loop.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

Batch = tuple[Tensor, Tensor]
# extra_logits(client position k, step t, x) -> a tensor added to the model's output (a frozen partner
# model's logits, e.g. pFedLoRA's adapter in phase 1), or None.
ExtraLogits = Callable[[int, int, Tensor], Tensor]

_SAMPLE_MIXING = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.dropout._DropoutNd,
                  nn.LocalResponseNorm)


@dataclass(frozen=True)
class SGDSettings:
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # max total gradient norm per client; 0 disables

    @classmethod
    def from_config(cls, cfg) -> "SGDSettings":
        return cls(cfg.lr, cfg.momentum, cfg.weight_decay, cfg.grad_clip)


def can_batch(models: Sequence[nn.Module]) -> bool:
    """True when the models share one structure (parameter names, shapes, dtypes, device, requires_grad)
    and have no buffers and no module that mixes samples or draws random numbers."""
    if not models:
        return False
    first = models[0]
    signature = [(n, p.shape, p.dtype, p.device, p.requires_grad) for n, p in first.named_parameters()]
    if not any(p.requires_grad for p in first.parameters()):
        return False
    for m in models:
        if type(m) is not type(first) or any(True for _ in m.buffers()):
            return False
        if any(isinstance(sub, _SAMPLE_MIXING) for sub in m.modules()):
            return False
        if [(n, p.shape, p.dtype, p.device, p.requires_grad) for n, p in m.named_parameters()] != signature:
            return False
    return True


def _stack_batches(batches: Sequence[Batch]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x, y, w, n) stacked over clients: x zero-padded to the largest batch, w = 1 on real samples,
    n = real sample counts (float, on the device)."""
    sizes = [len(y) for _, y in batches]
    biggest = max(sizes)
    if all(s == biggest for s in sizes):
        x = torch.stack([x for x, _ in batches])
        y = torch.stack([y for _, y in batches])
        w = torch.ones(y.shape, dtype=x.dtype, device=x.device)
    else:
        x0, y0 = batches[0]
        x = x0.new_zeros((len(batches), biggest, *x0.shape[1:]))
        y = y0.new_zeros((len(batches), biggest))
        w = x0.new_zeros((len(batches), biggest))
        for i, (xb, yb) in enumerate(batches):
            x[i, : len(yb)] = xb
            y[i, : len(yb)] = yb
            w[i, : len(yb)] = 1
    return x, y, w, w.sum(dim=1)  # counts from the mask: no host-to-device copy inside the step loop


def train_same_arch(models: Sequence[nn.Module], batches: Sequence[Iterable[Batch]], sgd: SGDSettings,
                    extra_logits: ExtraLogits | None = None, steps: Sequence[int] | None = None) -> list[Tensor]:
    """Train models[k] on batches[k] (its whole local schedule: every epoch's batches, in order) with
    cross-entropy, all clients in lockstep; the models are updated in place. Only parameters with
    requires_grad train (the others are passed as constants). `batches[k]` may be a lazy iterable (e.g. the
    harness's batch generators chained over epochs, so no epoch is materialised); then `steps[k]` gives its
    number of batches. Returns each client's mean training loss (a 0-d tensor, sample-weighted like
    RunContext.train), without host synchronisation."""
    if not can_batch(models):
        raise ValueError("train_same_arch needs models of one structure without buffers or sample-mixing "
                         "modules (see can_batch)")
    if len(batches) != len(models):
        raise ValueError(f"{len(models)} models but {len(batches)} batch lists")
    k_total = len(models)
    counts = list(steps) if steps is not None else [len(b) for b in batches]  # type: ignore[arg-type]
    order = sorted(range(k_total), key=lambda k: -counts[k])  # stable: ties keep client order
    ordered = [models[k] for k in order]
    steps = [counts[k] for k in order]
    streams = [iter(batches[k]) for k in order]
    template = copy.deepcopy(ordered[0]).to("meta")
    stacked, _ = stack_module_state(ordered)
    names = [n for n, p in ordered[0].named_parameters() if p.requires_grad]
    frozen_names = [n for n, p in ordered[0].named_parameters() if not p.requires_grad]
    params = {n: stacked[n].detach() for n in names}
    frozen = {n: stacked[n].detach() for n in frozen_names}
    momentum = {n: torch.zeros_like(p) for n, p in params.items()} if sgd.momentum else {}

    def client_loss(p: dict[str, Tensor], fz: dict[str, Tensor], x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        ce = F.cross_entropy(functional_call(template, {**p, **fz}, (x,)), y, reduction="none")
        return (ce * w).sum() / w.sum()

    def client_loss_extra(p: dict[str, Tensor], fz: dict[str, Tensor], x: Tensor, y: Tensor, w: Tensor,
                          extra: Tensor) -> Tensor:
        logits = functional_call(template, {**p, **fz}, (x,)) + extra
        ce = F.cross_entropy(logits, y, reduction="none")
        return (ce * w).sum() / w.sum()

    step_plain = vmap(grad_and_value(client_loss))
    step_extra = vmap(grad_and_value(client_loss_extra))
    device = next(iter(params.values())).device
    loss_sum = torch.zeros(k_total, device=device)
    seen = torch.zeros(k_total, device=device)
    for t in range(steps[0] if steps else 0):
        active = sum(1 for s in steps if s > t)  # a prefix, since steps is descending
        x, y, w, n = _stack_batches([next(streams[i]) for i in range(active)])
        view = {nm: p[:active] for nm, p in params.items()}
        fz = {nm: p[:active] for nm, p in frozen.items()}
        if extra_logits is None:
            grads, loss = step_plain(view, fz, x, y, w)
        else:
            with torch.no_grad():
                extra = torch.stack([extra_logits(order[i], t, x[i]).detach() for i in range(active)])
            grads, loss = step_extra(view, fz, x, y, w, extra)
        with torch.no_grad():
            _functional_sgd_step(view, grads, {nm: b[:active] for nm, b in momentum.items()}, sgd)
            loss_sum[:active] += loss * n
            seen[:active] += n
    with torch.no_grad():
        for i, model in enumerate(ordered):
            for name, p in model.named_parameters():
                if name in params:
                    p.copy_(params[name][i])
    means = loss_sum / seen.clamp(min=1)
    out: list[Tensor] = [torch.empty(())] * k_total
    for i, k in enumerate(order):
        out[k] = means[i]
    return out


def _functional_sgd_step(params: dict[str, Tensor], grads: dict[str, Tensor], momentum: dict[str, Tensor],
                         sgd: SGDSettings) -> None:
    """In place, on stacked (clients, ...) tensors: per-client clip_grad_norm_ then torch.optim.SGD's update
    (dampening 0, not Nesterov). A zero momentum buffer makes the first step equal SGD's buf = d_p."""
    names = list(params)
    g = [grads[n] for n in names]
    if sgd.grad_clip > 0:
        # clip_grad_norm_: total = ||(||g_1||, ..., ||g_m||)||, coef = min(max_norm / (total + 1e-6), 1).
        per_param = torch.stack([gi.flatten(1).norm(dim=1) for gi in g], dim=1)  # (clients, params)
        total = torch.linalg.vector_norm(per_param, dim=1)
        coef = torch.clamp(sgd.grad_clip / (total + 1e-6), max=1.0)
        g = [gi * coef.view(-1, *([1] * (gi.dim() - 1))) for gi in g]
    for name, gi in zip(names, g):
        p = params[name]
        d_p = gi.add(p, alpha=sgd.weight_decay) if sgd.weight_decay else gi
        if sgd.momentum:
            buf = momentum[name]
            buf.mul_(sgd.momentum).add_(d_p)
            d_p = buf
        p.add_(d_p, alpha=-sgd.lr)


def train_sequential(models: Sequence[nn.Module], batches: Sequence[Sequence[Batch]], sgd: SGDSettings,
                     extra_logits: ExtraLogits | None = None) -> list[Tensor]:
    """The reference semantics of train_same_arch, one client after the other, exactly as RunContext.train
    does it for one model (torch.optim.SGD + clip_grad_norm_). Used by the tests and the speed benchmark."""
    out = []
    for k, (model, client_batches) in enumerate(zip(models, batches)):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=sgd.lr, momentum=sgd.momentum, weight_decay=sgd.weight_decay)
        loss_sum = torch.zeros((), device=params[0].device)
        seen = 0
        for t, (x, y) in enumerate(client_batches):
            logits = model(x)
            if extra_logits is not None:
                with torch.no_grad():
                    extra = extra_logits(k, t, x)
                logits = logits + extra
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if sgd.grad_clip > 0:
                nn.utils.clip_grad_norm_(params, sgd.grad_clip, foreach=True)
            opt.step()
            loss_sum += loss.detach() * len(y)
            seen += len(y)
        out.append(loss_sum / max(seen, 1))
    return out


def group_by_architecture(keys: Sequence[str]) -> dict[str, list[int]]:
    """Positions of equal keys (architecture names), in first-seen order: the batches train_same_arch takes."""
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups
