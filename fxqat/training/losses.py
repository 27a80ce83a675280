"""Losses for block replacement: task loss on the backbone and on every path, plus distillation to the FP partner.

``L = task_weight·CE(lp, y) + λ_kd·KD(lp, fp) + Σ_i w_i·(CE(m_i, y) + λ_kd·KD(m_i, fp))`` with
``KD(a, f) = T²·KL(softmax(f/T) ‖ softmax(a/T))`` (methods.md §1; every weight from :class:`~fxqat.HybridConfig`).

Example:
    >>> import torch
    >>> from fxqat.passes.build_hybrid import HybridOutput
    >>> from fxqat.config import HybridConfig
    >>> logits = torch.tensor([[2.0, 0.0]])
    >>> out = HybridOutput(lp=logits, paths=[logits], fp=logits, path_ids=(0,), config=HybridConfig())
    >>> total, parts = hybrid_loss(out, torch.tensor([0]))
    >>> round(float(parts["kd_lp"]), 6), round(float(total), 4)
    (0.0, 0.2539)
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from fxqat.config import HybridConfig
from fxqat.hybrid_output import HybridOutput

__all__ = ["kd_loss", "hybrid_loss", "distillation_loss", "logits_of"]


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T²·KL(softmax(teacher/T) ‖ softmax(student/T))``, averaged over the batch; no gradient to the teacher."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student / t, dim=-1), F.log_softmax(teacher.detach() / t, dim=-1),
        reduction="batchmean", log_target=True,
    ) * (t * t)


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, config: Optional[HybridConfig] = None
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Task loss plus KD to a teacher's logits, without paths (the "distillation only" baseline arm)."""
    cfg = config or HybridConfig()
    ce = F.cross_entropy(student, target)
    kd = kd_loss(student, teacher, cfg.temperature)
    total = cfg.task_weight * ce + cfg.kd_weight * kd
    return total, {"ce_lp": ce.detach(), "kd_lp": kd.detach()}


def logits_of(out: Any) -> torch.Tensor:
    """The logits in a model output: a tensor itself, ``out.logits`` (transformers), ``out["logits"]``, or the first
    element of a tuple/list.

    Example:
        >>> logits_of({"logits": torch.ones(2, 3)}).shape
        torch.Size([2, 3])
    """
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find the logits in a {type(out).__name__}: pass a tensor, an object with .logits, a dict "
                    "with 'logits' or a tuple whose first element is the logits.")


def _flat(logits: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sequence outputs (N, T, C) with targets (N, T) become (N*T, C) and (N*T,) for the token-level losses."""
    if logits.dim() > 2 and target.dim() == logits.dim() - 1:
        return logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    return logits, target


def hybrid_loss(out, target: torch.Tensor, config: Optional[HybridConfig] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Total loss of a hybrid model's train-mode output and a dict of its parts (detached, for logging).

    Args:
        out: a :class:`~fxqat.hybrid_output.HybridOutput` (or a plain output: then plain CE). Each of its parts may
            be a logits tensor or a model output holding them (``.logits``, ``["logits"]``, first tuple element).
        target: class indices; for sequence logits (N, T, C), next-token targets (N, T) (already shifted).
        config: loss weights; defaults to ``out.config`` (the model's HybridConfig).

    When ``out.stats`` is set (models in ``lp_prefix`` mode), the step's task losses of the FP output, the paths and
    the LP output are folded into the model's running averages (:func:`fxqat.running_sensitivity` reads them).
    """
    if not isinstance(out, HybridOutput):
        logits, target = _flat(logits_of(out), target)
        ce = F.cross_entropy(logits, target)
        return ce, {"ce_lp": ce.detach()}
    cfg = config or out.config or HybridConfig()
    lp, flat_target = _flat(logits_of(out.lp), target)
    fp, _ = _flat(logits_of(out.fp), target)
    total, parts = distillation_loss(lp, fp, flat_target, cfg)
    n = len(out.paths)
    path_ce: Dict[int, torch.Tensor] = {}
    for pid, path in zip(out.path_ids or range(n), out.paths):
        m, _ = _flat(logits_of(path), target)
        w = 1.0 / n if cfg.path_weights == "uniform" else cfg.path_weights[pid]
        ce = F.cross_entropy(m, flat_target)
        kd = kd_loss(m, fp, cfg.temperature)
        total = total + w * (ce + cfg.kd_weight * kd)
        parts[f"ce_path{pid}"] = ce.detach()
        parts[f"kd_path{pid}"] = kd.detach()
        path_ce[pid] = parts[f"ce_path{pid}"]
    if out.stats is not None:  # running path losses: one extra cross-entropy on the FP logits, no extra forward
        with torch.no_grad():
            out.stats.update(F.cross_entropy(fp, flat_target), path_ce, parts["ce_lp"])
    return total, parts
