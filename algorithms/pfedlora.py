"""pFedLoRA (arXiv 2310.13283): a private heterogeneous model F_k plus a small homogeneous low-rank
adapter G(theta); only the adapter is federated. Prediction: F_k(x) + G(x) (see models/adapters.py for
the three placements). Each round the client (1) freezes the adapter and trains F_k, then (2) freezes F_k
and trains the adapter, both on CE(F_k + G, y), and uploads the adapter; the server averages (weighted
by n_k)."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from algorithms.base import Algorithm, Payload, load_payload, state_payload, weighted_average
from bench.errors import UserError
from bench.registry import register
from models.adapters import A_INITS, PLACEMENTS, LoRAAdapter, personalised_logits


@dataclass
class PFedLoRAHyperparams:
    placement: str = "model"     # model | representation | header-lora (models/adapters.py)
    rank: int = 64               # r
    local_epochs: int = 0        # E_local, phase 1; 0 means the run's local_epochs (E)
    adapter_epochs: int = 0      # E_adapter, phase 2; 0 means the run's local_epochs (E)
    training: str = "iterative"  # iterative: phase 1 then phase 2; joint: F_k and G together (ablation)
    a_init: str = "kaiming"      # init of A (B always starts at zero)
    eval_phase1: bool = True     # also log test accuracy after phase 1 (acc_phase1)

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


@register
class PFedLoRA(Algorithm):
    name = "pfedlora"
    server_flops_by_upload_shapes = True
    description = "private model + federated low-rank adapter, trained alternately (the paper's method)"
    Hyperparams = PFedLoRAHyperparams

    def epochs(self) -> tuple[int, int]:
        return phase_epochs(self.hp, self.ctx.cfg.local_epochs)

    @classmethod
    def estimated_cost(cls, hp, cfg) -> float:
        e_local, e_adapter = phase_epochs(hp, cfg.local_epochs)
        if hp.training == "joint":
            return 1.2 * e_local / cfg.local_epochs
        return (e_local + 1.2 * e_adapter) / cfg.local_epochs  # phase 2 backpropagates through the frozen F_k too

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        rep_dims = {ctx.representation_dim(arch) for arch in set(ctx.client_archs)}
        if hp.placement != "model" and len(rep_dims) > 1:
            raise UserError(f"pfedlora.placement={hp.placement} needs one representation size across clients, "
                            f"got {sorted(rep_dims)}; use placement=model")
        self.rep_dim = rep_dims.pop()

    def new_adapter(self) -> LoRAAdapter:
        return LoRAAdapter(self.hp.placement, self.ctx.num_classes, self.hp.rank, rep_dim=self.rep_dim,
                           in_channels=self.ctx.in_channels, image_size=self.ctx.image_size,
                           a_init=self.hp.a_init).to(self.ctx.device)

    def init_server(self) -> None:
        self.global_adapter = self.new_adapter()

    def init_client(self, client) -> None:
        client.state["model"] = self.ctx.build_model(client.arch)
        client.state["adapter"] = self.new_adapter()

    def server_payload(self, client, round_index: int) -> Payload:
        return state_payload(self.global_adapter)

    def client_update(self, client, payload: Payload, round_index: int) -> Payload:
        model, adapter = client.state["model"], client.state["adapter"]
        load_payload(adapter, payload)

        def loss(x, y):
            return F.cross_entropy(personalised_logits(model, adapter, x), y)

        e_local, e_adapter = self.epochs()
        if self.hp.training == "joint":
            set_trainable(model, True)
            set_trainable(adapter, True)
            self.ctx.train(client, [model, adapter], loss, e_local, phase="joint")
        else:
            set_trainable(model, True)
            set_trainable(adapter, False)
            self.ctx.train(client, [model], loss, e_local, phase="phase1-train-model")
            if self.hp.eval_phase1:
                correct, count, _ = self.ctx.evaluate(client, lambda x: self.predict(client, x), tag="eval-phase1")
                self.ctx.record("acc_phase1", correct / max(count, 1), weight=count)
            set_trainable(model, False)
            set_trainable(adapter, True)
            self.ctx.train(client, [adapter], loss, e_adapter, phase="phase2-train-adapter")
        set_trainable(model, True)
        set_trainable(adapter, True)
        return state_payload(adapter)

    def client_update_many(self, clients, payloads, round_index: int) -> dict[int, Payload]:
        """Batched rounds: phase 1 for all clients (same-architecture F_k together, adapters as frozen
        partners), then phase 2 for all (every client's adapter in one stack, F_k as frozen partners).
        Only the additive placement ("model") with iterative training; otherwise one client at a time."""
        if self.hp.placement != "model" or self.hp.training != "iterative":
            return super().client_update_many(clients, payloads, round_index)
        models = [c.state["model"] for c in clients]
        adapters = [c.state["adapter"] for c in clients]
        for c, adapter in zip(clients, adapters):
            load_payload(adapter, payloads[c.id])
        e_local, e_adapter = self.epochs()
        for model, adapter in zip(models, adapters):
            set_trainable(model, True)
            set_trainable(adapter, False)
        self.ctx.train_many(clients, models, e_local, "phase1-train-model", partners=adapters)
        if self.hp.eval_phase1:
            for c in clients:
                correct, count, _ = self.ctx.evaluate(c, lambda x, c=c: self.predict(c, x), tag="eval-phase1")
                self.ctx.record("acc_phase1", correct / max(count, 1), weight=count)
        for model, adapter in zip(models, adapters):
            set_trainable(model, False)
            set_trainable(adapter, True)
        self.ctx.train_many(clients, adapters, e_adapter, "phase2-train-adapter", partners=models)
        for model, adapter in zip(models, adapters):
            set_trainable(model, True)
            set_trainable(adapter, True)
        return {c.id: state_payload(adapter) for c, adapter in zip(clients, adapters)}

    def aggregate(self, uploads: dict[int, Payload], round_index: int) -> None:
        load_payload(self.global_adapter, weighted_average(uploads, self.ctx.client_weights))

    def predict(self, client, x):
        return personalised_logits(client.state["model"].eval(), client.state["adapter"].eval(), x)


def phase_epochs(hp: PFedLoRAHyperparams, run_epochs: int) -> tuple[int, int]:
    """(E_local, E_adapter); 0 in the hyper-parameters means the run's local_epochs (SPEC default)."""
    return hp.local_epochs or run_epochs, hp.adapter_epochs or run_epochs


def set_trainable(module, trainable: bool) -> None:
    """Freeze or unfreeze a module: no gradients, and eval mode (frozen BatchNorm keeps its statistics)."""
    module.requires_grad_(trainable)
    module.train(trainable)
