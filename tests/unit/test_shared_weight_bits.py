"""One weight quantizer per Parameter, also when its uses fall under different bit-widths.

A ``Linear`` that is the model's first layer (``first_last=8`` bits) and is called again in the middle (4 bits) got
two weight quantizers of different bit-widths for one Parameter; two modules sharing one weight got one quantizer
each. Now the highest precision wins, with a warning naming the layer.
"""

import warnings

import pytest
import torch
from torch import nn

import fxqat


class FirstAndAgain(nn.Module):
    """``fc`` is the first layer and is called again after ``mid``; ``head`` is the last layer."""

    def __init__(self):
        super().__init__()
        self.fc, self.mid, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        x = self.fc(x)
        x = self.mid(torch.relu(x))
        return self.head(self.fc(x))


class TiedFirstLast(nn.Module):
    """``a`` (first layer) and ``b`` (last layer) share one weight Parameter."""

    def __init__(self):
        super().__init__()
        self.a, self.m, self.b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4), nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.m(torch.relu(self.a(x))))


def _weight_bits(qm):
    return {q.weight_layer: q.bits for q in fxqat.named_quantizers(qm).values() if q.kind == "weight"}


def test_first_layer_called_again_gets_one_8_bit_weight_quantizer_and_a_warning():
    torch.manual_seed(0)
    model, x = FirstAndAgain(), torch.randn(4, 8)
    with pytest.warns(UserWarning, match=r"layer\(s\) fc is used 2 times with different weight bit-widths \(8, 4\)"):
        qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(w_bits=4, a_bits=4))
    assert _weight_bits(qm) == {"fc": 8, "mid": 4, "head": 8}
    wq = [q for q in fxqat.named_quantizers(qm).values() if q.kind == "weight"]
    assert len(wq) == 3 and len({id(q) for q in wq}) == 3
    # both calls of fc read the output of its one weight quantizer
    fc_q = [n for n in qm.graph.nodes if n.op == "call_module" and str(n.target).startswith("fxqat_quant.w_fc")]
    assert len(fc_q) == 1 and [u.target for u in fc_q[0].users] == [torch._C._nn.linear] * 2


def test_same_bits_everywhere_gives_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qm = fxqat.prepare_qat(FirstAndAgain(), (torch.randn(4, 8),), fxqat.QATConfig(w_bits=4, first_last=4))
    assert _weight_bits(qm) == {"fc": 4, "mid": 4, "head": 4}


def test_override_on_the_shared_layer_decides_without_a_warning():
    cfg = fxqat.QATConfig(w_bits=4, a_bits=4, overrides=(fxqat.Override("fc", w_bits=6),))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qm = fxqat.prepare_qat(FirstAndAgain(), (torch.randn(4, 8),), cfg)
    assert _weight_bits(qm) == {"fc": 6, "mid": 4, "head": 8}


def test_two_modules_sharing_a_weight_get_one_quantizer():
    torch.manual_seed(0)
    model, x = TiedFirstLast(), torch.randn(4, 4)
    qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(w_bits=4, a_bits=4))
    wq = {n: q for n, q in fxqat.named_quantizers(qm).items() if q.kind == "weight"}
    assert sorted((q.weight_layer, q.bits) for q in wq.values()) == [("a", 8), ("m", 4)]
    out = qm(x)
    assert out.shape == (4, 4) and bool(torch.isfinite(out).all())
    out.sum().backward()
    assert model.a.weight.grad is None  # the user's model is not modified
    assert qm.a.weight is qm.b.weight and qm.a.weight.grad is not None
