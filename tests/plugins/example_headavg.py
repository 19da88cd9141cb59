"""An example third-party algorithm plugin (see pyproject.toml next to this file for its entry point).

ExampleHeadAvg: every client keeps its own feature extractor; the linear header (the one layer of equal
shape across CNN-1..5) is shared. Per round the server sends its global header, each sampled client loads it,
trains its whole model with cross-entropy (one Phase it yields) and uploads its header; the server moves the
global header a step `server_lr` towards the n_k-weighted mean of the uploads (server_lr=1: LG-FedAvg).

What it shows a plugin author: a Hyperparams dataclass whose defaults validate and whose errors are
UserErrors; server state held as attributes (a module and a python int), which the default state_dict
checkpoints; local training as Phases that client_update yields (the simulator runs them, counts their FLOPs,
records their loss and may batch plain ones across clients); payloads as dicts of
tensors (the simulator copies them and counts their bytes); aggregation FLOPs declared shape-determined.
It is not registered with @register: a third-party plugin is found through the `bench.algorithms`
entry point.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from algorithms.base import (Algorithm, Payload, Phase, aggregation_weights, check_aggregation, load_payload,
                             state_payload, weighted_average)
from bench.errors import UserError

PREFIX = "header."


@dataclass
class ExampleHeadAvgHyperparams:
    server_lr: float = 1.0        # step of the global header towards the clients' mean, in (0, 1]
    aggregation: str = "samples"  # "samples" (n_k) or "uniform" weights for the mean

    def validate(self) -> None:
        if not 0 < self.server_lr <= 1:
            raise UserError(f"exampleheadavg.server_lr must be in (0, 1], got {self.server_lr}")
        check_aggregation("exampleheadavg", self.aggregation)


class ExampleHeadAvg(Algorithm):
    name = "exampleheadavg"
    description = "example plugin: private extractors, shared header averaged with a server step size"
    Hyperparams = ExampleHeadAvgHyperparams
    server_flops_by_upload_shapes = True  # the averaging's FLOPs depend only on the uploads' shapes

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        rep_dims = {ctx.representation_dim(arch) for arch in set(ctx.client_archs)}
        if len(rep_dims) > 1:
            raise UserError(f"exampleheadavg shares the header, which needs one representation size across "
                            f"clients; got {sorted(rep_dims)}; use a CNN model group")
        self.rep_dim = rep_dims.pop()

    def init_server(self) -> None:
        self.global_header = nn.Linear(self.rep_dim, self.ctx.num_classes).to(self.ctx.device)
        self.rounds_aggregated = 0  # checkpointed by the default state_dict, like the header

    def init_client(self, client) -> None:
        client.state["model"] = self.ctx.build_model(client.arch)

    def server_payload(self, client, round_index: int) -> Payload:
        return state_payload(self.global_header, PREFIX)

    def client_update(self, client, payload: Payload, round_index: int):
        model = client.state["model"].train()
        load_payload(model.header, payload, PREFIX)
        yield Phase("local", [model], self.ctx.cfg.local_epochs)  # no loss given: CE(model(x), y)
        return state_payload(model.header, PREFIX)

    def aggregate(self, uploads: dict[int, Payload], round_index: int) -> None:
        mean = weighted_average(uploads, aggregation_weights(self.ctx, self.hp.aggregation))
        with torch.no_grad():
            for name, tensor in self.global_header.state_dict().items():
                tensor.lerp_(mean[PREFIX + name], self.hp.server_lr)
        self.rounds_aggregated += 1

    def predict(self, client, x):
        return client.state["model"](x)
