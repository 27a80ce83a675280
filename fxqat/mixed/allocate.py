"""Bit-width allocation: one bit-width per block minimising the total predicted loss under a weight-memory budget.

The problem is a multiple-choice knapsack: block ``i`` at ``b`` bits costs ``n_i · b`` bits of weight memory (an
integer) and adds ``S_i(b)`` to the predicted loss (the :class:`~fxqat.mixed.table.SensitivityTable`); choose one
``b`` per block with ``Σ n_i·b_i <= B`` and ``Σ S_i(b_i)`` minimal. :func:`solve_mckp` solves it exactly by dynamic
programming over the integer budget, after dividing every cost and the budget by the gcd of the costs (weight counts
share large factors, so the table stays small: ResNet-20's blocks are multiples of 4,608 weights, and a 3-bit budget
is 175 cells). Exact ties go to the cheaper choice. Blocks without allocatable weights (only first/last-policy layers) cost nothing and are left out.

:func:`allocate_bits` turns the solution into a :class:`~fxqat.config.QATConfig` whose ``overrides`` set each layer
to its block's bits (``w_bits``, and ``a_bits`` of its input when ``activations`` and the base config quantizes
activations), which ``prepare_qat`` takes directly.

Example:
    >>> from fxqat.mixed.table import BlockSensitivity, SensitivityTable
    >>> t = SensitivityTable("paths", (2, 4), (
    ...     BlockSensitivity("a", 0, ("a.conv",), 100, (0.9, 0.1), (0, 0)),
    ...     BlockSensitivity("b", 1, ("b.conv",), 100, (0.2, 0.1), (0, 0))))
    >>> cfg, alloc = allocate_bits(t, avg_bits=3)
    >>> dict(alloc.bits), alloc.avg_bits, round(alloc.predicted_loss, 6)
    ({'a': 4, 'b': 2}, 3.0, 0.3)
    >>> [(o.match, o.w_bits, o.a_bits) for o in cfg.overrides]
    [('a.conv', 4, 4), ('b.conv', 2, 2)]
    >>> allocate_bits(t, avg_bits=1.5)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: allocate_bits: the budget (avg_bits=1.5, ...) is infeasible: the smallest feasible budget is avg_bits=2 ...
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from fxqat.config import Override, QATConfig
from fxqat.mixed.table import SensitivityTable

__all__ = ["allocate_bits", "solve_mckp", "Allocation", "InfeasibleBudget", "MAX_CELLS"]

#: largest DP table (items x budget cells after the gcd reduction) solve_mckp builds
MAX_CELLS = 200_000_000


class InfeasibleBudget(ValueError):
    """The budget is below the cheapest choice of every item; ``min_cost`` is the smallest feasible budget."""

    def __init__(self, message: str, min_cost: int) -> None:
        super().__init__(message)
        self.min_cost = min_cost


def solve_mckp(costs: Sequence[Sequence[int]], values: Sequence[Sequence[float]],
               budget: int) -> Tuple[List[int], float]:
    """Exact multiple-choice knapsack: pick one option per item, total cost <= ``budget``, minimal total value.

    Args:
        costs: ``costs[i][k]``, non-negative integer cost of option k of item i.
        values: ``values[i][k]``, its value (any finite float, negative allowed).
        budget: the integer budget.

    Returns:
        ``(picks, total)``: the chosen option of each item and the sum of their values.

    Raises:
        InfeasibleBudget: even the cheapest options exceed ``budget``.
        ValueError: malformed input, or a DP table larger than :data:`MAX_CELLS`.

    Example:
        >>> solve_mckp([[2, 4], [2, 4], [2, 4]], [[5.0, 1.0], [3.0, 2.0], [9.0, 0.0]], budget=10)
        ([1, 0, 1], 4.0)
    """
    if len(costs) != len(values) or any(len(c) != len(v) or not c for c, v in zip(costs, values)):
        raise ValueError("solve_mckp: costs and values need the same, non-empty option list per item.")
    if any(int(c) != c or c < 0 for row in costs for c in row):
        raise ValueError("solve_mckp: costs must be non-negative integers.")
    if not all(math.isfinite(v) for row in values for v in row):
        raise ValueError("solve_mckp: values must be finite (a sensitivity is NaN or inf: check the estimate).")
    n = len(costs)
    min_cost = sum(min(int(c) for c in row) for row in costs)
    if min_cost > budget:
        raise InfeasibleBudget(f"solve_mckp: budget {budget} < smallest feasible budget {min_cost}", min_cost)
    if n == 0:
        return [], 0.0
    g = 0
    for row in costs:
        for c in row:
            g = math.gcd(g, int(c))
    g = g or 1
    w = [[int(c) // g for c in row] for row in costs]
    cap = min(int(budget) // g, sum(max(row) for row in w))  # no solution costs more than every maximum
    if n * (cap + 1) > MAX_CELLS:
        raise ValueError(f"solve_mckp: the exact DP needs {n} x {cap + 1} cells (> {MAX_CELLS}) after dividing the "
                         f"costs by their gcd {g}; merge blocks (HybridConfig(max_blocks=...)) or lower the budget.")
    dp = np.zeros(cap + 1)  # dp[c]: least value of the items so far with total cost <= c
    choice = np.zeros((n, cap + 1), dtype=np.int16)
    for i in range(n):
        best = np.full(cap + 1, np.inf)
        arg = np.zeros(cap + 1, dtype=np.int16)
        for k, (wk, vk) in enumerate(zip(w[i], values[i])):
            if wk > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[wk:] = dp[: cap + 1 - wk] + float(vk)
            better = cand < best  # strict: an exact tie keeps the earlier (cheaper, when sorted) option
            best[better] = cand[better]
            arg[better] = k
        dp, choice[i] = best, arg
    picks = [0] * n
    c = cap
    for i in reversed(range(n)):
        k = int(choice[i, c])
        picks[i] = k
        c -= w[i][k]
    return picks, float(sum(float(values[i][k]) for i, k in enumerate(picks)))


@dataclass(frozen=True)
class Allocation:
    """The bit-width of each block chosen by :func:`allocate_bits`.

    Attributes:
        bits: ``(block, bits)`` for every block with allocatable weights, in partition order.
        layers: ``(block, layer names)`` for the same blocks: the layers the config's overrides set.
        weight_count: elements of the allocated weights.
        budget_bits: the budget in bits of weight memory.
        used_bits: what the allocation uses (``<= budget_bits``).
        predicted_loss: ``Σ S_i(b_i)`` from the table.
        method: the sensitivity estimator the table came from.
    """

    bits: Tuple[Tuple[str, int], ...]
    layers: Tuple[Tuple[str, Tuple[str, ...]], ...]
    weight_count: int
    budget_bits: int
    used_bits: int
    predicted_loss: float
    method: str

    @property
    def avg_bits(self) -> float:
        """Average bits per allocated weight."""
        return self.used_bits / self.weight_count if self.weight_count else 0.0

    @property
    def weight_bytes(self) -> float:
        return self.used_bits / 8

    @property
    def modules(self) -> Dict[str, int]:
        """Bits of every allocated layer, by module name."""
        bits = dict(self.bits)
        return {m: bits[blk] for blk, mods in self.layers for m in mods}

    def bits_of(self, block: str) -> int:
        return dict(self.bits)[block]

    def to_dict(self) -> Dict:
        return {"bits": dict(self.bits), "layers": {b: list(m) for b, m in self.layers},
                "weight_count": self.weight_count, "budget_bits": self.budget_bits, "used_bits": self.used_bits,
                "avg_bits": self.avg_bits, "weight_bytes": self.weight_bytes, "predicted_loss": self.predicted_loss,
                "method": self.method}

    def to_markdown(self) -> str:
        layers = dict(self.layers)
        lines = ["| block | bits | layers |", "|---|---:|---|"]
        lines += [f"| {blk} | {b} | {', '.join(layers.get(blk, ()))} |" for blk, b in self.bits]
        lines += ["", f"{self.avg_bits:.3f} bits per weight on average ({self.weight_bytes:g} of "
                  f"{self.budget_bits / 8:g} bytes), predicted loss increase {self.predicted_loss:.4g} "
                  f"({self.method})."]
        return "\n".join(lines)


def _exact(name: str) -> str:
    """An Override pattern matching exactly the module ``name``."""
    return "re:" + re.escape(name) if any(c in name for c in "*?[]") else name


def _budget(avg_bits: Optional[float], max_bytes: Optional[float], n_weights: int) -> int:
    if avg_bits is None and max_bytes is None:
        raise ValueError("allocate_bits: give the budget as avg_bits=... (bits per weight) or max_bytes=....")
    limits = []
    if avg_bits is not None:
        if avg_bits <= 0:
            raise ValueError(f"allocate_bits: avg_bits={avg_bits!r} must be > 0.")
        limits.append(math.floor(Fraction(str(avg_bits)) * n_weights))
    if max_bytes is not None:
        if max_bytes < 0:
            raise ValueError(f"allocate_bits: max_bytes={max_bytes!r} must be >= 0.")
        limits.append(math.floor(Fraction(str(max_bytes)) * 8))
    return min(limits)


def _describe(avg_bits: Optional[float], max_bytes: Optional[float], budget: int) -> str:
    given = ", ".join(f"{k}={v!r}" for k, v in (("avg_bits", avg_bits), ("max_bytes", max_bytes)) if v is not None)
    return f"{given}, i.e. {budget} bits = {budget / 8:g} bytes of weights"


def allocate_bits(
    sensitivity: SensitivityTable,
    avg_bits: Optional[float] = None,
    max_bytes: Optional[float] = None,
    choices: Optional[Sequence[int]] = None,
    base_config: Optional[QATConfig] = None,
    activations: bool = True,
) -> Tuple[QATConfig, Allocation]:
    """The bit-width per block minimising the predicted loss under a weight-memory budget (module docstring).

    Args:
        sensitivity: a :class:`~fxqat.mixed.table.SensitivityTable` (``fxqat.sensitivity(...)``).
        avg_bits: budget as average bits per allocated weight (the weights of the table's ``modules``; layers under
            the first/last policy are not counted).
        max_bytes: budget as bytes of the allocated weights (``count · bits / 8``). With both, the smaller wins.
        choices: allowed bit-widths (default: every bit-width of the table); each must be in the table.
        base_config: the config the overrides are added to (default ``QATConfig()``); use the one the sensitivity
            model was prepared with (its ``hybrid`` setting is kept as given). Its ``skip`` overrides stay first
            (they must not match an allocated layer); a layer's ``method`` / ``act_signed`` override is carried into
            its new override, which comes before the other base overrides.
        activations: also set the input-activation bits of each layer to its block's bits (when the base config
            quantizes activations); ``False`` leaves them at ``base_config.a_bits``.

    Returns:
        ``(config, allocation)``: a QATConfig for ``prepare_qat`` and the :class:`Allocation`.

    Raises:
        ValueError: no budget, a choice the table did not measure, or an infeasible budget (the message gives the
            smallest feasible one, as ``avg_bits`` and as ``max_bytes``).
    """
    t = sensitivity
    base = base_config or QATConfig()
    choices = tuple(sorted(set(t.bits if choices is None else choices)))
    missing = [b for b in choices if b not in t.bits]
    if missing or not choices:
        raise ValueError(f"allocate_bits: choices {choices} include {missing}, which the table did not measure "
                         f"(it has {t.bits}); measure them (fxqat.sensitivity(..., bits=...)) or drop them.")
    rows = [r for r in t.rows if r.weight_count > 0 and r.modules]
    skipped = [m for r in rows for m in r.modules if (o := base.override_for(m, None)) is not None and o.skip]
    if skipped:
        raise ValueError(f"allocate_bits: base_config skips {skipped}, which the table allocates; measure the "
                         "sensitivity on a model prepared with this base config (its skipped layers are then not "
                         "in the table).")
    n_weights = sum(r.weight_count for r in rows)
    if n_weights == 0:
        raise ValueError("allocate_bits: the table has no allocatable weights (every quantized layer is fixed by the "
                         "first/last policy).")
    budget = _budget(avg_bits, max_bytes, n_weights)
    costs = [[r.weight_count * b for b in choices] for r in rows]
    values = [[t.sensitivity_of(r.block, b) for b in choices] for r in rows]
    try:
        picks, loss = solve_mckp(costs, values, budget)
    except InfeasibleBudget as e:
        lo = e.min_cost
        raise ValueError(
            f"allocate_bits: the budget ({_describe(avg_bits, max_bytes, budget)}) is infeasible: the smallest "
            f"feasible budget is avg_bits={lo / n_weights:g} (max_bytes={lo / 8:g}), every block at {choices[0]} "
            "bits."
        ) from None
    chosen = [(r, choices[k]) for r, k in zip(rows, picks)]
    a_follow = activations and base.a_bits is not None
    ours, layers = [], []
    for r, b in chosen:
        mods = []
        for m in r.modules:
            prev = base.override_for(m, None)
            ours.append(Override(_exact(m), w_bits=b, a_bits=b if a_follow else None,
                                 method=prev.method if prev else None, act_signed=prev.act_signed if prev else None))
            mods.append(m)
        layers.append((r.block, tuple(mods)))
    skips = tuple(o for o in base.overrides if o.skip)
    config = base.with_(overrides=skips + tuple(ours) + tuple(o for o in base.overrides if not o.skip))
    alloc = Allocation(bits=tuple((r.block, b) for r, b in chosen), layers=tuple(layers), weight_count=n_weights,
                       budget_bits=budget, used_bits=sum(r.weight_count * b for r, b in chosen),
                       predicted_loss=loss, method=t.method)
    return config, alloc
