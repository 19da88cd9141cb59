"""The algorithm plugin interface. The round loop (bench/simulator.py) calls these hooks; an algorithm never
loops over rounds or clients itself, and never measures its own costs."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Generator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import UserError

if TYPE_CHECKING:
    from bench.simulator import Client, RunContext

Payload = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Phase:
    """One stretch of a client's local training, described for the simulator to run: `epochs` epochs of SGD
    (the run's settings, new optimizers) over the client's training batches, one optimizer and one gradient
    clipping per entry of `trainable` (a module, or a list of modules sharing them); only parameters with
    requires_grad train. The simulator counts its FLOPs, reports its mean loss and, with
    cfg.batched_training, trains same-architecture clients' plain phases together (bench/batched.py)."""
    name: str                  # names the computation (FLOP cache, loss report): include what changes it
    trainable: Sequence[nn.Module | Sequence[nn.Module]]
    epochs: int
    loss: LossFn | None = None  # None: the plain phase, CE(trainable[0](x) + partner(x), y)
    partner: nn.Module | None = None  # a frozen module whose logits the plain loss adds (pFedLoRA)
    indices: torch.Tensor | None = None  # train on these training indices instead of the client's split
    optimizers: tuple[list[list[nn.Parameter]], list[torch.optim.Optimizer]] | None = None
    # ^ the algorithm's own ctx.optimizers_for(trainable), e.g. with momentum carried across rounds

    @property
    def plain(self) -> bool:
        """True when the simulator may train this phase batched with other clients' plain phases."""
        return (self.loss is None and self.indices is None and self.optimizers is None
                and len(self.trainable) == 1 and isinstance(self.trainable[0], nn.Module))

    def loss_fn(self) -> LossFn:
        if self.loss is not None:
            return self.loss
        model, partner = self.trainable[0], self.partner
        if not isinstance(model, nn.Module):
            raise TypeError(f"phase {self.name!r}: the plain loss needs one module first in `trainable`")
        if partner is None:
            return lambda x, y: F.cross_entropy(model(x), y)
        return lambda x, y: F.cross_entropy(model(x) + partner(x), y)


# client_update's form: a generator that yields the Phases to run (receiving each one's mean loss) and returns
# the upload; a client_update without training may be a plain function returning the upload.
ClientUpdate = Generator[Phase, torch.Tensor, Payload]

# Reference profiles (config key `profile`): "spec" = SPEC.md's defaults, "official" = each method's own
# released code, "htfllib" = HtFLlib's HEAD. An algorithm lists, per profile, the hyper-parameters that differ
# from its SPEC defaults in `profiles`; the fidelity notes (algorithms/README.md) give the sources.
PROFILES = ("spec", "official", "htfllib")
# How averaging methods weight the uploads: "samples" = n_k (SPEC), "uniform" = plain mean (official codes).
AGGREGATIONS = ("samples", "uniform")


@dataclass
class NoHyperparams:
    """This algorithm has no hyper-parameters beyond the run's training settings."""


ROLES = ("proposed", "baseline", "reference")


class Algorithm:
    name: ClassVar[str]                   # registry name, e.g. "pfedlora"
    description: ClassVar[str] = ""
    # How reports show it: the name in tables and legends ("" = `name`), its role (the proposed method, a
    # baseline, or a reference point such as Standalone), its position in tables and legends (built-ins use
    # 0-99), and its colour in every figure (a matplotlib colour; "" = a stable colour derived from the name).
    display_name: ClassVar[str] = ""
    role: ClassVar[str] = "baseline"
    table_order: ClassVar[int] = 100
    colour: ClassVar[str] = ""
    Hyperparams: ClassVar[type] = NoHyperparams
    homogeneous_only: ClassVar[bool] = False  # needs every client on the same architecture (FedAvg)
    # True when predictions depend on server state (FedAvg's global model): then every client is
    # re-evaluated each round; otherwise only the clients whose state changed (the sampled ones).
    prediction_uses_server_state: ClassVar[bool] = False
    # The model group the conformance kit and the generic tests run it on: None means "cnn-hetero" ("cnn5-homo"
    # when homogeneous_only); methods that need other layers name a group of their family (LoRA: a ViT group).
    example_model_group: ClassVar[str | None] = None
    # False when the clients' local updates share mutable algorithm state (a momentum carried from client to
    # client): the simulator then runs them one after the other, even under
    # cfg.batched_training (which otherwise interleaves them to train their plain phases together).
    batchable_clients: ClassVar[bool] = True
    # True when after_aggregation_payload goes to every client, not only the round's sampled ones.
    broadcast_after_aggregation: ClassVar[bool] = False
    # True when aggregate()'s FLOPs are determined by the names, shapes and dtypes of the uploads (averaging,
    # FedGH's fixed passes over the uploaded pairs): they are then counted once per upload signature instead
    # of every round. Leave False when they depend on values (FedKD's energy-chosen SVD ranks).
    server_flops_by_upload_shapes: ClassVar[bool] = False
    # Attributes left out of checkpoints by the default state_dict (besides ctx and hp): caches that
    # init_server/__init__ rebuild identically, or objects the checkpoint format cannot hold.
    checkpoint_exclude: ClassVar[tuple[str, ...]] = ()
    # Hyper-parameter values per reference profile ("official", "htfllib"); "spec" is the dataclass defaults.
    profiles: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, ctx: "RunContext", hp: Any):
        self.ctx = ctx
        self.hp = hp

    @classmethod
    def make_hparams(cls, overrides: Mapping[str, Any] | None = None) -> Any:
        """The typed hyper-parameters with overrides applied; a bad key or type is a UserError."""
        fields = {f.name: f for f in dataclasses.fields(cls.Hyperparams)}
        values = {}
        for key, value in (overrides or {}).items():
            if key not in fields:
                from bench.config import closest

                valid = ", ".join(fields) or "none"
                raise UserError(f"unknown hyper-parameter {cls.name}.{key}{closest(key, list(fields))}; valid: {valid}")
            default = fields[key].default
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{cls.name}.{key} must be a finite number, got {value}")
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**31 - 1:
                raise UserError(f"{cls.name}.{key}={value} is out of range; valid: at most 2147483647 in size")
            if default is not None and default is not dataclasses.MISSING and type(value) is not type(default):
                raise UserError(f"{cls.name}.{key} must be {type(default).__name__}, got {value!r}")
            values[key] = value
        hp = cls.Hyperparams(**values)
        check = getattr(hp, "validate", None)
        if check is not None:
            check()
        return hp

    @classmethod
    def example_group(cls) -> str:
        """The model group to try this algorithm on when none is given (see example_model_group)."""
        return cls.example_model_group or ("cnn5-homo" if cls.homogeneous_only else "cnn-hetero")

    @classmethod
    def hparams_for(cls, cfg: Any) -> Any:
        """The run's typed hyper-parameters: the profile's values, then the config's own overrides on top."""
        from bench.registry import canonical_algorithm_name

        table = cfg.algo.get(cls.name) or cfg.algo.get(canonical_algorithm_name(cls.name))  # config keys: canonical
        return cls.make_hparams({**cls.profiles.get(cfg.profile, {}), **(table or {})})

    # ---- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The server state to checkpoint, as live objects (bench/checkpoint.py saves them). The default
        takes every attribute except ctx, hp, `checkpoint_exclude` and behaviour (functions, classes):
        modules, tensors, optimizers (their state dicts), torch/numpy generators, python scalars and
        containers of these. Override this and load_state_dict for anything else."""
        from bench.checkpoint import is_state

        skip = {"ctx", "hp", *self.checkpoint_exclude}
        return {k: v for k, v in vars(self).items() if k not in skip and is_state(v)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict returned. Modules, optimizers and generators arrive already loaded into
        this (freshly initialised) algorithm's own objects; everything else is set as an attribute."""
        for key, value in state.items():
            setattr(self, key, value)

    # ---- hooks -------------------------------------------------------------------------------
    def init_server(self) -> None:
        """Create the server state (called once, after every client is initialised)."""

    def init_client(self, client: "Client") -> None:
        """Fill client.state with the client's personal state (private model, ...)."""
        raise NotImplementedError

    def server_payload(self, client: "Client", round_index: int) -> Payload:
        """What the server sends to a sampled client at the start of a round (0-based round_index)."""
        return {}

    def client_update(self, client: "Client", payload: Payload, round_index: int) -> ClientUpdate | Payload:
        """Local training, as a generator: prepare, `loss = yield Phase(...)` for each stretch of training
        (the simulator runs it), and `return` the upload. Personal state stays in client.state. Code between
        phases runs between them (freezing a module, ctx.evaluate, ctx.record)."""
        raise NotImplementedError

    def aggregate(self, uploads: dict[int, Payload], round_index: int) -> None:
        """Server update from the uploads of the sampled clients (keyed by client id)."""

    def after_aggregation_payload(self, client: "Client", round_index: int) -> Payload | None:
        """Optional second download in the same round, after aggregation (e.g. FedAPEN's new shared model,
        on which the client then learns lambda). None (the default) means no such step."""
        return None

    def receive_after_aggregation(self, client: "Client", payload: Payload, round_index: int) -> None:
        """Client-side handling of `after_aggregation_payload` (its compute counts as training FLOPs)."""

    def predict(self, client: "Client", x: torch.Tensor) -> torch.Tensor:
        """Personalised logits for client `client` (called under no_grad)."""
        return client.state["model"](x)


def weighted_average(uploads: dict[int, Payload], weights: Mapping[int, float]) -> Payload:
    """Per-tensor average of the uploads weighted by weights[client id] (n_k, SPEC)."""
    ids = list(uploads)
    total = float(sum(weights[i] for i in ids))
    first = uploads[ids[0]]
    out = {}
    for name, tensor in first.items():
        w = torch.tensor([weights[i] / total for i in ids], dtype=torch.float32, device=tensor.device)
        stacked = torch.stack([uploads[i][name].float() for i in ids])
        out[name] = torch.tensordot(w, stacked, dims=1).to(tensor.dtype)
    return out


def aggregation_weights(ctx: "RunContext", mode: str) -> dict[int, float]:
    """Weights for weighted_average: n_k per client ("samples", SPEC) or 1 each ("uniform")."""
    if mode == "samples":
        return ctx.client_weights
    if mode == "uniform":
        return {cid: 1.0 for cid in ctx.client_weights}
    raise ValueError(f"unknown aggregation {mode!r}; valid: {', '.join(AGGREGATIONS)}")


def check_aggregation(algo_name: str, mode: str) -> None:
    """The one-line error for a bad `aggregation` hyper-parameter."""
    if mode not in AGGREGATIONS:
        raise UserError(f"{algo_name}.aggregation must be one of {', '.join(AGGREGATIONS)}, got {mode!r}")


KL_REDUCTIONS = ("batchmean", "mean")


def kl_to(student_logits: torch.Tensor, teacher_logits: torch.Tensor, detach: bool = True,
          reduction: str = "batchmean") -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)), the distillation term of FML, FedKD and FedAPEN; with
    `detach` the gradient flows into the student only. reduction "batchmean": summed over classes, mean over
    the batch (the true KL); "mean": over batch x classes (torch's KLDivLoss() default), i.e. / classes."""
    teacher = F.softmax(teacher_logits, dim=1)
    kl = F.kl_div(F.log_softmax(student_logits, dim=1), teacher.detach() if detach else teacher,
                  reduction="batchmean")
    # "mean" written out: torch warns that its own "mean" will turn into "batchmean"
    return kl / student_logits.shape[1] if reduction == "mean" else kl


def state_payload(module: torch.nn.Module, prefix: str = "") -> Payload:
    """A module's parameters and buffers as a payload (the simulator copies it on transmission)."""
    return {prefix + name: tensor for name, tensor in module.state_dict().items()}


def load_payload(module: torch.nn.Module, payload: Payload, prefix: str = "") -> None:
    """Copy payload tensors named prefix+<state key> into the module, in place."""
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            tensor.copy_(payload[prefix + name])
