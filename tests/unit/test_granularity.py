"""Every registered method × every granularity it declares × bits 2..8 (issue #15).

The cases come from the code: ``fxqat.available_methods()`` (less ``"grad"``, which quantizes gradients and has its
own tests), each class's ``granularities`` and ``kinds``, and ``fxqat.config.GRANULARITIES`` (which tensor kinds a
granularity applies to). Weights are signed; per-tensor activations run on post-ReLU data with an unsigned grid and
on signed data with a signed grid; per-token activations (method ``"dynamic"``) are asymmetric whatever the sign.
Per-group uses ``group_size=32`` on a conv-shaped weight (the grouped view flattens the non-channel dims).

Checked per case:

* **grid**: eval-mode values lie exactly on ``q.grid()`` (per tensor / channel / group), no scale-sharing row has
  more than ``2^bits`` distinct values, and where the method has an affine equivalent ``y/s + z`` is an integer in
  ``[qmin, qmax]``. Which cases are affine is pinned (``AFFINE``), so the integer check cannot be skipped silently.
  With 32 elements a group, the level count is informative up to 4 bits; the exact grid and integer checks are
  what bind at 5..8 bits.
* **gradients**: the fast path (the method's ``autograd.Function``) against its plain-ops reference (the path
  ``torch.compile`` takes: ``use_function()`` patched to False), both in float64 from the same state. Where a method
  has a single path (DoReFa-style weights, ``dynamic``) the two runs coincide. float32 is not compared with float64:
  an element on a rounding or clipping boundary (QIL's init puts max|w| exactly at c + d) flips between the two
  precisions and moves a parameter gradient by a whole term, so only a same-precision comparison can be tight.
* **state_dict**: a trained quantizer's state loads into a fresh one (per-channel / per-group parameters are shaped
  lazily and resized on load) and both compute bit-identical values and gradients (atol=0).
* **edge inputs**: constant, all-zero, NaN, inf and 1e30 first batches; NaN and 1e30 after initialisation.

A compiled == eager check for every case is marked slow (``test_compiled_equals_eager``).
"""

import sys

import pytest
import torch

import fxqat
from fxqat.config import GRANULARITIES, QuantSpec
from fxqat.quantizers import NotAffineError, get_method, make_quantizer
from fxqat.quantizers.dynamic import per_token_qparams
from fxqat.quantizers.layout import to_groups

METHODS = [m for m in fxqat.available_methods() if m != "grad"]
BITS = list(range(2, 9))
GROUP = 32


def _cases():
    out = []
    for m in METHODS:
        cls = get_method(m)
        for gran in cls.granularities:
            for kind in GRANULARITIES[gran]:
                if kind not in cls.kinds:
                    continue
                if kind == "weight":
                    out.append((m, gran, "weight"))
                else:  # post-ReLU and signed data (per-token: the data's sign only, the grid is asymmetric anyway)
                    out += [(m, gran, "act_unsigned"), (m, gran, "act_signed")]
    return out


CASES = _cases()
IDS = ["-".join(c) for c in CASES]
# cases whose eval-mode function is an integer affine grid right after initialisation (methods' docstrings)
AFFINE = {
    *[(m, g, "weight") for m in ("lsq", "lsq_plus", "noise_temper", "qil") for g in ("per_tensor", "per_channel",
                                                                                     "per_group")],
    ("gguf", "per_group", "weight"),
    *[(m, "per_tensor", v) for m in ("lsq", "noise_temper", "qil", "pact", "dorefa") for v in ("act_unsigned",
                                                                                               "act_signed")],
    # l = min(x) = 0 after ReLU is on the grid; β = 0 for LSQ+'s MSE init on post-ReLU data; signed data: l < 0 off it
    *[(m, "per_tensor", "act_unsigned") for m in ("lsq_plus", "ewgs", "dsq")],
}
# a NaN input element poisons every element that shares a data statistic with it (the forward normalises by one)
NAN_SPREADS = {("dorefa", "weight"), ("pact", "weight"), ("dynamic", "act_unsigned"), ("dynamic", "act_signed")}


def spec(method, gran, variant, bits):
    if method == "gguf" and bits not in (4, 8):
        pytest.skip("method 'gguf' is llama.cpp's Q4_0 (4 bits) and Q8_0 (8 bits) only")
    kind = "weight" if variant == "weight" else "act"
    signed = None if gran == "per_token" else variant != "act_unsigned"
    return QuantSpec(bits=bits, method=method, kind=kind, signed=signed, granularity=gran,
                     group_size=GROUP if gran == "per_group" else None)


def data(gran, variant, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    if variant == "weight":
        x = torch.randn(8, 128, 2, 2, generator=g)  # 512 inputs a channel, 16 groups of 32
    elif gran == "per_token":
        x = torch.randn(2, 4, 512, generator=g)  # 8 tokens of 512
    else:
        x = torch.randn(4, 16, 64, generator=g)
    x = torch.relu(x) if variant == "act_unsigned" else x
    return x.to(dtype)


def rows(t, gran):
    """``t`` as one row per scale: the whole tensor, an output channel, a group of 32 or a token."""
    if gran == "per_tensor":
        return t.reshape(1, -1)
    if gran == "per_channel":
        return t.reshape(t.shape[0], -1)
    if gran == "per_group":
        return to_groups(t, 0, GROUP)
    return t.reshape(-1, t.shape[-1])


def initialised(case, bits, x=None):
    method, gran, variant = case
    q = make_quantizer(spec(method, gran, variant, bits))
    with torch.no_grad():
        q(data(gran, variant) if x is None else x)
    if method == "noise_temper":
        q.step.fill_(10**9)  # ρ = 0: no noise, so both paths compute the same values (they draw differently)
    return q


def test_cases_cover_every_method_and_declared_granularity():
    assert set(METHODS) == set(fxqat.available_methods()) - {"grad"} and len(METHODS) >= 9
    for m in METHODS:
        declared = set(get_method(m).granularities)
        assert {g for mm, g, _ in CASES if mm == m} == declared, m
    assert ("dynamic", "per_token", "act_signed") in CASES and ("lsq", "per_group", "weight") in CASES
    assert not any(g == "per_token" for m, g, _ in CASES if m != "dynamic")  # static methods: no per-token


# ------------------------------------------------------------------------------------------------ grid
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_values_lie_on_the_integer_grid(case, bits):
    method, gran, variant = case
    x = data(gran, variant)
    q = initialised(case, bits)
    q.eval()
    y = q(x).detach()
    assert y.shape == x.shape and torch.isfinite(y).all()
    r = rows(y, gran)
    assert max(torch.unique(row).numel() for row in r) <= 2**bits
    if method == "dynamic":  # no stored grid: the per-token qparams of this very input
        qmin, qmax = q.qrange
        s, zp = per_token_qparams(x, qmin, qmax)
        s, zp = s.reshape(-1, 1), zp.reshape(-1, 1)
    else:
        grid = q.grid().reshape(-1, q.grid().shape[-1])
        assert grid.shape[0] == r.shape[0] and grid.shape[1] <= 2**bits
        dist = (r[:, :, None] - grid[:, None, :]).abs().amin(-1)
        assert float(dist.max()) == 0.0  # outputs and grid come from the same float ops: bit-exact
        try:
            s, zp, qmin, qmax = q.affine_qparams()
        except NotAffineError:
            assert case not in AFFINE
            return
        assert case in AFFINE
        s, zp = s.reshape(-1, 1).expand(r.shape[0], 1), zp.reshape(-1, 1).to(r.dtype)
    codes = r / s + zp
    # (q − z)·s / s in float32: |error| ≤ |q − z|·2^-23·(a few) ≤ 2^8·2^-22 ≈ 6e-5 at 8 bits; measured ≤ 1.5e-5
    assert float((codes - codes.round()).abs().max()) <= 1e-4
    assert float(codes.round().min()) >= qmin and float(codes.round().max()) <= qmax


# ------------------------------------------------------------------------------------------------ gradients
def _grads(q, x, g, reference, monkeypatch):
    """Gradients of ``(q(x)·g).sum()`` w.r.t. x and every parameter, on the fast or the plain-ops path."""
    with monkeypatch.context() as mp:
        module = sys.modules[type(q).__module__]
        if reference and hasattr(module, "use_function"):
            mp.setattr(module, "use_function", lambda: False)  # what torch.compile's tracing sees
        x = x.clone().requires_grad_()
        q.zero_grad(set_to_none=True)
        (q(x) * g).sum().backward()
        return {"x": x.grad, **{n: p.grad for n, p in q.named_parameters()}}


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fast_path_gradients_equal_reference_float64(case, bits, monkeypatch):
    method, gran, variant = case
    state = initialised(case, bits).state_dict()
    x = data(gran, variant, dtype=torch.float64)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    runs = []
    for reference in (False, True):
        q = make_quantizer(spec(method, gran, variant, bits))
        q.load_state_dict(state)
        runs.append(_grads(q.double().train(), x, g, reference, monkeypatch))
    fast, ref = runs
    assert fast.keys() == ref.keys()
    assert float(fast["x"].abs().max()) > 0  # something flows back
    for name in fast:
        a, b = fast[name], ref[name]
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert torch.isfinite(a).all(), name
        # float64, same maths in another order (dot products vs pairwise sums, tanh via sigmoid in DSQ):
        # measured ≤ 2e-13 relative to the largest entry
        tol = 1e-10 * max(float(b.abs().max()), 1e-30)
        assert float((a - b).abs().max()) <= tol, (name, float((a - b).abs().max()), tol)


# ------------------------------------------------------------------------------------------------ state_dict
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dict_round_trip_is_exact(case, bits):
    method, gran, variant = case
    x = data(gran, variant)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    q = make_quantizer(spec(method, gran, variant, bits))
    torch.manual_seed(0)
    for _ in range(3):  # a few SGD steps so every parameter has moved away from its initial value
        y = q(x)
        if not y.requires_grad:
            break  # no parameter (dynamic; DoReFa-style weights with a fixed output scale)
        q.zero_grad(set_to_none=True)
        (y * g).sum().backward()
        with torch.no_grad():
            for p in q.parameters():
                if p.grad is not None:
                    p -= 1e-3 * p.grad
    fresh = make_quantizer(spec(method, gran, variant, bits))
    before = {k: v.shape for k, v in fresh.state_dict().items()}
    state = q.state_dict()
    if gran in ("per_channel", "per_group") and method != "dynamic":
        n_rows = rows(x, gran).shape[0]
        lazy = [k for k, v in state.items() if v.shape != before[k]]
        assert lazy and all(state[k].shape[0] == n_rows for k in lazy)  # [C] or [C·G], resized on load
    fresh.load_state_dict(state)
    assert fresh.state_dict().keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert fresh.is_initialized and fresh.signed == q.signed
    for mode in ("eval", "train"):
        q.train(mode == "train"), fresh.train(mode == "train")
        outs = []
        for m in (q, fresh):
            torch.manual_seed(3)  # the same noise draw for noise tempering
            m.zero_grad(set_to_none=True)
            xx = x.clone().requires_grad_()
            y = m(xx)
            if y.requires_grad:
                (y * g).sum().backward()
            outs.append((y.detach(), xx.grad, {n: p.grad for n, p in m.named_parameters()}))
        (y0, gx0, gp0), (y1, gx1, gp1) = outs
        assert torch.equal(y0, y1), mode  # atol = 0
        assert (gx0 is None and gx1 is None) or torch.equal(gx0, gx1)
        assert gp0.keys() == gp1.keys()
        assert all((gp0[n] is None and gp1[n] is None) or torch.equal(gp0[n], gp1[n]) for n in gp0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_float64_quantizer_keeps_float64_state(case):
    """``.double()`` before the first batch: parameters shaped on it (per channel / group) are float64 too, and a
    float32 state_dict loads into it as float64 (LSQ created float32 per-channel scales here)."""
    method, gran, variant = case
    q = make_quantizer(spec(method, gran, variant, 4)).double()
    q(data(gran, variant, dtype=torch.float64))
    floats = {k: v for k, v in q.state_dict().items() if v.is_floating_point()}
    assert all(v.dtype == torch.float64 for v in floats.values()), {k: v.dtype for k, v in floats.items()}
    fresh = make_quantizer(spec(method, gran, variant, 4)).double()
    fresh.load_state_dict(initialised(case, 4).state_dict())
    assert all(v.dtype == torch.float64 for v in fresh.state_dict().values() if v.is_floating_point())


# ------------------------------------------------------------------------------------------------ edge inputs
def _normal_then_eval(case, bits, x_first):
    method, gran, variant = case
    q = make_quantizer(spec(method, gran, variant, bits))
    q(x_first)
    return q.eval()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_constant_first_batch_gives_a_range_reaching_the_constant(case, bits):
    method, gran, variant = case
    c = -0.3 if variant == "act_signed" else 0.3  # float32 std ≈ 1e-8, not 0
    x = torch.full(data(gran, variant).shape, c)
    q = _normal_then_eval(case, bits, x)
    y = q(x).detach()
    assert torch.isfinite(y).all()
    if method == "dynamic":  # [min(c, 0), max(c, 0)]: c is the end level, exact up to (c/s)·s rounding
        assert float((y - c).abs().max()) <= 1e-6
        return
    # some level of every row's grid reaches the constant (a degenerate range of width ~1e-7 does not)
    reach = q.grid().reshape(-1, q.grid().shape[-1]).abs().amax(-1)
    assert float(reach.min()) >= 0.999 * abs(c)
    z = data(gran, variant, seed=1) * abs(c)  # a later batch with spread is not crushed into a tiny interval
    assert torch.isfinite(q(z)).all() and float(q(z).detach().abs().max()) >= 0.5 * abs(c)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_all_zero_first_batch_is_finite(case, bits):
    method, gran, variant = case
    zero = torch.zeros(data(gran, variant).shape)
    q = _normal_then_eval(case, bits, zero)
    y = q(zero).detach()
    assert torch.isfinite(y).all() and float(y.abs().max()) <= 1e-3  # absolute floors of 1e-8 … 1e-3 only
    assert torch.isfinite(q(data(gran, variant, seed=1))).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("bits", [2, 8])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_non_finite_first_batch(case, bits, bad):
    method, gran, variant = case
    x = data(gran, variant)
    x.view(-1)[5] = bad
    q = make_quantizer(spec(method, gran, variant, bits))
    if method != "dynamic":
        with pytest.raises(ValueError, match="first tensor seen.*NaN or inf"):
            q(x)
        assert not q.is_initialized
        return
    # dynamic: nothing is initialised (a check per call would cost a device sync): the token holding the value is
    # non-finite, every other token is quantized exactly as without it
    y = q(x).detach()
    clean = data(gran, variant)
    y_clean = q(clean).detach()
    tok = rows(y, gran)
    assert not torch.isfinite(tok[0]).all()
    assert torch.equal(tok[1:], rows(y_clean, gran)[1:])


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_nan_after_initialisation_stays_where_it_is(case, bits):
    method, gran, variant = case
    x = data(gran, variant)
    q = initialised(case, bits)
    q.eval()
    xn = x.clone()
    xn.view(-1)[5] = float("nan")
    bad = ~torch.isfinite(q(xn).detach())
    if (method, variant) in NAN_SPREADS:  # the row normalised by max|tanh w| / the token's min and max
        assert torch.equal(rows(bad, gran).any(-1), torch.arange(rows(bad, gran).shape[0]) == 0)
        assert bool(rows(bad, gran)[0].all())
    else:
        assert int(bad.sum()) == 1 and bool(bad.view(-1)[5])


def _rel_rms(y, x):
    return float((y.double() - x.double()).norm() / x.double().norm())  # float64: 1e30 squared overflows float32


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_huge_inputs(case, bits):
    method, gran, variant = case
    x = data(gran, variant)
    q = _normal_then_eval(case, bits, x * 1e30)
    y = q(x * 1e30).detach()
    assert torch.isfinite(y).all()
    rel_huge, rel_unit = _rel_rms(y, x * 1e30), _rel_rms(_normal_then_eval(case, bits, x)(x).detach(), x)
    if method == "dorefa" and variant != "weight":
        assert rel_huge > 0.99  # DoReFa's paper range clip(x, 0, 1) is fixed (act_clip=1.0): by design
    elif method in ("dorefa", "pact") and variant == "weight":
        assert rel_huge < 1.0  # tanh(w) saturates at |w| ≫ 1 (DoReFa's normalisation): not scale-equivariant
    elif method == "gguf":  # GGUF files store fp16 steps (|d| <= 65504): weights of 1e30 saturate, by design
        assert float(y.abs().max()) <= 65504.0 * 127
    else:
        # the range follows the data's scale: the relative error is that of the same data at scale 1, up to the
        # float32 rounding of the initial statistics (LSQ+'s MSE search kept s = 1 here: relative error 1)
        assert abs(rel_huge - rel_unit) <= 1e-3, (rel_huge, rel_unit)
    # 1e30 after initialisation on ordinary data: clipped to the range, finite
    q2 = initialised(case, bits).eval()
    assert torch.isfinite(q2(x * 1e30)).all() and torch.isfinite(q2(x * -1e30)).all()


# ------------------------------------------------------------------------------------------------ compiled
@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_compiled_equals_eager(case):
    """torch.compile (``aot_eager``: dynamo + AOTAutograd, the plain-ops path) against eager (the fast path), float64:
    values and gradients, at 4 bits."""
    method, gran, variant = case
    state = initialised(case, 4).state_dict()
    x = data(gran, variant, dtype=torch.float64)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    outs = []
    for compiled in (False, True):
        q = make_quantizer(spec(method, gran, variant, 4))
        q.load_state_dict(state)
        q = q.double().train()
        run = torch.compile(q, backend="aot_eager", fullgraph=True) if compiled else q
        xx = x.clone().requires_grad_()
        y = run(xx)
        (y * g).sum().backward()
        outs.append((y.detach(), xx.grad, {n: p.grad for n, p in q.named_parameters()}))
    torch._dynamo.reset()
    (y0, gx0, gp0), (y1, gx1, gp1) = outs
    if method != "dsq":  # DSQ's soft forward differs by float rounding (tanh as 2σ(2·) − 1 in the function)
        assert torch.equal(y0, y1)
    assert torch.allclose(y0, y1, rtol=1e-12, atol=1e-14)
    assert torch.allclose(gx0, gx1, rtol=1e-10, atol=1e-12)
    for n in gp0:
        assert (gp0[n] is None) == (gp1[n] is None), n
        if gp0[n] is not None:  # float64, op order only (see the gradient test): measured ≤ 2e-13
            assert float((gp0[n] - gp1[n]).abs().max()) <= 1e-10 * max(float(gp0[n].abs().max()), 1e-30), n
