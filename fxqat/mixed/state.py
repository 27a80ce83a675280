"""Trying bit-widths on a prepared model without changing it: quantizer snapshots and the path-measuring mode.

:func:`preserved` restores every listed quantizer afterwards (bits, learned parameters and buffers, the same
``Parameter`` objects, enabled flags), so a sensitivity analysis may re-initialise quantizers at other bit-widths and
switch them off. :func:`path_mode` makes a block-replacement model return every path of its ``HybridOutput``
deterministically: the root in train mode (the hybrid forward), every submodule in eval mode (BatchNorm running
statistics, no dropout, nothing updated), all paths, and the step counter restored afterwards.

Example:
    >>> import torch, torch.nn as nn, fxqat
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> qm = fxqat.prepare_qat(net, (torch.randn(2, 4),), fxqat.QATConfig(hybrid=fxqat.HybridConfig(paths=1)))
    >>> qs = fxqat.named_quantizers(qm)
    >>> with preserved(qs.values()), path_mode(qm):
    ...     _ = [q.set_bits(2) for q in qs.values()]
    ...     out = qm(torch.randn(3, 4))
    >>> len(out.paths), qs["fxqat_quant.w_2"].bits, qm.training
    (2, 4, True)
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterable, Iterator, List, Tuple

import torch
from torch import nn

from fxqat.capture.eager_hybrid import EagerHybrid
from fxqat.config import HybridConfig
from fxqat.passes.build_hybrid import HybridGraphModule
from fxqat.quantizers.base import Quantizer

__all__ = ["preserved", "path_mode", "hybrid_of", "HYBRID_CTRL"]

HYBRID_CTRL = "fxqat_hybrid_ctrl"  # where an eager-root hybrid model keeps its EagerHybrid


class _Snapshot:
    """Everything :func:`preserved` restores of one quantizer."""

    def __init__(self, q: Quantizer) -> None:
        self.q = q
        self.bits = q.bits
        self.enabled = bool(q.fake_quant_enabled[0])
        self.params = dict(q._parameters)
        self.buffers = dict(q._buffers)
        self.state = {k: v.detach().clone() for k, v in q.state_dict().items()}

    @torch.no_grad()
    def restore(self) -> None:
        q = self.q
        q._parameters.clear()
        q._parameters.update(self.params)
        q._buffers.clear()
        q._buffers.update(self.buffers)
        for name, t in list(self.params.items()) + list(self.buffers.items()):
            if t is not None and name in self.state and t.shape != self.state[name].shape:
                t.data = torch.empty_like(self.state[name])  # re-initialisation changed the shape (per-channel)
        q.set_bits(self.bits, reinit=False)
        q.load_state_dict(self.state)  # values, and the Python mirrors each method keeps of its buffers
        q.enable_fake_quant(self.enabled)


@contextlib.contextmanager
def preserved(quantizers: Iterable[Quantizer]) -> Iterator[Callable[[], None]]:
    """Restore ``quantizers`` on exit: bits, parameters and buffers (same objects), enabled flags.

    Yields a function that restores them at once (to start each trial from the same state)."""
    snaps = [_Snapshot(q) for q in quantizers]

    def restore() -> None:
        for s in snaps:
            s.restore()

    try:
        yield restore
    finally:
        restore()


def hybrid_of(qm: nn.Module) -> Tuple[HybridConfig, object]:
    """``(HybridConfig, holder)`` of a block-replacement model; the holder's ``hybrid`` / ``fxqat_hybrid`` is it.

    Raises:
        ValueError: ``qm`` was prepared without block replacement.
    """
    if isinstance(qm, HybridGraphModule):
        return qm.fxqat_hybrid, qm
    ctrl = qm.__dict__.get(HYBRID_CTRL)
    if isinstance(ctrl, EagerHybrid):
        return ctrl.hybrid, ctrl
    raise ValueError(
        f"{type(qm).__name__} has no mixed-precision paths: method='paths' needs a model prepared with block "
        "replacement, fxqat.prepare_qat(model, (x,), config.with_(hybrid=fxqat.HybridConfig())); or use "
        "method='fisher' or 'hessian'."
    )


def _set_hybrid(holder: object, qm: nn.Module, hybrid: HybridConfig) -> None:
    if isinstance(holder, HybridGraphModule):
        holder.fxqat_hybrid = hybrid
    else:
        holder.hybrid = hybrid
        qm.__dict__["fxqat_hybrid"] = hybrid


def _get_step(qm: nn.Module) -> int:
    return qm.step if isinstance(qm, HybridGraphModule) else int(qm.fxqat_step)


def _set_step(qm: nn.Module, step: int) -> None:
    if isinstance(qm, HybridGraphModule):
        qm.step = step
    else:
        qm.fxqat_step.fill_(step)


@contextlib.contextmanager
def path_mode(qm: nn.Module) -> Iterator[HybridConfig]:
    """Run ``qm`` (a block-replacement model) as a deterministic measurement of all its paths (module docstring).

    Yields the model's HybridConfig. Raises a ValueError for models without ``lp_prefix`` paths.
    """
    hybrid, holder = hybrid_of(qm)
    if hybrid.mode != "lp_prefix":
        raise ValueError(
            f"path sensitivity needs HybridConfig(mode='lp_prefix') paths (LP blocks 1..i, FP blocks after), but "
            f"{type(qm).__name__} was prepared with mode={hybrid.mode!r}; prepare a copy with HybridConfig()."
        )
    modes: List[Tuple[nn.Module, bool]] = [(m, m.training) for m in qm.modules()]
    step = _get_step(qm)
    try:
        _set_hybrid(holder, qm, dataclasses.replace(hybrid, paths="all"))
        for m, _ in modes:
            m.training = m is qm
        yield hybrid
    finally:
        _set_hybrid(holder, qm, hybrid)
        for m, mode in modes:
            m.training = mode
        _set_step(qm, step)

