"""FedDistill (Jeong et al. 2018, "FD"): only per-class average logits are federated.

Client k trains its private model on CE(f(x), y) + lam * D(f(x), zbar_y), where zbar_y is the global
average logit of class y; the term is skipped for a class that has no global logit yet. While training,
the client accumulates its (detached) logits per class and uploads the per-class means of the classes it
holds. The server's logit of class c is the plain mean over the clients that uploaded class c. Prediction:
the private model.

Options: `exclude_own` (Jeong et al.'s Algorithm 1: client k's target is the mean over the OTHER holders of
the class, so the server sends each client its own table), the server's memory of classes nobody uploaded
this round (`aggregation`), and HtFLlib's loss (`distance="ce"`, see distillation_term).

Payloads (bytes are what the simulator measures on these dicts):
- up: one float32 vector of length `classes` per class the client holds, keyed "logit.<c>":
  |classes_k| x classes floats, as in SPEC. The class id travels in the key, like a parameter's name in a
  state-dict payload, so no index tensor is sent.
- down: the same layout for every class that has a global logit (for this client). Once every class has one
  that is classes x classes floats (SPEC); before that only the existing rows are sent (in round 0 nothing
  exists yet, so the download is empty, 0 bytes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from algorithms.base import Algorithm, Payload, Phase
from bench.errors import UserError

KEY_PREFIX = "logit."
DISTANCES = ("mse", "kl", "ce")
AGGREGATIONS = ("round", "latest", "fresh")
RECORDS = ("all", "last-epoch")
NORMALISATIONS = ("batch", "distilled")


@dataclass
class FedDistillHyperparams:
    lam: float = 1.0              # lambda, weight of the distillation term
    # D(f(x), zbar_y): "mse" on logits (SPEC default), "kl": KL(softmax(zbar_y) || softmax(f(x))), or "ce":
    # HtFLlib's CrossEntropyLoss(f(x), zbar_y), the raw global logits used as soft-target weights.
    distance: str = "mse"
    # Which logits the client averages per class: "all" = every training step of the round (all E local
    # epochs; the model changes while they are recorded, as in the paper), "last-epoch" = the final epoch only.
    record: str = "all"
    # Server, per class: "round" = mean over this round's uploaders holding it (classes nobody uploaded keep
    # their previous global logit); "latest" = mean over the most recent upload of every client ever heard
    # from; "fresh" = this round's uploads only, classes nobody uploaded have no global logit (HtFLlib).
    # They differ only with partial participation.
    aggregation: str = "round"
    # How D is averaged over a batch: "batch" = over all samples of the batch, a sample whose class has no
    # global logit taking its own (detached) logits as the target, as in HtFLlib (0 for mse and kl);
    # "distilled" = over the samples whose class has a global logit only. MSE also averages over the
    # `classes` logit entries, KL and CE do not.
    normalise: str = "batch"
    # Client k's target for class c leaves out k's own upload: the mean over the other holders of c (Jeong et
    # al., Algorithm 1); a class k alone holds then has no target for k. False: one table for all (SPEC).
    exclude_own: bool = False

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
    has = valid[y]                                                           # (B,)
    target = torch.where(has.unsqueeze(1), targets[y], logits.detach())      # (B, classes)
    if distance == "mse":
        per_sample = (logits - target).pow(2).mean(dim=1)
    elif distance == "kl":  # KL(softmax(target) || softmax(logits)), summed over classes
        per_sample = F.kl_div(F.log_softmax(logits, dim=1), F.softmax(target, dim=1), reduction="none").sum(dim=1)
    else:  # "ce": -sum_j target_j log softmax(logits)_j, the raw logits as weights (HtFLlib)
        per_sample = -(target * F.log_softmax(logits, dim=1)).sum(dim=1)
    if normalise == "batch":
        return per_sample.sum() / len(y)
    mask = has.to(logits.dtype)
    return (per_sample * mask).sum() / mask.sum().clamp(min=1.0)


class FedDistill(Algorithm):
    name = "feddistill"
    display_name, role, table_order, colour = "FedDistill", "baseline", 10, "#1f77b4"
    server_flops_by_upload_shapes = True
    description = "federated distillation: clients share per-class mean logits, distil towards the global ones"
    Hyperparams = FedDistillHyperparams
    profiles = {
        # No released code; Algorithm 1 of the paper: targets without the device's own logits, a cross-entropy
        # regularizer on softmax outputs (kl has its gradient).
        "official": {"exclude_own": True, "distance": "kl"},
        # HtFLlib HEAD's loss is CE on raw global logits (distance="ce"), unbounded below: learning collapses
        # (a bug since its commit ca3e29a, not reproduced, as FedGH's untrained header is not); "kl" is the
        # softmax-target CE it used before, same gradient.
        "htfllib": {"distance": "kl", "aggregation": "fresh"},
    }

    def init_server(self) -> None:
        self.contributions: dict[int, dict[int, torch.Tensor]] = {}  # class -> client id -> its uploaded logits

    def init_client(self, client) -> None:
        client.state["model"] = self.ctx.build_model(client.arch)

    def global_logit(self, cls: int, exclude: int | None = None) -> torch.Tensor | None:
        """Mean of the class's contributions, leaving out client `exclude`; None when nothing is left."""
        vecs = [vec for cid, vec in self.contributions.get(cls, {}).items() if cid != exclude]
        return torch.stack(vecs).mean(dim=0) if vecs else None

    def server_payload(self, client, round_index: int) -> Payload:
        exclude = client.id if self.hp.exclude_own else None
        payload = {}
        for cls in sorted(self.contributions):
            logit = self.global_logit(cls, exclude)
            if logit is not None:
                payload[f"{KEY_PREFIX}{cls}"] = logit
        return payload

    def client_update(self, client, payload: Payload, round_index: int):
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
        # With mse/kl a sample of a class without a global logit adds nothing, so the term is needed only when a
        # held class has one; with "ce" it adds its own-target term whenever anything was received (HtFLlib).
        needed = bool(received) if hp.distance == "ce" else bool(set(received) & set(held))
        distil = hp.lam > 0 and needed

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

        yield Phase(f"distill-{hp.distance}" if distil else "ce-only", [model], epochs, loss=loss_fn)
        means = sums / counts.clamp(min=1.0).unsqueeze(1)
        return {f"{KEY_PREFIX}{cls}": means[cls] for cls in counts.nonzero().flatten().tolist()}

    def aggregate(self, uploads: dict[int, Payload], round_index: int) -> None:
        this_round: dict[int, dict[int, torch.Tensor]] = {}
        for cid, upload in uploads.items():
            for key, vec in upload.items():
                this_round.setdefault(int(key[len(KEY_PREFIX):]), {})[cid] = vec
        if self.hp.aggregation == "fresh":
            self.contributions = {}
        for cls, by_client in this_round.items():
            if self.hp.aggregation == "latest":
                self.contributions.setdefault(cls, {}).update(by_client)
            else:
                self.contributions[cls] = by_client

    def predict(self, client, x):
        return client.state["model"](x)
