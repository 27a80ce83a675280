"""LBT gradient quantization (fxqat.quantizers.grad, fxqat.training.grad_quant; methods.md §3).

The hypothesis strategies are local to this file (``*_st``) because they only make sense for gradient tensors.
"""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import fxqat
from fxqat.config import QuantSpec
from fxqat.quantizers.grad import GradQuantizer, clip_fraction, ema_search_gamma, quantize_gradient
from fxqat.training.grad_quant import clip_fractions, gammas, grad_quantizers, update_intervals


def gq(bits: int = 4, **options) -> GradQuantizer:
    return GradQuantizer(QuantSpec(bits=bits, method="grad", kind="grad", options=options))


def backward_through(q: GradQuantizer, upstream: torch.Tensor) -> torch.Tensor:
    """Run ``upstream`` backward through ``q``; return the gradient that reaches q's input."""
    x = torch.zeros_like(upstream, requires_grad=True)
    q(x * 1.0).backward(upstream)
    return x.grad


def bits_st():
    return st.integers(min_value=2, max_value=8)


def gamma_st():
    return st.floats(min_value=0.05, max_value=1.0)


def grad_tensor_st():
    """A random gradient: shape, scale (1e-6 .. 1e3) and heavy or light tails, from a drawn seed."""
    return st.tuples(
        st.integers(1, 2**31 - 1), st.integers(1, 4000), st.floats(-6, 3), st.sampled_from(["normal", "laplace"])
    ).map(_make_grad)


def _make_grad(args):
    seed, n, log_scale, dist = args
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, generator=gen)
    if dist == "laplace":
        g = g * torch.rand(n, generator=gen).clamp_min(1e-3).log().neg()
    return g * 10.0**log_scale


# --------------------------------------------------------------------------------------------- rounding
@pytest.mark.parametrize("noise", ["int8", "int16", "uniform"])
@settings(max_examples=10, deadline=None)
@given(bits=bits_st(), gamma=gamma_st(), frac=st.floats(-0.999, 0.999), seed=st.integers(0, 2**31 - 1))
def test_stochastic_rounding_is_unbiased(noise, bits, gamma, frac, seed):
    # one element fixes max|g| = 1, the other n elements are the value x inside the clipping range
    n = 40_000
    x = frac * gamma
    g = torch.full((n + 1,), x)
    g[0] = 1.0
    torch.manual_seed(seed)
    out, step = quantize_gradient(g, bits, torch.tensor([gamma]), "stochastic", noise=noise)
    mean = float(out[1:].double().mean())
    # every draw lies within one step of x, so the std of a draw is <= step/2 and the mean's std <= step/(2·sqrt(n));
    # tolerance: 6 standard errors, plus the discrete noise's bounded bias (2^-9 step for int8, 2^-16 for int16)
    tol = float(step) * (6 / (2 * n**0.5) + {"int8": 2.0**-9, "int16": 2.0**-16, "uniform": 0.0}[noise])
    assert abs(mean - x) <= tol
    # and it is not nearest rounding in disguise: both neighbouring grid points occur unless x is on the grid
    k = x / float(step)
    if abs(k - round(k)) > 0.05:
        assert len(torch.unique(out[1:])) == 2


@settings(max_examples=25, deadline=None)
@given(g=grad_tensor_st(), bits=bits_st(), gamma=gamma_st(), rounding=st.sampled_from(["stochastic", "nearest"]))
def test_dequantized_values_lie_on_the_grid(g, bits, gamma, rounding):
    torch.manual_seed(0)
    out, step = quantize_gradient(g, bits, torch.tensor([gamma]), rounding)
    half = 2 ** (bits - 1) - 1
    k = torch.round(out / step)
    assert torch.equal(out, k * step)  # bit-exact multiples of the step
    assert int(k.abs().max()) <= half
    assert len(torch.unique(k)) <= 2**bits - 1
    # the step is 2·γ·max|g| / (2^b − 2); in-range elements move by less than one step, clipped ones land on ±γ·max|g|
    gmax = g.abs().max()
    assert torch.equal(step, torch.clamp(torch.tensor(gamma) * gmax / half, min=torch.finfo(g.dtype).tiny))
    inside = g.abs() <= gamma * gmax
    assert bool(((out - g).abs()[inside] <= step * (1 + 1e-5)).all())
    clipped = ~inside
    assert torch.equal(k[clipped].abs(), torch.full_like(k[clipped], half))
    assert torch.equal(torch.sign(k[clipped]), torch.sign(g[clipped]))


def test_nearest_rounding_matches_the_official_formula():
    # the official code: shift to [0, 2^b − 2], round, shift back; fxqat writes it centred on zero
    torch.manual_seed(1)
    g = torch.randn(1000)
    for bits, gamma in [(4, 0.7), (8, 1.0), (2, 0.5)]:
        out, step = quantize_gradient(g, bits, torch.tensor([gamma]), "nearest")
        m = gamma * float(g.abs().max())
        scale = 2 * m / (2**bits - 2)
        ref = torch.round(torch.clamp((g + m) / scale, 0, 2**bits - 2)) * scale - m
        torch.testing.assert_close(out, ref, atol=1e-6 * m, rtol=0)  # float rounding of the two formulations


# --------------------------------------------------------------------------------------------- the hook
def test_layer_gradients_consume_the_quantized_error_signal():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=False)
    q = gq(4, init="none", gamma0=0.8)
    x = torch.randn(32, 16)
    up = torch.randn(32, 8)
    torch.manual_seed(123)
    q(lin(x)).backward(up)
    torch.manual_seed(123)
    ref, step = quantize_gradient(up, 4, torch.tensor([0.8]))
    assert torch.equal(q.last_step, step)
    assert torch.equal(lin.weight.grad, ref.t() @ x)  # dW = G_qᵀ·X, bit for bit


def test_output_may_be_modified_in_place():
    # the forward returns the input tensor itself (no custom-Function view), so in-place consumers work
    q = gq(4, init="none")
    x = torch.randn(64, requires_grad=True)
    y = q(x * 2)
    torch.relu_(y)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert int(q.n_backward) == 1


def test_scratch_buffers_stay_private():
    import copy
    import pickle

    torch.manual_seed(0)
    q = gq(4, init="none")
    g = torch.randn(1000)
    out1 = backward_through(q, g).clone()
    assert set(q._scratch) == {"bits", "out"}  # CPU: buffers are reused between steps
    ptr = q._scratch["out"].data_ptr()
    out2 = backward_through(q, g)
    assert q._scratch["out"].data_ptr() == ptr  # nothing held last step's output: its buffer was reused
    assert not torch.equal(out1, out2)  # fresh noise each step
    assert len(copy.deepcopy(q)._scratch) == 0 and len(pickle.loads(pickle.dumps(q))._scratch) == 0


def test_a_gradient_someone_holds_is_never_overwritten():
    torch.manual_seed(0)
    q = gq(4, init="none")
    held = []
    for _ in range(3):
        x = torch.zeros(1000, requires_grad=True)
        y = q(x * 1.0)
        y.register_hook(lambda g: held.append(g))  # runs after q's hook: receives q's output itself
        y.backward(torch.randn(1000))
    copies = [h.clone() for h in held]
    x = torch.zeros(1000, requires_grad=True)
    q(x * 1.0).backward(torch.randn(1000))
    assert all(torch.equal(h, c) for h, c in zip(held, copies))
    assert len({h.data_ptr() for h in held}) == 3


def test_no_hook_without_autograd():
    q = gq()
    x = torch.randn(8)
    assert q(x) is x
    with torch.no_grad():
        xr = torch.randn(8, requires_grad=True)
        assert q(xr) is xr
    assert int(q.n_backward) == 0


# --------------------------------------------------------------------------------------------- interval update
def test_update_in_backward_moves_gamma_by_eps_towards_the_target():
    torch.manual_seed(0)
    q = gq(4, init="none", gamma0=0.5)  # γ = 0.5 on a Gaussian clips far more than 1e-3/15
    g = torch.randn(10_000)
    backward_through(q, g)
    assert float(q.clip_fraction) == pytest.approx(float(clip_fraction(g, torch.tensor([0.5]))), abs=0)
    assert float(q.gamma) == pytest.approx(0.5 + 1e-3, abs=1e-7)
    q2 = gq(4, init="none", gamma0=1.0)  # at γ = 1 nothing is clipped: R = 0 < target, γ shrinks
    backward_through(q2, g)
    assert float(q2.clip_fraction) == 0.0
    assert float(q2.gamma) == pytest.approx(1.0 - 1e-3, abs=1e-7)


def test_manual_update_uses_the_mean_clip_fraction():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4))
    cfg = fxqat.QATConfig(g_bits=4, g_options={"update": "manual", "init": "none", "gamma0": 0.5})
    qm = fxqat.prepare_qat(net, (torch.randn(2, 8),), cfg)
    for _ in range(3):
        qm(torch.randn(16, 8)).square().sum().backward()
    assert set(gammas(qm).values()) == {0.5}  # nothing moved during backward
    rs = {n: float(q.r_sum / q.r_count) for n, q in grad_quantizers(qm).items()}
    update_intervals(qm)
    for name, g in gammas(qm).items():
        target = 1e-3 / 15
        expected = 0.5 + (1e-3 if rs[name] > target else -1e-3 if rs[name] < target else 0.0)
        assert g == pytest.approx(expected, abs=1e-7)
        assert float(grad_quantizers(qm)[name].r_count) == 0


def test_zero_gradient_leaves_gamma_alone():
    q = gq(4, init="none", gamma0=0.6)
    out = backward_through(q, torch.zeros(100))
    assert torch.equal(out, torch.zeros(100))
    assert float(q.gamma) == pytest.approx(0.6, abs=1e-7)


def test_minmax_baseline_keeps_gamma_one():
    torch.manual_seed(0)
    q = gq(4, mode="minmax")
    for _ in range(5):
        backward_through(q, torch.randn(1000))
    assert float(q.gamma) == 1.0 and float(q.clip_fraction) == 0.0  # nothing exceeds max|G|


def _lbt_init_loop(g: torch.Tensor, target: float, step: float = 1e-3, momentum: float = 0.999) -> float:
    """The official ``update_interval`` initialisation, transcribed (float32 γ as in the code)."""
    a, gmax = g.abs(), g.abs().max()
    gamma, ema = torch.tensor(1.0), torch.tensor(0.0)
    while True:
        r = (a > gmax * gamma).float().mean()
        ema = momentum * ema + (1 - momentum) * r
        sign = torch.sign(ema - target)
        gamma = gamma + step * sign
        if sign > 0:
            return float(torch.clamp(gamma, 0.001, 1))


@pytest.mark.parametrize("seed", [0, 1])
def test_ema_search_initialisation_matches_the_official_loop(seed):
    torch.manual_seed(seed)
    g = torch.randn(20_000) * torch.rand(20_000)
    target = 1e-3 / 15
    # tolerance 1e-5 (1% of one ε-step): the code accumulates γ in float32 over hundreds of ±1e-3 steps
    assert ema_search_gamma(g, target) == pytest.approx(_lbt_init_loop(g, target), abs=1e-5)
    q = gq(4)
    backward_through(q, g)  # the first backward initialises γ (and is quantized with γ = 1)
    assert float(q.gamma) == pytest.approx(_lbt_init_loop(g, target), abs=1e-5)
    assert q.is_initialized


def test_quantile_initialisation_hits_the_target():
    torch.manual_seed(0)
    g = torch.randn(100_000)
    q = gq(4, init="quantile", alpha=0.15)  # target 0.01: 1000 elements above the threshold
    backward_through(q, g)
    assert float(clip_fraction(g, q.gamma)) == pytest.approx(0.01, abs=2e-5)


def _run_source(q: GradQuantizer, steps: int, source) -> list:
    rs = []
    for i in range(steps):
        backward_through(q, source(i))
        rs.append(float(q.clip_fraction))
    return rs


def test_clip_fraction_converges_on_a_fixed_gradient():
    # stationary source 1: the same upstream gradient every step. 2^18 Gaussian elements: the target 1e-3/15
    # is ~17 elements; one ε-step of γ moves R by ~1 element, so R settles within ±15% of the target
    torch.manual_seed(0)
    g = torch.randn(2**18)
    q = gq(4)
    rs = _run_source(q, 500, lambda i: g)
    last = rs[-100:]
    assert all(abs(r / q.target - 1) <= 0.15 for r in last), (min(last) / q.target, max(last) / q.target)
    assert 0.5 < float(q.gamma) < 1.0


def test_clip_fraction_converges_on_a_random_stationary_source():
    # stationary source 2: a fresh Gaussian draw every step. max|G| fluctuates from draw to draw, so R does too;
    # the sign update drives the *median* of R to the target (stated tolerance 25%), and the mean stays close
    torch.manual_seed(0)
    q = gq(4, alpha=0.15)  # target 0.01 so that 2^16 elements give ~650 clipped per step
    rs = _run_source(q, 500, lambda i: torch.randn(2**16))
    last = rs[-200:]
    assert abs(statistics.median(last) / q.target - 1) <= 0.25
    assert abs(statistics.mean(last) / q.target - 1) <= 0.35


# --------------------------------------------------------------------------------------------- with prepare_qat
def _prepared(g_bits, seed=0):
    from fxqat.models import get_model

    torch.manual_seed(seed)
    model = get_model("cnn", width=8, in_shape=(1, 12, 12))
    x = torch.randn(4, 1, 12, 12)
    return fxqat.prepare_qat(model, (x,), fxqat.QATConfig(w_bits=4, a_bits=4, g_bits=g_bits)), x


def test_forward_is_bit_identical_with_and_without_gradient_quantization():
    plain, x = _prepared(None)
    quant, _ = _prepared(4)
    n_layers = sum(1 for q in fxqat.named_quantizers(plain).values() if q.kind == "weight")
    assert len(grad_quantizers(quant)) == n_layers  # one per quantized layer
    plain.train(), quant.train()
    torch.manual_seed(5)
    xb = torch.randn(16, 1, 12, 12)
    y0, y1 = plain(xb), quant(xb)
    assert torch.equal(y0, y1)
    plain.eval(), quant.eval()
    assert torch.equal(plain(xb), quant(xb))
    # the backward differs (quantized), and becomes identical when the gradient quantizers are disabled
    plain.train(), quant.train()
    for m in (plain, quant):
        m.zero_grad()
        m(xb).square().sum().backward()
    p0 = dict(plain.named_parameters())
    assert any(not torch.equal(p.grad, p0[n].grad) for n, p in quant.named_parameters() if p.grad is not None)
    fxqat.set_quantization(quant, False, kinds=("grad",))
    for m in (plain, quant):
        m.zero_grad()
        m(xb).square().sum().backward()
    assert all(torch.equal(p.grad, p0[n].grad) for n, p in quant.named_parameters() if p.grad is not None)


def test_gamma_is_saved_and_restored_by_the_state_dict():
    qm, x = _prepared(4)
    qm.train()
    torch.manual_seed(0)
    for _ in range(3):
        qm(torch.randn(8, 1, 12, 12)).square().sum().backward()
    before = gammas(qm)
    bits = {n: q.bits for n, q in fxqat.named_quantizers(qm).items() if q.kind == "grad"}
    # initialised and updated (the 8-bit gradient quantizers of the first/last layers may keep gamma = 1)
    assert all(g < 1.0 for n, g in before.items() if bits.get(n, 4) == 4)
    sd = qm.state_dict()
    assert any(k.endswith(".gamma") for k in sd) and any(k.endswith(".clip_fraction") for k in sd)
    fresh, _ = _prepared(4, seed=1)
    fresh.load_state_dict(sd)
    assert gammas(fresh) == before
    assert clip_fractions(fresh) == clip_fractions(qm)
    assert all(q.is_initialized for q in grad_quantizers(fresh).values())  # no re-initialisation on resume
    # the next backward therefore does a regular ±ε update, identical in both models
    torch.manual_seed(9)
    xb = torch.randn(8, 1, 12, 12)
    for m in (qm, fresh):
        torch.manual_seed(9)
        m(xb).square().sum().backward()
    assert gammas(fresh) == gammas(qm)
    assert all(abs(gammas(qm)[n] - before[n]) == pytest.approx(1e-3, abs=1e-6) for n in before)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="g_bits >= 2"):
        gq(1)
    with pytest.raises(ValueError, match="mode"):
        gq(4, mode="sometimes")
    with pytest.raises(ValueError, match="unknown option|has no option"):
        gq(4, gama=0.5)
    with pytest.raises(ValueError, match="g_bits=4"):
        fxqat.prepare_qat(nn.Linear(2, 2), (torch.randn(1, 2),), fxqat.QATConfig(method="grad"))


@given(seed=st.integers(0, 2**16), n=st.integers(1, 5000), gamma=st.floats(0.01, 1.0), heavy=st.booleans())
def test_chunked_max_and_count_are_exact(seed, n, gamma, heavy):
    """The chunked CPU path (per-chunk max, count in the qualifying chunks only) equals the plain count exactly,
    for any length (partial last chunk), any γ (few or most chunks qualify) and heavy-tailed data."""
    from fxqat.quantizers.grad import max_and_count_above

    g = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    if heavy:
        g = g**3
    gm = torch.tensor([gamma])
    a = g.abs()
    expect_max = a.amax()
    expect_count = int((a > gm * expect_max).sum())
    for chunk in (7, 256):
        m, k = max_and_count_above(g, gm, chunk=chunk)
        assert torch.equal(m, expect_max) and int(k) == expect_count


@pytest.mark.parametrize("kind,levels", [("int8", 256), ("int16", 65536)])
def test_discrete_noise_is_uniform_on_its_levels(kind, levels):
    """int8: the 256 values (k + ½)/256 (symmetric about 0, mean exactly 0); int16: k/65536; all in [−½, ½)."""
    from fxqat.quantizers.grad import uniform_noise

    torch.manual_seed(0)
    u = uniform_noise(torch.empty(400_000, dtype=torch.float64), kind)
    assert u.min().item() >= -0.5 and u.max().item() < 0.5
    k = u * levels - (0.5 if kind == "int8" else 0.0)
    assert torch.equal(k, torch.round(k))  # on the stated levels
    assert abs(u.mean().item()) < 6 * (1 / 12) ** 0.5 / 400_000**0.5  # 6 standard errors of the mean
    if kind == "int8":
        counts = torch.bincount((k + 128).long(), minlength=256)
        assert counts.numel() == 256 and counts.min().item() > 0.8 * 400_000 / 256  # every level, about equally
