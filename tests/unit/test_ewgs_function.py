"""EWGS's fast autograd.Function (``impl="function"``) against the plain-ops path (``impl="autograd"``), float64.

Same forward bits; gradients to x, lower, upper and the output scale equal to float64 rounding (1e-10), with δ's
element-wise scaling, for weights (learnable, fixed and no output scale; per-tensor and per-channel) and
activations (``act_output`` "denorm" and "unit"), including elements exactly at the clip bounds.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxqat.config import QuantSpec
from fxqat.quantizers import make_quantizer
from fxqat.quantizers._ewgs_function import EWGSFunction
from fxqat.quantizers.ewgs import refresh_ewgs_delta

seed_st = st.integers(0, 2**16)
bits_st = st.integers(1, 5)
TOL = dict(rtol=1e-10, atol=1e-10)  # float64 rounding: the same sums in another order

CASES = [
    ("weight", False, {}),
    ("weight", True, {}),
    ("weight", False, {"out_scale": "fixed"}),
    ("weight", True, {"out_scale": "none"}),
    ("act", False, {}),
    ("act", False, {"act_output": "unit"}),
]


def _quantizer(kind, bits, per_channel, impl, **opts):
    spec = QuantSpec(bits=bits, method="ewgs", kind=kind, signed=kind == "weight", per_channel=per_channel,
                     options={"impl": impl, **opts})
    return make_quantizer(spec).double()


def _run(q, x, g):
    xx = x.clone().requires_grad_()
    y = q(xx)
    y.backward(g)
    return y.detach(), xx.grad, {k: p.grad for k, p in q.named_parameters()}


@pytest.mark.parametrize("kind,per_channel,opts", CASES)
@given(seed=seed_st, bits=bits_st, delta=st.floats(0.0, 3.0), shrink=st.floats(0.3, 1.2))
def test_fast_path_equals_autograd_path(kind, per_channel, opts, seed, bits, delta, shrink):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 4, 3, 3, generator=gen, dtype=torch.float64)
    if kind == "act":
        x = torch.relu(x)  # l = min(x) = 0: about half the elements sit exactly on the lower bound
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    qs = {impl: _quantizer(kind, bits, per_channel, impl, **opts) for impl in ("function", "autograd")}
    for q in qs.values():
        q(x)
        with torch.no_grad():
            q.upper.mul_(shrink)  # shrink < 1 clips the top of the range
            q.delta.fill_(delta)
            if isinstance(q.out_scale, torch.nn.Parameter):
                q.out_scale.mul_(1.0 - 2.0 * (seed % 2))  # a negative output scale flips sign(g_q)
    if kind == "weight":  # elements exactly on both bounds of channel 0
        q = qs["function"]
        x = x.clone()
        x.view(6, -1)[0, :2] = torch.stack([q.lower.view(-1)[0], q.upper.view(-1)[0]]).detach()
    out = {impl: _run(q, x, g) for impl, q in qs.items()}
    (yf, gxf, pf), (ya, gxa, pa) = out["function"], out["autograd"]
    assert torch.equal(yf, ya)
    torch.testing.assert_close(gxf, gxa, **TOL)
    assert pf.keys() == pa.keys()
    for k in pa:
        torch.testing.assert_close(pf[k], pa[k], **TOL, msg=lambda m, k=k: f"{k}: {m}")


@given(seed=seed_st, bits=bits_st)
def test_no_grad_forward_is_the_same(seed, bits):
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    qf, qa = _quantizer("weight", bits, True, "function"), _quantizer("weight", bits, True, "autograd")
    qf(x), qa(x)
    with torch.no_grad():
        assert torch.equal(qf(x), qa(x))
    assert torch.equal(qf(x).detach(), qa(x).detach())


def test_function_docstring_gradients_on_a_small_case():
    """unit mode, δ = 0.5: g_x = g·(1 + δ·sign(g)·(x_n − x_q))/w inside (0, 1), 0 outside and on the bounds."""
    x = torch.tensor([-0.5, 0.0, 0.1, 0.4, 1.0, 1.5], dtype=torch.float64, requires_grad=True)
    lo = torch.tensor([0.0], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([1.0, 1.0, -2.0, 3.0, 1.0, 1.0], dtype=torch.float64)
    EWGSFunction.apply(x, lo, w, None, torch.tensor([0.5], dtype=torch.float64), 3, "unit").backward(g)
    # x_n − x_q: 0.1 − 0 = 0.1, 0.4 − 1/3 = 1/15
    expect = torch.tensor([0.0, 0.0, -2.0 * (1 - 0.5 * 0.1), 3.0 * (1 + 0.5 / 15), 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(x.grad, expect, **TOL)
    torch.testing.assert_close(lo.grad, -expect.sum().reshape(1), **TOL)
    torch.testing.assert_close(w.grad, -(expect * x.detach()).sum().reshape(1), **TOL)


def test_delta_refresh_uses_the_twice_differentiable_path():
    x = torch.rand(6, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    q = _quantizer("act", 3, False, "function", act_output="unit")
    q(x)
    deltas = refresh_ewgs_delta(q, lambda out, _: 0.5 * out.pow(2).sum(), [(x, None)])
    assert deltas[0] == pytest.approx(1 / (3 * q(x).detach().std().item()), rel=1e-9)
