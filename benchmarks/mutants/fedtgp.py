"""Mutations of FedTGP's mechanisms (benchmarks/mutation_check.py); each must make tests/test_fedtgp.py fail."""
from benchmarks.mutation_check import Mutation

F = "algorithms/fedtgp.py"
T = ("tests/test_fedtgp.py",)

MUTATIONS = [
    Mutation(name="fedtgp: contrastive loss without the margin", file=F,
             old="    dist = dist + margin * F.one_hot(labels, global_protos.shape[0])\n", new="", tests=T),
    Mutation(name="fedtgp: margin subtracted instead of added", file=F,
             old="dist = dist + margin * F.one_hot", new="dist = dist - margin * F.one_hot", tests=T),
    Mutation(name="fedtgp: margin not capped at tau", file=F,
             old="return torch.minimum(gap[held].max(), tau_t)", new="return gap[held].max()", tests=T),
    Mutation(name="fedtgp: one server epoch whatever server_epochs says", file=F,
             old="for _ in range(self.hp.server_epochs):", new="for _ in range(1):", tests=T),
    Mutation(name="fedtgp: server gradient ascent", file=F,
             old="    return F.cross_entropy(-dist, labels)", new="    return -F.cross_entropy(-dist, labels)", tests=T),
    Mutation(name="fedtgp: server lr ignored (run's lr)", file=F,
             old="lr=self.hp.server_lr)", new="lr=self.ctx.cfg.lr)", tests=T),
]
