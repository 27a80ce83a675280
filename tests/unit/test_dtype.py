"""bf16 / fp16 tensors through every quantizer method: the dtype rule of :mod:`fxqat.quantizers.base`.

A quantizer fake-quantizes a bfloat16 or float16 tensor in float32 and hands back the input's dtype; its own
parameters and buffers stay float32 when the model is cast (``.to(torch.bfloat16)``, ``.half()``).

Bounds: every comparison here is bit-exact (atol=0). The reference is the same quantizer (a deep copy, same state,
same random stream) run in float32 on the widened input: widening bf16/fp16 to float32 is exact, so the float32
arithmetic is the same, and the only rounding left is the final cast of the output and of the input's gradient to
the narrow dtype; parameter gradients (float32) are equal as they stand.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from strategies import LOW_PRECISION, low_precision_quant_st

import fxqat
from fxqat.config import QuantSpec
from fxqat.quantizers import NotAffineError, make_quantizer
from fxqat.quantizers.base import compute_dtype, is_narrow_float


def _spec(method: str, granularity: str, kind: str) -> QuantSpec:
    kw = dict(bits=8 if method == "dynamic" else 4, method=method, kind=kind, granularity=granularity)
    if granularity == "per_group":
        kw["group_size"] = 32 if method == "gguf" else 16  # GGUF's Q4_0 blocks are 32 wide
    return QuantSpec(**kw)


def _float_state(q: nn.Module):
    return [t for t in list(q.parameters()) + list(q.buffers()) if t.is_floating_point()]


@given(low_precision_quant_st())
def test_every_method_returns_the_input_dtype_and_computes_in_float32(case):
    method, gran, kind, dtype, x, seed = case
    q = make_quantizer(_spec(method, gran, kind)).to(dtype)  # what a model cast does to its quantizers
    q32 = copy.deepcopy(q)
    xl, x32 = x.clone().requires_grad_(), x.float().requires_grad_()
    torch.manual_seed(seed)
    y = q(xl)
    torch.manual_seed(seed)
    y32 = q32(x32)
    assert y.dtype == dtype
    assert all(t.dtype == torch.float32 for t in _float_state(q)), method  # initialised in float32 too
    assert torch.equal(y, y32.to(dtype))
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    y.backward(g)
    y32.backward(g.float())
    assert xl.grad.dtype == dtype and torch.equal(xl.grad, x32.grad.to(dtype))
    for p, p32 in zip(q.parameters(), q32.parameters()):
        assert (p.grad is None) == (p32.grad is None)
        if p.grad is not None:
            assert p.grad.dtype == torch.float32 and torch.equal(p.grad, p32.grad)
    try:
        codes = q.integer_repr(x)
    except NotAffineError:
        return
    assert torch.equal(codes, q32.integer_repr(x.float()))


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_gradient_quantizer_quantizes_a_narrow_gradient_in_float32(dtype):
    q = make_quantizer(QuantSpec(bits=4, method="grad", kind="grad")).to(dtype)
    q32 = copy.deepcopy(q)
    x = torch.randn(8, 64).to(dtype).requires_grad_()
    x32 = x.detach().float().requires_grad_()
    g = torch.randn(8, 64).to(dtype)
    torch.manual_seed(3)
    q(x * 1).backward(g)
    torch.manual_seed(3)
    q32(x32 * 1).backward(g.float())
    assert x.grad.dtype == dtype and q.gamma.dtype == torch.float32
    assert torch.equal(x.grad, x32.grad.to(dtype))
    assert 2 < len(torch.unique(x32.grad)) <= 15  # the 4-bit gradient grid (2^4 - 1 levels), before the cast


def test_casting_a_model_keeps_quantizer_state_float32_and_exact():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(8, 16)
    qm = fxqat.prepare_qat(net, (x,), fxqat.QATConfig(w_bits=4, a_bits=4, w_granularity="per_channel"))
    qm(x)
    before = {n: t.clone() for n, t in qm.state_dict().items() if ".w_" in n or ".a_" in n}
    assert any(t.numel() > 1 for t in before.values())  # per-channel scales
    qm.to(torch.bfloat16)
    for name, t in qm.state_dict().items():
        if name in before:
            assert t.dtype == before[name].dtype and torch.equal(t, before[name]), name  # no bf16 rounding
        elif t.is_floating_point():
            assert t.dtype == torch.bfloat16, name  # the model's own weights follow the cast
    assert qm(x.to(torch.bfloat16)).dtype == torch.bfloat16
    qm.half()
    assert {t.dtype for q in fxqat.named_quantizers(qm).values() for t in _float_state(q)} == {torch.float32}
    qm.double()  # a wider float still applies to quantizers (float64 quantizers: last-digit studies)
    assert {t.dtype for q in fxqat.named_quantizers(qm).values() for t in _float_state(q)} == {torch.float64}


def test_compute_dtype_rule():
    assert [compute_dtype(d) for d in (torch.bfloat16, torch.float16, torch.float32, torch.float64)] == [
        torch.float32, torch.float32, torch.float32, torch.float64]
    assert is_narrow_float(torch.float8_e4m3fn) and not is_narrow_float(torch.int8)
