"""FedKD (Wu et al. 2022, Nature Communications): adaptive mutual distillation between the private mentor T
and a small shared mentee S, with SVD-compressed mentee updates in both directions.

Per step (SPEC section 2), with z the logits, h the representations and W a learnable map kept on the client:
    L_T = CE_T + [KL(p_S || p_T) + MSE(h_T, W h_S)] / (CE_T + CE_S)
    L_S = CE_S + [KL(p_T || p_S) + MSE(h_T, W h_S)] / (CE_T + CE_S)
T, S and W each have their own optimizer (the run's SGD settings). The upload is the mentee UPDATE (after
training minus the global mentee received), every weight matrix truncated by SVD to the smallest rank
whose squared singular values reach the fraction T(t) = T_start + (t+1)/R (T_end - T_start) of the energy.
The server reconstructs the uploads, averages them (n_k weights; `aggregation="uniform"`: the plain mean,
as the original code and HtFLlib), compresses the average the same way, applies that *compressed* update to
its global mentee and broadcasts it; clients apply it to their copy, so the server's global mentee and every
synchronised client copy stay bit-identical.

Design decisions (each a Hyperparams field where it is a choice):
- Divisor: the original code (wuch15/FedKD, model_bert.py) does NOT detach (CE_T + CE_S); default
  `detach_divisor=False` follows it, True treats the divisor as a constant weight.
- Targets: SPEC writes separate losses per model, so by default each model's loss sees the other model's
  outputs detached (`detach_targets=True`; W is trained by both MSE terms). False backpropagates the
  sum L_T + L_S through everything, like the original code's single summed loss.
- KL reduction: "batchmean" (the true KL per sample); "mean" is torch's KLDivLoss() default that the
  original code uses (divides by the number of classes as well). MSE is the element mean (nn.MSELoss).
- Hidden-state map: `hidden_map="learned"` is SPEC's W; "identity" compares h_T and h_S directly, as the
  original code does (its 768x768 maps are built but never applied).
- Compression: conv kernels are reshaped to (out, in*kh*kw) (`conv_svd="kernel"`: HtFLlib's SVD of every
  kh x kw slice, one rank pooled over the slices); tensors with fewer than 2 dimensions (biases) are sent
  dense; a factor pair ("name.U" = U_r diag(s_r), m x r, and "name.V" = V_r^T, r x n) is only sent when it
  is smaller than the matrix, else the matrix goes dense, untruncated (`dense_fallback=False`: always the
  truncated factors, as the original code and HtFLlib). Non-floating buffers (e.g. BatchNorm's
  num_batches_tracked, for torchvision mentees) are not federated. Payload bytes are the tensors sent.
- `compress_target="weights"` (HtFLlib): the client uploads its compressed mentee weights, the server
  averages their reconstructions, compresses the average and that reconstruction becomes the global
  mentee ("w/..." download keys, to any client not holding it, when smaller than the dense model).
- Downloads: a client that holds the previous global version gets the compressed aggregate of the last
  round ("d0/..." keys). Round 0, a client never sampled before, or one whose missed compressed
  aggregates together cost at least the dense model gets the full global mentee ("full/..." keys)
  once; a client that missed a few rounds gets the missed compressed aggregates in order ("d0/", "d1/",
  ...) when they are smaller than the dense model.
- After uploading, the client's mentee is reset to the global version it received (FedKD's mentee is
  the shared model; the locally trained one is only used for its update).
- Costs: the client's SVDs and reconstructions count as its training FLOPs, the server's as server
  FLOPs; SVD is counted with the formula registered below (FlopCounterMode does not count it).
- Reference profiles (`official`, `htfllib`): the option values in `FedKD.profiles`; /tmp/fidelity/fedkd.md
  gives the lines of each code they reproduce and what is deliberately not reproduced.
Inference: the mentor T.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.base import (KL_REDUCTIONS, Algorithm, Payload, Phase, aggregation_weights, check_aggregation, kl_to,
                             weighted_average)
from bench.accounting import EXTRA_FLOP_FORMULAS, payload_bytes
from bench.errors import UserError
from models.groups import ARCHITECTURES


# ---- SVD flop formula ----------------------------------------------------------------------------------
def svd_flops(a_shape, full_matrices=False, compute_uv=True, driver=None, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of aten._linalg_svd on a (..., m, n) input: Golub & Van Loan (Matrix Computations, 3rd ed.,
    Fig. 5.4.1), R-SVD, with m >= n (the transpose otherwise): singular values only 2mn^2 + 2n^3; thin
    U_1, S, V 6mn^2 + 20n^3; full U, S, V 4m^2 n + 22n^3. Times the batch size.
    The defaults are the op schema's: FlopCounterMode passes on only the arguments that differ from them
    (a thin SVD arrives as the shape alone)."""
    *batch, m, n = a_shape
    big, small = max(m, n), min(m, n)
    if not compute_uv:
        per = 2 * big * small**2 + 2 * small**3
    elif full_matrices:
        per = 4 * big**2 * small + 22 * small**3
    else:
        per = 6 * big * small**2 + 20 * small**3
    count = 1
    for b in batch:
        count *= b
    return int(count * per)


EXTRA_FLOP_FORMULAS[torch.ops.aten._linalg_svd] = svd_flops


# ---- compression -----------------------------------------------------------------------------------------
def energy_threshold(round_index: int, rounds: int, start: float, end: float, offset: int = 1) -> float:
    """T(t) = T_start + (t+offset)/R (T_end - T_start), t the 0-based round (offset 1: SPEC)."""
    return start + (round_index + offset) / rounds * (end - start)


def truncation_rank(singular_values: torch.Tensor, threshold: float) -> int:
    """Smallest r with sum_{i<r} s_i^2 >= threshold * sum_i s_i^2 (at least 1, at most len(s))."""
    energy = singular_values.double() ** 2
    cum = torch.cumsum(energy, 0)
    r = int((cum < threshold * cum[-1]).sum()) + 1
    return min(max(r, 1), singular_values.numel())


def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.linalg.svd(full_matrices=False) on the matrix's device. On CPU it runs single-threaded: MKL's
    threaded gesdd slows down by 10-100x when the cores are shared with other work, and for matrices of
    this size (at most a few thousand per side) one thread is as fast as several on an idle machine."""
    if matrix.device.type != "cpu":
        return torch.linalg.svd(matrix, full_matrices=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    finally:
        torch.set_num_threads(threads)


def svd_factors(matrix: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r diag(s_r), V_r^T) of an (m, n) matrix, r = truncation_rank(s, threshold)."""
    u, s, vh = thin_svd(matrix)
    r = truncation_rank(s, threshold)
    return (u[:, :r] * s[:r]).contiguous(), vh[:r].contiguous()


def kernel_factors(kernel: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """HtFLlib's conv compression: the SVD of every kh x kw slice of an (out, in, kh, kw) kernel, all cut
    to one rank r chosen from the energy pooled over the slices. Returns (U diag(s), V^T), (..., kh, r) and
    (..., r, kw)."""
    u, s, vh = thin_svd(kernel)
    pooled = s.reshape(-1, s.shape[-1]).double().pow(2).sum(0).sqrt()
    r = truncation_rank(pooled, threshold)
    return (u[..., :r] * s[..., None, :r]).contiguous(), vh[..., :r, :].contiguous()


def compress(update: Mapping[str, torch.Tensor], threshold: float, conv_svd: str = "matrix",
             dense_fallback: bool = True) -> Payload:
    """SVD-truncate every tensor with >= 2 dimensions (as an (out, rest) matrix, or per kernel slice); with
    dense_fallback a factor pair replaces the dense matrix only when it is smaller. Returns the payload sent."""
    out: Payload = {}
    for name, tensor in update.items():
        if tensor.dim() >= 2:
            if tensor.dim() > 2 and conv_svd == "kernel":
                u, v = kernel_factors(tensor, threshold)
            else:
                u, v = svd_factors(tensor.reshape(tensor.shape[0], -1), threshold)
            if not dense_fallback or u.numel() + v.numel() < tensor.numel():
                out[name + ".U"], out[name + ".V"] = u, v
                continue
        out[name] = tensor.detach().clone()
    return out


def decompress(payload: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size], prefix: str = "") -> Payload:
    """The dense tensors of a compressed payload (`shapes`: name -> shape of every federated tensor)."""
    out: Payload = {}
    for name, shape in shapes.items():
        key = prefix + name
        if key in payload:
            out[name] = payload[key]
        else:
            out[name] = (payload[key + ".U"] @ payload[key + ".V"]).reshape(shape)
    return out


# ---- the algorithm ---------------------------------------------------------------------------------------
@dataclass
class FedKDHyperparams:
    mentee_arch: str = "cnn5"       # the shared mentee S
    energy_start: float = 0.95      # T_start
    energy_end: float = 0.98        # T_end
    detach_divisor: bool = False    # False: gradient flows through (CE_T + CE_S), as in the original code
    detach_targets: bool = True     # True: each model's loss sees the other's outputs detached (SPEC's per-model losses)
    kl_reduction: str = "batchmean" # batchmean (true KL) | mean (torch KLDivLoss() default, the original code)
    divisor_floor: float = 1e-8     # (CE_T + CE_S) is clamped below at this, so the terms stay finite
    hidden_map: str = "learned"     # learned: MSE(h_T, W h_S) (SPEC) | identity: MSE(h_T, h_S) (official code)
    aggregation: str = "samples"    # samples: n_k-weighted average (SPEC) | uniform (official code, HtFLlib)
    compress_target: str = "update" # update: compress the mentee update (SPEC, official) | weights: its weights (HtFLlib)
    energy_round_offset: int = 1    # T(t) = T_start + (t + offset)/R (T_end - T_start); 0: HtFLlib (round 0 at T_start)
    conv_svd: str = "matrix"        # matrix: kernel as (out, in*kh*kw) | kernel: per kh x kw slice, pooled rank (HtFLlib)
    dense_fallback: bool = True     # dense, untruncated where factors are larger; False: always factors (official, HtFLlib)

    def validate(self) -> None:
        if self.mentee_arch not in ARCHITECTURES:
            raise UserError(f"fedkd.mentee_arch must be one of {', '.join(ARCHITECTURES)}, got {self.mentee_arch!r}")
        if not (0 < self.energy_start <= 1 and 0 < self.energy_end <= 1):
            raise UserError(f"fedkd.energy_start/energy_end must be in (0, 1], got {self.energy_start}, {self.energy_end}")
        if self.kl_reduction not in KL_REDUCTIONS:
            raise UserError(f"fedkd.kl_reduction must be 'batchmean' or 'mean', got {self.kl_reduction!r}")
        if self.divisor_floor < 0:
            raise UserError(f"fedkd.divisor_floor must be >= 0, got {self.divisor_floor}")
        if self.hidden_map not in ("learned", "identity"):
            raise UserError(f"fedkd.hidden_map must be 'learned' or 'identity', got {self.hidden_map!r}")
        check_aggregation("fedkd", self.aggregation)
        if self.compress_target not in ("update", "weights"):
            raise UserError(f"fedkd.compress_target must be 'update' or 'weights', got {self.compress_target!r}")
        if self.energy_round_offset not in (0, 1):
            raise UserError(f"fedkd.energy_round_offset must be 0 or 1, got {self.energy_round_offset}")
        if self.conv_svd not in ("matrix", "kernel"):
            raise UserError(f"fedkd.conv_svd must be 'matrix' or 'kernel', got {self.conv_svd!r}")


class FedKD(Algorithm):
    name = "fedkd"
    display_name, role, table_order, colour = "FedKD", "baseline", 30, "#2ca02c"
    description = "private mentor + shared mentee by adaptive mutual distillation; SVD-compressed mentee updates"
    Hyperparams = FedKDHyperparams
    # wuch15/FedKD run.py + model_bert.py and HtFLlib clientkd.py/serverkd.py (/tmp/fidelity/fedkd.md).
    profiles = {
        "official": {"aggregation": "uniform", "kl_reduction": "mean", "detach_targets": False,
                     "hidden_map": "identity", "dense_fallback": False},
        "htfllib": {"aggregation": "uniform", "kl_reduction": "mean", "detach_targets": False,
                    "compress_target": "weights", "energy_round_offset": 0, "conv_svd": "kernel",
                    "dense_fallback": False},
    }

    def __init__(self, ctx, hp):
        super().__init__(ctx, hp)
        self.version = 0                 # global mentee version: number of aggregates applied
        self.client_version: dict[int, int] = {}  # the version each client holds (absent: none)
        self.history: deque[tuple[Payload, int]] = deque()  # (compressed aggregate v -> v+1, bytes), newest last
        self.history_start = 0           # version the oldest kept aggregate starts from

    # ---- state ----
    def init_server(self) -> None:
        self.global_mentee = self.ctx.build_model(self.hp.mentee_arch)
        self.shapes = federated_shapes(self.global_mentee)
        self.dense_bytes = payload_bytes({k: v for k, v in self.global_mentee.state_dict().items() if k in self.shapes})

    def init_client(self, client) -> None:
        mentor = self.ctx.build_model(client.arch)
        mentee = self.ctx.build_model(self.hp.mentee_arch)
        client.state["model"] = mentor
        client.state["mentee"] = mentee
        if self.hp.hidden_map == "identity":
            if mentee.rep_dim != mentor.rep_dim:
                raise UserError(f"fedkd.hidden_map='identity' needs equal representation sizes, got mentor "
                                f"{client.arch} {mentor.rep_dim} and mentee {self.hp.mentee_arch} {mentee.rep_dim}")
            return
        w = nn.Linear(mentee.rep_dim, mentor.rep_dim, bias=False)
        nn.init.xavier_uniform_(w.weight)
        client.state["W"] = w.to(self.ctx.device)

    def threshold(self, round_index: int) -> float:
        return energy_threshold(round_index, self.ctx.cfg.rounds, self.hp.energy_start, self.hp.energy_end,
                                self.hp.energy_round_offset)

    def compress(self, tensors: Mapping[str, torch.Tensor], round_index: int) -> Payload:
        return compress(tensors, self.threshold(round_index), self.hp.conv_svd, self.hp.dense_fallback)

    # ---- download ----
    def server_payload(self, client, round_index: int) -> Payload:
        held = self.client_version.get(client.id)
        self.client_version[client.id] = self.version
        if self.hp.compress_target == "weights":
            # The last compressed aggregate is the whole global mentee: any client not holding it may get it.
            if held == self.version:
                return {}
            if self.history and self.history[-1][1] < self.dense_bytes:
                return {f"w/{k}": v for k, v in self.history[-1][0].items()}
        elif held is not None and held >= self.history_start:
            missed = list(self.history)[held - self.history_start:]
            if sum(b for _, b in missed) < self.dense_bytes:
                return {f"d{i}/{k}": v for i, (comp, _) in enumerate(missed) for k, v in comp.items()}
        return {f"full/{k}": v for k, v in self.global_mentee.state_dict().items() if k in self.shapes}

    def receive_mentee(self, client, payload: Payload) -> None:
        """Bring the client's mentee copy to the server's global version (reconstruction = client train FLOPs)."""
        mentee = client.state["mentee"]
        state = mentee.state_dict()
        with torch.no_grad(), self.ctx.accountant.count("train", None, client.id):
            for prefix in ("full/", "w/"):
                if any(k.startswith(prefix) for k in payload):
                    for name, tensor in decompress(payload, self.shapes, prefix=prefix).items():
                        state[name].copy_(tensor)
            i = 0
            while any(k.startswith(f"d{i}/") for k in payload):
                apply_update(mentee, decompress(payload, self.shapes, prefix=f"d{i}/"))
                i += 1

    # ---- local training ----
    def loss_fn(self, client):
        mentor, mentee = client.state["model"], client.state["mentee"]
        w = client.state.get("W", nn.Identity())
        hp = self.hp
        other = (lambda t: t.detach()) if hp.detach_targets else (lambda t: t)

        def kl(student, teacher):
            return kl_to(student, teacher, hp.detach_targets, hp.kl_reduction)

        def divisor(own, theirs):
            d = (own + other(theirs)).clamp_min(hp.divisor_floor)
            return d.detach() if hp.detach_divisor else d

        def loss(x, y):
            h_t = mentor.extractor(x)
            h_s = mentee.extractor(x)
            z_t, z_s = mentor.header(h_t), mentee.header(h_s)
            ce_t, ce_s = F.cross_entropy(z_t, y), F.cross_entropy(z_s, y)
            loss_t = ce_t + (kl(z_t, z_s) + F.mse_loss(h_t, w(other(h_s)))) / divisor(ce_t, ce_s)
            loss_s = ce_s + (kl(z_s, z_t) + F.mse_loss(other(h_t), w(h_s))) / divisor(ce_s, ce_t)
            return loss_t + loss_s

        return loss

    def local_phase(self, client) -> Phase:
        trainable = [client.state[key] for key in ("model", "mentee", "W") if key in client.state]
        for module in trainable:
            module.train()
        return Phase(f"mutual-{self.hp.mentee_arch}-{self.hp.hidden_map}", trainable, self.ctx.cfg.local_epochs,
                     loss=self.loss_fn(client))

    def client_update(self, client, payload: Payload, round_index: int):
        self.receive_mentee(client, payload)
        mentee = client.state["mentee"]
        state = mentee.state_dict()
        received = {name: state[name].detach().clone() for name in self.shapes}
        yield self.local_phase(client)
        with torch.no_grad(), self.ctx.accountant.count("train", None, client.id):
            if self.hp.compress_target == "weights":
                upload = self.compress({name: state[name] for name in self.shapes}, round_index)
            else:
                upload = self.compress({name: state[name] - received[name] for name in self.shapes}, round_index)
            for name in self.shapes:  # the mentee copy goes back to the shared global version
                state[name].copy_(received[name])
        self.ctx.record("upload_fraction", payload_bytes(upload) / self.dense_bytes)
        return upload

    # ---- server ----
    def aggregate(self, uploads: dict[int, Payload], round_index: int) -> None:
        with torch.no_grad():
            dense = {cid: decompress(up, self.shapes) for cid, up in uploads.items()}
            average = weighted_average(dense, aggregation_weights(self.ctx, self.hp.aggregation))
            sent = self.compress(average, round_index)
            rebuilt = decompress(sent, self.shapes)
            if self.hp.compress_target == "weights":
                state = self.global_mentee.state_dict()
                for name, tensor in rebuilt.items():
                    state[name].copy_(tensor)
                self.history.clear()  # only the newest compressed weights are ever sent
            else:
                apply_update(self.global_mentee, rebuilt)
        self.history.append((sent, payload_bytes(sent)))
        self.version += 1
        if self.hp.compress_target == "weights":
            self.history_start = self.version - 1
            return
        # An aggregate is only worth keeping while the ones from it to the newest cost less than the dense model.
        while self.history and sum(b for _, b in self.history) >= self.dense_bytes:
            self.history.popleft()
            self.history_start += 1
        if not self.history:
            self.history_start = self.version

    def predict(self, client, x):
        return client.state["model"](x)


def federated_shapes(module: nn.Module) -> dict[str, torch.Size]:
    """Name -> shape of the mentee's floating-point state entries (the ones exchanged)."""
    return {k: v.shape for k, v in module.state_dict().items() if v.is_floating_point()}


def apply_update(module: nn.Module, update: Mapping[str, torch.Tensor]) -> None:
    state = module.state_dict()
    with torch.no_grad():
        for name, delta in update.items():
            state[name].add_(delta.to(state[name].dtype))
