"""Mutations of FLoRA (algorithms/flora.py): each must be killed by tests/test_flora.py."""
from benchmarks.mutation_check import Mutation

FILE, TESTS = "algorithms/flora.py", ("tests/test_flora.py",)


def m(name: str, old: str, new: str) -> Mutation:
    return Mutation(name=f"flora: {name}", file=FILE, old=old, new=new, tests=TESTS)


MUTATIONS = [
    m("skip the merge", "        if payload:\n            self.merge(client, layers, payload)\n", ""),
    m("keep the old LoRA instead of a fresh one", "            layer.reset_lora(self.ctx.generator)", "            pass"),
    m("no p_k weights in the stack", "* (weights[c] / total * self.hp.scaling)", "* self.hp.scaling"),
    m("no LoRA scaling in the stack", "* (weights[c] / total * self.hp.scaling)", "* (weights[c] / total)"),
    m("send only the latest stack", "pending = self.stacks[self.merged_upto[client.id] - self.first_stack:]",
      "pending = self.stacks[-1:]"),
    m("uploaders are not marked up to date", "            self.merged_upto[cid] = self.first_stack + len(self.stacks)\n",
      "            pass\n"),
    m("merge subtracts", "layer.base.weight += payload", "layer.base.weight -= payload"),
    m("uniform p_k whatever the option", "weights = aggregation_weights(self.ctx, self.hp.aggregation)",
      'weights = aggregation_weights(self.ctx, "uniform")'),
]
