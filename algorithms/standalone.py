"""Standalone: each client trains only its own model with CE; nothing is shared (the lower reference point).
Every sampled client trains E epochs per round and is evaluated with its model after that training."""
from __future__ import annotations

from algorithms.base import Algorithm, Payload, Phase


class Standalone(Algorithm):
    name = "standalone"
    display_name, role, table_order, colour = "Standalone", "reference", 80, "#7f7f7f"
    server_flops_by_upload_shapes = True
    description = "each client trains its own model alone; nothing is communicated"

    def init_client(self, client) -> None:
        client.state["model"] = self.ctx.build_model(client.arch)

    def client_update(self, client, payload: Payload, round_index: int):
        model = client.state["model"].train()
        yield Phase("local", [model], self.ctx.cfg.local_epochs)  # CE(model(x), y)
        return {}

    def predict(self, client, x):
        """The client's own model, as it stands after its latest local training."""
        return client.state["model"](x)
