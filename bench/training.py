"""Local training, the one path: the simulator drives each sampled client's `client_update` generator and runs
the Phases it yields, one client after the other or, with cfg.batched_training, all clients in lockstep, so
that same-architecture clients' plain phases train together (bench/batched.py). Each phase's mean loss is
reported here, to the generator (the value of its `yield`) and to the round (`Updates.losses`). The simulator may
call run_updates for several clients at once from threads (bench/parallel.py): each client's batches come from its
own stream of the round (RunContext.client_generator), so the order clients run in changes nothing."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
from torch import nn

from algorithms.base import Payload, Phase

if TYPE_CHECKING:
    from bench.context import Client, RunContext


@dataclass
class Updates:
    uploads: dict[int, Payload] = field(default_factory=dict)
    final_loss: dict[int, torch.Tensor] = field(default_factory=dict)  # each client's last phase's mean loss
    losses: list[tuple[int, str, torch.Tensor]] = field(default_factory=list)  # (client, phase, loss), in order


def run_updates(ctx: "RunContext", algo, clients: Sequence["Client"], payloads: dict[int, Payload],
                round_index: int) -> Updates:
    """Every client's local update. Sequential: each client's phases run as its generator yields them.
    Batched: every client advances to its next phase, those phases run (plain ones batched), and so on."""
    out = Updates()
    cohorts = [list(clients)] if ctx.cfg.batched_training else [[c] for c in clients]
    for cohort in cohorts:
        _run_cohort(ctx, algo, cohort, payloads, round_index, out)
    return out


def _run_cohort(ctx: "RunContext", algo, cohort: list["Client"], payloads: dict[int, Payload],
                round_index: int, out: Updates) -> None:
    running: dict[int, tuple["Client", object]] = {}
    pending: dict[int, Phase] = {}
    for client in cohort:
        client.rng = ctx.client_generator(client.id, round_index)
        with ctx.observers.span("update", client=client.id, round=round_index), ctx.acting_as(client):
            update = algo.client_update(client, payloads[client.id], round_index)
            if not hasattr(update, "send"):  # a plain function: no training, the upload itself
                out.uploads[client.id] = update
                continue
            running[client.id] = (client, update)
            _advance(running, pending, out, client.id, None)  # to its first phase
    while pending:
        phases = dict(pending)
        pending.clear()
        losses = _run_phases(ctx, [running[cid][0] for cid in phases], list(phases.values()), round_index)
        for cid, phase in phases.items():
            out.losses.append((cid, phase.name, losses[cid]))
            out.final_loss[cid] = losses[cid]
            with ctx.observers.span("update", client=cid, round=round_index), ctx.acting_as(running[cid][0]):
                _advance(running, pending, out, cid, losses[cid])


def _advance(running, pending: dict[int, Phase], out: Updates, cid: int, loss: torch.Tensor | None) -> None:
    """Run client `cid`'s update until it yields its next phase (into `pending`) or returns its upload."""
    client, update = running[cid]
    try:
        phase = update.send(loss)
    except StopIteration as done:
        out.uploads[cid] = done.value if done.value is not None else {}
        return
    if not isinstance(phase, Phase):
        raise TypeError(f"client_update must yield Phase objects, got {type(phase).__name__}")
    pending[cid] = phase


def _run_phases(ctx: "RunContext", clients: list["Client"], phases: list[Phase], round_index: int
                ) -> dict[int, torch.Tensor]:
    """Each client's phase; plain phases of one name and model structure train together when batching."""
    from bench.batched import can_batch

    groups: dict[tuple, list[int]] = {}
    for i, phase in enumerate(phases):
        key: tuple = (i,)
        if ctx.cfg.batched_training and phase.plain:
            model = phase.trainable[0]
            signature = tuple((n, tuple(p.shape), p.requires_grad) for n, p in model.named_parameters())
            key = (phase.name, type(model), signature, phase.partner is None)
        groups.setdefault(key, []).append(i)
    losses: dict[int, torch.Tensor] = {}
    for members in groups.values():
        group_clients = [clients[i] for i in members]
        group_phases = [phases[i] for i in members]
        with ctx.observers.span("phase", clients=[c.id for c in group_clients], phase=group_phases[0],
                                round=round_index) as info:
            if len(members) > 1 and can_batch([p.trainable[0] for p in group_phases]):
                found = _train_together(ctx, group_clients, group_phases)
            else:
                found = {c.id: train_phase(ctx, c, p) for c, p in zip(group_clients, group_phases)}
            info["losses"] = found
        losses.update(found)
    return losses


def train_phase(ctx: "RunContext", client: "Client", phase: Phase) -> torch.Tensor:
    """Run one phase for one client and return its mean training loss (a tensor: no host sync per batch)."""
    with ctx.acting_as(client):  # the phase's loss may draw from ctx.generator
        return _train_phase(ctx, client, phase)


def batch_stream(ctx: "RunContext", client: "Client") -> torch.Generator:
    """The client's stream of this round (set by run_updates), or the run's outside an update."""
    return client.rng if client.rng is not None else ctx.run_generator


def _train_phase(ctx: "RunContext", client: "Client", phase: Phase) -> torch.Tensor:
    params, optimizers = phase.optimizers if phase.optimizers is not None else ctx.optimizers_for(phase.trainable)
    loss_fn = phase.loss_fn()
    idx = client.split.train if phase.indices is None else phase.indices
    loss_sum = torch.zeros((), device=ctx.device)
    seen = 0
    for _ in range(phase.epochs):
        for x, y in ctx.data.train_batches(idx, ctx.cfg.batch_size, batch_stream(ctx, client)):
            with ctx.accountant.count("train", (ctx.algo_name, phase.name, client.arch, len(y)), client.id):
                loss = ctx.step(loss_fn, x, y, params, optimizers)
            loss_sum += loss.detach() * len(y)
            seen += len(y)
    return loss_sum / max(seen, 1)


def _train_together(ctx: "RunContext", clients: list["Client"], phases: list[Phase]) -> dict[int, torch.Tensor]:
    """Plain phases of same-structure models in lockstep (bench/batched.py): equal to train_phase per client
    within float tolerance on the same batches; FLOPs credited per client and batch under train_phase's keys."""
    from bench.batched import SGDSettings, train_same_arch

    models = [p.trainable[0] for p in phases]
    steps = [p.epochs * math.ceil(c.num_train / ctx.cfg.batch_size) for c, p in zip(clients, phases)]
    streams = [_counted_batches(ctx, c, p) for c, p in zip(clients, phases)]
    extra = None
    if phases[0].partner is not None:
        extra = lambda k, t, x: phases[k].partner(x)  # noqa: E731
    out = train_same_arch(models, streams, SGDSettings.from_config(ctx.cfg), extra_logits=extra, steps=steps)
    return {c.id: loss for c, loss in zip(clients, out)}


def _counted_batches(ctx: "RunContext", client: "Client", phase: Phase) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The client's training batches for the phase's epochs, each credited with its step's FLOPs under
    train_phase's key; a key not yet cached is counted on meta-device copies (shapes only, no compute)."""
    model, partner = phase.trainable[0], phase.partner
    for _ in range(phase.epochs):
        for x, y in ctx.data.train_batches(client.split.train, ctx.cfg.batch_size, batch_stream(ctx, client)):
            key = (ctx.algo_name, phase.name, client.arch, len(y))
            cached = ctx.accountant.is_cached("train", key)
            with ctx.accountant.count("train", key, client.id):
                if not cached:
                    _meta_step(model, partner, x, y)
            yield x, y


def _meta_step(model: nn.Module, partner: nn.Module | None, x: torch.Tensor, y: torch.Tensor) -> None:
    """Forward and backward of one training step on meta-device copies: what FlopCounterMode counts, free."""
    meta_x, meta_y = x.to("meta"), y.to("meta")
    logits = copy.deepcopy(model).to("meta")(meta_x)
    if partner is not None:
        logits = logits + copy.deepcopy(partner).to("meta")(meta_x)
    with torch.autograd.set_detect_anomaly(False):  # anomaly checks read values back: none on meta
        torch.nn.functional.cross_entropy(logits, meta_y).backward()
