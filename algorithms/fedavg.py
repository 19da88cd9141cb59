"""FedAvg (McMahan et al. 2017), the model-homogeneous reference: the whole model is averaged.

Round: the server sends the global model; each sampled client loads it, trains it with CE for E epochs and
uploads it; the server's new global model is the weighted average of the uploads (`aggregation`: n_k, as
the paper's Algorithm 1, or uniform). Prediction (`eval_model`): the global model, so every client is
evaluated after each aggregation, or each client's own model after its local training.
"""
from __future__ import annotations

from dataclasses import dataclass

from algorithms.base import (Algorithm, Payload, Phase, aggregation_weights, check_aggregation, load_payload,
                             state_payload, weighted_average)
from bench.errors import UserError


@dataclass
class FedAvgHyperparams:
    # "global": evaluate the aggregated global model on each client's test set (classic FedAvg);
    # "local": evaluate each client's model after its own local training (FedAvg + local fine-tuning).
    eval_model: str = "global"
    aggregation: str = "samples"  # weights of the average: "samples" = n_k (SPEC, the paper), "uniform" = 1 each

    def validate(self) -> None:
        if self.eval_model not in ("global", "local"):
            raise UserError(f"fedavg.eval_model must be 'global' or 'local', got {self.eval_model!r}")
        check_aggregation("fedavg", self.aggregation)


class FedAvg(Algorithm):
    name = "fedavg"
    display_name, role, table_order, colour = "FedAvg", "reference", 90, "#bcbd22"
    server_flops_by_upload_shapes = True
    description = "whole-model averaging; model-homogeneous groups only"
    Hyperparams = FedAvgHyperparams
    homogeneous_only = True
    # Both references match the SPEC defaults (algorithms/README.md): the authors released no code and the
    # paper's Algorithm 1 weights by n_k; HtFLlib has no FedAvg (its sibling PFLlib weights by n_k and
    # evaluates the global model).
    profiles = {"official": {}, "htfllib": {}}

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        self.prediction_uses_server_state = hp.eval_model == "global"

    def init_client(self, client) -> None:
        client.state["model"] = self.ctx.build_model(client.arch)

    def init_server(self) -> None:
        self.global_model = self.ctx.build_model(self.ctx.client_archs[0])

    def server_payload(self, client, round_index: int) -> Payload:
        return state_payload(self.global_model)

    def client_update(self, client, payload: Payload, round_index: int):
        model = client.state["model"].train()
        load_payload(model, payload)  # the global model
        yield Phase("local", [model], self.ctx.cfg.local_epochs)  # CE(model(x), y)
        return state_payload(model)

    def aggregate(self, uploads: dict[int, Payload], round_index: int) -> None:
        load_payload(self.global_model, weighted_average(uploads, aggregation_weights(self.ctx, self.hp.aggregation)))

    def predict(self, client, x):
        return (self.global_model if self.hp.eval_model == "global" else client.state["model"])(x)
