"""Mixed precision: per-block sensitivity at candidate bit-widths and an exact bit allocation under a memory budget.

``fxqat.sensitivity(qm, batches, bits=(2, 3, 4, 8), method="paths" | "fisher" | "hessian")`` returns a
:class:`SensitivityTable`; ``fxqat.allocate_bits(table, avg_bits=... | max_bytes=...)`` returns the pair
``(config, allocation)``: a ``QATConfig`` with per-layer overrides and the :class:`Allocation` (``prepare_qat`` also
takes the pair as its config). See docs/choosing_bits.md.
"""

from fxqat.mixed.allocate import Allocation, InfeasibleBudget, allocate_bits, solve_mckp
from fxqat.mixed.sensitivity import running_sensitivity, sensitivity, task_loss
from fxqat.mixed.table import BlockSensitivity, SensitivityTable

__all__ = ["sensitivity", "running_sensitivity", "task_loss", "allocate_bits", "solve_mckp", "Allocation", "InfeasibleBudget",
           "SensitivityTable", "BlockSensitivity"]
