"""Mutations of FedAvg's mechanisms (benchmarks/mutation_check.py); each must make tests/test_fedavg.py fail.
The batched path is shared by every algorithm: its mutations are in benchmarks/mutants/training.py."""
from benchmarks.mutation_check import Mutation

F = "algorithms/fedavg.py"
T = ("tests/test_fedavg.py",)
_PHASE = '        yield Phase("local", [model], self.ctx.cfg.local_epochs)  # CE(model(x), y)\n'

MUTATIONS = [
    Mutation(name="fedavg: skip loading the downloaded global model", file=F,
             old="        load_payload(model, payload)  # the global model\n", new="", tests=T),
    Mutation(name="fedavg: client loss with label smoothing instead of plain CE", file=F,
             old=_PHASE,
             new="        import torch.nn.functional as F\n"
                 '        yield Phase("local", [model], self.ctx.cfg.local_epochs,\n'
                 "                    loss=lambda x, y: F.cross_entropy(model(x), y, label_smoothing=0.1))\n",
             tests=T),
    Mutation(name="fedavg: one extra local epoch", file=F,
             old='[model], self.ctx.cfg.local_epochs)  # CE', new='[model], self.ctx.cfg.local_epochs + 1)  # CE',
             tests=T),
    Mutation(name="fedavg: client trains only the header", file=F,
             old='Phase("local", [model],', new='Phase("local", [model.header],', tests=T),
    Mutation(name="fedavg: client uploads only its header", file=F,
             old="        return state_payload(model)\n",
             new='        return state_payload(model.header, "header.")\n', tests=T),
    Mutation(name="fedavg: always n_k-weighted (aggregation ignored)", file=F,
             old="aggregation_weights(self.ctx, self.hp.aggregation)", new="self.ctx.client_weights", tests=T),
    Mutation(name="fedavg: always uniform (aggregation ignored)", file=F,
             old="aggregation_weights(self.ctx, self.hp.aggregation)", new='aggregation_weights(self.ctx, "uniform")',
             tests=T),
    Mutation(name="fedavg: uniform by default", file=F,
             old='    aggregation: str = "samples"', new='    aggregation: str = "uniform"', tests=T),
    Mutation(name="fedavg: the average is not loaded into the global model", file=F,
             old="load_payload(self.global_model, weighted_average(",
             new="(self.global_model, weighted_average(", tests=T),
    Mutation(name="fedavg: 'global' evaluates each client's local model", file=F,
             old='(self.global_model if self.hp.eval_model == "global" else client.state["model"])',
             new='client.state["model"]', tests=T),
    Mutation(name="fedavg: 'local' evaluates the global model", file=F,
             old='(self.global_model if self.hp.eval_model == "global" else client.state["model"])',
             new="self.global_model", tests=T),
    Mutation(name="fedavg: prediction in training mode", file=F,
             old='client.state["model"])(x)', new='client.state["model"]).train()(x)', tests=T),
    Mutation(name="fedavg: 'global' evaluates only the sampled clients", file=F,
             old='self.prediction_uses_server_state = hp.eval_model == "global"',
             new="self.prediction_uses_server_state = False", tests=T),
    Mutation(name="fedavg: homogeneous groups not required", file=F,
             old="    homogeneous_only = True", new="    homogeneous_only = False", tests=T),
]
