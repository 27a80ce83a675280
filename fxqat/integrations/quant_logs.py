"""Scalars that describe a QAT model's quantizers and schedules, for a trainer's log (flat ``{name: float}``).

Summary keys (always): ``fxqat/quantizers`` (count), ``fxqat/problems`` (quantizers whose scale is uninitialised,
non-finite, collapsed or exploded: :func:`fxqat.training.health.quantizer_health`), and per kind (``weight``,
``act``): ``fxqat/<kind>_bits`` (mean bits), ``fxqat/<kind>_scale_min`` and ``fxqat/<kind>_scale_max``. With
noise-tempering quantizers: ``fxqat/rho`` (mean ρ(t), 1 = pure noise, 0 = hard quantization). With a
transition-rate optimizer: ``fxqat/tr`` (mean transition rate of the last step), ``fxqat/tr_running`` (K),
``fxqat/tr_target`` (R of the next step) and ``fxqat/talr`` (mean U). ``detail=True`` adds
``fxqat/<quantizer>/bits``, ``/scale_min`` and ``/scale_max`` for every quantizer.

Example:
    >>> import torch, torch.nn as nn, fxqat
    >>> qm = fxqat.prepare_qat(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), (torch.randn(4, 8),))
    >>> _ = fxqat.calibrate(qm, [torch.randn(4, 8)])
    >>> logs = quantizer_logs(qm)
    >>> logs["fxqat/quantizers"], logs["fxqat/problems"], logs["fxqat/weight_bits"]
    (4.0, 0.0, 8.0)
"""

from __future__ import annotations

import math
from typing import Dict, Optional

from torch import nn

from fxqat.quantizers.control import named_quantizers
from fxqat.quantizers.noise_temper import NoiseTemperQuantizer
from fxqat.training.health import quantizer_health
from fxqat.training.optim import TransitionRateScheduler

__all__ = ["quantizer_logs", "PREFIX"]

PREFIX = "fxqat/"


def _mean(values) -> float:
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def quantizer_logs(model: nn.Module, talr: Optional[TransitionRateScheduler] = None,
                   detail: bool = False) -> Dict[str, float]:
    """The log scalars of ``model``'s quantizers (and of ``talr``, the run's transition-rate scheduler, if any)."""
    rows = quantizer_health(model)
    out: Dict[str, float] = {f"{PREFIX}quantizers": float(len(rows)),
                             f"{PREFIX}problems": float(sum(r["status"] != "ok" for r in rows))}
    for kind in sorted({r["kind"] for r in rows}):
        mine = [r for r in rows if r["kind"] == kind]
        lows = [r["scale_min"] for r in mine if math.isfinite(r["scale_min"])]
        highs = [r["scale_max"] for r in mine if math.isfinite(r["scale_max"])]
        out[f"{PREFIX}{kind}_bits"] = _mean(float(r["bits"]) for r in mine)
        out[f"{PREFIX}{kind}_scale_min"] = min(lows) if lows else math.nan
        out[f"{PREFIX}{kind}_scale_max"] = max(highs) if highs else math.nan
    tempered = [q for q in named_quantizers(model).values() if isinstance(q, NoiseTemperQuantizer)]
    if tempered:
        out[f"{PREFIX}rho"] = _mean(q.rho() for q in tempered)
    if talr is not None and talr.layers:
        out[f"{PREFIX}tr"] = _mean(talr.rates().values())
        out[f"{PREFIX}tr_running"] = _mean(talr.running_rates().values())
        out[f"{PREFIX}tr_target"] = _mean(talr.targets().values())
        out[f"{PREFIX}talr"] = _mean(talr.talr().values())
    if detail:
        for r in rows:
            out[f"{PREFIX}{r['name']}/bits"] = float(r["bits"])
            out[f"{PREFIX}{r['name']}/scale_min"] = r["scale_min"]
            out[f"{PREFIX}{r['name']}/scale_max"] = r["scale_max"]
    return out
