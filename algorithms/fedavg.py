"""FedAvg (McMahan et al. 2017), the model-homogeneous reference: the whole model is averaged."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from algorithms.base import Algorithm, Payload, load_payload, state_payload, weighted_average
from bench.errors import UserError
from bench.registry import register


@dataclass
class FedAvgHyperparams:
    # "global": evaluate the aggregated global model on each client's test set (classic FedAvg);
    # "local": evaluate each client's model after its own local training (FedAvg + local fine-tuning).
    eval_model: str = "global"

    def validate(self) -> None:
        if self.eval_model not in ("global", "local"):
            raise UserError(f"fedavg.eval_model must be 'global' or 'local', got {self.eval_model!r}")


@register
class FedAvg(Algorithm):
    name = "fedavg"
    server_flops_by_upload_shapes = True
    description = "whole-model averaging; model-homogeneous groups only"
    Hyperparams = FedAvgHyperparams
    homogeneous_only = True

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        self.prediction_uses_server_state = hp.eval_model == "global"

    def init_client(self, client) -> None:
        client.state["model"] = self.ctx.build_model(client.arch)

    def init_server(self) -> None:
        self.global_model = self.ctx.build_model(self.ctx.client_archs[0])

    def server_payload(self, client, round_index: int) -> Payload:
        return state_payload(self.global_model)

    def client_update(self, client, payload: Payload, round_index: int) -> Payload:
        model = client.state["model"].train()
        load_payload(model, payload)
        self.ctx.train(client, [model], lambda x, y: F.cross_entropy(model(x), y), self.ctx.cfg.local_epochs,
                       phase="local")
        return state_payload(model)

    def client_update_many(self, clients, payloads, round_index: int) -> dict[int, Payload]:
        models = [c.state["model"].train() for c in clients]
        for c, model in zip(clients, models):
            load_payload(model, payloads[c.id])
        self.ctx.train_many(clients, models, self.ctx.cfg.local_epochs, phase="local")
        return {c.id: state_payload(model) for c, model in zip(clients, models)}

    def aggregate(self, uploads: dict[int, Payload], round_index: int) -> None:
        load_payload(self.global_model, weighted_average(uploads, self.ctx.client_weights))

    def predict(self, client, x):
        model = self.global_model if self.hp.eval_model == "global" else client.state["model"]
        return model.eval()(x)
