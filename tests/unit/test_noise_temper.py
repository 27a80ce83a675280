"""Noise tempering (methods.md §5, fxqat's reconstruction [R]): noise at step 0, decay to exact hard quantization,
κ-scaled gradient, LSQ base scale."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxqat.config import QuantSpec
from fxqat.quantizers import make_quantizer

seed_st = st.integers(0, 2**16)
bits_st = st.integers(2, 6)
kappa_st = st.floats(0.1, 3.0)


def _nt(kind="weight", bits=4, **opts):
    return make_quantizer(QuantSpec(bits=bits, method="noise_temper", kind=kind, signed=kind == "weight", options=opts))


def _hard(q, x):
    qmin, qmax = q.qrange
    s = q.scale.detach().abs()
    return torch.round(torch.clamp(x / s, qmin, qmax)) * s


@pytest.mark.parametrize("draw", ["int8", "int16", "exact"])
def test_step_zero_is_uniform_noise_of_one_bin(draw):
    torch.manual_seed(0)
    w = torch.randn(200_000)
    q = _nt(bits=4, uniform_draw=draw)
    y = q(w).detach()
    s = q.scale.item()
    e = y - w
    assert e.abs().max().item() <= s / 2 * (1 + 1e-5)
    assert e.mean().item() == pytest.approx(0.0, abs=0.01 * s)
    assert e.std().item() == pytest.approx(s / math.sqrt(12), rel=0.02)  # U(−s/2, s/2): 200k samples, ~0.3 % s.e.
    assert (y != _hard(q, w)).float().mean().item() > 0.99  # not hard quantization
    assert int(q.step) == 1


def test_step_zero_resampled_noise_is_a_permutation_of_rounding_errors():
    torch.manual_seed(1)
    w = torch.randn(5000)
    q = _nt(bits=3, noise="resampled")
    y = q(w).detach()
    s = q.scale.item()
    z = torch.clamp(w / s, -4, 3)
    errors = (torch.round(z) - z) * s
    assert torch.allclose(torch.sort(y - w).values, torch.sort(errors).values, atol=1e-5)
    assert not torch.allclose(y - w, errors, atol=1e-5)


@pytest.mark.parametrize("tau", [10.0, 250.0])
def test_rho_decays_exponentially_per_training_step(tau):
    q = _nt(tau=tau)
    w = torch.randn(100)
    for t in range(5):
        assert q.rho() == pytest.approx(math.exp(-t / tau), rel=1e-6)  # computed in float32
        q(w)
    assert int(q.step) == 5
    q.eval()
    q(w)
    assert int(q.step) == 5  # evaluation does not advance the clock
    assert "step" in q.state_dict() and int(q.state_dict()["step"]) == 5


def test_intermediate_rho_mixes_noise_and_quantization():
    torch.manual_seed(2)
    w = torch.randn(50_000)
    q = _nt(bits=4, tau=100.0)
    q(w)
    q.step.fill_(70)
    rho = math.exp(-0.7)
    y = q(w).detach()
    hard = _hard(q, w)
    e = (y - hard - rho * (w - hard)) / rho  # ỹ = Q + ρ(x + e − Q)
    s = q.scale.item()
    assert e.abs().max().item() <= s / 2 * (1 + 1e-4)
    assert e.std().item() == pytest.approx(s / math.sqrt(12), rel=0.03)


@given(seed=seed_st, bits=bits_st)
def test_after_enough_steps_output_equals_hard_quantization_exactly(seed, bits):
    torch.manual_seed(seed)
    w = torch.randn(300)
    q = _nt(bits=bits, tau=20.0)
    q(w)
    q.step.fill_(int(20 * math.log(1 / 1e-4)) + 1)  # ρ < rho_floor = 1e-4
    assert q.rho() == 0.0
    y_train = q(w).detach()
    assert torch.equal(y_train, _hard(q, w))
    q.eval()
    assert torch.equal(q(w).detach(), y_train)
    assert torch.unique(y_train).numel() <= 2**bits


@given(seed=seed_st, kappa=kappa_st, step=st.sampled_from([0, 5, 10_000]))
def test_input_gradient_is_kappa_times_upstream(seed, kappa, step):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 32, generator=g).requires_grad_()
    up = torch.randn(4, 32, generator=g)
    q = _nt("act", 4, tau=10.0, kappa_init=kappa)
    q(x.detach())
    q.step.fill_(step)
    q(x).backward(up)
    k = torch.tensor(kappa, dtype=torch.float32)
    assert torch.equal(x.grad, up * k)  # identity times κ everywhere, also where Q clips
    gf = q.grad_factor.item()
    assert gf == pytest.approx(1 / math.sqrt(32 * 15), rel=1e-6)
    assert q.kappa.grad.item() == pytest.approx(gf * float((up * x.detach()).sum()), rel=1e-4, abs=1e-6)


@given(seed=seed_st, bits=bits_st)
def test_scale_gradient_is_lsq_once_tempered(seed, bits):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(256, generator=g, dtype=torch.float64) * 2).requires_grad_()
    up = torch.randn(256, generator=g, dtype=torch.float64)
    q = _nt("weight", bits, grad_scale=False).double()
    q(x.detach())
    q.eval()  # ρ = 0: hard quantization
    q(x).backward(up)
    s = q.scale.item()
    qmin, qmax = q.qrange
    v = x.detach() / s
    inside = (v >= qmin) & (v <= qmax)
    ds = torch.where(inside, v.round() - v, torch.where(v < qmin, torch.tensor(float(qmin)), torch.tensor(float(qmax))))
    assert q.scale.grad.item() == pytest.approx(float((up * ds).sum()), rel=1e-9, abs=1e-9)


def test_scale_gradient_at_step_zero_is_noise_over_scale():
    torch.manual_seed(3)
    x = torch.randn(256, dtype=torch.float64).requires_grad_()
    up = torch.randn(256, dtype=torch.float64)
    q = _nt("weight", 4, grad_scale=False).double()
    q(x.detach())
    q.step.zero_()
    y = q(x)
    y.backward(up)
    e = (y.detach() - x.detach()) / q.scale.item()  # ρ = 1: ỹ = x + s·u, ∂ỹ/∂s = u
    assert q.scale.grad.item() == pytest.approx(float((up * e).sum()), rel=1e-9, abs=1e-9)


def test_manual_schedule_only_advances_on_request():
    q = _nt(schedule="manual", tau=2.0)
    w = torch.randn(64)
    for _ in range(3):
        q(w)
    assert int(q.step) == 0
    q.advance(4)
    assert int(q.step) == 4 and q.rho() == pytest.approx(math.exp(-2.0))


def test_kappa_can_be_fixed():
    q = _nt(learn_kappa=False, kappa_init=0.5)
    assert "kappa" not in dict(q.named_parameters())
    x = torch.randn(10, requires_grad=True)
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.full((10,), 0.5))


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="noise"):
        _nt(noise="gaussian")
    with pytest.raises(ValueError, match="tau"):
        _nt(tau=0.0)


@given(seed=seed_st, bits=bits_st, step=st.integers(1, 60), per_channel=st.booleans())
def test_scale_and_kappa_gradients_at_intermediate_rho(seed, bits, step, per_channel):
    """ỹ = Q + ρ(x + s·u − Q): ∂/∂s = (1 − ρ)·∂Q/∂s + ρ·u per element, ∂/∂κ = Σ g·x (float64, closed form)."""
    torch.manual_seed(seed)
    spec = QuantSpec(bits=bits, method="noise_temper", kind="weight", signed=True, per_channel=per_channel,
                     options={"tau": 20.0, "grad_scale": False})
    q = make_quantizer(spec).double()
    x = torch.randn(6, 40, dtype=torch.float64) * 1.5
    up = torch.randn(6, 40, dtype=torch.float64)
    q(x)
    q.step.fill_(step)
    rho = math.exp(-step / 20.0)
    y = q(x)
    y.backward(up)
    s = q.scale.detach().reshape(-1, 1) if per_channel else q.scale.detach()
    qmin, qmax = q.qrange
    v = x / s
    r = torch.round(torch.clamp(v, qmin, qmax))
    u = (y.detach() / s - r) / rho - v + r  # the noise drawn, recovered from the output
    assert u.abs().max().item() <= 0.5 + 1e-9
    inside = (v >= qmin) & (v <= qmax)
    dq = torch.where(inside, r - v, r)
    per_elem = up * ((1 - rho) * dq + rho * u)
    expect = per_elem.sum(1) if per_channel else per_elem.sum().reshape(1)
    assert torch.allclose(q.scale.grad, expect, rtol=1e-8, atol=1e-9)  # u recovered through a division by ρ
    assert q.kappa.grad.item() == pytest.approx(float((up * x).sum()), rel=1e-10, abs=1e-10)


def test_int8_draw_uses_the_centred_256_levels_of_a_bin():
    """uniform_draw="int8": e/s = (k + ½)/256, so 256·e/s − ½ is an integer in [−128, 127] (float64 to read it)."""
    torch.manual_seed(4)
    w = torch.randn(50_000, dtype=torch.float64)
    q = _nt(bits=4).double()
    y = q(w).detach()
    k = (y - w) / q.scale.item() * 256 - 0.5
    assert (k - k.round()).abs().max().item() < 1e-6
    assert k.min().item() >= -128 - 1e-6 and k.max().item() <= 127 + 1e-6
