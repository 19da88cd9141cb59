"""Mutations of LG-FedAvg (algorithms/lgfedavg.py): each must be killed by tests/test_lgfedavg.py."""
from benchmarks.mutation_check import Mutation

FILE, TESTS = "algorithms/lgfedavg.py", ("tests/test_lgfedavg.py",)


def m(name: str, old: str, new: str) -> Mutation:
    return Mutation(name=f"lgfedavg: {name}", file=FILE, old=old, new=new, tests=TESTS)


MUTATIONS = [
    m("skip loading the downloaded header",
      "        if payload:\n            load_payload(model.header, payload, PREFIX)\n", ""),
    m("train the header only", 'Phase("local", [model],', 'Phase("local", [model.header],'),
    m("train the extractor only", 'Phase("local", [model],', 'Phase("local", [model.extractor],'),
    m("upload the whole model", "        return state_payload(model.header, PREFIX)\n",
      "        return state_payload(model, PREFIX)\n"),
    m("upload the downloaded header, not the trained one", "        return state_payload(model.header, PREFIX)\n",
      "        return dict(payload) or state_payload(model.header, PREFIX)\n"),
    m("uniform average whatever the option", "weights = aggregation_weights(self.ctx, self.hp.aggregation)",
      'weights = aggregation_weights(self.ctx, "uniform")'),
    m("n_k-weighted average whatever the option", "weights = aggregation_weights(self.ctx, self.hp.aggregation)",
      "weights = self.ctx.client_weights"),
    m("aggregate into the first uploader's header, not the server's",
      "load_payload(self.global_header, weighted_average(uploads, weights), PREFIX)",
      "load_payload(self.global_header, next(iter(uploads.values())), PREFIX)"),
    m("round 0 sends nothing with a server-initialised header", 'self.has_global = self.hp.header_init == "server"',
      "self.has_global = False"),
    m("eval_header global does not broadcast",
      "self.broadcast_after_aggregation = self.prediction_uses_server_state = hp.eval_header == \"global\"",
      "self.prediction_uses_server_state = hp.eval_header == \"global\""),
    m("eval_header global evaluates only the sampled clients",
      "self.broadcast_after_aggregation = self.prediction_uses_server_state = hp.eval_header == \"global\"",
      "self.broadcast_after_aggregation = hp.eval_header == \"global\""),
    m("clients ignore the broadcast header", "        load_payload(client.state[\"model\"].header, payload, PREFIX)\n",
      "        pass\n"),
    m("broadcast the header with eval_header local too",
      'return state_payload(self.global_header, PREFIX) if self.hp.eval_header == "global" else None',
      "return state_payload(self.global_header, PREFIX)"),
    m("download the header again after a broadcast", "if not self.has_global or self.all_hold_global:",
      "if not self.has_global:"),
    m("never download after round 0", 'self.all_hold_global = self.hp.eval_header == "global"',
      "self.all_hold_global = True"),
    m("predict with the global header (eval_header local)", "        return client.state[\"model\"](x)\n",
      "        return self.global_header(client.state[\"model\"].extractor(x))\n"),
    m("official profile averages by n_k", '"official": {"eval_header": "global", "aggregation": "uniform"}',
      '"official": {"eval_header": "global"}'),
    m("htfllib profile evaluates the local header", '"htfllib": {"eval_header": "global"}', '"htfllib": {}'),
]
