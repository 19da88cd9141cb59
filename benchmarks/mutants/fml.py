"""Mutations of FML (algorithms/fml.py): each must be killed by tests/test_fml.py."""
from benchmarks.mutation_check import Mutation

FILE, TESTS = "algorithms/fml.py", ("tests/test_fml.py",)
UPLOAD = "{name: tensor.clone() for name, tensor in state_payload(meme).items()}"


def m(name: str, old: str, new: str, file: str = FILE) -> Mutation:
    return Mutation(name=f"fml: {name}", file=file, old=old, new=new, tests=TESTS)


KL_FILE = "algorithms/base.py"  # kl_to, shared with FedKD and FedAPEN


MUTATIONS = [
    m("drop the KL term of L_P", "(1 - alpha) * kl_to(p, m, detach, reduction)",
      "0.0 * kl_to(p, m, detach, reduction)"),
    m("drop the KL term of L_M", "(1 - beta) * kl_to(m, p, detach, reduction)", "0.0 * kl_to(m, p, detach, reduction)"),
    m("drop the CE weight alpha", "alpha * F.cross_entropy(p, y)", "F.cross_entropy(p, y)"),
    m("swap alpha and beta", "y, hp.alpha, hp.beta, hp.detach_teacher", "y, hp.beta, hp.alpha, hp.detach_teacher"),
    m("L_P distils from itself instead of M", "kl_to(p, m, detach, reduction)", "kl_to(p, p, detach, reduction)"),
    m("KL in the reverse direction (KL(student || teacher))",
      "kl = F.kl_div(F.log_softmax(student_logits, dim=1), teacher.detach() if detach else teacher,",
      "kl = F.kl_div(F.log_softmax(teacher_logits.detach() if detach else teacher_logits, dim=1), "
      "F.softmax(student_logits, dim=1),", KL_FILE),
    m("KL reduction sum instead of batchmean", 'reduction="batchmean")\n', 'reduction="sum")\n', KL_FILE),
    m("KL reduction mean (batch x classes) by default", 'if reduction == "mean" else kl', "if True else kl", KL_FILE),
    m("teacher not detached", "teacher.detach() if detach else teacher", "teacher", KL_FILE),
    m("teacher always detached (option ignored)", "teacher.detach() if detach else teacher", "teacher.detach()",
      KL_FILE),
    m("subtract L_M from L_P", "return loss_p + loss_m", "return loss_p - loss_m"),
    m("skip loading the downloaded meme", "            load_payload(meme, payload)\n", ""),
    m("upload the downloaded meme, not the trained one", UPLOAD, "dict(payload)"),
    m("upload the working meme's own tensors (the next client's training changes them)", UPLOAD,
      "state_payload(meme)"),
    m("train the private model only", "[private, meme], self.ctx.cfg.local_epochs, loss=loss_fn",
      "[private], self.ctx.cfg.local_epochs, loss=loss_fn"),
    m("one optimizer and one clipping for both models", "[private, meme], self.ctx.cfg.local_epochs, loss=loss_fn",
      "[[private, meme]], self.ctx.cfg.local_epochs, loss=loss_fn"),
    m("clients share one working meme (a spare one is not taken out of the pool)",
      "return self.spare_memes.pop()", "return self.spare_memes[0]"),
    m("a missing working meme is built (draws from the RNG) instead of copied",
      "return copy.deepcopy(self.global_meme)", "return self.new_meme()"),
    m("the working meme is not given back to the pool", "                self.spare_memes.append(meme)\n",
      "                pass\n"),
    m("the pool of working memes is checkpointed", '    checkpoint_exclude = ("spare_memes", "spare_lock")',
      "    checkpoint_exclude = ()"),
    m("server sends a working meme", "return state_payload(self.global_meme)",
      "return state_payload(self.spare_memes[0])"),
    m("uniform average whatever the option", "aggregation_weights(self.ctx, self.hp.aggregation)",
      'aggregation_weights(self.ctx, "uniform")'),
    m("n_k-weighted average whatever the option", "aggregation_weights(self.ctx, self.hp.aggregation)",
      "self.ctx.client_weights"),
    m("aggregate into a working meme", "load_payload(self.global_meme, weighted_average",
      "load_payload(self.spare_memes[0], weighted_average"),
    m("predict with a working meme", "        return client.state[\"model\"](x)\n",
      "        return self.spare_memes[0](x)\n"),
    m("predict with the sum of private model and meme", "        return client.state[\"model\"](x)\n",
      "        return client.state[\"model\"](x) + self.global_meme(x)\n"),
    m("htfllib profile keeps the teachers detached", '"detach_teacher": False, ', ""),
    m("official profile averages by n_k", '"official": {"aggregation": "uniform"}', '"official": {}'),
]
