"""DSQ's fast autograd.Functions (eager: ``DSQFunction``; under torch.compile: ``DSQFusedFunction``) against autograd
through the plain-ops reference ``dsq_soft`` (float64).

Gradients to x, lower, upper and alpha must agree to float64 rounding (1e-10), per-tensor and per-channel, in soft
and ``train_forward="hard"`` modes, including elements exactly at the clip bounds (autograd splits the gradient
of ``torch.maximum``/``torch.minimum`` evenly there; the Function reproduces the split).
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxqat.config import QuantSpec
from fxqat.quantizers import make_quantizer
from fxqat.quantizers._dsq_function import DSQFunction, DSQFusedFunction, dsq_hard
from fxqat.quantizers.dsq import dsq_soft

seed_st = st.integers(0, 2**16)
bits_st = st.integers(1, 5)
alpha_st = st.floats(1e-3, 0.5)
TOL = dict(rtol=1e-10, atol=1e-10)  # float64 rounding: the two compute the same sums in another order


def _reference(x, lo, up, alpha, bits, hard):
    """The previous DSQQuantizer.quantize: Q_S by autograd, value hard-rounded in hard mode."""
    soft = dsq_soft(x, lo, up, alpha, bits)
    if not hard:
        return soft
    n = 2**bits - 1
    delta = (up - lo).detach() / n
    xc = torch.minimum(torch.maximum(x.detach(), lo.detach()), up.detach())
    return lo.detach() + delta * torch.round((xc - lo.detach()) / delta) + (soft - soft.detach())


def _case(seed, per_channel):
    """Weights (6, 4, 3, 3) with bounds per channel or per tensor; each channel has one element at l and one at u."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    c = 6 if per_channel else 1
    lo = -0.3 - torch.rand(c, generator=g, dtype=torch.float64)
    up = 0.3 + torch.rand(c, generator=g, dtype=torch.float64)
    flat = x.view(6, -1)
    flat[:, 0] = lo.expand(6)
    flat[:, 1] = up.expand(6)
    return x, lo, up, torch.randn(x.shape, generator=g, dtype=torch.float64)


def _grads(fn, x, lo, up, alpha, g):
    leaves = [t.clone().requires_grad_() for t in (x, lo, up, alpha)]
    y = fn(*leaves)
    y.backward(g)
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("function", [DSQFunction, DSQFusedFunction], ids=["eager", "fused"])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("hard", [False, True])
@given(seed=seed_st, bits=bits_st, alpha=alpha_st)
def test_function_gradients_equal_dsq_soft_autograd(function, per_channel, hard, seed, bits, alpha):
    x, lo, up, g = _case(seed, per_channel)
    a = torch.tensor([alpha], dtype=torch.float64)
    view = (-1, 1, 1, 1) if per_channel else (1,)
    n = 2**bits - 1
    y_ref, g_ref = _grads(lambda *t: _reference(t[0], t[1].view(view), t[2].view(view), t[3], bits, hard),
                          x, lo, up, a, g)
    y_new, g_new = _grads(lambda *t: function.apply(t[0], t[1].view(view), t[2].view(view), t[3], n, hard),
                          x, lo, up, a, g)
    if hard:
        assert torch.equal(y_new, y_ref)
    else:
        torch.testing.assert_close(y_new, y_ref, rtol=0, atol=1e-12)  # another order of operations
    for name, gn, gr in zip(("x", "lower", "upper", "alpha"), g_new, g_ref):
        torch.testing.assert_close(gn, gr, **TOL, msg=lambda m, name=name: f"{name}: {m}")


def _quantizer(kind, bits, per_channel, impl, **opts):
    spec = QuantSpec(bits=bits, method="dsq", kind=kind, signed=kind == "weight", per_channel=per_channel,
                     options={"impl": impl, "init": "minmax", **opts})  # minmax: max(x) is a data point (a tie)
    return make_quantizer(spec).double()


@pytest.mark.parametrize("kind,per_channel", [("weight", False), ("weight", True), ("act", False)])
@pytest.mark.parametrize("train_forward", ["soft", "hard"])
@given(seed=seed_st, bits=bits_st, alpha=st.floats(-0.5, 1.5))
def test_quantizer_impls_agree(kind, per_channel, train_forward, seed, bits, alpha):
    """The whole quantizer (channel views, u = max(u, l + ε), α clamped to alpha_range: 0 gradient outside)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 4, 3, 3, generator=gen, dtype=torch.float64)
    x = torch.relu(x) if kind == "act" else x  # act: l = min = 0, shared by about half the elements
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    out = {}
    for impl in ("function", "autograd"):
        q = _quantizer(kind, bits, per_channel, impl, train_forward=train_forward)
        q(x)
        with torch.no_grad():
            q.alpha.fill_(alpha)
        xx = x.clone().requires_grad_()
        y = q(xx)
        y.backward(g)
        out[impl] = (y.detach(), xx.grad, {k: p.grad for k, p in q.named_parameters()})
    (yf, gxf, pf), (ya, gxa, pa) = out["function"], out["autograd"]
    torch.testing.assert_close(yf, ya, rtol=0, atol=0 if train_forward == "hard" else 1e-12)
    torch.testing.assert_close(gxf, gxa, **TOL)
    for k in pa:
        torch.testing.assert_close(pf[k], pa[k], **TOL, msg=lambda m, k=k: f"{k}: {m}")
    if not 1e-3 <= alpha <= 0.5:
        assert pf["alpha"].item() == 0.0


@given(seed=seed_st, bits=bits_st)
def test_eval_and_no_grad_forward_on_the_grid(seed, bits):
    x = torch.randn(64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
    q = _quantizer("act", bits, False, "function")
    q(x)
    q.eval()
    y = q(x)
    with torch.no_grad():
        y0 = q(x)
    lo, up = q.lower.detach(), q.upper.detach()
    assert torch.equal(y.detach(), y0) and torch.equal(y0, dsq_hard(x, lo, up, 2**bits - 1))
    grid = q.grid()
    assert ((y0.reshape(-1, 1) - grid.reshape(1, -1)).abs().amin(1) == 0).all()


def test_function_is_not_twice_differentiable_autograd_impl_is():
    x = torch.linspace(-1, 1, 11, dtype=torch.float64, requires_grad=True)
    lo, up = torch.tensor([-0.8], dtype=torch.float64), torch.tensor([0.9], dtype=torch.float64)
    a = torch.tensor([0.3], dtype=torch.float64)
    (gx,) = torch.autograd.grad(dsq_soft(x, lo, up, a, 2).sum(), x, create_graph=True)
    assert gx.requires_grad  # the reference has a Hessian
    (gx,) = torch.autograd.grad(DSQFunction.apply(x, lo, up, a, 3, False).sum(), x, create_graph=True)
    assert not gx.requires_grad  # once_differentiable: no graph to differentiate again (use impl="autograd")
