"""LSQ against its equations (methods.md §6): forward grid, STE, step-size gradient, init, grad scale."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxqat.config import QuantSpec
from fxqat.quantizers import make_quantizer


def _lsq(bits=4, kind="weight", signed=True, per_channel=False, **opts):
    return make_quantizer(QuantSpec(bits=bits, kind=kind, signed=signed, per_channel=per_channel, options=opts))


def test_init_is_two_mean_abs_over_sqrt_qp():
    w = torch.randn(32, 16)
    q = _lsq(bits=3)
    q(w)
    assert torch.equal(q.scale.data, (2 * w.abs().mean() / math.sqrt(3)).reshape(1))
    assert q.grad_factor.item() == pytest.approx(1 / math.sqrt(w.numel() * 3), rel=1e-6)


def test_per_channel_init():
    w = torch.randn(8, 4, 3, 3)
    q = _lsq(bits=4, per_channel=True)
    q(w)
    expect = 2 * w.abs().reshape(8, -1).mean(1) / math.sqrt(7)
    assert torch.equal(q.scale.data, expect)


def test_recreated_scale_keeps_requires_grad():
    # a per-channel scale is a new Parameter after init (and after loading another shape): a frozen scale (TALR's
    # freeze_weight_scales) must stay frozen, a trainable one trainable
    w = torch.randn(8, 4)
    for frozen in (True, False):
        q = _lsq(bits=4, per_channel=True)
        q.scale.requires_grad_(not frozen)
        q(w)
        assert q.scale.shape == (8,) and q.scale.requires_grad is not frozen
        fresh = _lsq(bits=4, per_channel=True)
        fresh.scale.requires_grad_(not frozen)
        fresh.load_state_dict(q.state_dict())
        assert torch.equal(fresh.scale, q.scale) and fresh.scale.requires_grad is not frozen


@given(st.integers(2, 8), st.floats(0.01, 2.0), st.integers(0, 10_000))
def test_forward_and_gradients_match_equations(bits, s, seed):
    torch.manual_seed(seed)
    x = (torch.randn(64) * 3).requires_grad_()
    q = _lsq(bits=bits, grad_scale=False)
    q.initialize(x.detach())
    q.scale.data.fill_(s)
    y = q(x)
    qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    v = x.detach() / s
    expect = torch.clamp(v, -qn, qp).round() * s
    assert torch.allclose(y, expect, atol=1e-6, rtol=0)  # x/s vs clamp order differ only in float rounding
    g = torch.randn(64)
    y.backward(g)
    inside = (v >= -qn) & (v <= qp)
    # the chain rule multiplies by s and by 1/s: exact up to float rounding of s·(1/s)
    assert torch.allclose(x.grad, torch.where(inside, g, torch.zeros_like(g)), rtol=1e-6, atol=0)
    ds = torch.where(inside, v.round() - v, torch.where(v < -qn, torch.tensor(-qn * 1.0), torch.tensor(qp * 1.0)))
    assert q.scale.grad.item() == pytest.approx(float((g * ds).sum()), rel=1e-4, abs=1e-4)


def test_grad_scale_multiplies_step_gradient():
    x = torch.randn(100)
    grads = []
    for gs in (False, True):
        q = _lsq(bits=4, grad_scale=gs)
        q(x).sum().backward()
        grads.append(q.scale.grad.item())
    assert grads[1] == pytest.approx(grads[0] / math.sqrt(100 * 7), rel=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_values_on_grid(bits):
    w = torch.randn(64, 64)
    q = _lsq(bits=bits)
    y = q(w).detach()
    codes = y / q.scale.detach()
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert len(torch.unique(y)) <= 2**bits


def test_unsigned_activation_range():
    x = torch.rand(16, 10) * 5
    q = _lsq(bits=2, kind="act", signed=None)
    y = q(x)
    assert not q.signed and q.qrange == (0, 3)
    assert set((y / q.scale).round().unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}


def test_fused_forward_equals_ste_forward():
    x = torch.randn(1000) * 2
    a, b = _lsq(bits=3, impl="ste"), _lsq(bits=3, impl="fused")
    ya, yb = a(x), b(x)
    assert torch.allclose(ya, yb, atol=1e-6, rtol=0)


def test_state_dict_round_trip_keeps_initialisation():
    w = torch.randn(8, 3, 3, 3)
    q = _lsq(bits=4, per_channel=True)
    y = q(w)
    q2 = _lsq(bits=4, per_channel=True)
    q2.load_state_dict(q.state_dict())
    assert q2.is_initialized
    assert torch.equal(q2(w * 2), q(w * 2))  # no re-initialisation from the new tensor
    assert not torch.equal(q2(w * 2), _lsq(bits=4, per_channel=True)(w * 2))
    assert torch.equal(q2(w), y)


def test_torch_ao_helpers_toggle_fake_quant():
    from torch.ao.quantization import disable_fake_quant, enable_fake_quant

    x = torch.randn(10)
    q = _lsq(bits=2)
    q.apply(disable_fake_quant)
    assert torch.equal(q(x), x)
    q.apply(enable_fake_quant)
    assert not torch.equal(q(x), x)


@pytest.mark.parametrize("per_channel", [False, True])
def test_function_impl_equals_plain_ops_impl(per_channel):
    torch.manual_seed(3)
    w = torch.randn(8, 4, 3, 3) * 2
    up = torch.randn_like(w)
    res = {}
    for impl in ("function", "ste"):
        q = _lsq(bits=3, per_channel=per_channel, impl=impl)
        x = w.clone().requires_grad_()
        y = q(x)
        y.backward(up)
        res[impl] = (y.detach(), x.grad, q.scale.grad)
    assert torch.equal(res["function"][0], res["ste"][0])  # identical forward
    c = (w / q.scale.detach().abs().reshape(-1, 1, 1, 1) if per_channel else w / q.scale.detach().abs())
    inside = (c >= -4) & (c <= 3)
    assert torch.equal(res["function"][1], up * inside)  # exact STE mask
    assert torch.allclose(res["function"][2], res["ste"][2], rtol=1e-5, atol=1e-6)  # summation order differs
