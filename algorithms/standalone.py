"""Standalone: each client trains only its own model with CE; nothing is shared (the lower reference point).
Every sampled client trains E epochs per round and is evaluated with its model after that training."""
from __future__ import annotations

import torch.nn.functional as F

from algorithms.base import Algorithm, Payload


class Standalone(Algorithm):
    name = "standalone"
    display_name, role, table_order, colour = "Standalone", "reference", 80, "#7f7f7f"
    server_flops_by_upload_shapes = True
    description = "each client trains its own model alone; nothing is communicated"

    def init_client(self, client) -> None:
        client.state["model"] = self.ctx.build_model(client.arch)

    def client_update(self, client, payload: Payload, round_index: int) -> Payload:
        model = client.state["model"].train()
        self.ctx.train(client, [model], lambda x, y: F.cross_entropy(model(x), y), self.ctx.cfg.local_epochs,
                       phase="local")
        return {}

    def client_update_many(self, clients, payloads, round_index: int) -> dict[int, Payload]:
        models = [c.state["model"].train() for c in clients]
        self.ctx.train_many(clients, models, self.ctx.cfg.local_epochs, phase="local")
        return {c.id: {} for c in clients}

    def predict(self, client, x):
        """The client's own model, as it stands after its latest local training."""
        return client.state["model"](x)
