"""Mutations of algorithms/fedapen.py that tests/test_fedapen.py must kill."""
from benchmarks.mutation_check import Mutation

F = "algorithms/fedapen.py"
T = ("tests/test_fedapen.py",)


def m(name: str, old: str, new: str) -> Mutation:
    return Mutation(name=f"fedapen: {name}", file=F, old=old, new=new, tests=T)


MUTATIONS = [
    # ---- the losses ----
    m("drop CE from the private model's loss",
      "loss_p = F.cross_entropy(p, y) + kl_to(p, s)", "loss_p = kl_to(p, s)"),
    m("drop KL from the private model's loss",
      "loss_p = F.cross_entropy(p, y) + kl_to(p, s) + ", "loss_p = F.cross_entropy(p, y) + "),
    m("drop the ensemble term from the private model's loss",
      " + mixture_loss(p, s.detach(), lam, y, mix)", ""),
    m("drop CE from the shared model's loss",
      "loss_s = F.cross_entropy(s, y) + kl_to(s, p)", "loss_s = kl_to(s, p)"),
    m("drop KL from the shared model's loss",
      "loss_s = F.cross_entropy(s, y) + kl_to(s, p) + ", "loss_s = F.cross_entropy(s, y) + "),
    m("drop the ensemble term from the shared model's loss",
      " + mixture_loss(p.detach(), s, lam, y, mix)", ""),
    m("ensemble term of L_S lets its gradient into P",
      "mixture_loss(p.detach(), s, lam, y, mix)", "mixture_loss(p, s, lam, y, mix)"),
    m("KL targets not detached", "+ kl_to(p, s) +", "+ kl_to(p, s, detach=False) +"),
    m("KL reduction mean instead of batchmean", "+ kl_to(p, s) +", '+ kl_to(p, s, reduction="mean") +'),
    m("training with lambda frozen at 0.5",
      '        lam = client.state["lambda"].detach()\n        mix = self.hp.mix',
      '        lam = torch.tensor(0.5)\n        mix = self.hp.mix'),
    m("lambda and 1 - lambda swapped in the logit mixture",
      "        return F.cross_entropy(lam * p + (1 - lam) * s, y)",
      "        return F.cross_entropy((1 - lam) * p + lam * s, y)"),
    m("P and S share one optimizer (one clipping group)",
      '[private, shared], self.ctx.cfg.local_epochs,', '[[private, shared]], self.ctx.cfg.local_epochs,'),
    m("local training on the whole train split (held-out samples included)",
      "loss=self.loss_fn(client), indices=train_part)", "loss=self.loss_fn(client))"),
    # ---- lambda learning ----
    m("lambda never learned",
      '        client.state["lambda"] = lam.detach()', "        pass"),
    m("lambda gradient step with the wrong sign",
      "lam = (lam.detach() - self.hp.lambda_lr * grad).clamp_(0.0, 1.0)",
      "lam = (lam.detach() + self.hp.lambda_lr * grad).clamp_(0.0, 1.0)"),
    m("lambda not clipped to [0, 1]",
      "lam = (lam.detach() - self.hp.lambda_lr * grad).clamp_(0.0, 1.0)",
      "lam = lam.detach() - self.hp.lambda_lr * grad"),
    m("lambda clipped only after the last step",
      "                lam = (lam.detach() - self.hp.lambda_lr * grad).clamp_(0.0, 1.0)\n"
      "        client.state[\"lambda\"] = lam.detach()",
      "                lam = lam.detach() - self.hp.lambda_lr * grad\n"
      "        client.state[\"lambda\"] = lam.detach().clamp(0.0, 1.0)"),
    m("lambda learning rate fixed at 1e-3",
      "lam = (lam.detach() - self.hp.lambda_lr * grad)", "lam = (lam.detach() - 1e-3 * grad)"),
    m("one lambda pass more",
      "for _ in range(self.hp.lambda_epochs):", "for _ in range(self.hp.lambda_epochs + 1):"),
    m("one step per pass (last batch only)",
      "            for p, s, y in outputs:\n", "            for p, s, y in outputs[-1:]:\n"),
    m("lambda learned on the training part instead of the held-out split",
      "held_out = self.splits[client.id][1].to(self.ctx.device)",
      "held_out = self.splits[client.id][0].to(self.ctx.device)"),
    m("lambda learned before the new S is loaded",
      '        load_payload(client.state["shared"], payload)\n        self.learn_lambda(client)',
      '        self.learn_lambda(client)\n        load_payload(client.state["shared"], payload)'),
    m("new S not loaded after aggregation",
      '        load_payload(client.state["shared"], payload)\n        self.learn_lambda(client)',
      "        self.learn_lambda(client)"),
    # ---- server ----
    m("server averages with n_k whatever aggregation says",
      "weighted_average(uploads, aggregation_weights(self.ctx, self.hp.aggregation))",
      "weighted_average(uploads, self.ctx.client_weights)"),
    m("server averages uniformly whatever aggregation says",
      "weighted_average(uploads, aggregation_weights(self.ctx, self.hp.aggregation))",
      'weighted_average(uploads, aggregation_weights(self.ctx, "uniform"))'),
    m("upload loaded into S is skipped at the start of the round",
      "        if payload:\n            load_payload(shared, payload)", "        pass"),
    # ---- prediction ----
    m("prediction ignores lambda (plain sum)",
      "            return lam * p + (1 - lam) * s", "            return p + s"),
    m("prediction by the private model only",
      "            return lam * p + (1 - lam) * s", "            return p"),
    # ---- split and profiles ----
    m("no held-out split (everything held out except one)",
      "held = 0 if n < 2 else min(max(1, round(fraction * n)), n - 1)", "held = n - 1"),
    m("official profile keeps n_k weights",
      'profiles = {"official": {"aggregation": "uniform"}}', 'profiles = {"official": {}}'),
]
