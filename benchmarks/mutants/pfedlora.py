"""Mutations of pFedLoRA (algorithms/pfedlora.py, models/adapters.py): each breaks one mechanism and must be
caught by tests/test_pfedlora.py. There is no batched path of pFedLoRA's own: the simulator runs its phases
either way (benchmarks/mutants/training.py breaks that shared path)."""
from benchmarks.mutation_check import Mutation

ALGO = "algorithms/pfedlora.py"
ADAPTERS = "models/adapters.py"
TESTS = ("tests/test_pfedlora.py",)

_I = "            "  # the iterative branch's indentation
_PHASE1_NAME = (_I + 'phase1 = "phase1-train-model" + ("-mix" if self.hp.phase1_mix else "")'
                "  # the mix adds F_k's own logits\n")
_PHASE1_CALL = "yield from self.train(client, [model], self.phase1_loss(model, adapter), e_local, phase1, partner=adapter)"
_PHASE2_CALL = ('yield from self.train(client, [adapter], self.loss(model, adapter), e_adapter, "phase2-train-adapter",\n'
                "                                  partner=model)")
_RECORD1 = _I + 'self.record_sampled(client, "acc_phase1_sampled", "eval-phase1")\n'
_RECORD2 = _I + 'self.record_sampled(client, "acc_phase2_sampled", "eval-phase2")\n'
_FREEZE_ADAPTER = _I + "set_trainable(model, True)\n" + _I + "set_trainable(adapter, False)\n"
_FREEZE_MODEL = _I + "set_trainable(model, False)\n" + _I + "set_trainable(adapter, True)\n"
_PHASES = (_FREEZE_ADAPTER + _PHASE1_NAME + _I + _PHASE1_CALL + "\n" + _RECORD1
           + _FREEZE_MODEL + _I + _PHASE2_CALL + "\n" + _RECORD2)
_PHASES_SWAPPED = (_FREEZE_MODEL + _I + _PHASE2_CALL + "\n" + _RECORD1
                   + _FREEZE_ADAPTER + _PHASE1_NAME + _I + _PHASE1_CALL + "\n" + _RECORD2)
_END = ("        set_trainable(model, True)\n        set_trainable(adapter, True)\n"
        "        return state_payload(adapter)\n")


def m(name: str, old: str, new: str, file: str = ALGO) -> Mutation:
    return Mutation(name=f"pfedlora: {name}", file=file, old=old, new=new, tests=TESTS)


MUTATIONS = [
    # the download
    m("client ignores the downloaded global adapter",
      "        load_payload(adapter, payload)  # theta^t, the global adapter\n", ""),
    # phase order and losses
    m("phases swapped (adapter first, then F_k)", _PHASES, _PHASES_SWAPPED),
    m("phase 1 trains F_k on CE(F_k) alone", _PHASE1_CALL,
      "yield from self.train(client, [model], lambda x, y: F.cross_entropy(model(x), y), e_local, phase1)"),
    m("phase 2 trains the adapter on CE(G) alone", _PHASE2_CALL,
      "yield from self.train(client, [adapter], lambda x, y: F.cross_entropy(adapter(x), y), e_adapter, "
      '"phase2-train-adapter")'),
    # what is frozen
    m("phase 1 also trains the adapter",
      "set_trainable(adapter, False)\n" + _PHASE1_NAME + _I + "yield from self.train(client, [model],",
      "set_trainable(adapter, True)\n" + _PHASE1_NAME + _I + "yield from self.train(client, [model, adapter],"),
    m("phase 2 also trains F_k", _FREEZE_MODEL + _I + "yield from self.train(client, [adapter],",
      _I + "set_trainable(model, True)\n" + _I + "set_trainable(adapter, True)\n" + _I
      + "yield from self.train(client, [adapter, model],"),
    m("frozen parts keep requires_grad (their weight gradients are computed, not used)",
      "    module.requires_grad_(trainable)\n", "    module.requires_grad_(True)\n"),
    # phase length
    m("E_adapter taken from E_local",
      "return hp.local_epochs or run_epochs, hp.adapter_epochs or run_epochs",
      "return hp.local_epochs or run_epochs, hp.local_epochs or run_epochs"),
    # the plain phases (the simulator's own loss CE(trainable + partner), batched across clients)
    m("phase1_mix declared a plain phase (the mix dropped)",
      ' and partner is not None and not name.endswith("-mix")', " and partner is not None"),
    m("non-additive placements declared plain phases (CE(F_k(x) + G(x)) for every placement)",
      'plain = self.hp.placement == "model" and partner', "plain = partner"),
    m("persistent_optimizer='shared': clients trained in lockstep (each starts from the same momentum)",
      'self.batchable_clients = hp.persistent_optimizer != "shared"', "self.batchable_clients = True"),
    m("persistent momentum loaded into an optimizer the phase does not use",
      "params, optimizers = phase.optimizers = self.ctx.optimizers_for(trainable)",
      "params, optimizers = self.ctx.optimizers_for(trainable)"),
    # the upload
    m("upload taken before phase 2", _I + _PHASE2_CALL + "\n" + _RECORD2 + _END,
      _I + "upload = {k: v.clone() for k, v in state_payload(adapter).items()}\n" + _I + _PHASE2_CALL + "\n"
      + _RECORD2 + _END.replace("return state_payload(adapter)",
                                'return upload if self.hp.training == "iterative" else state_payload(adapter)')),
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
    m("phase-1 accuracy recorded after phase 2", _RECORD1 + _FREEZE_MODEL + _I + _PHASE2_CALL + "\n",
      _FREEZE_MODEL + _I + _PHASE2_CALL + "\n" + _RECORD1),
    m("phase-2 accuracy recorded under the phase-1 name",
      'self.record_sampled(client, "acc_phase2_sampled", "eval-phase2")',
      'self.record_sampled(client, "acc_phase1_sampled", "eval-phase2")'),
    m("phase-2 accuracy recorded before phase 2", _I + _PHASE2_CALL + "\n" + _RECORD2,
      _RECORD2 + _I + _PHASE2_CALL + "\n"),
    # options
    m("phase1_mix ignored", "        if not mu:\n", "        if True:\n"),
    m("phase1_mix weights swapped",
      "(1 - mu) * F.cross_entropy(both, y) + mu * F.cross_entropy(local, y)",
      "mu * F.cross_entropy(both, y) + (1 - mu) * F.cross_entropy(local, y)"),
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
