"""LG-FedAvg (Liang et al. 2020): only the header (fc3, the one layer of equal shape in CNN-1..5) is
federated; the feature extractor stays private.

Round: the server sends the global header; the client loads it into its model, trains the whole model with
CE for E epochs and uploads its header; the server takes the n_k-weighted average. By default the global
header is a freshly initialised Linear(rep_dim, classes) sent from round 0, so every client starts from
the same header (option header_init="local": round 0 sends nothing). Prediction: the client's own model
(its private extractor and the header it trained last).

Payloads: the header's weight and bias, keys "header.weight" and "header.bias",
4 x (rep_dim x classes + classes) bytes each way (4 x 5,010 for the CNNs on 10 classes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from algorithms.base import Algorithm, Payload, load_payload, state_payload, weighted_average
from bench.errors import UserError
from bench.registry import register

PREFIX = "header."
HEADER_INITS = ("server", "local")


@dataclass
class LGFedAvgHyperparams:
    # Where the shared header starts: "server" = the server initialises a global header and sends it from
    # round 0, so all clients start alike; "local" = nothing is sent in round 0 (0 bytes), each client trains
    # its own randomly initialised header and the first aggregate defines the global one.
    header_init: str = "server"

    def validate(self) -> None:
        if self.header_init not in HEADER_INITS:
            raise UserError(f"lgfedavg.header_init must be one of {', '.join(HEADER_INITS)}, "
                            f"got {self.header_init!r}")


@register
class LGFedAvg(Algorithm):
    name = "lgfedavg"
    server_flops_by_upload_shapes = True
    description = "local representations, global header: only the classifier layer fc3 is averaged"
    Hyperparams = LGFedAvgHyperparams

    @classmethod
    def estimated_cost(cls, hp, cfg) -> float:
        return 1.0  # the same local training as Standalone

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        rep_dims = {ctx.representation_dim(arch) for arch in set(ctx.client_archs)}
        if len(rep_dims) > 1:
            raise UserError(f"lgfedavg shares the header, which needs one representation size across clients; "
                            f"got {sorted(rep_dims)}; use a CNN model group")
        self.rep_dim = rep_dims.pop()

    def init_server(self) -> None:
        self.global_header = nn.Linear(self.rep_dim, self.ctx.num_classes).to(self.ctx.device)
        self.has_global = self.hp.header_init == "server"

    def init_client(self, client) -> None:
        client.state["model"] = self.ctx.build_model(client.arch)

    def server_payload(self, client, round_index: int) -> Payload:
        return state_payload(self.global_header, PREFIX) if self.has_global else {}

    def client_update(self, client, payload: Payload, round_index: int) -> Payload:
        model = client.state["model"].train()
        if payload:
            load_payload(model.header, payload, PREFIX)
        self.ctx.train(client, [model], lambda x, y: F.cross_entropy(model(x), y), self.ctx.cfg.local_epochs,
                       phase="local")
        return state_payload(model.header, PREFIX)

    def client_update_many(self, clients, payloads, round_index: int) -> dict[int, Payload]:
        models = [c.state["model"].train() for c in clients]
        for c, model in zip(clients, models):
            if payloads[c.id]:
                load_payload(model.header, payloads[c.id], PREFIX)
        self.ctx.train_many(clients, models, self.ctx.cfg.local_epochs, phase="local")
        return {c.id: state_payload(model.header, PREFIX) for c, model in zip(clients, models)}

    def aggregate(self, uploads: dict[int, Payload], round_index: int) -> None:
        load_payload(self.global_header, weighted_average(uploads, self.ctx.client_weights), PREFIX)
        self.has_global = True

    def predict(self, client, x):
        return client.state["model"].eval()(x)
