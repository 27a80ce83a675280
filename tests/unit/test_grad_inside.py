"""grad_inside: the one-pass straight-through mask equals ``g·[lo < v < hi]`` (ends optionally closed) exactly, at
the ends too, per dtype; the open default is what autograd gives for ``torch.clamp``."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxqat.quantizers.base import _next_float, grad_inside

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x", [0.0, 1.0, -1.0, 7.0, -8.0, 255.0, 2.0**-126])
def test_next_float_is_the_adjacent_representable_number(dtype, x):
    t = torch.tensor(x, dtype=dtype)
    for up in (True, False):
        n = _next_float(float(t), up, dtype)
        assert float(torch.tensor(n, dtype=dtype)) == n  # representable
        assert (n > float(t)) == up
        if dtype in (torch.float32, torch.float64):
            inf = torch.tensor(float("inf") if up else float("-inf"), dtype=dtype)
            assert n == float(torch.nextafter(t, inf))


@given(seed=st.integers(0, 2**16), lo=st.integers(-8, 0), width=st.integers(1, 15),
       dtype=st.sampled_from(DTYPES), lo_closed=st.booleans(), hi_closed=st.booleans())
def test_matches_boolean_mask_including_the_ends(seed, lo, width, dtype, lo_closed, hi_closed):
    hi = lo + width
    gen = torch.Generator().manual_seed(seed)
    v = (torch.rand(300, generator=gen, dtype=torch.float64) * (width + 4) + lo - 2).to(dtype)
    v[:6] = torch.tensor([lo, hi, lo, hi, float("nan"), 0.0], dtype=dtype)  # the ends exactly, NaN
    v[6:8] = torch.nextafter(torch.tensor([lo, hi], dtype=torch.float32),
                             torch.tensor([float("-inf"), float("inf")])).to(dtype)
    g = torch.randn(300, generator=gen, dtype=torch.float64).to(dtype)
    inside = ((v >= lo) if lo_closed else (v > lo)) & ((v <= hi) if hi_closed else (v < hi))
    expect = torch.where(inside, g, torch.zeros_like(g))
    assert torch.equal(grad_inside(g, v, lo, hi, lo_closed=lo_closed, hi_closed=hi_closed), expect)


def test_open_default_is_autograd_of_clamp():
    v = torch.tensor([-2.0, 0.0, 1.5, 3.0, 4.0], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    torch.clamp(v, 0, 3).backward(g)
    assert torch.equal(grad_inside(g, v.detach(), 0, 3), v.grad)
