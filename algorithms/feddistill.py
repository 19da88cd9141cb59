"""FedDistill (Jeong et al. 2018, "FD"): only per-class average logits are federated.

Client k trains its private model on CE(f(x), y) + lam * D(f(x), zbar_y), where zbar_y is the global
average logit of class y; the term is skipped for a class that has no global logit yet. While training,
the client accumulates its (detached) logits per class and uploads the per-class means of the classes it
holds. The server's logit of class c is the plain mean over the clients that uploaded class c. Prediction:
the private model.

Payloads (bytes are what the simulator measures on these dicts):
- up: one float32 vector of length `classes` per class the client holds, keyed "logit.<c>":
  |classes_k| x classes floats, as in SPEC. The class id travels in the key, like a parameter's name in a
  state-dict payload, so no index tensor is sent.
- down: the same layout for every class that has a global logit. Once every class has one that is
  classes x classes floats (SPEC); before that only the existing rows are sent (in round 0 nothing exists
  yet, so the download is empty, 0 bytes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from algorithms.base import Algorithm, Payload
from bench.errors import UserError
from bench.registry import register

KEY_PREFIX = "logit."
DISTANCES = ("mse", "kl")
AGGREGATIONS = ("round", "latest")
RECORDS = ("all", "last-epoch")
NORMALISATIONS = ("batch", "distilled")


@dataclass
class FedDistillHyperparams:
    lam: float = 1.0              # lambda, weight of the distillation term
    # D(f(x), zbar_y): "mse" on logits (SPEC default) or "kl": KL(softmax(zbar_y) || softmax(f(x))).
    distance: str = "mse"
    # Which logits the client averages per class: "all" = every training step of the round (all E local
    # epochs; the model changes while they are recorded, as in the paper), "last-epoch" = the final epoch only.
    record: str = "all"
    # Server: "round" = per class, mean over this round's uploaders holding it (classes nobody uploaded keep
    # their previous global logit); "latest" = mean over the most recent upload of every client ever heard
    # from (matters with partial participation).
    aggregation: str = "round"
    # How D is averaged over a batch: "batch" = over all samples of the batch, a sample whose class has no
    # global logit contributing 0 (as if its target were its own logits); "distilled" = over the samples
    # whose class has a global logit only. MSE also averages over the `classes` logit entries, KL does not
    # (batchmean).
    normalise: str = "batch"

    def validate(self) -> None:
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise UserError(f"feddistill.lam must be a finite number >= 0, got {self.lam}")
        for field, value, valid in (("distance", self.distance, DISTANCES), ("record", self.record, RECORDS),
                                    ("aggregation", self.aggregation, AGGREGATIONS),
                                    ("normalise", self.normalise, NORMALISATIONS)):
            if value not in valid:
                raise UserError(f"feddistill.{field} must be one of {', '.join(valid)}, got {value!r}")


def distillation_term(logits: torch.Tensor, y: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                      distance: str, normalise: str) -> torch.Tensor:
    """D(f(x), zbar_y) averaged over the batch; `targets` is the (classes x classes) global logit table and
    `valid` (classes,) marks its rows that exist. No host sync (masks, not boolean indexing)."""
    target = targets[y]                            # (B, classes)
    mask = valid[y].to(logits.dtype)               # (B,)
    if distance == "mse":
        per_sample = (logits - target).pow(2).mean(dim=1)
    else:  # KL(softmax(target) || softmax(logits)), summed over classes
        per_sample = F.kl_div(F.log_softmax(logits, dim=1), F.softmax(target, dim=1), reduction="none").sum(dim=1)
    total = (per_sample * mask).sum()
    if normalise == "batch":
        return total / len(y)
    return total / mask.sum().clamp(min=1.0)


@register
class FedDistill(Algorithm):
    name = "feddistill"
    server_flops_by_upload_shapes = True
    description = "federated distillation: clients share per-class mean logits, distil towards the global ones"
    Hyperparams = FedDistillHyperparams

    @classmethod
    def estimated_cost(cls, hp, cfg) -> float:
        return 1.05  # the private model's training plus a cheap per-sample distance

    def init_server(self) -> None:
        c = self.ctx.num_classes
        self.global_logits = torch.zeros(c, c, device=self.ctx.device)
        self.valid_classes: set[int] = set()
        self.latest: dict[int, dict[int, torch.Tensor]] = {}  # client id -> class -> logits ("latest")

    def init_client(self, client) -> None:
        client.state["model"] = self.ctx.build_model(client.arch)

    def server_payload(self, client, round_index: int) -> Payload:
        return {f"{KEY_PREFIX}{c}": self.global_logits[c] for c in sorted(self.valid_classes)}

    def client_update(self, client, payload: Payload, round_index: int) -> Payload:
        ctx, hp = self.ctx, self.hp
        c = ctx.num_classes
        model = client.state["model"].train()
        targets = torch.zeros(c, c, device=ctx.device)
        valid = torch.zeros(c, dtype=torch.bool, device=ctx.device)
        received = [int(k[len(KEY_PREFIX):]) for k in payload]
        if received:
            rows = torch.tensor(received, device=ctx.device)
            targets[rows] = torch.stack(list(payload.values())).to(targets.dtype)
            valid[rows] = True
        held = torch.bincount(ctx.data.y_train[client.split.train], minlength=c).nonzero().flatten().tolist()
        distil = hp.lam > 0 and bool(set(received) & set(held))

        sums = torch.zeros(c, c, device=ctx.device)
        counts = torch.zeros(c, device=ctx.device)
        epochs = ctx.cfg.local_epochs
        first_recorded = 0
        if hp.record == "last-epoch":
            first_recorded = (epochs - 1) * math.ceil(client.num_train / ctx.cfg.batch_size)
        step = 0

        def loss_fn(x, y):
            nonlocal step
            logits = model(x)
            if step >= first_recorded:
                sums.index_add_(0, y, logits.detach())
                counts.index_add_(0, y, torch.ones_like(y, dtype=counts.dtype))  # bincount syncs on CUDA
            step += 1
            loss = F.cross_entropy(logits, y)
            if distil:
                loss = loss + hp.lam * distillation_term(logits, y, targets, valid, hp.distance, hp.normalise)
            return loss

        phase = f"distill-{hp.distance}" if distil else "ce-only"
        ctx.train(client, [model], loss_fn, epochs, phase=phase)
        means = sums / counts.clamp(min=1.0).unsqueeze(1)
        return {f"{KEY_PREFIX}{cls}": means[cls] for cls in counts.nonzero().flatten().tolist()}

    def aggregate(self, uploads: dict[int, Payload], round_index: int) -> None:
        if self.hp.aggregation == "latest":
            for cid, upload in uploads.items():
                self.latest[cid] = {int(k[len(KEY_PREFIX):]): v for k, v in upload.items()}
            per_class = {}
            for logits in self.latest.values():
                for cls, vec in logits.items():
                    per_class.setdefault(cls, []).append(vec)
        else:
            per_class = {}
            for upload in uploads.values():
                for key, vec in upload.items():
                    per_class.setdefault(int(key[len(KEY_PREFIX):]), []).append(vec)
        for cls, vecs in per_class.items():
            self.global_logits[cls] = torch.stack(vecs).mean(dim=0)
            self.valid_classes.add(cls)

    def predict(self, client, x):
        return client.state["model"].eval()(x)
