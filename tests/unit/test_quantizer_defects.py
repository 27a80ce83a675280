"""Regression tests for initialisation defects of the quantizer zoo (issue #15) and for 1-bit signed grids.

* LSQ+'s MSE range search squared ``|x| ~ 1e30`` in float32 (1e60: inf), so every candidate's error was inf and the
  search silently returned ``s = 1, β = 0``; it now runs normalised, in float64.
* A constant first batch has a float32 std of a few ulps (about 1e-7 of its value), not 0, so the tests
  ``std > 0`` / ``u > 1e-8`` kept a range of ~1e-7 (PACT α = 3.7e-8 for a constant 0.1, QIL c = d = 1.9e-8, DSQ
  bounds ±2.2e-8, EWGS weight bounds ±3e-8; LSQ+ activations s = 1e-8). The test is now relative to the data's
  magnitude (``fxqat.quantizers._zoo_utils.is_degenerate``).
* A signed 1-bit grid {-1, 0} cannot represent a positive weight: grid-based methods refuse it with a message that
  names the alternatives; DoReFa-style and interval methods quantize 1-bit weights to two symmetric levels.
"""

import math

import pytest
import torch

from fxqat.config import QuantSpec
from fxqat.quantizers import make_quantizer
from fxqat.quantizers._zoo_utils import REL_SPREAD, act_clip_std, is_degenerate, widen_degenerate
from fxqat.quantizers.lsq_plus import mse_range_search


def make(method, kind, bits=4, signed=None, per_channel=False, **opts):
    if signed is None:
        signed = True if kind == "weight" else False
    return make_quantizer(QuantSpec(bits=bits, method=method, kind=kind, signed=signed, per_channel=per_channel,
                                    options=opts))


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ (a) LSQ+ 1e30
@pytest.mark.parametrize("signed_data", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lsq_plus_mse_search_is_scale_invariant_up_to_1e30(signed_data, bits):
    x = randn(4, 16, 64)
    x = x if signed_data else torch.relu(x)
    s1, b1 = mse_range_search(x, 0, 2**bits - 1, None, symmetric=False)
    s30, b30 = mse_range_search(x * 1e30, 0, 2**bits - 1, None, symmetric=False)
    assert torch.isfinite(s30).all() and torch.isfinite(b30).all()
    # the search is done on x / max|x| in float64 either way: the same candidate wins; only the float32 rounding of
    # the returned values differs (relative 2^-24 each, hence 1e-6)
    assert torch.allclose(s30 / 1e30, s1, rtol=1e-6, atol=0)
    assert torch.allclose(b30 / 1e30, b1, rtol=1e-6, atol=1e-12)
    assert float(s1) != 1.0  # the old failure mode returned exactly s = 1


@pytest.mark.parametrize("kind,per_channel", [("act", False), ("weight", False), ("weight", True)])
def test_lsq_plus_mse_init_on_1e30_first_batch(kind, per_channel):
    x = randn(8, 512) * 1e30
    x = x if kind == "weight" else x - 0.5e30
    q = make("lsq_plus", kind, 4, per_channel=per_channel, init="mse")
    q(x)
    q.eval()
    y = q(x).detach()
    assert torch.isfinite(y).all()
    assert 1e27 < float(q.scale.detach().min()) and float(q.scale.detach().max()) < 1e30
    # a range fitted to the data: error well under the data's magnitude (it was |x|_max: s = 1 maps x to ≈ 0 or 15)
    assert float((y - x).abs().max()) < 0.5 * float(x.abs().max())
    assert float((y - x).double().pow(2).mean()) < 0.05 * float(x.double().pow(2).mean())  # float64: 1e60


def test_lsq_plus_mse_search_unchanged_on_ordinary_data():
    """Normalising and float64 change only rounding: the chosen range is still at least as good as min/max."""
    x = torch.relu(randn(4, 16, 64)) - 0.1
    q_mse, q_mm = make("lsq_plus", "act", 3, init="mse"), make("lsq_plus", "act", 3, init="minmax")
    q_mse(x), q_mm(x)
    q_mse.eval(), q_mm.eval()
    assert float((q_mse(x) - x).detach().pow(2).mean()) < float((q_mm(x) - x).detach().pow(2).mean())


# ------------------------------------------------------------------------------------------------ (b) constants
CONSTANTS = [0.1, 0.3, 1.7, 123.4, 0.5]  # 0.5: float32 std exactly 0; the others: std of a few ulps
SHAPE = (8, 512)


def test_float32_std_of_a_constant_is_not_zero_but_is_degenerate():
    """The premise of the fix: an absolute test (std > 0) fails for these tensors, the relative one does not."""
    for c in CONSTANTS[:-1]:
        x = torch.full(SHAPE, c)
        sd = x.std()
        assert 0 < float(sd) < 1e-6 * c
        assert bool(is_degenerate(sd, x.abs().max()))
    assert not bool(is_degenerate(randn(*SHAPE).std(), randn(*SHAPE).abs().max()))
    assert REL_SPREAD < 1e-4  # a real spread (std/max ≈ 0.1 … 0.5) is never treated as zero


@pytest.mark.parametrize("c", CONSTANTS)
def test_act_clip_std_of_a_constant_is_its_value(c):
    assert torch.equal(act_clip_std(torch.full(SHAPE, c)), torch.tensor([c]))


def test_widen_degenerate_only_touches_degenerate_ranges():
    lo, hi = torch.tensor([0.3, -2.0, 0.0, 5.0, -0.7]), torch.tensor([0.3, -2.0, 0.0, 6.0, 0.2])
    wl, wh = widen_degenerate(lo, hi)
    assert wl.tolist() == pytest.approx([0.0, -2.0, 0.0, 5.0, -0.7])
    assert wh.tolist() == pytest.approx([0.3, 0.0, 0.0, 6.0, 0.2])


# (method, kind, options, what the range's top must be for a constant c > 0)
CONSTANT_CASES = [
    pytest.param(m, k, o, top, id=f"{m}-{k}" + "".join(f"-{v}" for v in o.values()))
    for m, k, o, top in [
        ("pact", "act", {}, lambda q: q.alpha.abs()),
        ("dorefa", "act", {"act_clip": "std"}, lambda q: q.act_range),
        ("qil", "act", {}, lambda q: q.c + q.d),
        ("qil", "weight", {}, lambda q: q.c + q.d),
        ("dsq", "weight", {}, lambda q: q.upper),
        ("dsq", "act", {}, lambda q: q.upper),
        ("ewgs", "weight", {}, lambda q: q.upper),
        ("lsq_plus", "act", {"init": "minmax"}, lambda q: q.scale * 15 + q.offset),
        ("lsq_plus", "act", {"init": "std"}, lambda q: q.scale * 15 + q.offset),
        ("lsq_plus", "act", {"init": "mse"}, lambda q: q.scale * 15 + q.offset),
    ]
]


@pytest.mark.parametrize("method,kind,opts,top", CONSTANT_CASES)
@pytest.mark.parametrize("c", CONSTANTS)
def test_constant_first_batch_gives_a_range_up_to_the_constant(method, kind, opts, top, c):
    x = torch.full(SHAPE, c)
    q = make(method, kind, 4, **opts)
    q(x)
    # the top of the range is the constant itself (max|x|), not ~1e-7. rtol 1e-5: float32 rounding of c/2 + c/2,
    # 3·(c/3), 15·(c/15) (a few ulps), and LSQ+'s "std" init, whose top μ + 3σ carries the float32 σ of a constant
    # (≤ 3.5e-7·c, see REL_SPREAD)
    assert float(top(q).detach()) == pytest.approx(c, rel=1e-5)
    if method in ("dsq", "ewgs") and kind == "weight":
        assert float(q.lower.detach()) == pytest.approx(-c, rel=1e-6)  # symmetric ±max|w|
    if method in ("dsq", "lsq_plus") and kind == "act":
        lower = q.lower if method == "dsq" else q.offset
        assert float(lower.detach()) == 0.0  # [0, c]: the constant is the top level of a range that includes zero
    q.eval()
    y = q(x).detach()
    assert torch.isfinite(y).all()
    # the constant is represented: it is the top level (up to the rounding above) for every case here
    assert float((y - x).abs().max()) <= 1e-5 * c
    # a later batch with spread is not crushed into a ~1e-7 interval
    z = torch.relu(randn(*SHAPE)) * c if kind == "act" else randn(*SHAPE) * c / 3
    assert float(q(z).detach().abs().max()) >= 0.5 * c


@pytest.mark.parametrize("method,kind,opts,top", CONSTANT_CASES)
def test_all_zero_first_batch_stays_finite(method, kind, opts, top):
    q = make(method, kind, 4, **opts)
    q(torch.zeros(SHAPE))
    q.eval()
    z = torch.relu(randn(*SHAPE)) if kind == "act" else randn(*SHAPE)
    assert torch.isfinite(q(torch.zeros(SHAPE))).all() and torch.isfinite(q(z)).all()
    assert float(q(torch.zeros(SHAPE)).detach().abs().max()) <= 1e-3  # the absolute fallbacks (widths of 1e-8 … 1e-3)


def test_negative_constant_activation_range_includes_zero():
    x = torch.full(SHAPE, -0.3)
    q = make("lsq_plus", "act", 4, init="minmax")
    q(x)
    assert float(q.offset.detach()) == pytest.approx(-0.3, rel=1e-6)
    assert float((q.offset + 15 * q.scale).detach()) == pytest.approx(0.0, abs=1e-7)
    qd = make("dsq", "act", 4, signed=True, init="minmax")
    qd(x)
    assert float(qd.lower.detach()) == pytest.approx(-0.3, rel=1e-6) and float(qd.upper.detach()) == 0.0


# ------------------------------------------------------------------------------------------------ (d) 1 bit
@pytest.mark.parametrize("method", ["lsq", "lsq_plus", "noise_temper"])
def test_one_bit_signed_weights_are_refused_clearly(method):
    q = make(method, "weight", bits=1)
    with pytest.raises(ValueError, match=r"bits=1, signed=True.*\{-1, 0\}.*bits >= 2.*dorefa"):
        q(randn(8, 16))


def test_one_bit_signed_qil_is_refused_at_construction():
    with pytest.raises(ValueError, match="needs bits >= 2"):
        make("qil", "weight", bits=1)


@pytest.mark.parametrize("method", ["lsq", "pact", "dorefa"])
def test_one_bit_signed_activations_are_refused(method):
    q = make(method, "act", bits=1, signed=True)
    with pytest.raises(ValueError, match="bits"):
        q(randn(8, 16))


@pytest.mark.parametrize("method", ["dorefa", "pact", "ewgs", "dsq"])
def test_one_bit_weights_of_sign_methods_are_two_symmetric_levels(method):
    """Binary weights where the method defines them (DoReFa's 2·q_1(·) − 1 = ±1 times a scale; EWGS/DSQ: {l, u})."""
    w = randn(8, 16)
    q = make(method, "weight", bits=1)
    q(w)
    q.eval()
    levels = torch.unique(q(w).detach())
    assert levels.numel() == 2
    assert float(levels[0]) == pytest.approx(-float(levels[1]), rel=1e-6) and float(levels[1]) > 0


def test_one_bit_unsigned_activations_are_allowed():
    for method in ("lsq", "pact", "dorefa"):
        q = make(method, "act", bits=1, signed=False)
        y = q(torch.relu(randn(8, 16)))
        assert torch.unique(y.detach()).numel() <= 2 and math.isfinite(float(y.detach().sum()))
