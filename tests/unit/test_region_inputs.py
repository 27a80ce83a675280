"""Graph regions and the ``None`` arguments of their recorded call: passed-on ones stay inputs, branched-on ones are
constants (fxqat/capture/region.py)."""

import pytest
import torch
import torch.nn as nn

from fxqat.capture.region import trace_region


class Attention(nn.Module):
    """Stands in for an eager attention: uses its mask when it gets one."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x, mask=None):
        y = self.proj(x)
        return y if mask is None else y.masked_fill(~mask, 0.0)


class PassesMask(nn.Module):
    """A decoder layer: hands its mask to the attention, never looks at it."""

    def __init__(self):
        super().__init__()
        self.attn, self.fc = Attention(), nn.Linear(4, 4)

    def forward(self, x, attention_mask=None, flag=False):
        return self.fc(self.attn(x, mask=attention_mask)) + x


class BranchesOnMask(PassesMask):
    def forward(self, x, attention_mask=None, flag=False):
        if attention_mask is not None:
            x = x * 2
        return self.fc(self.attn(x, mask=attention_mask))


def _region(cls):
    torch.manual_seed(0)
    layer, x = cls(), torch.randn(3, 4)
    return layer, x, trace_region(layer, (x,), {"attention_mask": None, "flag": False}, "layer", leaf_modules=("attn",))


def test_a_passed_on_none_is_an_input_that_also_takes_a_tensor():
    layer, x, region = _region(PassesMask)
    assert region.fxqat_binding.optional != ()
    mask = torch.rand(3, 4) > 0.5
    # the region runs the layer's own ops on the same tensors: bit-identical
    torch.testing.assert_close(region(x, attention_mask=None, flag=False), layer(x, attention_mask=None, flag=False), atol=0, rtol=0)
    torch.testing.assert_close(region(x, attention_mask=mask, flag=False), layer(x, attention_mask=mask, flag=False), atol=0, rtol=0)
    assert not torch.equal(region(x, attention_mask=mask, flag=False), region(x, attention_mask=None, flag=False))


def test_a_none_the_code_branches_on_stays_a_constant():
    layer, x, region = _region(BranchesOnMask)
    assert region.fxqat_binding.optional == (1,)  # leaves (keywords, sorted): attention_mask, flag, x; only the unused flag is an input
    torch.testing.assert_close(region(x, attention_mask=None, flag=False), layer(x, attention_mask=None, flag=False), atol=0, rtol=0)
    with pytest.raises(ValueError, match="'layer' was captured with an argument fixed to None"):
        region(x, attention_mask=torch.ones(3, 4, dtype=torch.bool), flag=False)


def test_a_passed_on_argument_refuses_other_values():
    _, x, region = _region(PassesMask)
    with pytest.raises(ValueError, match="'layer'.*called with str"):
        region(x, attention_mask="causal", flag=False)
    with pytest.raises(ValueError, match="captured with a bool"):  # the flag it hands on takes bools only
        region(x, attention_mask=None, flag=None)
    # an unused flag is handed on (an input): either value runs the same code
    torch.testing.assert_close(region(x, attention_mask=None, flag=True), region(x, attention_mask=None, flag=False),
                               atol=0, rtol=0)
