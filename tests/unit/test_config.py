"""QATConfig / QuantSpec / HybridConfig validation: every bad value names the field and what to write."""

import pytest
import torch.nn as nn

import fxqat
from fxqat.config import HybridConfig, Override, QATConfig, QuantSpec


@pytest.mark.parametrize("bits", [0, 17, -1, 2.5, True])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="w_bits=.*1 to 16"):
        QATConfig(w_bits=bits)


def test_unknown_method_lists_known_ones():
    with pytest.raises(ValueError, match=r"'lsqq' is not a known quantizer method; choose one of \[.*'lsq'"):
        QATConfig(method="lsqq")


def test_per_channel_only_for_weights():
    with pytest.raises(ValueError, match="per-channel scales are for weights only"):
        QuantSpec(bits=4, kind="act", per_channel=True)


def test_frozen():
    cfg = QATConfig()
    with pytest.raises(Exception):
        cfg.w_bits = 3  # type: ignore[misc]


def test_override_matching_by_name_and_type():
    cfg = QATConfig(overrides=(Override("layer1.*", w_bits=2), Override(nn.Linear, skip=True)))
    assert cfg.override_for("layer1.0.conv1", nn.Conv2d(1, 1, 1)).w_bits == 2
    assert cfg.override_for("fc", nn.Linear(1, 1)).skip is True
    assert cfg.override_for("conv1", nn.Conv2d(1, 1, 1)) is None


def test_override_must_be_wrapped():
    with pytest.raises(ValueError, match="fxqat.Override"):
        QATConfig(overrides=({"match": "fc"},))


def test_spec_for_defaults():
    cfg = QATConfig(w_bits=3, a_bits=5, per_channel=True, w_options={"grad_scale": False})
    w = cfg.spec_for("weight")
    a = cfg.spec_for("act", signed=False)
    assert (w.bits, w.kind, w.signed, w.per_channel, w.options_dict()) == (3, "weight", True, True, {"grad_scale": False})
    assert (a.bits, a.kind, a.signed, a.per_channel) == (5, "act", False, False)


@pytest.mark.parametrize(
    "kwargs, msg",
    [({"paths": 0}, "paths"), ({"partner": "x"}, "partner"), ({"mode": "x"}, "mode"), ({"temperature": 0}, "temperature"),
     ({"max_blocks": 1}, "max_blocks")],
)
def test_hybrid_config_validation(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        HybridConfig(**kwargs)


def test_available_methods_include_lsq():
    assert "lsq" in fxqat.available_methods()
