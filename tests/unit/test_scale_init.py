"""The ``"mse"`` step-size search of :mod:`fxqat.quantizers.scale_init` gives, bit for bit, the step sizes of trying
every ratio on every row (the definition, written out below), on drawn tensors, chunk sizes, grids and dtypes."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxqat.quantizers import scale_init
from fxqat.quantizers.scale_init import init_scale, lowest_needed_ratio, mse_scale
from tests.strategies import scale_rows_st


def every_ratio(rows: torch.Tensor, qrange, grid: int = 40):
    """The definition: every ratio ``i / grid`` tried on every row, the first (smallest) of least error kept, absmax
    where no error is finite. Returns ``(scales, errors [R, grid])``."""
    qmin, qmax = qrange
    half = (qmax - qmin) / 2 if qmin < 0 else max(qmax, 1)
    absmax = rows.abs().amax(dim=1) / half
    best, best_err = absmax.clone(), torch.full_like(absmax, float("inf"))
    errs = []
    for i in range(1, grid + 1):
        s = (absmax * i / grid).clamp_min(1e-12)[:, None]
        err = ((torch.clamp(torch.round(rows / s), qmin, qmax) * s - rows) ** 2).sum(dim=1)
        errs.append(err)
        better = err < best_err
        best = torch.where(better, s[:, 0], best)
        best_err = torch.where(better, err, best_err)
    return best, torch.stack(errs, 1)


def with_chunk(elements: int, fn):
    old = scale_init.CHUNK_ELEMENTS
    scale_init.CHUNK_ELEMENTS = elements
    try:
        return fn()
    finally:
        scale_init.CHUNK_ELEMENTS = old


@settings(max_examples=60, deadline=None)
@given(scale_rows_st(), st.sampled_from((1, 2, 7, 40)), st.sampled_from((64, 1 << 10, 1 << 18)))
def test_mse_equals_every_ratio(drawn, grid, chunk):
    rows, qrange = drawn
    want, _ = every_ratio(rows, qrange, grid)
    got = with_chunk(chunk, lambda: init_scale(rows, 0, qrange, "mse", grid))
    assert torch.equal(got, want)  # bit-exact: the same float operations decide


@settings(max_examples=40, deadline=None)
@given(scale_rows_st())
def test_bound_is_conservative(drawn):
    """No ratio below ``lowest_needed_ratio`` of the best error reaches that error (brute force over all ratios)."""
    rows, qrange = drawn
    grid = 40
    qmin, qmax = qrange
    half = (qmax - qmin) / 2 if qmin < 0 else max(qmax, 1)
    absmax = rows.abs().amax(dim=1) / half
    _, errs = every_ratio(rows, qrange, grid)
    best_err = errs.nan_to_num(nan=float("inf")).amin(dim=1)
    low = lowest_needed_ratio(rows.amax(1).clamp_min(0), rows.amin(1).neg().clamp_min(0), absmax, best_err, qrange,
                              grid)
    ratio = torch.arange(1, grid + 1)[None, :]
    below = ratio < low[:, None]
    assert bool((errs[below] > best_err[:, None].expand_as(errs)[below]).all())


def test_per_channel_axes_and_per_tensor():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 9, generator=g) ** 3
    for axis in (0, 1, 2):
        rows = x.transpose(0, axis).reshape(x.shape[axis], -1)
        assert torch.equal(init_scale(x, axis, (-4, 3), "mse"), every_ratio(rows, (-4, 3))[0])
    assert torch.equal(init_scale(x, None, (0, 255), "mse"), every_ratio(x.reshape(1, -1), (0, 255))[0])


def test_non_finite_rows_keep_absmax_like_the_definition():
    rows = torch.tensor([[1.0, float("nan"), 0.5], [float("inf"), 1.0, 2.0], [0.0, 0.0, 0.0], [0.3, -0.2, 0.1]])
    want, _ = every_ratio(rows, (-8, 7))
    got = init_scale(rows, 0, (-8, 7), "mse")
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~got.isnan()], want[~want.isnan()])
    assert float(got[2]) == torch.tensor(1e-12).item()  # an all-zero row: every ratio ties at error 0, the smallest (clamped) one wins


def test_low_precision_input_is_read_as_float32():
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(256, 32, generator=g) * 0.02).to(torch.bfloat16)
    got = init_scale(w, 0, (-8, 7), "mse")
    assert got.dtype == torch.float32
    assert torch.equal(got, init_scale(w.float(), 0, (-8, 7), "mse"))


def test_mse_never_worse_than_absmax_and_checks_shapes():
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(500, 32, generator=g)
    s = init_scale(rows, 0, (-2, 1), "mse")
    absmax = init_scale(rows, 0, (-2, 1), "absmax")
    assert bool((s <= absmax).all()) and bool((s < absmax).any())  # int2: clipping pays on Gaussian groups
    try:
        mse_scale(rows, absmax[:3], (-2, 1))
    except ValueError as e:
        assert "mse_scale" in str(e)
    else:
        raise AssertionError("mse_scale accepted mismatched shapes")


def test_compacting_the_live_rows_changes_no_step_size():
    """The rows still searched are copied together at any share (never, at half, always): same scales bit for bit."""
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(3000, 32, generator=g) * torch.rand(3000, 1, generator=g)
    rows[::7, 0] *= 9.0  # an outlier now and then: rows that stop early beside rows that go deep
    old = scale_init.COMPACT_SHARE
    for qrange in ((-8, 7), (-2, 1)):
        want, _ = every_ratio(rows, qrange)
        for share in (0.0, 0.5, 1.0):
            scale_init.COMPACT_SHARE = share
            try:
                got = with_chunk(1 << 12, lambda: init_scale(rows, 0, qrange, "mse"))
            finally:
                scale_init.COMPACT_SHARE = old
            assert torch.equal(got, want), (qrange, share)
