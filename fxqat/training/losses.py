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

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from fxqat.config import HybridConfig

__all__ = ["kd_loss", "hybrid_loss", "distillation_loss"]


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


def hybrid_loss(out, target: torch.Tensor, config: Optional[HybridConfig] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Total loss of a hybrid model's train-mode output and a dict of its parts (detached, for logging).

    Args:
        out: a :class:`~fxqat.passes.build_hybrid.HybridOutput` (or a plain logits tensor: then plain CE).
        target: class indices.
        config: loss weights; defaults to ``out.config`` (the model's HybridConfig).
    """
    if isinstance(out, torch.Tensor):
        ce = F.cross_entropy(out, target)
        return ce, {"ce_lp": ce.detach()}
    cfg = config or out.config or HybridConfig()
    total, parts = distillation_loss(out.lp, out.fp, target, cfg)
    n = len(out.paths)
    for pid, m in zip(out.path_ids or range(n), out.paths):
        w = 1.0 / n if cfg.path_weights == "uniform" else cfg.path_weights[pid]
        ce = F.cross_entropy(m, target)
        kd = kd_loss(m, out.fp, cfg.temperature)
        total = total + w * (ce + cfg.kd_weight * kd)
        parts[f"ce_path{pid}"] = ce.detach()
        parts[f"kd_path{pid}"] = kd.detach()
    return total, parts
