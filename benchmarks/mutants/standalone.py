"""Mutations of Standalone's mechanisms (benchmarks/mutation_check.py); each must make tests/test_standalone.py fail."""
from benchmarks.mutation_check import Mutation

F = "algorithms/standalone.py"
T = ("tests/test_standalone.py",)

MUTATIONS = [
    Mutation(name="standalone: uploads its model", file=F,
             old="        return {}\n", new="        return {k: v for k, v in model.state_dict().items()}\n", tests=T),
    Mutation(name="standalone: batched path uploads its models", file=F,
             old="return {c.id: {} for c in clients}",
             new="return {c.id: dict(c.state['model'].state_dict()) for c in clients}", tests=T),
    Mutation(name="standalone: client loss with label smoothing instead of plain CE", file=F,
             old="lambda x, y: F.cross_entropy(model(x), y)",
             new="lambda x, y: F.cross_entropy(model(x), y, label_smoothing=0.1)", tests=T),
    Mutation(name="standalone: one extra local epoch", file=F,
             old="F.cross_entropy(model(x), y), self.ctx.cfg.local_epochs,",
             new="F.cross_entropy(model(x), y), self.ctx.cfg.local_epochs + 1,", tests=T),
    Mutation(name="standalone: only the header trains", file=F,
             old="self.ctx.train(client, [model],", new="self.ctx.train(client, [model.header],", tests=T),
    Mutation(name="standalone: batched path skips local training", file=F,
             old='self.ctx.train_many(clients, models, self.ctx.cfg.local_epochs, phase="local")',
             new='self.ctx.train_many(clients, models, 0, phase="local")', tests=T),
    Mutation(name="standalone: evaluated with a copy of the model from before training", file=F,
             old='    def client_update(self, client, payload: Payload, round_index: int) -> Payload:\n'
                 '        model = client.state["model"].train()',
             new='    def client_update(self, client, payload: Payload, round_index: int) -> Payload:\n'
                 '        import copy\n        model = copy.deepcopy(client.state["model"]).train()', tests=T),
    Mutation(name="standalone: prediction in training mode", file=F,
             old='        return client.state["model"](x)', new='        return client.state["model"].train()(x)',
             tests=T),
]
