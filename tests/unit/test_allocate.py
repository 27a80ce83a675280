"""allocate_bits / solve_mckp: exact against brute force, always within the budget, clear infeasibility errors."""

import itertools
import math
import re
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import fxqat
from fxqat.mixed.allocate import InfeasibleBudget, solve_mckp
from fxqat.mixed.table import BlockSensitivity, SensitivityTable

BITS = (2, 3, 4, 8)


@st.composite
def table_st(draw, max_blocks=5):
    """A SensitivityTable of 1..max_blocks blocks (some without allocatable weights) at a subset of BITS."""
    bits = tuple(sorted(draw(st.sets(st.sampled_from(BITS), min_size=1, max_size=4))))
    n = draw(st.integers(1, max_blocks))
    rows = []
    for i in range(n):
        count = draw(st.sampled_from([0, 1, 7, 16, 48, 64, 100, 1000]))
        sens = draw(st.lists(st.floats(-1.0, 10.0, allow_nan=False, width=32), min_size=len(bits), max_size=len(bits)))
        rows.append(BlockSensitivity(f"b{i}", i, (f"b{i}.conv",) if count else (), count, tuple(sens),
                                     (0.0,) * len(bits)))
    if all(r.weight_count == 0 for r in rows):
        rows[0] = BlockSensitivity("b0", 0, ("b0.conv",), 16, rows[0].sensitivity, rows[0].spread)
    return SensitivityTable("paths", bits, tuple(rows))


def brute_force(table, choices, budget_bits):
    rows = [r for r in table.rows if r.weight_count > 0]
    best = None
    for combo in itertools.product(choices, repeat=len(rows)):
        cost = sum(r.weight_count * b for r, b in zip(rows, combo))
        if cost <= budget_bits:
            loss = sum(table.sensitivity_of(r.block, b) for r, b in zip(rows, combo))
            best = loss if best is None else min(best, loss)
    return best


@settings(max_examples=60)  # bounded: each example enumerates at most 4^5 allocations
@given(t=table_st(), frac=st.floats(0.0, 1.0), data=st.data())
def test_allocation_is_exact_and_within_budget(t, frac, data):
    choices = tuple(sorted(data.draw(st.sets(st.sampled_from(t.bits), min_size=1))))
    n = t.total_weight_count
    lo, hi = n * choices[0], n * choices[-1]
    max_bytes = (lo + frac * (hi - lo)) / 8  # between the smallest feasible and the largest useful budget
    cfg, alloc = fxqat.allocate_bits(t, max_bytes=max_bytes, choices=choices)
    assert alloc.budget_bits == math.floor(Fraction(str(max_bytes)) * 8)
    assert alloc.used_bits <= alloc.budget_bits
    assert alloc.used_bits == sum(t.row(b).weight_count * bits for b, bits in alloc.bits)
    expected = brute_force(t, choices, alloc.budget_bits)
    # the DP and the enumeration add the same float32-representable values in different orders: 1e-9 relative
    assert alloc.predicted_loss == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert alloc.predicted_loss == pytest.approx(sum(t.sensitivity_of(b, k) for b, k in alloc.bits), abs=0)
    assert all(bits in choices for _, bits in alloc.bits)
    # the config sets every allocated layer, weights and activations, to its block's bits
    got = {o.match: (o.w_bits, o.a_bits) for o in cfg.overrides}
    assert got == {m: (b, b) for m, b in alloc.modules.items()}


@settings(max_examples=60)
@given(costs=st.lists(st.lists(st.integers(0, 30), min_size=1, max_size=4), min_size=1, max_size=5),
       data=st.data())
def test_solver_matches_brute_force(costs, data):
    values = [data.draw(st.lists(st.floats(-5, 5, allow_nan=False), min_size=len(c), max_size=len(c))) for c in costs]
    budget = data.draw(st.integers(sum(min(c) for c in costs), sum(max(c) for c in costs) + 3))
    picks, total = solve_mckp(costs, values, budget)
    assert sum(costs[i][k] for i, k in enumerate(picks)) <= budget
    best = min(sum(values[i][k] for i, k in enumerate(p)) for p in itertools.product(*[range(len(c)) for c in costs])
               if sum(costs[i][k] for i, k in enumerate(p)) <= budget)
    assert total == pytest.approx(best, rel=1e-12, abs=1e-12)  # summation order only


def test_gcd_reduction_keeps_exactness():
    # costs share the factor 1000: the DP runs on a 13-cell budget, the answer is that of the full one
    costs = [[2000, 4000, 8000], [3000, 6000, 12000]]
    values = [[3.0, 1.0, 0.0], [5.0, 2.0, 0.5]]
    assert solve_mckp(costs, values, 12999) == ([1, 1], 3.0)
    assert solve_mckp(costs, values, 16000) == ([1, 2], 1.5)


def _table():
    return SensitivityTable("fisher", (2, 4, 8), (
        BlockSensitivity("stem", 0, (), 0, (0.1, 0.1, 0.1), (0, 0, 0), fixed=("conv1",)),
        BlockSensitivity("a", 1, ("a.c1", "a.c2"), 300, (3.0, 1.0, 0.1), (0, 0, 0)),
        BlockSensitivity("b", 2, ("b.c1",), 100, (0.5, 0.2, 0.0), (0, 0, 0))))


def test_infeasible_budget_names_the_smallest_feasible_one():
    with pytest.raises(ValueError, match=re.escape("smallest feasible budget is avg_bits=2 (max_bytes=100)")):
        fxqat.allocate_bits(_table(), avg_bits=1.99)
    with pytest.raises(ValueError, match=re.escape("smallest feasible budget is avg_bits=4 (max_bytes=200)")):
        fxqat.allocate_bits(_table(), max_bytes=150, choices=(4, 8))
    cfg, alloc = fxqat.allocate_bits(_table(), max_bytes=100)  # exactly the smallest: every block at 2 bits
    assert dict(alloc.bits) == {"a": 2, "b": 2} and alloc.used_bits == 800
    with pytest.raises(InfeasibleBudget) as e:
        solve_mckp([[5, 9]], [[0.0, 0.0]], 4)
    assert e.value.min_cost == 5


def test_bad_arguments():
    with pytest.raises(ValueError, match="avg_bits=... .* or max_bytes"):
        fxqat.allocate_bits(_table())
    with pytest.raises(ValueError, match=r"include \[3\], which the table did not measure"):
        fxqat.allocate_bits(_table(), avg_bits=4, choices=(2, 3))


def test_budget_from_avg_bits_and_both_limits():
    cfg, alloc = fxqat.allocate_bits(_table(), avg_bits=3.5)  # 400 weights x 3.5 = 1400 bits: a at 4, b at 2
    assert alloc.budget_bits == 1400 and dict(alloc.bits) == {"a": 4, "b": 2} and alloc.predicted_loss == 1.5
    _, alloc2 = fxqat.allocate_bits(_table(), avg_bits=8, max_bytes=175)  # the smaller limit (1400 bits) wins
    assert alloc2.budget_bits == 1400 and alloc2.bits == alloc.bits
    assert alloc.avg_bits == 3.5 and alloc.weight_bytes == 175.0
    _, alloc3 = fxqat.allocate_bits(_table(), avg_bits=3)  # 1200 bits: a at 4 no longer fits
    assert dict(alloc3.bits) == {"a": 2, "b": 4} and alloc3.used_bits == 1000 and alloc3.predicted_loss == 3.2


def test_config_keeps_base_fields_and_overrides():
    base = fxqat.QATConfig(w_bits=4, a_bits=None, method="lsq", overrides=(
        fxqat.Override("head.*", skip=True), fxqat.Override("a.c2", method="pact"), fxqat.Override(nn.LayerNorm)))
    cfg, alloc = fxqat.allocate_bits(_table(), avg_bits=3.5, base_config=base)
    assert cfg.w_bits == 4 and cfg.a_bits is None and cfg.first_last == 8
    matches = [(o.match, o.w_bits, o.a_bits, o.method, o.skip) for o in cfg.overrides]
    assert matches == [("head.*", None, None, None, True),  # the user's skip stays first
                       ("a.c1", 4, None, None, False), ("a.c2", 4, None, "pact", False),  # weight-only: no a_bits
                       ("b.c1", 2, None, None, False),
                       ("a.c2", None, None, "pact", False), (nn.LayerNorm, None, None, None, False)]
    with pytest.raises(ValueError, match=r"base_config skips \['b.c1'\], which the table allocates"):
        fxqat.allocate_bits(_table(), avg_bits=3, base_config=base.with_(overrides=(fxqat.Override("b.*", skip=True),)))


def test_allocated_config_prepares_a_model_with_those_bits():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                        nn.Linear(8, 2))
    t = SensitivityTable("paths", (2, 8), (
        BlockSensitivity("stem", 0, (), 0, (0.0, 0.0), (0, 0), fixed=("0",)),
        BlockSensitivity("2", 1, ("2",), 64, (1.0, 0.0), (0, 0)),
        BlockSensitivity("4", 2, ("4",), 64, (0.1, 0.0), (0, 0)),
        BlockSensitivity("head", 3, (), 0, (0.0, 0.0), (0, 0), fixed=("6",))))
    cfg, alloc = fxqat.allocate_bits(t, avg_bits=5)
    assert dict(alloc.bits) == {"2": 8, "4": 2}
    qs = fxqat.named_quantizers(fxqat.prepare_qat(net, (torch.randn(2, 4),), cfg))
    assert {n: q.bits for n, q in qs.items()} == {
        "fxqat_quant.a_input_1": 8, "fxqat_quant.w_0": 8,  # first layer: the first/last policy
        "fxqat_quant.a__1": 8, "fxqat_quant.w_2": 8, "fxqat_quant.a__3": 2, "fxqat_quant.w_4": 2,
        "fxqat_quant.a__5": 8, "fxqat_quant.w_6": 8}


def test_allocation_figures(tmp_path):
    from fxqat.mixed.plot import bit_colors, plot_allocation

    _, alloc = fxqat.allocate_bits(_table(), avg_bits=3.5)
    # without a graph (eager roots): one bar per block
    png = plot_allocation(alloc, tmp_path / "rows.png", table=_table(), choices=(2, 4, 8))
    assert open(png, "rb").read(4) == b"\x89PNG"
    colors = bit_colors([2, 3, 4, 8])
    assert len(set(colors.values())) == 4 and colors[2][0] > colors[8][0]  # red for few bits, green for many
