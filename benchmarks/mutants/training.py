"""Mutations of the one local-training path every algorithm shares: the Phase contract (algorithms/base.py),
the sequential and batched phase runners and the lockstep driver (bench/training.py), and the simulator's
choice of lockstep (bench/simulator.py). Each must make the listed tests fail; tests/test_training.py drives
the path with small plugin algorithms and checks it against hand computations."""
from benchmarks.mutation_check import Mutation

BASE, TRAINING, SIMULATOR = "algorithms/base.py", "bench/training.py", "bench/simulator.py"
T = "tests/test_training.py"


def m(name: str, file: str, old: str, new: str, *tests: str) -> Mutation:
    return Mutation(name=f"training: {name}", file=file, old=old, new=new, tests=(T, *tests))


MUTATIONS = [
    # ---- the Phase contract (algorithms/base.py) ----
    m("plain loss with label smoothing", BASE,
      "return lambda x, y: F.cross_entropy(model(x), y)\n",
      "return lambda x, y: F.cross_entropy(model(x), y, label_smoothing=0.1)\n", "tests/test_standalone.py"),
    m("plain loss ignores the partner's logits", BASE,
      "F.cross_entropy(model(x) + partner(x), y)", "F.cross_entropy(model(x), y)", "tests/test_pfedlora.py"),
    m("a phase with its own loss counts as plain (batched with the plain CE)", BASE,
      "return (self.loss is None and self.indices", "return (self.indices", "tests/test_pfedlora.py"),
    m("a phase with its own indices counts as plain (batched over the whole split)", BASE,
      "self.loss is None and self.indices is None and self.optimizers", "self.loss is None and self.optimizers"),
    m("a phase with its own optimizers counts as plain (batched with fresh SGD)", BASE,
      "and self.optimizers is None\n", "\n", "tests/test_pfedlora.py"),
    # ---- the sequential runner ----
    m("a phase's own optimizers ignored", TRAINING,
      "params, optimizers = phase.optimizers if phase.optimizers is not None else ctx.optimizers_for(phase.trainable)",
      "params, optimizers = ctx.optimizers_for(phase.trainable)", "tests/test_pfedlora.py"),
    m("a phase's indices ignored (the client's whole split)", TRAINING,
      "idx = client.split.train if phase.indices is None else phase.indices", "idx = client.split.train",
      "tests/test_fedapen.py"),
    m("a phase's mean loss not weighted by batch size", TRAINING,
      "loss_sum += loss.detach() * len(y)\n            seen += len(y)",
      "loss_sum += loss.detach()\n            seen += 1"),
    # ---- the lockstep driver ----
    m("the lockstep driver sends every client the first client's loss", TRAINING,
      "_advance(running, pending, out, cid, losses[cid])",
      "_advance(running, pending, out, cid, losses[next(iter(phases))])"),
    m("a phase's loss not reported (no non-finite check, no record)", TRAINING,
      "            out.losses.append((cid, phase.name, losses[cid]))\n", ""),
    m("final_loss taken from the first phase", TRAINING,
      "out.final_loss[cid] = losses[cid]", "out.final_loss.setdefault(cid, losses[cid])"),
    m("the upload a client_update returns is dropped", TRAINING,
      "out.uploads[cid] = done.value if done.value is not None else {}", "out.uploads[cid] = {}",
      "tests/test_fedavg.py"),
    # ---- grouping plain phases (bench/training.py _run_phases) ----
    m("plain phases grouped across different phase names", TRAINING,
      "key = (phase.name, type(model), signature, phase.partner is None)",
      "key = (type(model), signature, phase.partner is None)"),
    m("plain phases grouped with and without a partner", TRAINING,
      "key = (phase.name, type(model), signature, phase.partner is None)",
      "key = (phase.name, type(model), signature)"),
    m("plain phases grouped across different frozen parameters", TRAINING,
      "signature = tuple((n, tuple(p.shape), p.requires_grad) for n, p in model.named_parameters())",
      "signature = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())"),
    # ---- the batched runner ----
    m("batched group skips local training", TRAINING,
      "found = _train_together(ctx, group_clients, group_phases)",
      "found = {c.id: torch.zeros((), device=ctx.device) for c in group_clients}",
      "tests/test_standalone.py", "tests/test_fedavg.py"),
    m("batched group trains one epoch whatever the phases' epochs", TRAINING,
      "steps = [p.epochs * math.ceil(c.num_train / ctx.cfg.batch_size)",
      "steps = [math.ceil(c.num_train / ctx.cfg.batch_size)"),
    m("batched group ignores the partner's logits", TRAINING,
      "    if phases[0].partner is not None:\n        extra = lambda", "    if False:\n        extra = lambda",
      "tests/test_batched.py"),
    m("batched FLOPs credited to the wrong client", TRAINING,
      '            with ctx.accountant.count("train", key, client.id):',
      '            with ctx.accountant.count("train", key, 0):'),
    m("batched FLOPs miss the partner's forward", TRAINING,
      "    if partner is not None:\n        logits = logits + copy.deepcopy(partner)",
      "    if False:\n        logits = logits + copy.deepcopy(partner)", "tests/test_batched.py"),
    # ---- the simulator's cohorts ----
    m("clients that share state (batchable_clients = False) trained in lockstep", SIMULATOR,
      "together = self.cfg.batched_training and self.algo.batchable_clients",
      "together = self.cfg.batched_training", "tests/test_fml.py", "tests/test_batched.py"),
]
