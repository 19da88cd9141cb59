"""pFedLoRA (arXiv 2310.13283): a private heterogeneous model F_k plus a small homogeneous low-rank
adapter G(theta); only the adapter is federated. Prediction: F_k(x) + G(x) (see models/adapters.py for
the three placements). Each round the client loads the global adapter, (1) freezes the adapter and trains
F_k, then (2) freezes F_k and trains the adapter, both on CE(F_k + G, y), and uploads the adapter; the
server averages (weighted by n_k).

Options beyond the SPEC (defaults = SPEC): `phase1_mix` (pFedES's mu-mixed local loss in phase 1),
`inference` (F_k + G, or F_k alone as pFedES deploys), `persistent_optimizer` (the adapter's SGD momentum
kept across rounds, as the authors' sibling codes keep their shared module's optimizer), `aggregation`
(n_k-weighted or uniform). No pFedLoRA code was released; the fidelity notes give the sources."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from algorithms.base import (Algorithm, Payload, Phase, aggregation_weights, check_aggregation, load_payload,
                             state_payload, weighted_average)
from bench.errors import UserError
from models.adapters import (A_INITS, PLACEMENTS, LoRAAdapter, block_lora_layers, local_and_personalised_logits,
                             personalised_logits)
from models.groups import build_model

INFERENCES = ("sum", "local")
PERSISTENCE = ("none", "client", "shared")


@dataclass
class PFedLoRAHyperparams:
    placement: str = "model"     # model | representation | header-lora | block-lora (models/adapters.py)
    rank: int = 64               # r
    local_epochs: int = 0        # E_local, phase 1; 0 means the run's local_epochs (E)
    adapter_epochs: int = 0      # E_adapter, phase 2; 0 means the run's local_epochs (E)
    training: str = "iterative"  # iterative: phase 1 then phase 2; joint: F_k and G together (ablation)
    a_init: str = "kaiming"      # init of A (B always starts at zero)
    eval_phase1: bool = True     # also log the sampled clients' test accuracy after phase 1 and after phase 2
                                 # (acc_phase1_sampled, acc_phase2_sampled; iterative training only)
    phase1_mix: float = 0.0      # mu: phase 1 loss (1-mu) CE(F_k+G) + mu CE(F_k), pFedES's mixing; 0 = SPEC
    inference: str = "sum"       # sum: predict F_k + G (SPEC); local: F_k alone (pFedES deploys the local model)
    persistent_optimizer: str = "none"  # the adapter's SGD momentum: none = new every round (SPEC); client = kept
                                        # by each client; shared = one carried from client to client (sibling codes)
    aggregation: str = "samples"  # samples: n_k-weighted mean of the adapters (SPEC); uniform: plain mean

    def validate(self) -> None:
        if self.placement not in PLACEMENTS:
            raise UserError(f"pfedlora.placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.training not in ("iterative", "joint"):
            raise UserError(f"pfedlora.training must be 'iterative' or 'joint', got {self.training!r}")
        if self.a_init not in A_INITS:
            raise UserError(f"pfedlora.a_init must be one of {', '.join(A_INITS)}, got {self.a_init!r}")
        if self.rank < 1 or self.local_epochs < 0 or self.adapter_epochs < 0:
            raise UserError("pfedlora.rank must be >= 1 and pfedlora.local_epochs/adapter_epochs >= 0 "
                            "(0 = the run's local_epochs)")
        if not 0.0 <= self.phase1_mix <= 1.0:
            raise UserError(f"pfedlora.phase1_mix must be in [0, 1], got {self.phase1_mix}")
        if self.phase1_mix and self.training != "iterative":
            raise UserError("pfedlora.phase1_mix mixes phase 1's loss and needs training='iterative'")
        if self.inference not in INFERENCES:
            raise UserError(f"pfedlora.inference must be one of {', '.join(INFERENCES)}, got {self.inference!r}")
        if self.persistent_optimizer not in PERSISTENCE:
            raise UserError(f"pfedlora.persistent_optimizer must be one of {', '.join(PERSISTENCE)}, "
                            f"got {self.persistent_optimizer!r}")
        check_aggregation("pfedlora", self.aggregation)


class PFedLoRA(Algorithm):
    name = "pfedlora"
    display_name, role, table_order, colour = "pFedLoRA", "proposed", 0, "#d62728"
    server_flops_by_upload_shapes = True
    description = "private model + federated low-rank adapter, trained alternately (the paper's method)"
    Hyperparams = PFedLoRAHyperparams
    profiles: ClassVar[dict[str, dict[str, Any]]] = {
        # No pFedLoRA code is released: "official" takes what the authors' sibling codes (pFedES, pFedAFM,
        # FedMRL) share, i.e. one SGD optimizer for the shared module created once for the whole run.
        "official": {"persistent_optimizer": "shared"},
        "htfllib": {},  # HtFLlib has no pFedLoRA: SPEC defaults
    }

    def epochs(self) -> tuple[int, int]:
        return phase_epochs(self.hp, self.ctx.cfg.local_epochs)

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        rep_dims = {ctx.representation_dim(arch) for arch in set(ctx.client_archs)}
        if hp.placement != "model" and len(rep_dims) > 1:
            raise UserError(f"pfedlora.placement={hp.placement} needs one representation size across clients, "
                            f"got {sorted(rep_dims)}; use placement=model")
        self.rep_dim = rep_dims.pop()
        self.block_layers = None  # block-lora: the q, v layers every client architecture has at one shape
        if hp.placement == "block-lora":
            with torch.device("meta"):
                models = [build_model(a, ctx.num_classes, ctx.in_channels, ctx.image_size)
                          for a in dict.fromkeys(ctx.client_archs)]
            self.block_layers = block_lora_layers(models, ctx.cfg.model_group, hp.rank)
        self.batchable_clients = hp.persistent_optimizer != "shared"  # one momentum passed from client to client

    def new_adapter(self) -> LoRAAdapter:
        return LoRAAdapter(self.hp.placement, self.ctx.num_classes, self.hp.rank, rep_dim=self.rep_dim,
                           in_channels=self.ctx.in_channels, image_size=self.ctx.image_size,
                           a_init=self.hp.a_init, layers=self.block_layers).to(self.ctx.device)

    def init_server(self) -> None:
        self.global_adapter = self.new_adapter()
        if self.hp.persistent_optimizer == "shared":
            self.adapter_momentum = zero_momentum(self.global_adapter)

    def init_client(self, client) -> None:
        client.state["model"] = self.ctx.build_model(client.arch)
        client.state["adapter"] = self.new_adapter()
        if self.hp.persistent_optimizer == "client":
            client.state["adapter_momentum"] = zero_momentum(client.state["adapter"])

    def server_payload(self, client, round_index: int) -> Payload:
        return state_payload(self.global_adapter)

    def loss(self, model, adapter):
        """CE(F_k(x) + G(x), y): the loss of both phases (and of joint training)."""
        return lambda x, y: F.cross_entropy(personalised_logits(model, adapter, x), y)

    def phase1_loss(self, model, adapter):
        """Phase 1's loss: the SPEC's CE(F_k + G), or with phase1_mix = mu > 0
        (1 - mu) CE(F_k + G) + mu CE(F_k)."""
        mu = self.hp.phase1_mix
        if not mu:
            return self.loss(model, adapter)

        def mixed(x, y):
            local, both = local_and_personalised_logits(model, adapter, x)
            return (1 - mu) * F.cross_entropy(both, y) + mu * F.cross_entropy(local, y)

        return mixed

    def client_update(self, client, payload: Payload, round_index: int):
        model, adapter = client.state["model"], client.state["adapter"]
        load_payload(adapter, payload)  # theta^t, the global adapter
        e_local, e_adapter = self.epochs()
        if self.hp.training == "joint":
            set_trainable(model, True)
            set_trainable(adapter, True)
            yield from self.train(client, [model, adapter], self.loss(model, adapter), e_local, "joint")
        else:
            set_trainable(model, True)
            set_trainable(adapter, False)
            phase1 = "phase1-train-model" + ("-mix" if self.hp.phase1_mix else "")  # the mix adds F_k's own logits
            yield from self.train(client, [model], self.phase1_loss(model, adapter), e_local, phase1, partner=adapter)
            self.record_sampled(client, "acc_phase1_sampled", "eval-phase1")
            set_trainable(model, False)
            set_trainable(adapter, True)
            yield from self.train(client, [adapter], self.loss(model, adapter), e_adapter, "phase2-train-adapter",
                                  partner=model)
            self.record_sampled(client, "acc_phase2_sampled", "eval-phase2")
        set_trainable(model, True)
        set_trainable(adapter, True)
        return state_payload(adapter)

    def train(self, client, trainable, loss, epochs: int, name: str, partner=None):
        """Run one phase (`yield from`). With the additive placement, SPEC's CE(F_k + G) is the plain phase
        CE(trainable + partner), which the simulator may batch across clients. Under persistent_optimizer the
        adapter's SGD starts from its kept momentum and keeps it."""
        plain = self.hp.placement == "model" and partner is not None and not name.endswith("-mix")
        phase = Phase(name, trainable, epochs, loss=None if plain else loss, partner=partner if plain else None)
        adapter = client.state["adapter"]
        if self.hp.persistent_optimizer == "none" or all(m is not adapter for m in trainable):
            return (yield phase)
        momentum = client.state["adapter_momentum"] if self.hp.persistent_optimizer == "client" \
            else self.adapter_momentum
        params, optimizers = phase.optimizers = self.ctx.optimizers_for(trainable)
        i = next(i for i, m in enumerate(trainable) if m is adapter)
        kept, opt = params[i], optimizers[i]
        for p, buf in zip(kept, momentum.split([p.numel() for p in kept])):
            opt.state[p]["momentum_buffer"] = buf.view_as(p).clone()
        mean_loss = yield phase
        # a new tensor, not an in-place update: a checkpoint taken in memory may still share the old one
        momentum = torch.cat([opt.state[p]["momentum_buffer"].flatten() for p in kept])
        if self.hp.persistent_optimizer == "client":
            client.state["adapter_momentum"] = momentum
        else:
            self.adapter_momentum = momentum
        return mean_loss

    def record_sampled(self, client, name: str, tag: str) -> None:
        """Test accuracy of a sampled client's current prediction, as the round metric `name` (eval_phase1):
        over this round's sampled clients only, unlike acc_mean, which pools every client."""
        if self.hp.eval_phase1:
            correct, count, _ = self.ctx.evaluate(client, lambda x: self.predict(client, x), tag=tag)
            self.ctx.record(name, correct / max(count, 1), weight=count)

    def aggregate(self, uploads: dict[int, Payload], round_index: int) -> None:
        weights = aggregation_weights(self.ctx, self.hp.aggregation)
        load_payload(self.global_adapter, weighted_average(uploads, weights))

    def predict(self, client, x):
        if self.hp.inference == "local":
            return client.state["model"](x)
        return personalised_logits(client.state["model"], client.state["adapter"], x)


def phase_epochs(hp: PFedLoRAHyperparams, run_epochs: int) -> tuple[int, int]:
    """(E_local, E_adapter); 0 in the hyper-parameters means the run's local_epochs (SPEC default)."""
    return hp.local_epochs or run_epochs, hp.adapter_epochs or run_epochs


def zero_momentum(adapter) -> torch.Tensor:
    """A zero SGD momentum buffer for the adapter's parameters, flattened: it steps exactly like a fresh
    optimizer's first step (0 * momentum + d = d)."""
    return torch.zeros(sum(p.numel() for p in adapter.parameters()), device=next(adapter.parameters()).device)


def set_trainable(module, trainable: bool) -> None:
    """Freeze or unfreeze a module: no gradients, and eval mode (frozen BatchNorm keeps its statistics)."""
    module.requires_grad_(trainable)
    module.train(trainable)
