"""Tracing: leaf fallback with a warning, run-time training flags, a clear error for untraceable roots."""

import logging
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxqat
from fxqat.trace import TraceFailure, trace


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        if x.mean() > 0:  # data-dependent control flow: not traceable
            return self.conv(x)
        return -self.conv(x)


class PyDropout(nn.Module):
    """A dropout written in Python that reads self.training through a functional call."""

    def forward(self, x):
        return F.dropout(x, 0.5, self.training)


class PyBatchNorm(nn.Module):
    """A norm layer branching on self.training in Python (cannot be traced: kept as a leaf)."""

    def __init__(self, c):
        super().__init__()
        self.register_buffer("mean", torch.zeros(c))

    def forward(self, x):
        if self.training:
            return x - x.mean((0, 2, 3), keepdim=True)
        return x - self.mean.view(1, -1, 1, 1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 3, padding=1)
        self.dd = DataDependent()
        self.drop = PyDropout()
        self.norm = PyBatchNorm(3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        x = self.norm(self.drop(self.dd(self.stem(x))))
        return self.head(x.mean((2, 3)))


def test_untraceable_submodule_becomes_leaf_with_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="fxqat.trace"):
        gm = trace(Net())
    assert set(gm.meta["fxqat.opaque"]) == {"dd", "norm"}
    text = caplog.text
    assert "'dd' (DataDependent) could not be traced" in text and "'norm' (PyBatchNorm)" in text


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_prepared_model_matches_original_in_train_and_eval(mode):
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(4, 3, 8, 8)
    qm = fxqat.prepare_qat(model, (x,))
    fxqat.set_quantization(qm, False)
    getattr(model, mode)()
    getattr(qm, mode)()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(1)
    b = qm(x)
    assert torch.equal(a, b)


def test_dropout_follows_mode_after_tracing_in_eval():
    model = nn.Sequential(nn.Linear(4, 4), PyDropout()).eval()
    gm = trace(model)  # traced in eval mode; dropout must still be active after .train()
    x = torch.ones(64, 4)
    gm.train()
    assert (gm(x) == 0).any()
    gm.eval()
    assert torch.equal(gm(x), model[0](x))


def test_root_failure_names_the_line():
    class Root(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    with pytest.raises(TraceFailure, match=r"Root \(the root module\).*\n  at .*test_trace.py:\d+: +if x.sum\(\) > 0:"):
        trace(Root())


def test_root_training_branch_is_specialised_with_warning(caplog):
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            if self.training:
                return self.fc(x) * 2
            return self.fc(x)

    with caplog.at_level(logging.WARNING, logger="fxqat.trace"):
        gm = trace(Root().eval())
    assert "branches on self.training at the top level" in caplog.text
    x = torch.randn(3, 2)
    assert torch.equal(gm(x), gm.fc(x))


class SamePadConv(nn.Conv2d):
    """TF-style 'same' padding computed from the input size with math.ceil (not traceable: kept as a leaf)."""

    def forward(self, x):
        ih, iw = x.size()[-2:]
        kh, kw = self.weight.size()[-2:]
        oh, ow = math.ceil(ih / self.stride[0]), math.ceil(iw / self.stride[1])
        ph = max((oh - 1) * self.stride[0] + kh - ih, 0)
        pw = max((ow - 1) * self.stride[1] + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class WSConv(nn.Conv2d):
    """Weight-standardised conv: traced through, the quantizer sees the standardised weight."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def test_conv_subclasses_keep_their_own_computation():
    torch.manual_seed(0)
    model = nn.Sequential(SamePadConv(3, 4, 3, stride=2), nn.ReLU(), WSConv(4, 4, 3, padding=1), nn.Flatten(),
                          nn.LazyLinear(2))
    x = torch.randn(2, 3, 9, 9)
    model(x)
    model.eval()
    qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(first_last=None, w_bits=4))
    fxqat.set_quantization(qm, False)
    assert torch.equal(qm(x), model(x))
    qs = fxqat.named_quantizers(qm)
    # the WSConv weight quantizer sits on the standardised weight (a computed tensor, no parameter target)
    assert any(q.kind == "weight" and q.weight_target is None for q in qs.values())
    # SamePadConv is first (kept FP by first_last=None); with first_last=4 its weight is quantized through the leaf
    qm4 = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(first_last=4))
    assert "0.weight" in {q.weight_target for q in fxqat.named_quantizers(qm4).values()}
