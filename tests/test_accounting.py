import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.accounting import FlopAccountant, payload_bytes, transmit
from models.adapters import LoRAAdapter
from models.cnn import CNN
from tests.conftest import make_simulation


def conv_flops(c_in, c_out, k, out_side):
    return 2 * c_in * c_out * k * k * out_side * out_side  # a multiply-add is 2 FLOPs


def test_cnn1_forward_flops_equal_hand_count():
    # CNN-1 on 32x32: conv1 3->16 (28x28 out), pool -> 14, conv2 16->32 (10x10 out), pool -> 5, fc 800-2000-500-10
    hand = conv_flops(3, 16, 5, 28) + conv_flops(16, 32, 5, 10) + 2 * (800 * 2000 + 2000 * 500 + 500 * 10)
    assert hand == 9_651_600
    model = CNN("cnn1", 10)
    for batch in (1, 7):
        with FlopCounterMode(display=False) as mode:
            model(torch.randn(batch, 3, 32, 32))
        assert mode.get_total_flops() == batch * hand


def test_accountant_counts_backward_only_where_it_runs():
    model = CNN("cnn5", 10)
    x = torch.randn(4, 3, 32, 32)
    acct = FlopAccountant(cache=False)
    with acct.count("train"):
        model(x).sum().backward()
    fwd_only = FlopAccountant(cache=False)
    with fwd_only.count("eval"):
        model(x)
    # backward of a full model costs about twice its forward (minus the input gradient of conv1)
    assert 2.5 * fwd_only.totals["eval"] < acct.totals["train"] < 3 * fwd_only.totals["eval"]
    model.requires_grad_(False)
    frozen = FlopAccountant(cache=False)
    with frozen.count("train"):
        model(x).sum()
    assert frozen.totals["train"] == fwd_only.totals["eval"]  # frozen: forward only


def test_cached_count_equals_full_count_of_the_same_client_round():
    totals = {}
    for cache in (True, False):
        sim = make_simulation("pfedlora", flop_cache=cache, num_clients=5, rounds=1)
        sim.run_round(0)
        totals[cache] = (dict(sim.accountant.totals), dict(sim.accountant.by_client))
    assert totals[True] == totals[False]
    assert totals[True][0]["train"] > 0 and totals[True][0]["eval"] > 0


def test_cache_key_reuses_the_first_count():
    acct = FlopAccountant(cache=True)
    model = CNN("cnn5", 10)
    for _ in range(3):
        with acct.count("train", ("k",)):
            model(torch.randn(2, 3, 32, 32))
    with FlopCounterMode(display=False) as mode:
        model(torch.randn(2, 3, 32, 32))
    assert acct.totals["train"] == 3 * mode.get_total_flops()


def test_pfedlora_upload_bytes_are_four_times_adapter_parameters():
    sim = make_simulation("pfedlora", num_clients=5, rounds=1)
    metrics = sim.run_round(0)
    adapter_params = sum(p.numel() for p in LoRAAdapter("model", 10, rank=64).parameters())
    assert metrics["bytes_up"] == 5 * 4 * adapter_params
    assert metrics["bytes_down"] == 5 * 4 * adapter_params
    assert metrics["bytes_up_per_client"] == 4 * adapter_params


def test_transmit_copies_and_counts_at_the_dtype_sent():
    payload = {"a": torch.zeros(10, dtype=torch.float32), "b": torch.zeros(3, dtype=torch.int64),
               "c": torch.zeros(4, dtype=torch.float16)}
    sent, nbytes = transmit(payload, torch.device("cpu"))
    assert nbytes == payload_bytes(payload) == 40 + 24 + 8
    sent["a"] += 1
    assert payload["a"].sum() == 0  # the receiver cannot alias the sender's tensors
