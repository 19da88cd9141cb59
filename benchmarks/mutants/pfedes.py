"""Mutations of pFedES's mechanisms (benchmarks/mutation_check.py); each must make tests/test_pfedes.py fail."""
from benchmarks.mutation_check import Mutation

F = "algorithms/pfedes.py"
T = ("tests/test_pfedes.py",)

MUTATIONS = [
    Mutation(name="pfedes: proxy trainable in phase 1", file=F,
             old="        set_trainable(proxy, False)\n        set_trainable(model, True)\n        yield Phase(\"phase1-train-model\", [model],",
             new="        set_trainable(proxy, True)\n        set_trainable(model, True)\n        yield Phase(\"phase1-train-model\", [model, proxy],",
             tests=T),
    Mutation(name="pfedes: mu ignored (fixed 0.5)", file=F,
             old="        mu = self.hp.mu\n", new="        mu = 0.5\n", tests=T),
    Mutation(name="pfedes: phases swapped (proxy trained first)", file=F,
             old="        set_trainable(proxy, False)\n        set_trainable(model, True)\n"
                 "        yield Phase(\"phase1-train-model\", [model], epochs, loss=self.phase1_loss(model, proxy))\n"
                 "        set_trainable(model, False)\n        set_trainable(proxy, True)\n"
                 "        yield from self.train_proxy(model, proxy, epochs + self.hp.proxy_extra_epochs)\n",
             new="        set_trainable(model, False)\n        set_trainable(proxy, True)\n"
                 "        yield from self.train_proxy(model, proxy, epochs + self.hp.proxy_extra_epochs)\n"
                 "        set_trainable(proxy, False)\n        set_trainable(model, True)\n"
                 "        yield Phase(\"phase1-train-model\", [model], epochs, loss=self.phase1_loss(model, proxy))\n",
             tests=T),
    Mutation(name="pfedes: upload is the local model", file=F,
             old="        set_trainable(model, True)\n        return state_payload(proxy)",
             new="        set_trainable(model, True)\n        return state_payload(model)", tests=T),
    Mutation(name="pfedes: downloaded proxy not loaded", file=F,
             old="        load_payload(proxy, payload)\n", new="", tests=T),
    Mutation(name="pfedes: phase 2 ignores proxy_extra_epochs", file=F,
             old="epochs + self.hp.proxy_extra_epochs)", new="epochs)", tests=T),
]
