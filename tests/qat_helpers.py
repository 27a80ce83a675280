"""Small helpers several test files share: a briefly trained prepared model, and which blocks own each module."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import torch

import fxqat


def trained(net, x, preset: str, steps: int = 3, **overrides):
    """``net`` prepared with ``preset`` and a few Adam steps, so the learned scales move off their initialisation;
    returned in eval mode. The first forward initialises the quantizers before the optimizer sees their parameters."""
    qm = fxqat.prepare_qat(net, (x,), fxqat.QATConfig.preset(preset, **overrides))
    qm(x)
    opt = torch.optim.Adam(fxqat.trainable_parameters(qm), lr=1e-2)
    for _ in range(steps):
        out = qm(x)
        loss = (out.logits if hasattr(out, "logits") else out).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return qm.eval()


def block_owners(blocks) -> Dict[str, List[int]]:
    """Module name -> indices of the blocks whose ``modules`` list it (a partition lists each exactly once)."""
    where: Dict[str, List[int]] = {}
    for b in blocks:
        for m in b.modules:
            where.setdefault(m, []).append(b.index)
    return where


class RunsCode:
    """A pickle payload: unpickling this object executes ``open(marker, 'w').write('pwned')`` (for tests that
    crafted checkpoints are refused before any of their code runs)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)
