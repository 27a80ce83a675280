"""Small helpers several test files share: a briefly trained prepared model (any loss, or next-token LM steps), a
model whose root forward cannot be traced, and which blocks own each module."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

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


def lm_steps(qm, x: torch.Tensor, vocab: int, steps: int = 3, lr: float = 1e-2):
    """``steps`` Adam steps of next-token cross-entropy on ``x`` for a prepared causal LM (every trainable
    parameter, quantizer scales included), so learned step sizes move off their initial values; returned in eval
    mode."""
    qm.train()
    opt = torch.optim.Adam([p for p in qm.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        logits = qm(x).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return qm.eval()


class DataDepRoot(nn.Module):
    """An eager root (a data-dependent branch torch.fx cannot trace) over a ModuleList chain and a head; returns
    ``(logits, features)``, or the logits alone with ``features=False``."""

    def __init__(self, n: int = 3, d: int = 8, features: bool = True):
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(d, d), nn.ReLU()) for _ in range(n)])
        self.head = nn.Linear(d, 2)
        self.features = features

    def forward(self, x):
        if x.sum() > 1e9:
            x = -x
        for layer in self.layers:
            x = layer(x)
        return (self.head(x), x) if self.features else self.head(x)


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
