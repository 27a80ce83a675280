"""fxqat.models: CIFAR ResNets (He et al. 2016 sizes), small models, the name registry."""

import pytest
import torch
import torch.fx

from fxqat.models import MLP, SmallCNN, available_models, get_model


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    "name, expected",
    # option-A counts: He et al. 2016 Table 6 gives 0.27M / 0.46M / 0.85M; these are the exact counts
    [("resnet20", 269_722), ("resnet32", 464_154), ("resnet56", 853_018)],
)
def test_cifar_resnet_parameter_counts(name, expected):
    m = get_model(name)
    assert n_params(m) == expected
    assert abs(n_params(m) / 1e6 - {"resnet20": 0.27, "resnet32": 0.46, "resnet56": 0.85}[name]) < 0.005


def test_option_b_adds_projection_parameters():
    a, b = get_model("resnet20", shortcut="A"), get_model("resnet20", shortcut="B")
    # two projections: 16->32 (1x1 conv 512 + BN 64) and 32->64 (2048 + 128)
    assert n_params(b) - n_params(a) == 512 + 64 + 2048 + 128


@pytest.mark.parametrize("name", ["resnet20", "resnet32"])
def test_resnet_forward_shape_and_fx_trace(name):
    torch.manual_seed(0)
    m = get_model(name, num_classes=7).eval()
    x = torch.randn(3, 3, 32, 32)
    y = m(x)
    assert y.shape == (3, 7)
    gm = torch.fx.symbolic_trace(m)
    torch.testing.assert_close(gm(x), y, atol=0, rtol=0)  # same ops in the same order: bit-exact


def test_option_a_shortcut_is_subsample_and_zero_pad():
    blk = get_model("resnet20").layer2[0]
    x = torch.randn(2, 16, 32, 32)
    s = blk.shortcut(x)
    assert s.shape == (2, 32, 16, 16)
    assert torch.equal(s[:, 8:24], x[:, :, ::2, ::2])
    assert torch.count_nonzero(s[:, :8]) == 0 and torch.count_nonzero(s[:, 24:]) == 0


def test_small_models_shapes():
    assert SmallCNN(in_channels=1)(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert SmallCNN(in_channels=1)(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert get_model("mlp", in_shape=(1, 8, 8))(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    assert n_params(MLP(in_shape=(1, 28, 28))) == 784 * 256 + 256 + 2 * 256 + 256 * 128 + 128 + 2 * 128 + 1290


def test_torchvision_names_and_unknown_name():
    assert get_model("resnet18", num_classes=3).fc.out_features == 3
    assert "resnet18" in available_models() and "resnet20" in available_models()
    with pytest.raises(ValueError, match=r"unknown model 'resnet21'.*resnet20"):
        get_model("resnet21")
