"""FML (Shen et al. 2020, Federated Mutual Learning): a private heterogeneous model P and a homogeneous
"meme" model M (default CNN-5) trained together by deep mutual learning; only M is federated.

Each step, with p = P(x), m = M(x):
  L_P = alpha CE(p, y) + (1 - alpha) KL(softmax(m).detach || softmax(p))
  L_M = beta  CE(m, y) + (1 - beta)  KL(softmax(p).detach || softmax(m))
(KL with reduction batchmean). P and M have their own optimizers and clipping; because the cross terms
are detached, one backward of L_P + L_M gives P exactly dL_P/dP and M exactly dL_M/dM.
Round: the server sends the global M, the client trains (P, M) for E epochs and uploads its M, the server
takes the n_k-weighted average (option: uniform). Inference: P.

Options for the reference codes (profiles): aggregation="uniform" (official code and HtFLlib);
detach_teacher=False and kl_reduction="mean" (HtFLlib: its KL terms are not detached, so P also gets
dL_M/dP and M gets dL_P/dM, and nn.KLDivLoss() averages over batch x classes).

Payloads: down and up are the meme's state dict (4 x its parameter count bytes for the CNNs, which have
no buffers). The client's copy of M is replaced by the global one every round, so it is not personal
state: the algorithm keeps a pool of spare working memes; each client update takes one (a new copy of the
global meme when none is spare), loads the download into it, trains it and gives it back, so clients can
train at once (threads, batched lockstep): one meme when they run one after the other, one per client
training at once otherwise. The pool is not checkpointed (every download overwrites it).
"""
from __future__ import annotations

import copy
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from algorithms.base import (KL_REDUCTIONS, Algorithm, Payload, Phase, aggregation_weights, check_aggregation,
                             kl_to, load_payload, state_payload, weighted_average)
from bench.errors import UserError
from models.groups import ARCHITECTURES

@dataclass
class FMLHyperparams:
    alpha: float = 0.5        # weight of CE in the private model's loss L_P
    beta: float = 0.5         # weight of CE in the meme's loss L_M
    meme_arch: str = "cnn5"   # architecture of the shared meme M (SPEC: cnn5, option cnn1; any model works)
    aggregation: str = "samples"  # server average of the memes: "samples" (n_k, SPEC) or "uniform"
    # The KL teacher (the other model's softmax) is detached (SPEC, official code); False: gradients also flow
    # through it, so each model gets the gradient of both losses (HtFLlib).
    detach_teacher: bool = True
    # KL reduction: "batchmean" = summed over classes, mean over the batch (SPEC, official); "mean" = mean over
    # batch x classes, i.e. batchmean / classes (HtFLlib's nn.KLDivLoss() default).
    kl_reduction: str = "batchmean"

    def validate(self) -> None:
        for field in ("alpha", "beta"):
            value = getattr(self, field)
            if not 0.0 <= value <= 1.0:
                raise UserError(f"fml.{field} must be in [0, 1], got {value}")
        if self.meme_arch not in ARCHITECTURES:
            raise UserError(f"fml.meme_arch must be one of {', '.join(ARCHITECTURES)}, got {self.meme_arch!r}")
        check_aggregation("fml", self.aggregation)
        if self.kl_reduction not in KL_REDUCTIONS:
            raise UserError(f"fml.kl_reduction must be one of {', '.join(KL_REDUCTIONS)}, got {self.kl_reduction!r}")


def mutual_losses(p: torch.Tensor, m: torch.Tensor, y: torch.Tensor, alpha: float, beta: float,
                  detach: bool = True, reduction: str = "batchmean") -> tuple[torch.Tensor, torch.Tensor]:
    """(L_P, L_M) of deep mutual learning for private logits p and meme logits m."""
    loss_p = alpha * F.cross_entropy(p, y) + (1 - alpha) * kl_to(p, m, detach, reduction)
    loss_m = beta * F.cross_entropy(m, y) + (1 - beta) * kl_to(m, p, detach, reduction)
    return loss_p, loss_m


class FML(Algorithm):
    name = "fml"
    display_name, role, table_order, colour = "FML", "baseline", 20, "#ff7f0e"
    server_flops_by_upload_shapes = True
    description = "federated mutual learning: private model and a shared meme model distil into each other"
    Hyperparams = FMLHyperparams
    checkpoint_exclude = ("spare_memes", "spare_lock")  # working memes: each download overwrites them
    profiles = {
        "official": {"aggregation": "uniform"},
        "htfllib": {"aggregation": "uniform", "detach_teacher": False, "kl_reduction": "mean"},
    }

    def new_meme(self):
        return self.ctx.build_model(self.hp.meme_arch)

    def init_server(self) -> None:
        self.global_meme = self.new_meme()
        # Spare working memes (a client's copy of M during its local training). The first is built, as it
        # always was, so the run's RNG draws stay those of earlier versions; take_meme copies any more.
        self.spare_memes = [self.new_meme()]
        self.spare_lock = threading.Lock()  # clients may take and give back memes from several threads

    def take_meme(self) -> torch.nn.Module:
        """A spare working meme, or a new copy of the global meme: a copy draws nothing from the RNG, so runs
        that need more memes (parallel or batched clients) compute exactly what one meme in turn does."""
        with self.spare_lock:
            if self.spare_memes:
                return self.spare_memes.pop()
        return copy.deepcopy(self.global_meme)  # the load below overwrites its values

    def init_client(self, client) -> None:
        client.state["model"] = self.ctx.build_model(client.arch)

    def server_payload(self, client, round_index: int) -> Payload:
        return state_payload(self.global_meme)

    def client_update(self, client, payload: Payload, round_index: int):
        private, meme = client.state["model"].train(), self.take_meme().train()
        try:
            load_payload(meme, payload)
            hp = self.hp

            def loss_fn(x, y):
                loss_p, loss_m = mutual_losses(private(x), meme(x), y, hp.alpha, hp.beta, hp.detach_teacher,
                                               hp.kl_reduction)
                return loss_p + loss_m  # one backward: each model's gradient of the losses that reach it

            phase = f"mutual-{hp.meme_arch}" + ("" if hp.detach_teacher else "-undetached")
            yield Phase(phase, [private, meme], self.ctx.cfg.local_epochs, loss=loss_fn)
            # A copy: the simulator transmits the upload later, when another client may be training this meme.
            return {name: tensor.clone() for name, tensor in state_payload(meme).items()}
        finally:  # also when the update stops early (an error, the generator closed): the meme is free again
            with self.spare_lock:
                self.spare_memes.append(meme)

    def aggregate(self, uploads: dict[int, Payload], round_index: int) -> None:
        load_payload(self.global_meme, weighted_average(uploads, aggregation_weights(self.ctx, self.hp.aggregation)))

    def predict(self, client, x):
        return client.state["model"](x)
