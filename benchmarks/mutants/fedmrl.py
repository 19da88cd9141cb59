"""Mutations of FedMRL's mechanisms (benchmarks/mutation_check.py); each must make tests/test_fedmrl.py fail."""
from benchmarks.mutation_check import Mutation

F = "algorithms/fedmrl.py"
T = ("tests/test_fedmrl.py",)

MUTATIONS = [
    Mutation(name="fedmrl: coarse slice taken from the end of r", file=F,
             old="small.header(r[:, :d1])", new="small.header(r[:, -d1:])", tests=T),
    Mutation(name="fedmrl: fused inputs in the other order ([F_ex, G_ex])", file=F,
             old="torch.cat([small.extractor(x), model.extractor(x)], dim=1)",
             new="torch.cat([model.extractor(x), small.extractor(x)], dim=1)", tests=T),
    Mutation(name="fedmrl: m1 and m2 swapped", file=F,
             old="d1, m1, m2 = self.hp.homo_rep_dim, self.hp.m1, self.hp.m2",
             new="d1, m2, m1 = self.hp.homo_rep_dim, self.hp.m1, self.hp.m2", tests=T),
    Mutation(name="fedmrl: upload is the local model", file=F,
             old="        return state_payload(self.shared(small))\n\n    def aggregate",
             new="        return state_payload(model)\n\n    def aggregate", tests=T),
    Mutation(name="fedmrl: upload excludes the shared extractor (header only)", file=F,
             old="return small if self.hp.share == \"model\" else small.extractor",
             new="return small.header if self.hp.share == \"model\" else small.extractor", tests=T),
    Mutation(name="fedmrl: projector not trained", file=F,
             old='Phase("matryoshka", [model, small, projector],', new='Phase("matryoshka", [model, small],', tests=T),
]
