"""The Vision Transformer group: the documented table of parameters and forward FLOPs (models/vit.py) equals the
models and a hand formula; the extractor/header split; the groups; image sizes; the common initialisation the
LoRA methods use; model initialisation from a user's checkpoint file (models/pretrained.py)."""
from __future__ import annotations

import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import models.vit as vit
from bench.errors import UserError
from models.groups import MODEL_GROUPS, build_model, client_arch, image_size_problem
from models.vit import VIT_SPECS, ViT

pytestmark = pytest.mark.usefixtures("one_thread")
TOKENS, REP = 65, 128  # 8 x 8 patches + [CLS]; the representation


def documented_table() -> dict[str, tuple[int, int, int, int, int]]:
    """arch -> (depth, width, heads, parameters, forward FLOPs) as the module docstring's table states."""
    rows = re.findall(r"^\| (vits?\d) +\| (\d+) +\| (\d+) +\| (\d+) +\| ([\d,]+) +\| ([\d,]+) +\|$", vit.__doc__, re.M)
    return {r[0]: tuple(int(v.replace(",", "")) for v in r[1:]) for r in rows}


def hand_parameters(depth: int, width: int, classes: int) -> int:
    patch = 3 * 4 * 4 * width + width
    tokens = width + TOKENS * width                       # [CLS] + position embeddings
    block = 2 * 2 * width + 4 * (width * width + width) + (4 * width * width + 4 * width) + (4 * width * width + width)
    return patch + tokens + depth * block + 2 * width + (width * REP + REP) + (REP * classes + classes)


def hand_forward_flops(depth: int, width: int, classes: int) -> int:
    patch = 2 * (3 * 16) * width * 64                      # the 4x4 stride-4 convolution on 64 patches
    block = 2 * TOKENS * 4 * width * width                 # q, k, v, o
    block += 2 * 2 * TOKENS * TOKENS * width               # Q K^T and softmax(.) V over all heads
    block += 2 * TOKENS * 8 * width * width                # fc1 (w -> 4w) and fc2 (4w -> w)
    return patch + depth * block + 2 * width * REP + 2 * REP * classes


def test_the_table_lists_every_architecture():
    assert set(documented_table()) == set(VIT_SPECS)


@pytest.mark.parametrize("arch", list(VIT_SPECS))
def test_parameters_and_flops_equal_the_table_and_the_hand_count(arch):
    depth, width, heads, params, flops = documented_table()[arch]
    assert VIT_SPECS[arch] == (depth, width, heads)
    model = ViT(arch, 10)
    assert sum(p.numel() for p in model.parameters()) == params == hand_parameters(depth, width, 10)
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 32, 32))
    assert counter.get_total_flops() == flops == hand_forward_flops(depth, width, 10)
    # 100 classes: only the header grows
    assert sum(p.numel() for p in ViT(arch, 100).parameters()) == params + REP * 90 + 90


def test_split_representation_and_heads():
    torch.manual_seed(0)
    model = build_model("vit4", 10)
    x = torch.randn(3, 3, 32, 32)
    h = model.extractor(x)
    assert h.shape == (3, REP) and h.abs().max() <= 1  # pre-logits tanh
    assert torch.equal(model.header(h), model(x))
    assert model.rep_dim == REP and model.extractor.blocks[0].attn.heads == 4
    # attention by hand for one block: softmax(Q K^T / sqrt(d_head)) V per head, then o
    block = model.extractor.blocks[0]
    t = torch.randn(2, TOKENS, 128)
    q, k, v = (lin(t).reshape(2, TOKENS, 4, 32).transpose(1, 2) for lin in (block.attn.q, block.attn.k, block.attn.v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / 32 ** 0.5, -1)
    expected = block.attn.o((weights @ v).transpose(1, 2).reshape(2, TOKENS, 128))
    torch.testing.assert_close(block.attn(t), expected)


def test_groups_assign_by_client_index():
    assert [client_arch("vit-hetero", i) for i in range(7)] == ["vit1", "vit2", "vit3", "vit4", "vit5", "vit1", "vit2"]
    assert {client_arch("vit5-homo", i) for i in range(4)} == {"vit5"}
    for group in ("vit-hetero", "vit5-homo", "vit-small-hetero"):
        for arch in MODEL_GROUPS[group][0]:
            assert build_model(arch, 10)(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_image_size_rule_matches_the_model():
    """Square sides that are multiples of the 4x4 patches build and train; others are refused by the rule."""
    def trains(h: int, w: int) -> bool:
        try:
            build_model("vits5", 10, 3, h)(torch.zeros(2, 3, h, w)).sum().backward()
        except (RuntimeError, ValueError):
            return False
        return True

    for h, w in ((32, 32), (8, 8), (4, 4), (32, 24)):
        assert (image_size_problem("vits5", h, w) is None) == trains(h, w), (h, w)
    assert "multiple of its 4x4 patches" in image_size_problem("vit1", 30, 30)  # would train, dropping pixels


def test_a_dataset_of_odd_sized_images_is_refused_in_one_line():
    from models.groups import check_image_size

    with pytest.raises(UserError, match=r"the dataset's 30x30 images do not fit model group 'vit-hetero': vit1 needs "
                                        r"square images whose side is a multiple of its 4x4 patches; valid: .*"
                                        r"or square images whose side is a multiple of 4$"):
        check_image_size("vit-hetero", 30, 30)


# ---- the common initialisation of the LoRA methods ---------------------------------------------------------

def test_common_initialisation_is_shared_per_width_and_by_block():
    """Clients of one width share the initial weights of the blocks they both have; another width, another seed
    or the global RNG stream give other weights, and building leaves the global RNG untouched."""
    from algorithms.lora_common import init_family
    from models.lora import shared_init_seed

    def built(arch: str, seed: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(shared_init_seed(seed, init_family(arch)))
            return build_model(arch, 10)

    state = torch.get_rng_state()
    deep, shallow, narrow = built("vit1", 0), built("vit3", 0), built("vit4", 0)
    assert torch.equal(torch.get_rng_state(), state)
    for i in range(4):
        assert torch.equal(deep.extractor.blocks[i].attn.q.weight, shallow.extractor.blocks[i].attn.q.weight)
    assert torch.equal(deep.extractor.patch_embed.weight, shallow.extractor.patch_embed.weight)
    assert not torch.equal(deep.extractor.blocks[0].attn.q.weight[:128, :128], narrow.extractor.blocks[0].attn.q.weight)
    assert not torch.equal(built("vit1", 1).extractor.blocks[0].attn.q.weight, deep.extractor.blocks[0].attn.q.weight)
    assert init_family("vit2") == init_family("vit1") != init_family("vit5") and init_family("cnn3") == "cnn3"


# ---- initialisation from a user's checkpoint (model.init) -------------------------------------------------

def test_model_init_loads_a_state_dict_or_a_per_architecture_file(tmp_path):
    from models.pretrained import load_model_init

    torch.manual_seed(1)
    source = build_model("vits5", 100)  # another class count: the header does not fit and stays random
    single, per_arch = tmp_path / "one.pt", tmp_path / "group.pt"
    torch.save(source.state_dict(), single)
    torch.save({"vits5": source.state_dict(), "vits4": build_model("vits4", 10).state_dict()}, per_arch)
    for path in (single, per_arch):
        target = build_model("vits5", 10)
        header = target.header.weight.clone()
        load_model_init(target, str(path), "vits5")
        for key, value in source.extractor.state_dict().items():
            assert torch.equal(target.extractor.state_dict()[key], value), key
        assert torch.equal(target.header.weight, header)


def test_model_init_errors_are_one_line(tmp_path):
    from models.pretrained import load_model_init

    model = build_model("vits5", 10)
    with pytest.raises(UserError, match="no such file"):
        load_model_init(model, str(tmp_path / "missing.pt"), "vits5")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="not a weights-only torch checkpoint"):
        load_model_init(model, str(tmp_path / "junk.pt"), "vits5")
    torch.save({"vits4": build_model("vits4", 10).state_dict()}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="has no weights for architecture 'vits5'; it holds vits4"):
        load_model_init(model, str(tmp_path / "other.pt"), "vits5")
    torch.save(build_model("vits3", 10).state_dict(), tmp_path / "wrong.pt")
    with pytest.raises(UserError, match="does not fit architecture 'vits5'"):
        load_model_init(model, str(tmp_path / "wrong.pt"), "vits5")


# ---- pFedLoRA on transformers: the block-lora placement ------------------------------------------------------

def test_block_lora_adapts_the_q_and_v_every_client_shares():
    from models.adapters import block_lora_layers

    with torch.device("meta"):
        depth = [build_model(a, 10) for a in MODEL_GROUPS["vit-depth-hetero"][0]]
        mixed = [build_model(a, 10) for a in MODEL_GROUPS["vit-hetero"][0]]
        cnns = [build_model(a, 10) for a in MODEL_GROUPS["cnn-hetero"][0]]
    layers = block_lora_layers(depth, "vit-depth-hetero", rank=8)
    assert list(layers) == [f"extractor.blocks.{i}.attn.{t}" for i in range(4) for t in "qv"]  # depth 4 is shared
    assert set(layers.values()) == {(256, 256)}
    for models, group in ((mixed, "vit-hetero"), (cnns, "cnn-hetero")):
        with pytest.raises(UserError, match=rf"block-lora needs transformer blocks of one shape in every client's "
                                            rf"model; model group '{group}' has none; valid: placement one of model, "
                                            rf"representation, header-lora, or a group of one width"):
            block_lora_layers(models, group, rank=8)
    with pytest.raises(UserError, match=r"pfedlora.rank=300 does not fit the block-lora layers .* valid: rank 1..256"):
        block_lora_layers(depth, "vit-depth-hetero", rank=300)


def test_block_lora_prediction_is_the_merged_model():
    """F_k (+) G = F_k with W + 2 B A in place of each adapted weight (functional_call, not the hooks)."""
    from torch.func import functional_call

    from models.adapters import LoRAAdapter, personalised_logits

    torch.manual_seed(0)
    model = build_model("vits3", 10)
    layers = {f"extractor.blocks.{i}.attn.{t}": (64, 64) for i in range(2) for t in "qv"}
    adapter = LoRAAdapter("block-lora", 10, rank=4, layers=layers)
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(personalised_logits(model, adapter, x), model(x))  # B = 0
    with torch.no_grad():
        for b in adapter.B:
            b.normal_(0, 0.1)
    params = {k: v.detach() for k, v in model.named_parameters()}
    for name, a, b in zip(layers, adapter.A, adapter.B):
        params[f"{name}.weight"] = params[f"{name}.weight"] + 2.0 * b.detach() @ a.detach()
    torch.testing.assert_close(personalised_logits(model, adapter, x), functional_call(model, params, (x,)))
    assert torch.equal(model(x), functional_call(model, {k: v.detach() for k, v in model.named_parameters()}, (x,)))
    # the adapter's payload: A (4 x 64) and B (64 x 4) per layer, 4 x 4 x 4 x 128 bytes
    assert sum(t.numel() * 4 for t in adapter.state_dict().values()) == 4 * 4 * 4 * 128


def test_pfedlora_conforms_on_transformers():
    from bench.testing import check_algorithm

    check_algorithm("pfedlora", model_group="vit5-homo", hparams={"placement": "block-lora", "rank": 4},
                    train_size=60, test_size=30)
    check_algorithm("pfedlora", model_group="vit-hetero", hparams={"rank": 8}, train_size=60, test_size=30)


def test_pfedlora_block_lora_on_a_group_of_mixed_widths_is_one_line(monkeypatch, capsys, tmp_path, small_npz):
    from tests.conftest import bench_main

    code, _, err = bench_main(monkeypatch, capsys, "run", "--algo", "pfedlora", "--dataset", str(small_npz),
                              "--clients", "5", "--rounds", "1", "--model-group", "vit-small-hetero", "--set",
                              "pfedlora.placement=block-lora", "--output-dir", str(tmp_path / "o"), "--quiet")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: pfedlora.placement=block-lora needs transformer blocks of one shape in every "
                               "client's model; model group 'vit-small-hetero' has none")
