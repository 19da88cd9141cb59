"""Hand computations shared by the mechanism tests: a tiny model put in place of the model zoo (flatten ->
linear -> BatchNorm -> ReLU -> header) and its forward pass, loss, SGD step, clipping, class means and
evaluation written with plain torch ops, so a test's expected values never come from the code under test."""
from __future__ import annotations

import torch
from torch import nn

import bench.context as context
from models.cnn import SplitModel

REP = 6  # the tiny model's representation size
BN_EPS, BN_MOMENTUM = 1e-5, 0.1  # BatchNorm1d's defaults


class Tiny(SplitModel):
    """x -> ReLU(BN(W x + b)) -> header (without BN when batchnorm=False: batched training needs no buffers)."""

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 32, batchnorm: bool = True):
        super().__init__()
        norm = [nn.BatchNorm1d(REP)] if batchnorm else []
        self.extractor = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, REP),
                                       *norm, nn.ReLU())
        self.header = nn.Linear(REP, num_classes)


def use_tiny(monkeypatch, batchnorm: bool = True) -> None:
    """Every model the simulator builds from now on (in this test) is a Tiny."""
    monkeypatch.setattr(context, "build_model", lambda arch, k, c=3, s=32: Tiny(k, c, s, batchnorm))


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def pre_bn(p, x):
    return x.reshape(len(x), -1) @ p["extractor.1.weight"].T + p["extractor.1.bias"]


def features(p, x, bn_mode: str = "eval"):
    """The tiny extractor by hand; BatchNorm with the batch's statistics ("train") or the running ones."""
    h = pre_bn(p, x)
    if "extractor.2.running_mean" not in p:
        return h.clamp_min(0)
    if bn_mode == "train":
        mean, var = h.mean(0), h.var(0, unbiased=False)
    else:
        mean, var = p["extractor.2.running_mean"], p["extractor.2.running_var"]
    h = (h - mean) / torch.sqrt(var + BN_EPS) * p["extractor.2.weight"] + p["extractor.2.bias"]
    return h.clamp_min(0)


def logits(p, x, bn_mode: str = "eval"):
    return features(p, x, bn_mode) @ p["header.weight"].T + p["header.bias"]


def cross_entropy(z, y, reduction="mean"):
    per_sample = torch.logsumexp(z, 1) - z[torch.arange(len(y)), y]
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


def sgd_step(p, names, loss_fn, lr, weight_decay, clip, buffers=None, momentum=0.0):
    """One SGD step on p[names]: gradient of loss_fn, global-norm clipping (clip > 0), weight decay, momentum
    (buffers: the previous step's, None for a fresh optimizer). Returns (new p, new buffers)."""
    leaves = {k: p[k].clone().requires_grad_(True) for k in names}
    grads = torch.autograd.grad(loss_fn({**p, **leaves}), [leaves[k] for k in names])
    coef = 1.0
    if clip > 0:
        norm = float(torch.sqrt(sum((g ** 2).sum() for g in grads)))
        coef = min(1.0, clip / (norm + 1e-6))
    steps = [coef * g + weight_decay * p[k] for k, g in zip(names, grads)]
    if buffers is not None:
        steps = [momentum * b + s for b, s in zip(buffers, steps)]
    return {**p, **{k: p[k] - lr * s for k, s in zip(names, steps)}}, steps


def trainable(p) -> list[str]:
    return [k for k in p if "running_" not in k and "num_batches" not in k]


def client_step(p, x, y, cfg):
    """One local step of a client (fresh SGD, whole model, CE, BatchNorm in train mode), with the running
    statistics that step's forward leaves."""
    new, _ = sgd_step(p, trainable(p), lambda q: cross_entropy(logits(q, x, "train"), y), cfg.lr, cfg.weight_decay,
                      cfg.grad_clip)
    if "extractor.2.running_mean" in p:
        h = pre_bn(p, x)
        new["extractor.2.running_mean"] = ((1 - BN_MOMENTUM) * p["extractor.2.running_mean"]
                                           + BN_MOMENTUM * h.mean(0))
        new["extractor.2.running_var"] = ((1 - BN_MOMENTUM) * p["extractor.2.running_var"]
                                          + BN_MOMENTUM * h.var(0, unbiased=True))
        new["extractor.2.num_batches_tracked"] = p["extractor.2.num_batches_tracked"] + 1
    return new


def with_header(p, header):
    return {**p, "header.weight": header["weight"], "header.bias": header["bias"]}


def class_means(h, y):
    """(sorted classes present in y, the mean row of h for each)."""
    classes = torch.unique(y)
    return classes, torch.stack([h[y == c].mean(0) for c in classes])


def record_train_batches(monkeypatch, data):
    """Spy on data.train_batches: a list with one list of (x, y) batches per call."""
    calls = []
    original = data.train_batches

    def spy(idx, batch_size, generator):
        batches = []
        calls.append(batches)
        for x, y in original(idx, batch_size, generator):
            batches.append((x.clone(), y.clone()))
            yield x, y

    monkeypatch.setattr(data, "train_batches", spy)
    return calls


def evaluation_by_hand(sim, client, p):
    """(correct, summed CE) of the tiny model p in eval mode on the client's test split."""
    idx = client.split.test
    x, y = sim.ctx.data.normalise(sim.ctx.data.x_test[idx]), sim.ctx.data.y_test[idx]
    z = logits(p, x, "eval")
    return int((z.argmax(1) == y).sum()), float(cross_entropy(z, y, "sum"))


def clipped(grads, max_norm):
    """Gradient-norm clipping of one group, as torch's clip_grad_norm_ does it."""
    if max_norm <= 0:
        return list(grads)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return [g * torch.clamp(max_norm / (norm + 1e-6), max=1.0) for g in grads]
