"""LG-FedAvg (Liang et al. 2020): only the header (fc3, the one layer of equal shape in CNN-1..5) is
federated; the feature extractor stays private.

Round: the server sends the global header; the client loads it into its model, trains the whole model with
CE for E epochs and uploads its header; the server takes the n_k-weighted average (option: uniform). By
default the global header is a freshly initialised Linear(rep_dim, classes) sent from round 0, so every
client starts from the same header (option header_init="local": round 0 sends nothing).

Prediction, `eval_header`:
- "local" (SPEC default): the client's own model, i.e. its private extractor and the header it trained
  last; only the sampled clients change, so only they are re-evaluated.
- "global" (the official code and HtFLlib): after aggregation the server sends the new header to EVERY
  client, which loads it, and every client is evaluated with it. (Both codes send the header to all
  clients at the start of the next round and evaluate there: the same models.) A client then already holds
  the current header at the start of a round, so the round's download is empty from round 1 on.

Payloads: the header's weight and bias, keys "header.weight" and "header.bias",
4 x (rep_dim x classes + classes) bytes each way (4 x 5,010 for the CNNs on 10 classes); with
eval_header="global" that many bytes to each of the N clients after every aggregation.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from algorithms.base import (Algorithm, Payload, Phase, aggregation_weights, check_aggregation, load_payload,
                             state_payload, weighted_average)
from bench.errors import UserError

PREFIX = "header."
HEADER_INITS = ("server", "local")
EVAL_HEADERS = ("local", "global")


@dataclass
class LGFedAvgHyperparams:
    # Where the shared header starts: "server" = the server initialises a global header and sends it from
    # round 0, so all clients start alike; "local" = nothing is sent in round 0 (0 bytes), each client trains
    # its own randomly initialised header and the first aggregate defines the global one.
    header_init: str = "server"
    aggregation: str = "samples"  # server average of the headers: "samples" (n_k, SPEC) or "uniform"
    # Which header a client is evaluated with: "local" = the one it trained last (SPEC); "global" = the new
    # global header, broadcast to every client after aggregation (official code, HtFLlib).
    eval_header: str = "local"

    def validate(self) -> None:
        if self.header_init not in HEADER_INITS:
            raise UserError(f"lgfedavg.header_init must be one of {', '.join(HEADER_INITS)}, "
                            f"got {self.header_init!r}")
        check_aggregation("lgfedavg", self.aggregation)
        if self.eval_header not in EVAL_HEADERS:
            raise UserError(f"lgfedavg.eval_header must be one of {', '.join(EVAL_HEADERS)}, "
                            f"got {self.eval_header!r}")


class LGFedAvg(Algorithm):
    name = "lgfedavg"
    display_name, role, table_order, colour = "LG-FedAvg", "baseline", 40, "#9467bd"
    server_flops_by_upload_shapes = True
    description = "local representations, global header: only the classifier layer fc3 is averaged"
    Hyperparams = LGFedAvgHyperparams
    profiles = {
        "official": {"eval_header": "global", "aggregation": "uniform"},
        "htfllib": {"eval_header": "global"},  # HtFLlib weights LG-FedAvg's average by n_k
    }

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        rep_dims = {ctx.representation_dim(arch) for arch in set(ctx.client_archs)}
        if len(rep_dims) > 1:
            raise UserError(f"lgfedavg shares the header, which needs one representation size across clients; "
                            f"got {sorted(rep_dims)}; use a CNN model group")
        self.rep_dim = rep_dims.pop()
        # "global": every client receives the new header after aggregation and is evaluated with it.
        self.broadcast_after_aggregation = self.prediction_uses_server_state = hp.eval_header == "global"

    def init_server(self) -> None:
        self.global_header = nn.Linear(self.rep_dim, self.ctx.num_classes).to(self.ctx.device)
        self.has_global = self.hp.header_init == "server"
        self.all_hold_global = False  # set once a broadcast has given every client the current header

    def init_client(self, client) -> None:
        client.state["model"] = self.ctx.build_model(client.arch)

    def server_payload(self, client, round_index: int) -> Payload:
        if not self.has_global or self.all_hold_global:
            return {}
        return state_payload(self.global_header, PREFIX)

    def client_update(self, client, payload: Payload, round_index: int):
        model = client.state["model"].train()
        if payload:
            load_payload(model.header, payload, PREFIX)
        yield Phase("local", [model], self.ctx.cfg.local_epochs)  # CE(model(x), y)
        return state_payload(model.header, PREFIX)

    def aggregate(self, uploads: dict[int, Payload], round_index: int) -> None:
        weights = aggregation_weights(self.ctx, self.hp.aggregation)
        load_payload(self.global_header, weighted_average(uploads, weights), PREFIX)
        self.has_global = True
        self.all_hold_global = self.hp.eval_header == "global"

    def after_aggregation_payload(self, client, round_index: int) -> Payload | None:
        return state_payload(self.global_header, PREFIX) if self.hp.eval_header == "global" else None

    def receive_after_aggregation(self, client, payload: Payload, round_index: int) -> None:
        load_payload(client.state["model"].header, payload, PREFIX)

    def predict(self, client, x):
        return client.state["model"](x)
