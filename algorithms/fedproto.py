"""FedProto (Tan et al., AAAI 2022): clients share per-class prototypes (mean representations), not models.

Client: train the whole model E epochs on CE(f(x), y) + lam * MSE(h(x), P_y), where h is the extractor's
representation and P_y the global prototype of the sample's label (samples whose label has no global prototype
target their own detached representation, i.e. add nothing but count in the mean, as both reference codes do;
the term is absent while no global prototype exists); then upload the per-class prototypes of the classes it
holds. Server: the global prototype of a class is the plain mean of this round's uploaded prototypes of that
class (unweighted, over the clients holding it). Inference: the local model (SPEC) or, as an option, the
nearest global prototype (squared Euclidean distance).

Prototypes (`prototypes`): "after" = exact class means of the trained model's representations over the
client's unaugmented train split in eval mode (SPEC; FedTGP's codes); "all-epochs" = the mean of the
representations seen during training, every epoch (train mode, augmented batches, before each step: HtFLlib's
FedProto); "last-epoch" = the same over the last epoch only (the official code). Either pass counts as the
client's training FLOPs.

Payloads: up "protos" float32 (|classes_k| x d) and "classes" (uint8 up to 256 classes); down the global
prototypes of the classes that have one, in the same form (nothing in round 0). With inference="prototype"
the new global prototypes go to every client after each aggregation (every client is then evaluated with
them) and the round's own download is empty.

One representation size d across clients is needed; `proto_dim` > 0 appends a trainable Linear(rep, proto_dim)
to every client's extractor and gives it a Linear(proto_dim, classes) header (HtFLlib's `feature_dim`), which
lets the torchvision group (512 and 1280) take part."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.base import Algorithm, Payload, Phase
from algorithms.fedgh import class_id_dtype
from bench.errors import UserError

PROTOTYPES = ("after", "all-epochs", "last-epoch")
INFERENCES = ("model", "prototype")


@dataclass
class FedProtoHyperparams:
    lam: float = 1.0             # weight of the prototype distance term (official --ld 1)
    prototypes: str = "after"    # after | all-epochs | last-epoch: how the uploaded class means are formed
    inference: str = "model"     # model: the local model (SPEC); prototype: the nearest global prototype
    proto_dim: int = 0           # 0: the models' own representation; > 0: a per-client Linear map to this size

    def validate(self) -> None:
        check_prototype_options("fedproto", self)


def check_prototype_options(name: str, hp) -> None:
    """The one-line errors shared by FedProto and FedTGP."""
    if not hp.lam >= 0:
        raise UserError(f"{name}.lam must be >= 0, got {hp.lam}")
    if hp.prototypes not in PROTOTYPES:
        raise UserError(f"{name}.prototypes must be one of {', '.join(PROTOTYPES)}, got {hp.prototypes!r}")
    if hp.inference not in INFERENCES:
        raise UserError(f"{name}.inference must be one of {', '.join(INFERENCES)}, got {hp.inference!r}")
    if hp.proto_dim < 0:
        raise UserError(f"{name}.proto_dim must be >= 0 (0 = the models' representation size), got {hp.proto_dim}")


# ---- helpers shared with FedTGP -------------------------------------------------------------------------------

def prototype_dim(ctx, name: str, proto_dim: int) -> int:
    """The prototype size: proto_dim, or the clients' one representation size (a UserError if they differ)."""
    if proto_dim:
        return proto_dim
    dims = {ctx.representation_dim(arch) for arch in set(ctx.client_archs)}
    if len(dims) > 1:
        raise UserError(f"{name} needs one representation size across clients, got {sorted(dims)}; "
                        f"set {name}.proto_dim (e.g. 512) to map every representation to one size")
    return dims.pop()


def build_client_model(ctx, arch: str, proto_dim: int):
    """The client's model; with proto_dim, its extractor ends in Linear(rep, proto_dim) and a new header follows."""
    model = ctx.build_model(arch)
    if proto_dim:
        model.extractor = nn.Sequential(model.extractor, nn.Linear(model.rep_dim, proto_dim)).to(ctx.device)
        model.header = nn.Linear(proto_dim, ctx.num_classes).to(ctx.device)
    return model


class Recorder:
    """Per-class sums of the representations seen during training (detached), for prototypes="all-epochs" or
    "last-epoch" (then only the calls from `start` on, i.e. the last epoch's batches)."""

    def __init__(self, num_classes: int, dim: int, device, start: int = 0):
        self.sums = torch.zeros(num_classes, dim, device=device)
        self.counts = torch.zeros(num_classes, dtype=torch.long, device=device)
        self.calls, self.start = 0, start

    def add(self, h: torch.Tensor, y: torch.Tensor) -> None:
        if self.calls >= self.start:
            self.sums.index_add_(0, y, h.detach().float())
            self.counts.index_add_(0, y, torch.ones_like(y))
        self.calls += 1

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        present = torch.nonzero(self.counts > 0).flatten()
        return present, self.sums[present] / self.counts[present].unsqueeze(1)


def prototype_loss(model, targets: torch.Tensor | None, held: torch.Tensor | None, lam: float,
                   recorder: Recorder | None = None):
    """CE(header(h), y) + lam * MSE(h, P_y) (mean over batch x dimensions; a sample whose class has no global
    prototype targets its own detached h); records h when a recorder is given."""
    def loss(x, y):
        h = model.extractor(x)
        ce = F.cross_entropy(model.header(h), y)
        if recorder is not None:
            recorder.add(h, y)
        if targets is None:
            return ce
        target = torch.where(held[y].unsqueeze(1), targets[y], h.detach())
        return ce + lam * F.mse_loss(h, target)

    return loss


@torch.no_grad()
def exact_class_means(ctx, client, extractor, dim: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes held, their mean representations) over the client's unaugmented train split in eval mode,
    counted as the client's training FLOPs."""
    training = extractor.training
    extractor.eval()
    sums = torch.zeros(ctx.num_classes, dim, device=ctx.device)
    counts = torch.zeros(ctx.num_classes, dtype=torch.long, device=ctx.device)
    for x, y in ctx.data.eval_batches("train", client.split.train, ctx.cfg.eval_batch_size):
        with ctx.accountant.count("train", (name, "prototypes", client.arch, len(y)), client.id):
            h = extractor(x).float()
        sums.index_add_(0, y, h)
        counts.index_add_(0, y, torch.ones_like(y))
    extractor.train(training)
    present = torch.nonzero(counts > 0).flatten()
    return present, sums[present] / counts[present].unsqueeze(1)


def nearest_prototype_logits(h: torch.Tensor, protos: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """Logits = -squared Euclidean distance to each held global prototype; a class without one scores below
    every held class (finite, so the CE loss stays defined)."""
    dist = (h * h).sum(1, keepdim=True) - 2 * h @ protos.T + (protos * protos).sum(1)
    logits = -dist
    floor = logits[:, held].min(1, keepdim=True).values - 1.0
    return torch.where(held.unsqueeze(0), logits, floor)


class FedProto(Algorithm):
    name = "fedproto"
    display_name, role, table_order, colour = "FedProto", "baseline", 65, "#17becf"
    server_flops_by_upload_shapes = True
    description = "clients share per-class prototypes; local loss CE + lam * distance to the global prototype"
    Hyperparams = FedProtoHyperparams
    # Sources and line numbers: algorithms/README.md (fidelity notes).
    profiles = {
        "official": {"prototypes": "last-epoch"},
        "htfllib": {"lam": 10.0, "prototypes": "all-epochs", "inference": "prototype"},
    }

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        self.dim = prototype_dim(ctx, self.name, hp.proto_dim)
        # "prototype": the global prototypes go to every client after aggregation; every client is evaluated.
        self.broadcast_after_aggregation = hp.inference == "prototype"
        self.prediction_uses_server_state = hp.inference == "prototype"

    def init_server(self) -> None:
        self.protos = torch.zeros(self.ctx.num_classes, self.dim, device=self.ctx.device)
        self.held = torch.zeros(self.ctx.num_classes, dtype=torch.bool, device=self.ctx.device)

    def init_client(self, client) -> None:
        client.state["model"] = build_client_model(self.ctx, client.arch, self.hp.proto_dim)
        if self.hp.inference == "prototype":  # the client's copy of the latest broadcast
            client.state["protos"] = torch.zeros(self.ctx.num_classes, self.dim, device=self.ctx.device)
            client.state["held"] = torch.zeros(self.ctx.num_classes, dtype=torch.bool, device=self.ctx.device)

    # ---- communication ---------------------------------------------------------------------------------------
    def global_payload(self) -> Payload:
        classes = torch.nonzero(self.held).flatten()
        return {"protos": self.protos[classes], "classes": classes.to(class_id_dtype(self.ctx.num_classes))}

    def server_payload(self, client, round_index: int) -> Payload:
        if not bool(self.held.any()) or self.hp.inference == "prototype":
            return {}  # nothing yet, or the broadcast after the last aggregation already delivered it
        return self.global_payload()

    def unpack(self, payload: Payload) -> tuple[torch.Tensor, torch.Tensor]:
        """(K x d prototypes, K held flags) from a payload; without class ids it holds every class in order."""
        k = self.ctx.num_classes
        if "classes" not in payload:
            return payload["protos"].float(), torch.ones(k, dtype=torch.bool, device=self.ctx.device)
        classes = payload["classes"].long()
        protos = torch.zeros(k, self.dim, device=self.ctx.device)
        protos[classes] = payload["protos"].float()
        held = torch.zeros(k, dtype=torch.bool, device=self.ctx.device)
        held[classes] = True
        return protos, held

    def targets(self, client, payload: Payload) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The global prototypes the client trains towards: the download, else its broadcast copy, else none."""
        if payload:
            return self.unpack(payload)
        if "held" in client.state and bool(client.state["held"].any()):
            return client.state["protos"], client.state["held"]
        return None, None

    def after_aggregation_payload(self, client, round_index: int) -> Payload | None:
        return self.global_payload() if self.hp.inference == "prototype" else None

    def receive_after_aggregation(self, client, payload: Payload, round_index: int) -> None:
        client.state["protos"], client.state["held"] = self.unpack(payload)

    # ---- client ------------------------------------------------------------------------------------------------
    def client_update(self, client, payload: Payload, round_index: int):
        model = client.state["model"].train()
        targets, held = self.targets(client, payload)
        epochs = self.ctx.cfg.local_epochs
        recorder = None
        if self.hp.prototypes != "after":
            start = 0
            if self.hp.prototypes == "last-epoch":
                start = (epochs - 1) * -(-client.num_train // self.ctx.cfg.batch_size)  # batches before it
            recorder = Recorder(self.ctx.num_classes, self.dim, self.ctx.device, start)
        if targets is None and recorder is None:
            yield Phase("local-ce", [model], epochs)  # plain CE (batchable)
        else:
            loss = prototype_loss(model, targets, held, self.hp.lam, recorder)
            yield Phase("local-proto" if targets is not None else "local-ce-record", [model], epochs, loss=loss)
        if recorder is not None:
            classes, protos = recorder.means()
        else:
            classes, protos = exact_class_means(self.ctx, client, model.extractor, self.dim, self.name)
        return {"protos": protos, "classes": classes.to(class_id_dtype(self.ctx.num_classes))}

    # ---- server ------------------------------------------------------------------------------------------------
    def aggregate(self, uploads: dict[int, Payload], round_index: int) -> None:
        """Per class, the plain mean of this round's uploaded prototypes; classes nobody uploaded have none."""
        sums = torch.zeros_like(self.protos)
        counts = torch.zeros(self.ctx.num_classes, device=self.ctx.device)
        for cid in sorted(uploads):
            classes = uploads[cid]["classes"].long()
            sums.index_add_(0, classes, uploads[cid]["protos"].float())
            counts.index_add_(0, classes, torch.ones(len(classes), device=self.ctx.device))
        self.held = counts > 0
        self.protos = sums / counts.clamp(min=1).unsqueeze(1)

    # ---- inference ---------------------------------------------------------------------------------------------
    def predict(self, client, x):
        model = client.state["model"]
        if self.hp.inference == "model" or not bool(client.state["held"].any()):
            return model(x)  # before the first global prototypes arrive: the local model
        return nearest_prototype_logits(model.extractor(x), client.state["protos"], client.state["held"])
