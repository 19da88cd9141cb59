"""Mutations of pFedLoRA (algorithms/pfedlora.py, models/adapters.py): each breaks one mechanism and must be
caught by tests/test_pfedlora.py."""
from benchmarks.mutation_check import Mutation

ALGO = "algorithms/pfedlora.py"
ADAPTERS = "models/adapters.py"
TESTS = ("tests/test_pfedlora.py",)

_PHASES = '''            set_trainable(model, True)
            set_trainable(adapter, False)
            phase1 = "phase1-train-model" + ("-mix" if self.hp.phase1_mix else "")  # the mix adds F_k's own logits
            self.train(client, [model], self.phase1_loss(model, adapter), e_local, phase1)
            self.record_sampled(client, "acc_phase1_sampled", "eval-phase1")
            set_trainable(model, False)
            set_trainable(adapter, True)
            self.train(client, [adapter], self.loss(model, adapter), e_adapter, "phase2-train-adapter")
            self.record_sampled(client, "acc_phase2_sampled", "eval-phase2")
'''
_PHASES_SWAPPED = '''            set_trainable(model, False)
            set_trainable(adapter, True)
            self.train(client, [adapter], self.loss(model, adapter), e_adapter, "phase2-train-adapter")
            self.record_sampled(client, "acc_phase1_sampled", "eval-phase1")
            set_trainable(model, True)
            set_trainable(adapter, False)
            phase1 = "phase1-train-model" + ("-mix" if self.hp.phase1_mix else "")  # the mix adds F_k's own logits
            self.train(client, [model], self.phase1_loss(model, adapter), e_local, phase1)
            self.record_sampled(client, "acc_phase2_sampled", "eval-phase2")
'''
_BATCHED_PHASES = '''        for model, adapter in zip(models, adapters):
            set_trainable(model, True)
            set_trainable(adapter, False)
        self.ctx.train_many(clients, models, e_local, "phase1-train-model", partners=adapters)
'''
_BATCHED_SWAPPED = '''        for model, adapter in zip(models, adapters):
            set_trainable(model, False)
            set_trainable(adapter, True)
        self.ctx.train_many(clients, adapters, e_adapter, "phase2-train-adapter", partners=models)
        for model, adapter in zip(models, adapters):
            set_trainable(model, True)
            set_trainable(adapter, False)
        self.ctx.train_many(clients, models, e_local, "phase1-train-model", partners=adapters)
'''
_PHASE2_CALL = 'self.train(client, [adapter], self.loss(model, adapter), e_adapter, "phase2-train-adapter")'


def m(name: str, old: str, new: str, file: str = ALGO) -> Mutation:
    return Mutation(name=f"pfedlora: {name}", file=file, old=old, new=new, tests=TESTS)


MUTATIONS = [
    # the download
    m("client ignores the downloaded global adapter",
      "        load_payload(adapter, payload)  # theta^t, the global adapter\n", ""),
    m("batched: client ignores the downloaded global adapter",
      "            load_payload(adapter, payloads[c.id])\n", "            pass\n"),
    # phase order and losses
    m("phases swapped (adapter first, then F_k)", _PHASES, _PHASES_SWAPPED),
    m("batched: phases swapped (adapter first, then F_k)",
      _BATCHED_PHASES + '''        for c in clients:
            self.record_sampled(c, "acc_phase1_sampled", "eval-phase1")
        for model, adapter in zip(models, adapters):
            set_trainable(model, False)
            set_trainable(adapter, True)
        self.ctx.train_many(clients, adapters, e_adapter, "phase2-train-adapter", partners=models)
''', _BATCHED_SWAPPED + '''        for c in clients:
            self.record_sampled(c, "acc_phase1_sampled", "eval-phase1")
'''),
    m("phase 1 trains F_k on CE(F_k) alone",
      "self.train(client, [model], self.phase1_loss(model, adapter), e_local, phase1)",
      "self.train(client, [model], lambda x, y: F.cross_entropy(model(x), y), e_local, phase1)"),
    m("phase 2 trains the adapter on CE(G) alone", _PHASE2_CALL,
      'self.train(client, [adapter], lambda x, y: F.cross_entropy(adapter(x), y), e_adapter, "phase2-train-adapter")'),
    # what is frozen
    m("phase 1 also trains the adapter",
      "set_trainable(adapter, False)\n" + _PHASES.splitlines(keepends=True)[2] + "            self.train(client, [model],",
      "set_trainable(adapter, True)\n" + _PHASES.splitlines(keepends=True)[2] + "            self.train(client, [model, adapter],"),
    m("phase 2 also trains F_k",
      "            set_trainable(model, False)\n            set_trainable(adapter, True)\n            self.train(client, [adapter],",
      "            set_trainable(model, True)\n            set_trainable(adapter, True)\n            self.train(client, [adapter, model],"),
    m("frozen parts keep requires_grad (their weight gradients are computed, not used)",
      "    module.requires_grad_(trainable)\n", "    module.requires_grad_(True)\n"),
    # phase length
    m("E_adapter taken from E_local",
      "return hp.local_epochs or run_epochs, hp.adapter_epochs or run_epochs",
      "return hp.local_epochs or run_epochs, hp.local_epochs or run_epochs"),
    # the upload
    m("upload taken before phase 2", _PHASE2_CALL,
      "upload = {k: v.clone() for k, v in state_payload(adapter).items()}; " + _PHASE2_CALL + "; return upload"),
    m("batched: upload the downloaded adapter, not the trained one",
      "return {c.id: state_payload(adapter) for c, adapter in zip(clients, adapters)}",
      "return {c.id: payloads[c.id] for c in clients}"),
    m("upload F_k instead of the adapter", "        return state_payload(adapter)\n\n    def train",
      "        return state_payload(model)\n\n    def train"),
    m("client keeps the downloaded adapter for itself, not its trained one",
      "        return state_payload(adapter)\n\n    def train",
      "        upload = {k: v.clone() for k, v in state_payload(adapter).items()}\n"
      "        load_payload(adapter, payload)\n        return upload\n\n    def train"),
    # aggregation
    m("aggregation ignores the option (always n_k-weighted)",
      "weights = aggregation_weights(self.ctx, self.hp.aggregation)", "weights = self.ctx.client_weights"),
    m("aggregation always uniform",
      "weights = aggregation_weights(self.ctx, self.hp.aggregation)",
      'weights = aggregation_weights(self.ctx, "uniform")'),
    # prediction and evaluation
    m("prediction through the global adapter",
      'return personalised_logits(client.state["model"], client.state["adapter"], x)',
      'return personalised_logits(client.state["model"], self.global_adapter, x)'),
    m("inference='local' ignored", 'if self.hp.inference == "local":', "if False:"),
    m("phase-1 accuracy recorded after phase 2",
      '''            self.record_sampled(client, "acc_phase1_sampled", "eval-phase1")
            set_trainable(model, False)
            set_trainable(adapter, True)
            ''' + _PHASE2_CALL + "\n",
      '''            set_trainable(model, False)
            set_trainable(adapter, True)
            ''' + _PHASE2_CALL + '''
            self.record_sampled(client, "acc_phase1_sampled", "eval-phase1")
'''),
    m("phase-2 accuracy recorded under the phase-1 name",
      'self.record_sampled(client, "acc_phase2_sampled", "eval-phase2")',
      'self.record_sampled(client, "acc_phase1_sampled", "eval-phase2")'),
    m("batched: phase-2 accuracy recorded before phase 2",
      '''        self.ctx.train_many(clients, adapters, e_adapter, "phase2-train-adapter", partners=models)
        for c in clients:
            self.record_sampled(c, "acc_phase2_sampled", "eval-phase2")
''', '''        for c in clients:
            self.record_sampled(c, "acc_phase2_sampled", "eval-phase2")
        self.ctx.train_many(clients, adapters, e_adapter, "phase2-train-adapter", partners=models)
'''),
    # options
    m("phase1_mix ignored", "        if not mu:\n", "        if True:\n"),
    m("phase1_mix weights swapped",
      "(1 - mu) * F.cross_entropy(both, y) + mu * F.cross_entropy(local, y)",
      "mu * F.cross_entropy(both, y) + (1 - mu) * F.cross_entropy(local, y)"),
    m("batched path does not fall back for phase1_mix", "hp.phase1_mix > 0,", "False,"),
    m("batched path does not fall back for persistent_optimizer",
      'hp.persistent_optimizer != "none")', "False)"),
    m("persistent momentum not loaded", 'opt.state[p]["momentum_buffer"] = buf.view_as(p).clone()', "pass"),
    m("persistent momentum not kept",
      'momentum = torch.cat([opt.state[p]["momentum_buffer"].flatten() for p in kept])',
      "momentum = torch.zeros_like(momentum)"),
    m("joint training trains F_k only",
      'self.train(client, [model, adapter], self.loss(model, adapter), e_local, "joint")',
      'self.train(client, [model], self.loss(model, adapter), e_local, "joint")'),
    m("joint training clips F_k and the adapter together",
      'self.train(client, [model, adapter], self.loss(model, adapter), e_local, "joint")',
      'self.train(client, [[model, adapter]], self.loss(model, adapter), e_local, "joint")'),
    # the adapter (models/adapters.py)
    m("B not zero at init", "        nn.init.zeros_(self.B.weight)\n", "", ADAPTERS),
    m("B's bias not zero at init", "            nn.init.zeros_(self.B.bias)\n", "            pass\n", ADAPTERS),
    m("header-lora A with a bias", "self.A = nn.Linear(rep_dim, rank, bias=False)",
      "self.A = nn.Linear(rep_dim, rank, bias=True)", ADAPTERS),
    m("nonlinearity between A and B", "return self.B(self.A(self.trunk(inputs)))",
      "return self.B(torch.relu(self.A(self.trunk(inputs))))", ADAPTERS),
    m("model placement: G subtracted", "        return model(x) + adapter(x)\n",
      "        return model(x) - adapter(x)\n", ADAPTERS),
    m("representation placement: F_k's representation dropped",
      "return model.header(model.extractor(x) + adapter(x))", "return model.header(adapter(x))", ADAPTERS),
    m("header-lora: G subtracted", "    return model.header(h) + adapter(h)\n",
      "    return model.header(h) - adapter(h)\n", ADAPTERS),
    m("phase1_mix pair: the local logits include G", "        return local, local + adapter(x)\n",
      "        return local + adapter(x), local + adapter(x)\n", ADAPTERS),
    m("phase1_mix pair (representation): the sum misses F_k's representation",
      "        return local, model.header(h + adapter(x))\n", "        return local, model.header(adapter(x))\n",
      ADAPTERS),
]
