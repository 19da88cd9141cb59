"""Mutations of Standalone's mechanisms (benchmarks/mutation_check.py); each must make tests/test_standalone.py fail.
The batched path is shared by every algorithm: its mutations are in benchmarks/mutants/training.py."""
from benchmarks.mutation_check import Mutation

F = "algorithms/standalone.py"
T = ("tests/test_standalone.py",)
_PHASE = '        yield Phase("local", [model], self.ctx.cfg.local_epochs)  # CE(model(x), y)\n'

MUTATIONS = [
    Mutation(name="standalone: uploads its model", file=F,
             old="        return {}\n", new="        return {k: v for k, v in model.state_dict().items()}\n", tests=T),
    Mutation(name="standalone: client loss with label smoothing instead of plain CE", file=F,
             old=_PHASE,
             new="        import torch.nn.functional as F\n"
                 '        yield Phase("local", [model], self.ctx.cfg.local_epochs,\n'
                 "                    loss=lambda x, y: F.cross_entropy(model(x), y, label_smoothing=0.1))\n",
             tests=T),
    Mutation(name="standalone: one extra local epoch", file=F,
             old='[model], self.ctx.cfg.local_epochs)  # CE', new='[model], self.ctx.cfg.local_epochs + 1)  # CE',
             tests=T),
    Mutation(name="standalone: only the header trains", file=F,
             old='Phase("local", [model],', new='Phase("local", [model.header],', tests=T),
    Mutation(name="standalone: no local training (zero epochs)", file=F,
             old='[model], self.ctx.cfg.local_epochs)  # CE', new='[model], 0)  # CE', tests=T),
    Mutation(name="standalone: evaluated with a copy of the model from before training", file=F,
             old='    def client_update(self, client, payload: Payload, round_index: int):\n'
                 '        model = client.state["model"].train()',
             new='    def client_update(self, client, payload: Payload, round_index: int):\n'
                 '        import copy\n        model = copy.deepcopy(client.state["model"]).train()', tests=T),
    Mutation(name="standalone: prediction in training mode", file=F,
             old='        return client.state["model"](x)', new='        return client.state["model"].train()(x)',
             tests=T),
]
