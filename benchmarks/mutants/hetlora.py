"""Mutations of HetLoRA (algorithms/hetlora.py): each must be killed by tests/test_hetlora.py."""
from benchmarks.mutation_check import Mutation

FILE, TESTS = "algorithms/hetlora.py", ("tests/test_hetlora.py",)


def m(name: str, old: str, new: str) -> Mutation:
    return Mutation(name=f"hetlora: {name}", file=FILE, old=old, new=new, tests=TESTS)


MUTATIONS = [
    m("download the full-rank global factors", 'out[f"{key}.lora_A"] = self.global_factors[f"{key}.lora_A"][:rank]',
      'out[f"{key}.lora_A"] = self.global_factors[f"{key}.lora_A"]'),
    m("skip loading the download", "        load_factors(layers, payload)\n", ""),
    m("no regulariser in the loss", "return ce + lam * tail_norm(layers, rank, self.hp.prune_gamma) if lam else ce",
      "return ce"),
    m("prune when the tail grew", "return float(tail_norm(layers, rank, self.hp.prune_gamma)) < start",
      "return float(tail_norm(layers, rank, self.hp.prune_gamma)) > start"),
    m("never prune", "if self.hp.self_pruning and rank > 1 and self.tail_decreased(layers, rank, start):",
      "if False:"),
    m("prune without zeroing the pruned ranks", "            prune(layers, rank)\n", ""),
    m("upload at the old rank after pruning", "upload = factors_payload(layers, rank=rank)",
      "upload = factors_payload(layers)"),
    m("uniform weights instead of sparsity", "weights = [float(torch.linalg.matrix_norm(self.hp.scaling * (b @ a))) "
      "for a, b in factors]", "weights = [1.0 for a, b in factors]"),
    m("weights by the norm of A alone", "weights = [float(torch.linalg.matrix_norm(self.hp.scaling * (b @ a))) "
      "for a, b in factors]", "weights = [float(torch.linalg.matrix_norm(a)) for a, b in factors]"),
    m("aggregate B without its weights", "b_new = sum(w * F.pad(b, (0, max_rank - b.shape[1]))",
      "b_new = sum(F.pad(b, (0, max_rank - b.shape[1]))"),
    m("train at the stored rank", "        set_rank(layers, rank)\n", ""),
]
