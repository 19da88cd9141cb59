"""Mutations of FedSA-LoRA (algorithms/fedsa_lora.py): each must be killed by tests/test_fedsa_lora.py."""
from benchmarks.mutation_check import Mutation

FILE, TESTS = "algorithms/fedsa_lora.py", ("tests/test_fedsa_lora.py",)


def m(name: str, old: str, new: str) -> Mutation:
    return Mutation(name=f"fedsalora: {name}", file=FILE, old=old, new=new, tests=TESTS)


MUTATIONS = [
    m("skip loading the global A", "        load_factors(layers, payload)\n", ""),
    m("upload A and B", 'return factors_payload(layers, parts="A")', "return factors_payload(layers)"),
    m("uniform mean whatever the option", "weights = aggregation_weights(self.ctx, self.hp.aggregation)",
      'weights = aggregation_weights(self.ctx, "uniform")'),
    m("the server keeps its A", "                self.global_a[entry] = sum(", "                _ = sum("),
    m("unnormalised sum", "uploads[c][entry] * (weights[c] / total)", "uploads[c][entry] * weights[c]"),
]
