"""Mutations of FedProto's mechanisms (benchmarks/mutation_check.py); each must make tests/test_fedproto.py fail."""
from benchmarks.mutation_check import Mutation

F = "algorithms/fedproto.py"
T = ("tests/test_fedproto.py",)

MUTATIONS = [
    Mutation(name="fedproto: server mean weighted by the clients' n_k", file=F,
             old="            sums.index_add_(0, classes, uploads[cid][\"protos\"].float())\n"
                 "            counts.index_add_(0, classes, torch.ones(len(classes), device=self.ctx.device))",
             new="            n_k = float(self.ctx.client_weights[cid])\n"
                 "            sums.index_add_(0, classes, n_k * uploads[cid][\"protos\"].float())\n"
                 "            counts.index_add_(0, classes, n_k * torch.ones(len(classes), device=self.ctx.device))",
             tests=T),
    Mutation(name="fedproto: distance term dropped", file=F,
             old="return ce + lam * F.mse_loss(h, target)", new="return ce", tests=T),
    Mutation(name="fedproto: distance term sign flipped", file=F,
             old="return ce + lam * F.mse_loss(h, target)", new="return ce - lam * F.mse_loss(h, target)", tests=T),
    Mutation(name="fedproto: lam ignored (weight 1)", file=F,
             old="return ce + lam * F.mse_loss(h, target)", new="return ce + F.mse_loss(h, target)", tests=T),
    Mutation(name="fedproto: prototypes taken before local training", file=F,
             old="        if targets is None and recorder is None:\n            yield Phase(\"local-ce\"",
             new="        before = exact_class_means(self.ctx, client, model.extractor, self.dim, self.name)\n"
                 "        if recorder is None:\n            return {\"protos\": before[1], "
                 "\"classes\": before[0].to(class_id_dtype(self.ctx.num_classes))}\n"
                 "        if targets is None and recorder is None:\n            yield Phase(\"local-ce\"", tests=T),
    Mutation(name="fedproto: prototypes taken from the model in training mode", file=F,
             old="    training = extractor.training\n    extractor.eval()\n",
             new="    training = extractor.training\n", tests=T),
]
