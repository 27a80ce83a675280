"""The quantizer zoo (QIL, LSQ+, PACT, DoReFa, EWGS, DSQ, noise tempering) against methods.md §2, §5, §6.

Properties common to every method, parametrized over methods and tensor kinds: eval-mode outputs on the method's
grid, idempotence, state_dict round trip, option validation, registration. Closed-form gradient and
initialisation checks per method follow, on hypothesis-generated tensors (seed + scale -> deterministic tensor).
QIL, noise tempering, EWGS's δ refresh and the progressive schedule have their own files.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxqat.config import QATConfig, QuantSpec
from fxqat.quantizers import NotAffineError, make_quantizer
from fxqat.quantizers.dorefa import dorefa_weight
from fxqat.quantizers.dsq import dsq_soft

METHODS = ["qil", "lsq_plus", "pact", "dorefa", "ewgs", "dsq", "noise_temper"]
KINDS = ["weight", "act", "act_signed"]  # act: post-ReLU data (unsigned grid); act_signed: data with negatives
CASES = [(m, k) for m in METHODS for k in KINDS]
# weight grids that are not fixed points of their own quantizer: tanh normalisation (DoReFa, PACT weights) and
# EWGS's [l, u] -> [−1, 1] map with an independent output scale. For these q(q(x)) lies on the grid but moves.
NOT_FIXED_POINT = {("dorefa", "weight"), ("pact", "weight"), ("ewgs", "weight")}

seed_st = st.integers(0, 2**16)
scale_st = st.floats(0.05, 20.0)
bits_st = st.integers(2, 5)


def make(method, kind, bits=4, per_channel=False, **opts):
    signed = {"weight": True, "act": False, "act_signed": None}[kind]
    spec = QuantSpec(
        bits=bits,
        method=method,
        kind="weight" if kind == "weight" else "act",
        signed=signed,
        per_channel=per_channel,
        options=opts,
    )
    return make_quantizer(spec)


def sample(kind, seed, scale=1.0, shape=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shape = shape or ((6, 4, 3, 3) if kind == "weight" else (4, 5, 6, 6))
    x = torch.randn(shape, generator=g, dtype=dtype) * scale
    return torch.relu(x) if kind == "act" else x


def dist_to_grid(y, grid):
    """Largest distance from an element of y to its nearest grid level (grid [L] or per-channel [C, L])."""
    if grid.dim() == 1:
        return (y.reshape(-1, 1) - grid.reshape(1, -1)).abs().amin(1).max().item()
    flat = y.reshape(y.shape[0], -1, 1)
    return (flat - grid[:, None, :]).abs().amin(2).max().item()


# ------------------------------------------------------------------------------------------------ registration
@pytest.mark.parametrize("method", METHODS)
def test_qatconfig_accepts_method(method):
    cfg = QATConfig(method=method)
    assert cfg.method == method
    assert cfg.spec_for("weight").method == method and cfg.spec_for("act").method == method
    q = make_quantizer(cfg.spec_for("weight"))
    assert q.method == method and q.bits == 4 and q.kind == "weight"


@pytest.mark.parametrize("method", METHODS)
def test_unknown_option_is_rejected(method):
    with pytest.raises(ValueError, match="unknown option|has no option"):
        make(method, "weight", no_such_option=1)


@pytest.mark.parametrize("method", METHODS)
def test_default_options_are_documented_defaults(method):
    q = make(method, "act")
    assert q.opts == type(q).default_options
    assert len(q.opts) >= 1


# ------------------------------------------------------------------------------------------------ grid
@pytest.mark.parametrize("method,kind", CASES)
@given(bits=bits_st, seed=seed_st, scale=scale_st)
def test_eval_outputs_lie_on_grid(method, kind, bits, seed, scale):
    q = make(method, kind, bits)
    x = sample(kind, seed, scale)
    q(x)  # first (training) forward initialises
    q.eval()
    y = q(x).detach()
    grid = q.grid()
    assert y.shape == x.shape
    assert grid.numel() <= 2**bits
    assert torch.unique(y).numel() <= 2**bits
    assert dist_to_grid(y, grid) == 0.0  # outputs are computed with the same ops as the grid: bit-exact


@pytest.mark.parametrize("method", METHODS)
@given(bits=bits_st, seed=seed_st, scale=scale_st)
def test_per_channel_weights_lie_on_per_channel_grid(method, bits, seed, scale):
    q = make(method, "weight", bits, per_channel=True)
    w = sample("weight", seed, scale, shape=(5, 3, 3, 3))
    q(w)
    q.eval()
    y = q(w).detach()
    grid = q.grid()
    assert grid.shape == (5, grid.shape[1]) and grid.shape[1] <= 2**bits
    assert max(torch.unique(y[c]).numel() for c in range(5)) <= 2**bits
    assert dist_to_grid(y, grid) == 0.0


@pytest.mark.parametrize("method", METHODS)
def test_per_channel_axis_one(method):
    """ch_axis=1 (e.g. a Linear stored transposed): one grid per column."""
    spec = QuantSpec(bits=3, method=method, kind="weight", signed=True, per_channel=True, ch_axis=1)
    q = make_quantizer(spec)
    w = sample("weight", 3, shape=(7, 4))
    q(w)
    q.eval()
    y = q(w).detach()
    assert q.grid().shape[0] == 4
    assert dist_to_grid(y.t(), q.grid()) == 0.0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(16,), (8, 12), (2, 3, 4, 5), (2, 3, 4, 5, 2)])
def test_activation_any_batch_shape(method, shape):
    q = make(method, "act", 3)
    x = sample("act", 1, shape=shape)
    y = q(x)
    q.eval()
    ye = q(x)
    assert y.shape == x.shape and ye.shape == x.shape
    assert torch.unique(ye).numel() <= 8
    assert bool(torch.isfinite(y).all())


# ------------------------------------------------------------------------------------------------ idempotence
@pytest.mark.parametrize("method,kind", CASES)
@given(bits=bits_st, seed=seed_st, scale=scale_st)
def test_eval_quantization_is_idempotent(method, kind, bits, seed, scale):
    q = make(method, kind, bits)
    x = sample(kind, seed, scale)
    q(x)
    q.eval()
    y = q(x).detach()
    yy = q(y).detach()
    if (method, kind) in NOT_FIXED_POINT:
        # the grid is not a fixed point (see NOT_FIXED_POINT): the second pass stays on the grid
        assert dist_to_grid(yy, q.grid()) == 0.0
    else:
        assert torch.equal(yy, y)


def test_dorefa_weight_grid_is_not_a_fixed_point():
    """Why DoReFa weights are excluded above: tanh warps the grid, so q(q(w)) != q(w) at 4 bits."""
    q = make("dorefa", "weight", 4, out_scale="none")
    w = torch.linspace(-3, 3, 1001)
    q(w)
    q.eval()
    y = q(w).detach()
    assert not torch.equal(q(y).detach(), y)


# ------------------------------------------------------------------------------------------------ state_dict
@pytest.mark.parametrize(
    "method,kind,per_channel", [(m, k, False) for m, k in CASES] + [(m, "weight", True) for m in METHODS]
)
def test_state_dict_round_trip(method, kind, per_channel):
    torch.manual_seed(0)
    q = make(method, kind, 3, per_channel=per_channel)
    x = sample(kind, 7, 2.0)
    for _ in range(3):  # a few training steps so the parameters move away from their init
        y = q(x)
        if not y.requires_grad:  # DoReFa-style weights with a fixed output scale have no parameters
            break
        y.pow(2).sum().backward()
        with torch.no_grad():
            for p in q.parameters():
                p -= 1e-3 * p.grad
                p.grad = None
    q.eval()
    fresh = make(method, kind, 3, per_channel=per_channel)
    fresh.load_state_dict(q.state_dict())
    fresh.eval()
    assert torch.equal(fresh(x), q(x))
    assert fresh.is_initialized and fresh.signed == q.signed
    for name, t in q.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], t), name


@pytest.mark.parametrize("method", METHODS)
def test_fresh_quantizer_does_not_reinitialise_after_load(method):
    q = make(method, "act", 4)
    q(sample("act", 0))
    fresh = make(method, "act", 4)
    fresh.load_state_dict(q.state_dict())
    before = {k: v.clone() for k, v in fresh.state_dict().items() if k != "step"}
    fresh(sample("act", 1, 10.0))  # very different data: would change a data-dependent init
    after = fresh.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------------------------ affine export
AFFINE = [("lsq_plus", "weight"), ("pact", "act"), ("pact", "act_signed"), ("dorefa", "act"), ("ewgs", "act"),
          ("dsq", "act"), ("noise_temper", "weight"), ("noise_temper", "act"), ("qil", "weight"), ("qil", "act")]


@pytest.mark.parametrize("method,kind", AFFINE)
@given(seed=seed_st, scale=scale_st)
def test_affine_qparams_reproduce_eval_output(method, kind, seed, scale):
    q = make(method, kind, 4)
    x = sample(kind, seed, scale)
    q(x)
    q.eval()
    y = q(x).detach()
    s, zp, qmin, qmax = q.affine_qparams()
    assert zp.dtype == torch.int32
    ref = (torch.clamp(torch.round(x / s) + zp, qmin, qmax) - zp) * s
    # same grid, computed by a different sequence of float ops: equal up to a few ulps of the scale
    assert (y - ref).abs().max().item() <= 1e-5 * float(s.max())


@pytest.mark.parametrize(
    "method,kind,opts,why",
    [
        ("qil", "weight", {"gamma_init": 1.5}, "γ"),
        ("dorefa", "weight", {}, "tanh"),
        ("pact", "weight", {}, "tanh"),
        ("ewgs", "weight", {}, "zero level"),
        ("ewgs", "act", {"act_output": "unit"}, "denorm"),
    ],
)
def test_not_affine_raises_with_reason(method, kind, opts, why):
    q = make(method, kind, 4, **opts)
    q(sample(kind, 0))
    q.eval()
    with pytest.raises(NotAffineError, match=why):
        q.affine_qparams()


def test_dsq_soft_mode_has_no_affine_equivalent_until_eval():
    q = make("dsq", "act", 4)
    q(sample("act", 0))
    with pytest.raises(NotAffineError, match="soft"):
        q.affine_qparams()
    q.eval()
    assert q.affine_qparams()[1].item() == 0  # l = min(relu(x)) = 0 -> zero point 0


def test_lsq_plus_offset_off_grid_needs_offset_on_grid():
    x = sample("act_signed", 0) - 0.3
    q = make("lsq_plus", "act", 4, init="minmax")
    q(x)
    with pytest.raises(NotAffineError, match="offset_on_grid"):
        q.affine_qparams()
    q2 = make("lsq_plus", "act", 4, init="minmax", offset_on_grid=True)
    q2(x)
    q2.eval()
    s, zp, qmin, qmax = q2.affine_qparams()
    ref = (torch.clamp(torch.round(x / s) + zp, qmin, qmax) - zp) * s
    assert (q2(x).detach() - ref).abs().max().item() <= 1e-5 * s.item()
    assert (qmin, qmax) == (0, 15)


# ------------------------------------------------------------------------------------------------ initialisation
def _std(x):
    return x.std().reshape(1)


def _act_u(x):
    return 3 * x.std() / math.sqrt(1 - 2 / math.pi)


def test_init_qil():
    w, a = sample("weight", 0), sample("act", 0)
    q = make("qil", "weight", 4)
    q(w)
    u = torch.minimum(3 * w.std(), w.abs().max())
    assert torch.allclose(q.c.data, (u / 2).reshape(1), rtol=1e-6) and torch.equal(q.c.data, q.d.data)
    assert torch.allclose(q.out_scale.data, u.reshape(1), rtol=1e-6) and q.gamma.item() == 1.0
    qa = make("qil", "act", 4)
    qa(a)
    ua = torch.minimum(_act_u(a), a.max())
    assert torch.allclose(qa.c.data, (ua / 2).reshape(1), rtol=1e-6) and torch.equal(qa.c.data, qa.d.data)
    qm = make("qil", "act", 4, init="max")
    qm(a)
    assert torch.allclose(qm.c.data + qm.d.data, a.max().reshape(1), rtol=1e-6)


def test_init_lsq_plus():
    w, x = sample("weight", 0), sample("act_signed", 0) - 0.2
    q = make("lsq_plus", "weight", 4)
    q(w)
    mu, sd = w.mean(), w.std()
    assert torch.allclose(q.scale.data, (torch.maximum((mu - 3 * sd).abs(), (mu + 3 * sd).abs()) / 8).reshape(1))
    assert q.offset.item() == 0.0
    qa = make("lsq_plus", "act", 4, init="minmax")
    qa(x)
    assert torch.allclose(qa.scale.data, ((x.max() - x.min()) / 15).reshape(1), rtol=1e-6)
    assert qa.offset.item() == x.min().item()
    assert qa.grad_factor.item() == pytest.approx(1 / math.sqrt(x[0].numel() * 15), rel=1e-6)
    # MSE init never does worse than min/max on the tensor it was fitted to
    qm = make("lsq_plus", "act", 4, init="mse")
    qm(x)
    qm.eval(), qa.eval()
    assert (qm(x) - x).pow(2).mean().item() <= (qa(x) - x).pow(2).mean().item() + 1e-9


def test_init_pact():
    a = sample("act", 0)
    q = make("pact", "act", 4)
    q(a)
    assert torch.allclose(q.alpha.data, torch.minimum(_act_u(a), a.max()).reshape(1), rtol=1e-6)
    qc = make("pact", "act", 4, init="const")
    qc(a)
    assert qc.alpha.item() == 10.0
    qw = make("pact", "weight", 4)
    w = sample("weight", 0)
    qw(w)
    assert torch.allclose(qw.out_scale, w.abs().mean() / dorefa_weight(w, 4).abs().mean(), rtol=1e-6)


def test_init_dorefa():
    w = sample("weight", 0)
    q = make("dorefa", "weight", 3)
    q(w)
    assert torch.allclose(q.out_scale, w.abs().mean() / dorefa_weight(w, 3).abs().mean(), rtol=1e-6)
    qn = make("dorefa", "weight", 3, out_scale="none")
    qn(w)
    assert qn.out_scale.item() == 1.0
    qa = make("dorefa", "act", 3)
    qa(sample("act", 0, 5.0))
    assert qa.act_range.item() == 1.0  # the paper's clip(x, 0, 1)
    qs = make("dorefa", "act", 3, act_clip="max")
    a = sample("act", 0, 5.0)
    qs(a)
    assert qs.act_range.item() == a.max().item()


def test_init_ewgs():
    w, a = sample("weight", 0), sample("act", 0)
    q = make("ewgs", "weight", 4)
    q(w)
    assert torch.allclose(q.upper.data, 3 * _std(w)) and torch.allclose(q.lower.data, -3 * _std(w))
    assert q.delta.item() == pytest.approx(1e-3)
    wn = torch.clamp((w - q.lower) / (q.upper - q.lower), 0, 1)
    wq = 2 * torch.round(wn * 15) / 15 - 1
    assert torch.allclose(q.out_scale.data, (w.abs().mean() / wq.abs().mean()).reshape(1), rtol=1e-5)
    qa = make("ewgs", "act", 4)
    qa(a)
    assert qa.lower.item() == a.min().item() and qa.upper.item() == pytest.approx(_act_u(a).item(), rel=1e-6)


def test_init_dsq():
    w, a = sample("weight", 0), sample("act", 0)
    q = make("dsq", "weight", 4)
    q(w)
    assert torch.allclose(q.upper.data, 3 * _std(w)) and torch.allclose(q.lower.data, -3 * _std(w))
    assert q.alpha.item() == pytest.approx(0.2)
    qa = make("dsq", "act", 4)
    qa(a)
    assert qa.lower.item() == 0.0 and qa.upper.item() == pytest.approx(_act_u(a).item(), rel=1e-6)


def test_init_noise_temper():
    w = sample("weight", 0)
    q = make("noise_temper", "weight", 4)
    assert int(q.step) == 0 and q.kappa.item() == 1.0
    q(w)
    assert torch.allclose(q.scale.data, (2 * w.abs().mean() / math.sqrt(7)).reshape(1))
    assert q.grad_factor.item() == pytest.approx(1 / math.sqrt(w.numel() * 7), rel=1e-6)
    assert int(q.step) == 1


# ------------------------------------------------------------------------------------------------ gradients
def _upstream(x, seed):
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=x.dtype)


@given(seed=seed_st, bits=bits_st, scale=scale_st)
def test_lsq_plus_gradients_match_equations(seed, bits, scale):
    x = (sample("act_signed", seed, scale, shape=(8, 16), dtype=torch.float64) - 0.1 * scale).requires_grad_()
    q = make("lsq_plus", "act", bits, init="minmax", grad_scale=False).double()
    q(x.detach())
    with torch.no_grad():  # shrink the range so both clipping ends are hit
        q.scale.mul_(0.7)
        q.offset.add_(0.1 * scale)
    g = _upstream(x, seed)
    q(x).backward(g)
    s, b, n = q.scale.item(), q.offset.item(), 2**bits - 1
    z = (x.detach() - b) / s
    inside = (z >= 0) & (z <= n)
    # (g·s)/s: the STE passes through a division and a multiplication by s, hence rtol instead of equality
    assert torch.allclose(x.grad, torch.where(inside, g, torch.zeros_like(g)), rtol=1e-12, atol=0)
    ds = torch.where(inside, z.round() - z, torch.where(z < 0, torch.zeros_like(z), torch.full_like(z, n)))
    assert q.scale.grad.item() == pytest.approx(float((g * ds).sum()), rel=1e-9, abs=1e-9)
    assert q.offset.grad.item() == pytest.approx(float((g * (~inside)).sum()), rel=1e-9, abs=1e-9)


def test_lsq_plus_grad_scale_multiplies_scale_and_offset_gradients():
    x = sample("act_signed", 0, shape=(4, 50)) - 0.2
    grads = []
    for gs in (False, True):
        q = make("lsq_plus", "act", 4, init="minmax", grad_scale=gs)
        q(x).pow(2).sum().backward()
        grads.append((q.scale.grad.item(), q.offset.grad.item()))
    f = 1 / math.sqrt(50 * 15)
    assert grads[1][0] == pytest.approx(grads[0][0] * f, rel=1e-5)
    assert grads[1][1] == pytest.approx(grads[0][1] * f, rel=1e-5)


@given(seed=seed_st, bits=bits_st, scale=scale_st, signed=st.booleans())
def test_pact_gradients_match_equations(seed, bits, scale, signed):
    x = sample("act_signed", seed, scale, shape=(8, 16), dtype=torch.float64).requires_grad_()
    q = make("pact", "act_signed" if signed else "act", bits, init="const", alpha_init=0.8 * scale).double()
    g = _upstream(x, seed)
    q(x).backward(g)
    a, xd = 0.8 * scale, x.detach()
    if signed:
        inside = xd.abs() < a
        da = (g * (xd >= a)).sum() - (g * (xd <= -a)).sum()
    else:
        inside = (xd >= 0) & (xd < a)
        da = (g * (xd >= a)).sum()
    assert torch.equal(x.grad, torch.where(inside, g, torch.zeros_like(g)))
    assert q.alpha.grad.item() == pytest.approx(float(da), rel=1e-12, abs=1e-12)


def test_pact_regularization_is_l2_on_alpha():
    q = make("pact", "act", 4, init="const", alpha_init=2.5, alpha_l2=1e-3)
    q(sample("act", 0))
    r = q.regularization()
    assert r.item() == pytest.approx(1e-3 * 2.5**2)
    r.backward()
    assert q.alpha.grad.item() == pytest.approx(2e-3 * 2.5)
    assert make("pact", "act", 4).regularization().item() == 0.0  # alpha_l2 defaults to 0 (off)


@given(seed=seed_st, bits=bits_st, scale=scale_st)
def test_dorefa_weight_gradient_matches_equation(seed, bits, scale):
    w = sample("weight", seed, scale, shape=(8, 16), dtype=torch.float64).requires_grad_()
    q = make("dorefa", "weight", bits).double()
    g = _upstream(w, seed)
    q(w).backward(g)
    t = torch.tanh(w.detach())
    m = t.abs().max()
    expect = q.out_scale * (1 - t**2) / m * g
    others = t.abs() != m  # the arg-max element also carries the gradient through max|tanh w|
    assert torch.allclose(w.grad[others], expect[others], rtol=1e-10, atol=1e-12)
    levels = torch.arange(2**bits, dtype=torch.float64) / (2**bits - 1) * 2 - 1
    assert dist_to_grid(dorefa_weight(w.detach(), bits), levels) < 1e-12


@given(seed=seed_st, bits=bits_st)
def test_dorefa_activation_gradient_is_clipped_ste(seed, bits):
    x = sample("act_signed", seed, 1.0, shape=(8, 16), dtype=torch.float64).mul(1.5).requires_grad_()
    q = make("dorefa", "act", bits).double()
    g = _upstream(x, seed)
    y = q(x)
    y.backward(g)
    xd = x.detach()
    expect = torch.where((xd >= 0) & (xd <= 1), g, torch.zeros_like(g))
    assert torch.allclose(x.grad, expect, rtol=1e-12, atol=0)  # g·r/n·n/r: exact up to rounding
    n = 2**bits - 1
    assert torch.equal(y.detach(), torch.round(xd.clamp(0, 1) * n) / n)


@given(seed=seed_st, bits=bits_st, delta=st.floats(0.0, 2.0))
def test_ewgs_gradients_match_equations(seed, bits, delta):
    w = sample("weight", seed, 1.0, shape=(8, 16), dtype=torch.float64).requires_grad_()
    q = make("ewgs", "weight", bits).double()
    q(w.detach())
    q.delta.fill_(delta)
    g = _upstream(w, seed)
    q(w).backward(g)
    lo, up, o, n = q.lower.item(), q.upper.item(), q.out_scale.item(), 2**bits - 1
    xn = ((w.detach() - lo) / (up - lo)).clamp(0, 1)
    xq = torch.round(xn * n) / n
    inside = (w.detach() >= lo) & (w.detach() <= up)
    g_xq = 2 * o * g
    g_xn = g_xq * (1 + delta * torch.sign(g_xq) * (xn - xq))
    assert torch.allclose(w.grad, torch.where(inside, g_xn / (up - lo), torch.zeros_like(g)), rtol=1e-10, atol=1e-12)
    du = (torch.where(inside, g_xn, torch.zeros_like(g)) * (-xn / (up - lo))).sum()
    dl = (torch.where(inside, g_xn, torch.zeros_like(g)) * (-(1 - xn) / (up - lo))).sum()
    assert q.upper.grad.item() == pytest.approx(float(du), rel=1e-9, abs=1e-10)
    assert q.lower.grad.item() == pytest.approx(float(dl), rel=1e-9, abs=1e-10)
    assert q.out_scale.grad.item() == pytest.approx(float((g * (2 * xq - 1)).sum()), rel=1e-9, abs=1e-10)


@given(seed=seed_st, delta=st.floats(0.0, 2.0))
def test_ewgs_activation_gradient(seed, delta):
    x = sample("act", seed, 1.0, shape=(8, 16), dtype=torch.float64).requires_grad_()
    q = make("ewgs", "act", 3).double()
    q(x.detach())
    q.delta.fill_(delta)
    g = _upstream(x, seed)
    q(x).backward(g)
    lo, up = q.lower.item(), q.upper.item()
    xn = ((x.detach() - lo) / (up - lo)).clamp(0, 1)
    xq = torch.round(xn * 7) / 7
    inside = (x.detach() > lo) & (x.detach() < up)
    expect = torch.where(inside, g * (1 + delta * torch.sign(g) * (xn - xq)), torch.zeros_like(g))
    off_edge = (x.detach() != lo) & (x.detach() != up)  # l = min(x) is a data point: its gradient is a kink
    assert off_edge.sum() >= 40  # about half of relu(randn) is exactly 0 = l
    assert torch.allclose(x.grad[off_edge], expect[off_edge], rtol=1e-10, atol=1e-12)


@given(seed=seed_st, bits=bits_st, alpha=st.floats(0.01, 0.5))
def test_dsq_soft_derivative_matches_equation(seed, bits, alpha):
    lo, up = -1.0, 1.5
    x = (torch.rand(200, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2.4 - 0.95)
    x.requires_grad_()
    y = dsq_soft(x, torch.tensor(lo, dtype=torch.float64), torch.tensor(up, dtype=torch.float64),
                 torch.tensor(alpha, dtype=torch.float64), bits)
    y.sum().backward()
    n = 2**bits - 1
    delta = (up - lo) / n
    i = torch.clamp(torch.floor((x.detach() - lo) / delta), 0, n - 1)
    m = lo + (i + 0.5) * delta
    k = 2 * math.atanh(1 - alpha) / delta
    expect = delta / 2 / (1 - alpha) * k * (1 - torch.tanh(k * (x.detach() - m)) ** 2)
    assert torch.allclose(x.grad, expect, rtol=1e-10, atol=1e-12)
    # Q_S passes through every level at the cell edges and stays within [l, u]
    edges = lo + delta * torch.arange(n + 1, dtype=torch.float64)
    qs_edges = dsq_soft(edges, torch.tensor(lo), torch.tensor(up), torch.tensor(alpha), bits)
    assert torch.allclose(qs_edges.double(), edges, atol=1e-6)
    assert float(y.detach().min()) >= lo - 1e-12 and float(y.detach().max()) <= up + 1e-12


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_dsq_soft_gradcheck(bits):
    g = torch.Generator().manual_seed(bits)
    lo = torch.tensor([-0.7], dtype=torch.float64, requires_grad=True)
    up = torch.tensor([1.1], dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    x = (torch.rand(40, generator=g, dtype=torch.float64) * 1.6 - 0.6).requires_grad_()  # inside (l, u)
    assert torch.autograd.gradcheck(lambda *a: dsq_soft(*a, bits), (x, lo, up, alpha), eps=1e-6, atol=1e-5)


@given(seed=seed_st, bits=bits_st)
def test_dsq_hard_training_forward_uses_soft_gradient(seed, bits):
    x = sample("act", seed, 1.0, shape=(64,), dtype=torch.float64).requires_grad_()
    soft = make("dsq", "act", bits).double()
    hard = make("dsq", "act", bits, train_forward="hard").double()
    soft(x.detach()), hard(x.detach())
    ys = soft(x)
    ys.sum().backward()
    gs = x.grad.clone()
    x.grad = None
    yh = hard(x)
    yh.sum().backward()
    assert torch.equal(x.grad, gs)
    hard.eval()
    assert torch.equal(yh.detach(), hard(x).detach())  # hard training forward == eval forward
    assert not torch.equal(ys.detach(), yh.detach())
    assert dist_to_grid(yh.detach(), hard.grid()) == 0.0


def test_dsq_alpha_is_clamped():
    q = make("dsq", "act", 2)
    x = sample("act", 0)
    q(x)
    q.alpha.data.fill_(5.0)
    y_big = q(x)
    q.alpha.data.fill_(0.5)
    assert torch.equal(y_big, q(x))  # α clamped to alpha_range max 0.5
