"""Mutations of FedDistill (algorithms/feddistill.py): each must be killed by tests/test_feddistill.py."""
from benchmarks.mutation_check import Mutation

FILE, TESTS = "algorithms/feddistill.py", ("tests/test_feddistill.py",)


def m(name: str, old: str, new: str) -> Mutation:
    return Mutation(name=f"feddistill: {name}", file=FILE, old=old, new=new, tests=TESTS)


MUTATIONS = [
    # client loss
    m("drop the distillation term", "loss = loss + hp.lam * distillation_term(",
      "loss = loss + 0.0 * distillation_term("),
    m("ignore lambda", "loss = loss + hp.lam * distillation_term(", "loss = loss + distillation_term("),
    m("subtract the distillation term", "loss = loss + hp.lam * distillation_term(",
      "loss = loss - hp.lam * distillation_term("),
    m("drop the CE term", "loss = F.cross_entropy(logits, y)", "loss = 0.0 * F.cross_entropy(logits, y)"),
    m("target is the next class's logit", "targets[y], logits.detach())",
      "targets[(y + 1) % len(targets)], logits.detach())"),
    m("classes without a global logit distil towards zeros", "has = valid[y]", "has = torch.ones_like(valid[y])"),
    m("own-logit target not detached", "targets[y], logits.detach())", "targets[y], logits)"),
    m("KL in the reverse direction", "F.kl_div(F.log_softmax(logits, dim=1), F.softmax(target, dim=1)",
      "F.kl_div(F.log_softmax(target, dim=1), F.softmax(logits, dim=1)"),
    m("MSE summed over the logits", "(logits - target).pow(2).mean(dim=1)", "(logits - target).pow(2).sum(dim=1)"),
    m("ce with the wrong sign", "per_sample = -(target * F.log_softmax(logits, dim=1))",
      "per_sample = (target * F.log_softmax(logits, dim=1))"),
    m("ce on softmaxed targets (HtFLlib before 2025-11)", "per_sample = -(target * F.log_softmax(logits, dim=1))",
      "per_sample = -(F.softmax(target, dim=1) * F.log_softmax(logits, dim=1))"),
    m("batch normalisation divides by the distilled samples", "return per_sample.sum() / len(y)",
      "return per_sample.sum() / has.sum().clamp(min=1)"),
    m("distilled normalisation divides by the batch", "return (per_sample * mask).sum() / mask.sum().clamp(min=1.0)",
      "return (per_sample * mask).sum() / len(y)"),
    m("never skip the term", "distil = hp.lam > 0 and needed", "distil = hp.lam > 0"),
    m("train a fresh model, not the client's", 'model = client.state["model"].train()',
      "model = self.ctx.build_model(client.arch).train()"),
    # the upload
    m("upload logit sums, not means", "means = sums / counts.clamp(min=1.0).unsqueeze(1)", "means = sums"),
    m("record nothing in the last epoch (off by one)", "first_recorded = (epochs - 1) * math.ceil(",
      "first_recorded = epochs * math.ceil("),
    m("last-epoch records every epoch", "first_recorded = (epochs - 1) * math.ceil(",
      "first_recorded = 0 * math.ceil("),
    m("upload a row for every class", "for cls in counts.nonzero().flatten().tolist()}", "for cls in range(c)}"),
    # the server
    m("server sums instead of averaging", "torch.stack(vecs).mean(dim=0) if vecs",
      "torch.stack(vecs).sum(dim=0) if vecs"),
    m("server takes the first holder only", "torch.stack(vecs).mean(dim=0) if vecs", "vecs[0] if vecs"),
    m("exclude_own ignored", "exclude = client.id if self.hp.exclude_own else None", "exclude = None"),
    m("own logit always excluded", "exclude = client.id if self.hp.exclude_own else None", "exclude = client.id"),
    m("round aggregation keeps every client's latest", "                self.contributions[cls] = by_client\n",
      "                self.contributions.setdefault(cls, {}).update(by_client)\n"),
    m("latest aggregation ignored", 'if self.hp.aggregation == "latest":', "if False:"),
    m("fresh aggregation keeps old classes", 'if self.hp.aggregation == "fresh":', "if False:"),
    # profiles
    m("official profile keeps the own logit", '"official": {"exclude_own": True, "distance": "kl"}',
      '"official": {"distance": "kl"}'),
    m("htfllib profile keeps old classes", '"htfllib": {"distance": "kl", "aggregation": "fresh"}',
      '"htfllib": {"distance": "kl"}'),
    m("htfllib profile takes HtFLlib HEAD's unbounded CE", '"htfllib": {"distance": "kl", "aggregation": "fresh"}',
      '"htfllib": {"distance": "ce", "aggregation": "fresh"}'),
]
