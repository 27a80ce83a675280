"""Numerical health of a training run: the non-finite step guard of :func:`fxqat.training.loop.fit` and a report of
quantizers whose scale collapsed, exploded or became non-finite.

Example:
    >>> import torch, fxqat
    >>> from torch import nn
    >>> m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> qm = fxqat.prepare_qat(m, (torch.randn(2, 4),), fxqat.QATConfig())
    >>> _ = fxqat.calibrate(qm, [torch.randn(8, 4)])
    >>> rows = quantizer_health(qm)
    >>> sorted({r["status"] for r in rows})
    ['ok']
    >>> with torch.no_grad():
    ...     _ = next(q for q in fxqat.named_quantizers(qm).values() if q.kind == "weight").scale.fill_(float("nan"))
    >>> [r["status"] for r in rows_with_problems(quantizer_health(qm))]
    ['non-finite']
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from fxqat.quantizers.base import NotAffineError, Quantizer

__all__ = ["NonFiniteGuard", "quantizer_health", "rows_with_problems", "format_health", "TINY_SCALE", "HUGE_SCALE"]

log = logging.getLogger(__name__)
TINY_SCALE = 1e-8   # a step size below this maps every realistic value to the same code: collapsed
HUGE_SCALE = 1e4    # a step size above this puts every realistic value in the zero bin: exploded


def _scale_of(q: Quantizer) -> Optional[torch.Tensor]:
    try:
        return q.affine_qparams()[0].detach()
    except (NotAffineError, RuntimeError, AttributeError):
        s = getattr(q, "scale", None)
        return s.detach() if torch.is_tensor(s) else None


@torch.no_grad()
def quantizer_health(qm: nn.Module, tiny: float = TINY_SCALE, huge: float = HUGE_SCALE) -> List[Dict[str, Any]]:
    """One row per quantizer of ``qm``: name, kind, bits, scale range and a status.

    Status is ``"uninitialized"`` (no data seen yet), ``"non-finite"`` (a NaN/inf in its parameters or buffers),
    ``"collapsed"`` (smallest scale < ``tiny``), ``"exploded"`` (largest scale > ``huge``) or ``"ok"``.
    """
    rows = []
    for name, q in qm.named_modules():
        if not isinstance(q, Quantizer):
            continue
        tensors = [t for t in list(q.parameters(recurse=False)) + list(q.buffers(recurse=False))
                   if t.is_floating_point()]
        finite = all(bool(torch.isfinite(t).all()) for t in tensors)
        scale = _scale_of(q) if finite else None
        lo = float(scale.abs().min()) if scale is not None and scale.numel() else math.nan
        hi = float(scale.abs().max()) if scale is not None and scale.numel() else math.nan
        if not q.is_initialized:
            status = "uninitialized"
        elif not finite or (scale is not None and not math.isfinite(lo + hi)):
            status = "non-finite"
        elif scale is not None and lo < tiny:
            status = "collapsed"
        elif scale is not None and hi > huge:
            status = "exploded"
        else:
            status = "ok"
        rows.append({"name": name, "kind": q.kind, "bits": q.bits, "method": getattr(q, "method", "?"),
                     "scale_min": lo, "scale_max": hi, "status": status})
    return rows


def rows_with_problems(rows: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The rows of :func:`quantizer_health` whose status is not ``"ok"``."""
    return [r for r in rows if r["status"] != "ok"]


def format_health(rows: Sequence[Dict[str, Any]]) -> str:
    """A text table of :func:`quantizer_health` rows."""
    lines = [f"{'quantizer':<40} {'kind':<7} {'bits':>4} {'scale min':>11} {'scale max':>11}  status"]
    for r in rows:
        lines.append(f"{r['name']:<40} {r['kind']:<7} {r['bits']:>4} {r['scale_min']:>11.4g} {r['scale_max']:>11.4g}"
                     f"  {r['status']}")
    return "\n".join(lines)


def _any_across_ranks(flag: bool) -> bool:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class NonFiniteGuard:
    """Detects steps with a non-finite loss or gradient and applies the policy of ``TrainConfig.nonfinite``.

    Call :meth:`before_step` before the forward pass (it snapshots the model's buffers when the policy is "skip",
    since the forward of a poisoned batch already writes BatchNorm statistics and quantizer state) and
    :meth:`check` after ``backward``. ``check`` returns ``"ok"`` (update), ``"skip"`` (buffers restored; do not
    update) or ``"stop"`` (``message`` names the step); with policy ``"raise"`` it raises ``FloatingPointError``.
    Under DDP the verdict is agreed across ranks, so every rank skips the same steps.

    Example:
        >>> m = nn.BatchNorm1d(2); g = NonFiniteGuard(m, "skip", max_consecutive=2)
        >>> g.before_step(); _ = m(torch.tensor([[float("nan"), 1.0], [0.0, 2.0]]))
        >>> g.check(1, float("nan"), []), bool(torch.isfinite(m.running_mean).all()), g.count
        ('skip', True, 1)
        >>> g.before_step(); g.check(2, float("inf"), [])
        'stop'
        >>> g.message
        'fit(train): 2 consecutive non-finite steps (loss inf) ending at step 2; stopped.'
    """

    def __init__(self, model: nn.Module, policy: str = "skip", max_consecutive: int = 5, desc: str = "train"):
        self.model, self.policy, self.max_consecutive, self.desc = model, policy, max_consecutive, desc
        self.count = 0
        self.consecutive = 0
        self.message = ""
        self._snapshot: List[torch.Tensor] = []
        self._buffers: List[torch.Tensor] = []

    def before_step(self) -> None:
        if self.policy == "skip":
            self._buffers = list(self.model.buffers())
            self._snapshot = [b.detach().clone() for b in self._buffers]

    @torch.no_grad()
    def check(self, step: int, loss: float, params: Iterable[torch.Tensor]) -> str:
        grads = [p.grad for p in params if p.grad is not None]
        bad_grad = bool(grads) and not bool(torch.isfinite(nn.utils.get_total_norm(grads)).item())
        bad = _any_across_ranks(not math.isfinite(loss) or bad_grad)
        if not bad:
            self.consecutive = 0
            return "ok"
        self.count += 1
        self.consecutive += 1
        what = f"loss {loss}" if not math.isfinite(loss) else "gradient norm non-finite"
        if self.policy == "raise":
            raise FloatingPointError(f"fit({self.desc}): non-finite step {step} ({what}); lower --lr or check the "
                                     f"data, or use --nonfinite skip.")
        if self.policy == "stop" or self.consecutive >= self.max_consecutive:
            n = "1 non-finite step" if self.consecutive == 1 else f"{self.consecutive} consecutive non-finite steps"
            self.message = f"fit({self.desc}): {n} ({what}) ending at step {step}; stopped."
            return "stop"
        for b, s in zip(self._buffers, self._snapshot):
            b.copy_(s)
        log.warning("fxqat %s: step %d skipped (%s); %d non-finite step(s) so far", self.desc, step, what, self.count)
        return "skip"
