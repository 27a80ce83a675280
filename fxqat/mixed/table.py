"""The result of :func:`fxqat.sensitivity`: per block, its layers, weight memory and sensitivity at each bit-width.

A row's *sensitivity* at ``b`` bits is the predicted increase of the loss when the block's layers are quantized to
``b`` bits (the unit is the loss itself for every method); *spread* is the standard deviation of that estimate over
the batches. Weight memory is ``weight_count · b / 8`` bytes (the quantizers' scales are not counted). Layers whose
bits the ``first_last`` policy sets are listed as ``fixed`` and are not part of any budget.

Example:
    >>> t = SensitivityTable(method="paths", bits=(2, 4), rows=(
    ...     BlockSensitivity("stem", 0, (), 0, (0.0, 0.0), (0.0, 0.0), fixed=("conv1",)),
    ...     BlockSensitivity("layer1", 1, ("layer1.conv",), 100, (0.5, 0.1), (0.05, 0.01))))
    >>> t.weight_bytes("layer1", 4), t.sensitivity_of("layer1", 2), t.total_weight_count
    (50.0, 0.5, 100)
    >>> SensitivityTable.from_json(t.to_json()) == t
    True
    >>> print(t.to_markdown().splitlines()[3])
    | 1 | layer1 | 1 | 100 | 25 | 50 | 0.5 ± 0.05 | 0.1 ± 0.01 |
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

__all__ = ["BlockSensitivity", "SensitivityTable", "METHODS"]

#: the estimators of :func:`fxqat.sensitivity`
METHODS = ("paths", "fisher", "hessian")


@dataclass(frozen=True)
class BlockSensitivity:
    """One block of a :class:`SensitivityTable`.

    Attributes:
        block: the block's name (``fxqat.Block.name``).
        index: its position in the partition.
        modules: the layers a bit allocation sets (qualified module names).
        weight_count: elements of their weights.
        sensitivity: predicted loss increase at each of the table's ``bits``.
        spread: standard deviation of each estimate over the batches.
        fixed: layers of the block whose bits the first/last policy sets (not allocated, not in the budget).
    """

    block: str
    index: int
    modules: Tuple[str, ...]
    weight_count: int
    sensitivity: Tuple[float, ...]
    spread: Tuple[float, ...]
    fixed: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("modules", "sensitivity", "spread", "fixed"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.sensitivity) != len(self.spread):
            raise ValueError(f"BlockSensitivity({self.block!r}): one spread per sensitivity, got "
                             f"{len(self.sensitivity)} and {len(self.spread)}.")
        if self.weight_count < 0:
            raise ValueError(f"BlockSensitivity({self.block!r}): weight_count={self.weight_count} must be >= 0.")


@dataclass(frozen=True)
class SensitivityTable:
    """Per-block sensitivities at candidate bit-widths (see the module docstring).

    Attributes:
        method: ``"paths"``, ``"fisher"`` or ``"hessian"``.
        bits: the candidate bit-widths, ascending.
        rows: one :class:`BlockSensitivity` per block, in partition order.
        kinds: the quantizer kinds set to each bit-width while measuring (``("weight", "act")`` or ``("weight",)``).
        n_batches: batches the estimate averaged over.
        time_s: wall time of the estimate.
        info: method settings (e.g. Hutchinson probes), for the record.
    """

    method: str
    bits: Tuple[int, ...]
    rows: Tuple[BlockSensitivity, ...]
    kinds: Tuple[str, ...] = ("weight", "act")
    n_batches: int = 0
    time_s: float = 0.0
    info: Tuple[Tuple[str, Any], ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", tuple(int(b) for b in self.bits))
        object.__setattr__(self, "rows", tuple(self.rows))
        object.__setattr__(self, "kinds", tuple(self.kinds))
        object.__setattr__(self, "info", tuple(sorted(dict(self.info).items())))
        if self.method not in METHODS:
            raise ValueError(f"SensitivityTable.method={self.method!r}: use one of {METHODS}.")
        if list(self.bits) != sorted(set(self.bits)) or not self.bits:
            raise ValueError(f"SensitivityTable.bits={self.bits}: give distinct bit-widths in ascending order.")
        for r in self.rows:
            if len(r.sensitivity) != len(self.bits):
                raise ValueError(f"SensitivityTable: block {r.block!r} has {len(r.sensitivity)} sensitivities for "
                                 f"{len(self.bits)} bit-widths {self.bits}.")
        names = [r.block for r in self.rows]
        if len(set(names)) != len(names):
            raise ValueError(f"SensitivityTable: block names must be unique, got {names}.")

    # ------------------------------------------------------------------------------------------------ lookups
    def row(self, block: Union[str, int]) -> BlockSensitivity:
        """The row of ``block`` (its name or its index)."""
        for r in self.rows:
            if r.block == block or (isinstance(block, int) and r.index == block):
                return r
        raise KeyError(f"no block {block!r} in this table; blocks: {[r.block for r in self.rows]}")

    def _col(self, bits: int) -> int:
        if bits not in self.bits:
            raise KeyError(f"{bits} bits were not measured; this table has {self.bits}.")
        return self.bits.index(bits)

    def sensitivity_of(self, block: Union[str, int], bits: int) -> float:
        """Predicted loss increase of ``block`` at ``bits``."""
        return self.row(block).sensitivity[self._col(bits)]

    def spread_of(self, block: Union[str, int], bits: int) -> float:
        return self.row(block).spread[self._col(bits)]

    def weight_bytes(self, block: Union[str, int], bits: int) -> float:
        """Bytes of ``block``'s allocatable weights at ``bits``."""
        return self.row(block).weight_count * bits / 8

    @property
    def total_weight_count(self) -> int:
        """Elements of every allocatable weight (what ``avg_bits`` averages over)."""
        return sum(r.weight_count for r in self.rows)

    # ------------------------------------------------------------------------------------------------ output
    def to_markdown(self) -> str:
        """A table: block, layers, weights, bytes at each bit-width, sensitivity ± spread at each bit-width."""
        head = ["#", "block", "layers", "weights"] + [f"bytes@{b}" for b in self.bits] + [
            f"ΔL@{b}" for b in self.bits]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = [str(r.index), r.block, str(len(r.modules)), str(r.weight_count)]
            cells += [f"{r.weight_count * b / 8:g}" for b in self.bits]
            cells += [f"{s:.4g} ± {d:.2g}" for s, d in zip(r.sensitivity, r.spread)]
            lines.append("| " + " | ".join(cells) + " |")
        fixed = [m for r in self.rows for m in r.fixed]
        lines.append("")
        lines.append(f"method {self.method}, {self.n_batches} batches, {self.time_s:.1f} s; quantizers varied: "
                     f"{', '.join(self.kinds)}; ΔL = predicted loss increase ± std over batches."
                     + (f" Fixed by the first/last policy (not allocated): {', '.join(fixed)}." if fixed else ""))
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["info"] = dict(self.info)
        return d

    def to_json(self, indent: Optional[int] = 1) -> str:
        """The table as JSON (:meth:`from_json` reads it back)."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "SensitivityTable":
        d = json.loads(text)
        rows = tuple(BlockSensitivity(**r) for r in d.pop("rows"))
        return cls(rows=rows, info=tuple(d.pop("info", {}).items()), **d)

    def plot(self, path: Union[str, os.PathLike], title: str = "") -> str:
        """Grouped bars: per block, the sensitivity at each bit-width with its spread (symmetric-log axis)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        rows = [r for r in self.rows if r.weight_count > 0] or list(self.rows)
        width = 0.8 / len(self.bits)
        fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(rows) * len(self.bits) ** 0.5 + 3), 4.0))
        try:
            for k, b in enumerate(self.bits):
                xs = [i + (k - (len(self.bits) - 1) / 2) * width for i in range(len(rows))]
                ax.bar(xs, [r.sensitivity[k] for r in rows], width, yerr=[r.spread[k] for r in rows],
                       label=f"{b} bits", color=plt.get_cmap("viridis")(k / max(1, len(self.bits) - 1)),
                       capsize=2, error_kw={"lw": 0.7})
            ax.set_yscale("symlog", linthresh=_linthresh(self))
            ax.set_xticks(range(len(rows)), [r.block for r in rows], rotation=45, ha="right", fontsize=7)
            ax.set_ylabel("predicted loss increase")
            ax.axhline(0, color="grey", lw=0.5)
            ax.legend(fontsize=7)
            ax.set_title(title or f"block sensitivity ({self.method}, {self.n_batches} batches)")
            fig.tight_layout()
            fig.savefig(path, dpi=110)
        finally:
            plt.close(fig)
        return str(path)


def _linthresh(table: SensitivityTable) -> float:
    vals = sorted(abs(s) for r in table.rows for s in r.sensitivity if s != 0)
    return vals[len(vals) // 10] if vals else 1.0

