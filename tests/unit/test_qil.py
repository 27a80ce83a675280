"""QIL (methods.md §2): transformer geometry, discretizer levels, analytic gradients, output-scale options."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxqat.config import QuantSpec
from fxqat.quantizers import make_quantizer
from fxqat.quantizers.qil import qil_transform

seed_st = st.integers(0, 2**16)
bits_st = st.integers(2, 6)
gamma_st = st.floats(0.4, 2.5)
prune_st = st.floats(0.0, 0.9)  # (c − d)/d: 0 = no pruning band


def _qil(kind="weight", bits=4, **opts):
    return make_quantizer(QuantSpec(bits=bits, method="qil", kind=kind, signed=kind == "weight", options=opts))


def _t(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_transformer_maps_interval_ends_prunes_and_clips():
    c, d = _t(1.0), _t(0.4)
    w = _t(0.6, -0.6, 1.4, -1.4, 0.1, -0.3, 0.59, 2.0, -7.0, 1.0)
    t = qil_transform(w, c, d, gamma=_t(1.7))
    assert t.tolist()[:4] == [0.0, 0.0, 1.0, -1.0]  # c − d -> 0, c + d -> 1 (both signs)
    assert t.tolist()[4:7] == [0.0, 0.0, 0.0]  # |w| < c − d: pruned to exactly 0
    assert t.tolist()[7:9] == [1.0, -1.0]  # |w| > c + d: clipped to sign(w)
    assert t[9].item() == pytest.approx(0.5**1.7, rel=1e-12)  # the centre maps to ½ before the power


@given(c=st.floats(0.2, 3.0), half=st.floats(0.05, 1.0), seed=seed_st)
def test_gamma_one_is_linear_paper_form(c, half, seed):
    d = min(half, c)  # c ≥ d keeps the pruning band non-negative, as in the paper (c_W > 0, d_W > 0)
    w = torch.randn(500, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 * c
    t = qil_transform(w, _t(c), _t(d), gamma=_t(1.0))
    alpha, beta = 0.5 / d, 0.5 - 0.5 * c / d
    inside = (w.abs() > c - d) & (w.abs() < c + d)
    expect = torch.sign(w) * (alpha * w.abs() + beta)
    assert torch.allclose(t[inside], expect[inside], rtol=1e-12, atol=1e-15)
    assert bool((t[w.abs() <= c - d] == 0).all()) and bool((t[w.abs() >= c + d].abs() == 1).all())
    ta = qil_transform(w.abs(), _t(c), _t(d), signed=False)  # activations: same map, unsigned
    assert torch.allclose(ta[inside], (alpha * w.abs() + beta)[inside], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_discretizer_levels(bits):
    qw = _qil("weight", bits, out_scale="none")
    w = torch.linspace(-3, 3, 4001)
    qw(w)
    qw.eval()
    n = 2 ** (bits - 1) - 1
    levels = torch.unique(qw(w).detach())
    assert levels.numel() == 2 * n + 1  # symmetric, with zero, one code unused
    assert torch.allclose(levels, torch.arange(-n, n + 1) / n, atol=1e-7)
    qa = _qil("act", bits, out_scale="none")
    a = torch.linspace(0, 3, 4001)
    qa(a)
    qa.eval()
    m = 2**bits - 1
    assert torch.allclose(torch.unique(qa(a).detach()), torch.arange(0, m + 1) / m, atol=1e-7)


@given(seed=seed_st, bits=bits_st, gamma=gamma_st, prune=prune_st)
def test_weight_gradients_match_analytic_derivatives(seed, bits, gamma, prune):
    q = _qil("weight", bits, out_scale="fixed").double()
    w = torch.randn(256, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).requires_grad_()
    q(w.detach())
    d = 0.6
    c = d * (1 + prune)
    with torch.no_grad():
        q.c.fill_(c), q.d.fill_(d), q.gamma.fill_(gamma), q.out_scale.fill_(1.3)
    g = torch.randn(256, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    q(w).backward(g)
    a, sg, o = w.detach().abs(), torch.sign(w.detach()), 1.3
    t = (a - c) / (2 * d) + 0.5
    inside = (t > 0) & (t < 1)
    tt = torch.where(inside, t, torch.ones_like(t))
    dt = gamma * tt ** (gamma - 1)  # ∂(t^γ)/∂t
    z = torch.zeros_like(g)
    assert torch.allclose(w.grad, torch.where(inside, o * dt / (2 * d) * g, z), rtol=1e-10, atol=1e-12)
    dc = torch.where(inside, g * o * sg * dt * (-1 / (2 * d)), z).sum()
    dd = torch.where(inside, g * o * sg * dt * (-(a - c) / (2 * d * d)), z).sum()
    dgam = torch.where(inside, g * o * sg * tt**gamma * torch.log(tt), z).sum()
    assert q.c.grad.item() == pytest.approx(dc.item(), rel=1e-9, abs=1e-10)
    assert q.d.grad.item() == pytest.approx(dd.item(), rel=1e-9, abs=1e-10)
    assert q.gamma.grad.item() == pytest.approx(dgam.item(), rel=1e-9, abs=1e-10)


@given(seed=seed_st, bits=bits_st, prune=prune_st)
def test_activation_gradients_match_analytic_derivatives(seed, bits, prune):
    q = _qil("act", bits).double()
    x = torch.rand(256, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).mul(3).requires_grad_()
    q(x.detach())
    d = 0.8
    c = d * (1 + prune)
    with torch.no_grad():
        q.c.fill_(c), q.d.fill_(d), q.out_scale.fill_(0.9)
    g = torch.randn(256, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    y = q(x)
    y.backward(g)
    t = (x.detach() - c) / (2 * d) + 0.5
    inside = (t > 0) & (t < 1)
    z = torch.zeros_like(g)
    n = 2**bits - 1
    assert torch.allclose(x.grad, torch.where(inside, 0.9 / (2 * d) * g, z), rtol=1e-10, atol=1e-12)
    dc = torch.where(inside, -0.9 / (2 * d) * g, z).sum()
    assert q.c.grad.item() == pytest.approx(dc.item(), rel=1e-9, abs=1e-10)
    dd = torch.where(inside, -0.9 * (x.detach() - c) / (2 * d * d) * g, z).sum()
    assert q.d.grad.item() == pytest.approx(dd.item(), rel=1e-9, abs=1e-10)
    xbar = torch.round(t.clamp(0, 1) * n) / n
    assert q.out_scale.grad.item() == pytest.approx((g * xbar).sum().item(), rel=1e-9, abs=1e-10)


def test_flat_regions_and_kinks_have_finite_zero_gradients():
    c, d = _t(1.0).requires_grad_(), _t(0.5).requires_grad_()
    gamma = _t(0.5).requires_grad_()  # γ < 1: t^(γ−1) is infinite at t = 0, must not leak as NaN
    w = _t(0.0, 0.2, -0.5, 0.5, 1.5, 3.0, -4.0).requires_grad_()  # zero, pruned, the kink c − d, clip, beyond
    qil_transform(w, c, d, gamma).sum().backward()
    for grad in (w.grad, c.grad, d.grad, gamma.grad):
        assert bool(torch.isfinite(grad).all())
    assert w.grad.tolist()[:3] == [0.0, 0.0, 0.0] and w.grad.tolist()[5:] == [0.0, 0.0]
    assert gamma.grad.item() == 0.0  # every point is in a flat region or at t ∈ {0, 1}


def test_transformer_gradcheck_away_from_kinks():
    g = torch.Generator().manual_seed(0)
    w = (torch.rand(30, generator=g, dtype=torch.float64) * 0.9 + 0.55) * torch.sign(torch.randn(30, generator=g))
    c, d, gamma = _t(1.0), _t(0.5), _t(1.3)
    for t in (w, c, d, gamma):
        t.requires_grad_()
    assert torch.autograd.gradcheck(qil_transform, (w, c, d, gamma), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["learnable", "fixed", "interval", "none"])
def test_output_scale_options(mode):
    w = torch.randn(64, 9, generator=torch.Generator().manual_seed(0))
    q = _qil("weight", 3, out_scale=mode)
    y = q(w)
    u = torch.minimum(3 * w.std(), w.abs().max()).item()
    expect_max = {"learnable": u, "fixed": u, "interval": u, "none": 1.0}[mode]
    assert y.abs().max().item() == pytest.approx(expect_max, rel=1e-6)
    names = dict(q.named_parameters())
    assert ("out_scale" in names) == (mode == "learnable")
    y.pow(2).sum().backward()
    if mode == "interval":  # the live c + d scales the output: both get the extra gradient
        assert q.c.grad.abs().item() > 0 and q.d.grad.abs().item() > 0


def test_initialised_quantizer_is_a_uniform_grid_on_zero_to_u():
    """With the [R] init (c = d = u/2, scale u) QIL starts as a plain uniform quantizer of step u/n."""
    x = torch.relu(torch.randn(4, 8, 5, 5, generator=torch.Generator().manual_seed(1)))
    q = _qil("act", 4)
    y = q(x).detach()
    u = (q.c + q.d).item()
    expect = torch.round(torch.clamp(x / u, 0, 1) * 15) / 15 * u
    assert (y - expect).abs().max().item() <= 1e-6 * u
    s, zp, qmin, qmax = q.affine_qparams()
    assert s.item() == pytest.approx(u / 15, rel=1e-6) and (zp.item(), qmin, qmax) == (0, 0, 15)


def test_one_bit_weights_are_rejected():
    with pytest.raises(ValueError, match="bits >= 2"):
        _qil("weight", 1)


def test_learn_gamma_false_keeps_gamma_a_buffer():
    q = _qil("weight", 3, learn_gamma=False, gamma_init=0.75)
    assert "gamma" not in dict(q.named_parameters()) and q.gamma.item() == 0.75
    w = torch.linspace(-2, 2, 101)
    y = q(w).detach()
    c, d = q.c.item(), q.d.item()
    t = torch.clamp((w.abs() - c) / (2 * d) + 0.5, 0, 1) ** 0.75
    expect = torch.sign(w) * torch.round(t * 3) / 3 * q.out_scale.item()
    assert (y - expect).abs().max().item() <= 1e-6
    assert math.isfinite(float(y.sum()))
