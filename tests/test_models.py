import pytest
import torch

from models.adapters import LoRAAdapter, personalised_logits
from models.cnn import CNN
from models.groups import MODEL_GROUPS, build_model, client_arch

# SPEC section 1, table of parameter counts.
SPEC_PARAMS = {
    10: {"cnn1": 2_621_558, "cnn2": 1_815_142, "cnn3": 1_320_558, "cnn4": 1_060_358, "cnn5": 670_058},
    100: {"cnn1": 2_666_648, "cnn2": 1_860_232, "cnn3": 1_365_648, "cnn4": 1_105_448, "cnn5": 715_148},
}


@pytest.mark.parametrize("classes", [10, 100])
@pytest.mark.parametrize("arch", ["cnn1", "cnn2", "cnn3", "cnn4", "cnn5"])
def test_parameter_counts_equal_spec_table(arch, classes):
    model = CNN(arch, classes)
    assert sum(p.numel() for p in model.parameters()) == SPEC_PARAMS[classes][arch]


def test_extractor_header_split_gives_500d_representation_and_same_logits():
    model = CNN("cnn3", 10)
    x = torch.randn(4, 3, 32, 32)
    h = model.extractor(x)
    assert h.shape == (4, 500) and (h >= 0).all()  # after ReLU
    assert torch.equal(model.header(h), model(x))


def test_paper_group_assigns_cnn_by_client_index():
    assert [client_arch("cnn-hetero", i) for i in range(7)] == ["cnn1", "cnn2", "cnn3", "cnn4", "cnn5", "cnn1", "cnn2"]
    assert {client_arch("cnn1-homo", i) for i in range(10)} == {"cnn1"}


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2"])
def test_torchvision_models_expose_the_same_split(arch):
    model = build_model(arch, 10)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.header(model.extractor(x)), model(x))
    assert model(x).shape == (2, 10)


@pytest.mark.parametrize("placement", ["model", "representation", "header-lora"])
def test_adapter_starts_as_identity_and_has_expected_shapes(placement):
    model = CNN("cnn2", 10)
    adapter = LoRAAdapter(placement, 10, rank=8)
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(personalised_logits(model, adapter, x), model(x))  # B = 0
    assert adapter.A.out_features == 8 and adapter.B.in_features == 8
    assert adapter.B.out_features == (500 if placement == "representation" else 10)
    torch.nn.init.normal_(adapter.B.weight)
    assert not torch.allclose(personalised_logits(model, adapter, x), model(x))


def test_model_level_adapter_parameter_count():
    # CNN-5 conv part (1,216 + 12,832) + A 800x64+64 + B 64x10+10
    adapter = LoRAAdapter("model", 10, rank=64)
    assert sum(p.numel() for p in adapter.parameters()) == 1216 + 12832 + 800 * 64 + 64 + 64 * 10 + 10


def test_header_lora_has_no_trunk_and_only_a_b():
    adapter = LoRAAdapter("header-lora", 100, rank=16)
    assert sum(p.numel() for p in adapter.parameters()) == 500 * 16 + 16 * 100


def test_every_group_builds():
    for group, (archs, _) in MODEL_GROUPS.items():
        for arch in archs:
            assert build_model(arch, 10)(torch.randn(1, 3, 32, 32)).shape == (1, 10), group
