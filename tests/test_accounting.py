import pytest
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


def test_affine_batch_size_cache_equals_counting_every_step():
    """Default accountant: new batch sizes are filled from each group's fitted line (exact integers), and the
    totals equal counting every step."""
    totals = {}
    for cache in (True, False):
        sim = make_simulation("pfedlora", num_clients=5, rounds=1, batch_size=64, model_group="cnn5-homo",
                              flop_cache=cache)
        sim.run_round(0)
        totals[cache] = (dict(sim.accountant.totals), dict(sim.accountant.by_client))
        if cache:
            assert sim.accountant.predicted > 0  # some sizes were not counted
    assert totals[True] == totals[False]


def test_affine_cache_fits_after_three_sizes_and_rejects_non_affine_groups():
    model = CNN("cnn5", 10)
    acct = FlopAccountant(cache=True)

    def step(size, group="g"):
        before = acct.totals["eval"]
        with acct.count("eval", (group, size)):
            model(torch.randn(size, 3, 32, 32))
        return acct.totals["eval"] - before

    per_sample = step(1)
    for size in (2, 5):  # the third size checks the line fitted from the first two
        assert step(size) == size * per_sample
    assert acct.predicted == 0
    assert step(9) == 9 * per_sample and acct.predicted == 1  # filled from the line, not counted
    assert acct.is_cached("eval", ("g", 17)) and not acct.is_cached("eval", ("other", 17))

    # a group whose FLOPs are not affine in its last key element keeps counting every new size
    odd = FlopAccountant(cache=True)
    for size in (1, 2, 3, 4):
        with odd.count("eval", ("sq", size)):
            torch.randn(size, size) @ torch.randn(size, size)  # 2 * size^3
    assert odd.predicted == 0 and odd.totals["eval"] == sum(2 * s ** 3 for s in (1, 2, 3, 4))

    # a checkpointed cache restores the lines: no recount after a resume
    restored = FlopAccountant(cache=True)
    restored.load_cache(acct.cache_state())
    assert restored.is_cached("eval", ("g", 33))
    with restored.count("eval", ("g", 33)):
        pass
    assert restored.totals["eval"] == 33 * per_sample


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


@pytest.mark.parametrize("algorithm", ["fedgh", "fml"])
def test_server_flops_cached_by_upload_signature_equal_counting_every_round(algorithm):
    """Shape-determined server work (Algorithm.server_flops_by_upload_shapes) is counted once per upload
    signature; per round it equals counting every round, with partial participation changing the uploaders."""
    per_round = {}
    for cache in (True, False):
        sim = make_simulation(algorithm, flop_cache=cache, num_clients=5, participation=0.6, rounds=3)
        per_round[cache] = [sim.run_round(r)["server_flops"] for r in range(3)]
        if cache:
            server_keys = [k for k in sim.accountant.cache_state() if k[0] == "server"]
            assert server_keys and len(server_keys) < 3  # some round reused a counted signature
    assert per_round[True] == per_round[False]
    if algorithm == "fedgh":
        assert all(f > 0 for f in per_round[True])  # the server header really trains


def test_server_work_depending_on_values_is_counted_every_round():
    from algorithms.fedkd import FedKD

    assert not FedKD.server_flops_by_upload_shapes  # its SVD ranks depend on the values of the updates
    sim = make_simulation("fedkd", rounds=2)
    for r in range(2):
        sim.run_round(r)
    assert not [k for k in sim.accountant.cache_state() if k[0] == "server"]
