"""Gradient quantizer of LBT (Kim et al., ECCV 2024, *Toward INT4 Fixed-Point Training*; methods.md §3).

Inserted by ``insert_quant`` after every quantized layer's output when ``QATConfig(g_bits=b)`` is set. The forward
pass returns its input **unchanged (the same tensor object)**; a tensor hook on that tensor replaces the gradient G
flowing back into the layer (the error signal both backward GEMMs consume) with

    g_max = max|G|,   Δ = 2·γ·g_max / (2^b − 2),   G_q = Δ · ⌊clip(G/Δ + u, −(2^{b−1} − 1), 2^{b−1} − 1)⌉,

``u`` uniform in [−½, ½) drawn from torch's **global** RNG (``torch.manual_seed`` makes a run reproducible): a
symmetric grid of 2^b − 1 levels with zero, clipped at ±γ·g_max, with stochastic rounding that is unbiased inside the
range (up to 2^-9 of a step with the default ``noise="int8"``, 2^-16 with ``"int16"``); the official code's ``grad_quant.backward``, written
centred on zero.

Interval update (code ``update_interval``). On each backward, *after* G is quantized with the current γ, the clip
fraction ``R = mean(|G| > γ·g_max)`` is measured on the full-precision G (buffer ``clip_fraction``) and

    γ ← clamp(γ + ε·sign(R − α/(2^b − 1)), γ_min, γ_max)          (skipped when G is all zero)

**Where the update runs** (option ``update``): ``"backward"`` (default): automatically inside the backward hook,
once per backward through the layer, so nothing has to be called from the training loop. ``"manual"``: the hook only
accumulates R; :func:`fxqat.training.grad_quant.update_intervals` applies one update per call with the mean R since
the previous call (all-reduced across DDP ranks); use it with gradient accumulation or when a layer runs several
times per step (hybrid ``fp_prefix``/``single`` modes).

Initialisation (option ``init``, on the first backward): ``"ema_search"`` (code): from γ = ``gamma0`` step γ down by
``init_step`` while an EMA (momentum ``init_momentum``, started at 0) of R stays ≤ the target, then one step back up
**[P] code; the exact stopping rule and the lack of an iteration cap are [R]**. ``"quantile"`` **[R]**: γ set so that R
equals the target on the first G. ``"none"``: start at ``gamma0`` and update from the first backward on. With
``"ema_search"``/``"quantile"`` the first backward is quantized with ``gamma0`` (the code's order) and does no regular
update. ``mode="minmax"`` keeps γ = 1 (the min-max baseline); ``mode="fixed"`` keeps γ = ``gamma0`` (the paper's
fixed-γ baselines). R is measured in every mode.

Options (defaults): ``mode`` ("adaptive"), ``alpha`` (1e-3), ``eps`` (1e-3), ``gamma0`` (1.0), ``gamma_min``
(1e-3), ``gamma_max`` (1.0), ``init`` ("ema_search"), ``init_momentum`` (0.999), ``init_step`` (None = ``eps``),
``init_max_iters`` (5000), ``update`` ("backward"), ``rounding`` ("stochastic" | "nearest", the latter an ablation),
``noise`` ("int8" | "int16" | "uniform": the source of u, see :func:`uniform_noise`; "int8" is fxqat's faster
default [R]).

Example:
    >>> import torch
    >>> from fxqat.config import QuantSpec
    >>> q = GradQuantizer(QuantSpec(bits=4, method="grad", kind="grad"))
    >>> x = torch.randn(8, 16, requires_grad=True)
    >>> y = q(x * 1)
    >>> bool(torch.equal(y, x))               # the forward pass is the identity
    True
    >>> _ = torch.manual_seed(0)
    >>> (y * torch.randn(8, 16)).sum().backward()
    >>> len(torch.unique(x.grad)) <= 15       # 2^4 - 1 levels
    True
"""

from __future__ import annotations

import logging
import math
from typing import Dict, Optional

import torch

from fxqat.method_registry import register
from fxqat.quantizers.base import Quantizer, all_reduce_, compute_dtype, is_narrow_float
from fxqat.quantizers.grad_ops import (
    Scratch,
    clip_fraction,
    ema_search_gamma,
    grid_step,
    max_and_count_above,
    quantize_gradient,
    quantize_into,
    reusable_output,
    uniform_noise,
)

__all__ = [
    "GradQuantizer", "quantize_gradient", "uniform_noise", "clip_fraction", "max_and_count_above", "ema_search_gamma",
]

log = logging.getLogger(__name__)

_CHOICES = {
    "mode": ("adaptive", "minmax", "fixed"),
    "init": ("ema_search", "quantile", "none"),
    "update": ("backward", "manual"),
    "rounding": ("stochastic", "nearest"),
    "noise": ("int8", "int16", "uniform"),
}


@register("grad")
class GradQuantizer(Quantizer):
    """LBT gradient quantizer: identity forward, stochastic-rounding quantization of the output gradient.

    Buffers (all in the ``state_dict``): ``gamma`` (clipping factor γ), ``clip_fraction`` (last measured R),
    ``r_sum`` / ``r_count`` (R accumulated for ``update="manual"``), ``n_backward`` (backward passes seen),
    ``initialized`` (γ initialised on a first backward). ``last_step`` holds the grid step Δ of the last backward.
    """

    default_options = {
        "mode": "adaptive", "alpha": 1e-3, "eps": 1e-3, "gamma0": 1.0, "gamma_min": 1e-3, "gamma_max": 1.0,
        "init": "ema_search", "init_momentum": 0.999, "init_step": None, "init_max_iters": 5000,
        "update": "backward", "rounding": "stochastic", "noise": "int8",
    }
    granularities = ("per_tensor",)  # one γ per gradient tensor
    kinds = ("grad",)

    def __init__(self, spec, **kwargs) -> None:
        if spec.kind != "grad":
            raise ValueError(
                f"GradQuantizer: method 'grad' quantizes gradients only (got kind={spec.kind!r}); choose a weight/"
                "activation method (e.g. method='lsq') and set QATConfig(g_bits=4) for gradient quantization."
            )
        super().__init__(spec, **kwargs)
        for name, choices in _CHOICES.items():
            if self.opts[name] not in choices:
                raise ValueError(f"GradQuantizer: {name}={self.opts[name]!r}; use one of {choices}.")
        if self.bits < 2:
            raise ValueError(f"GradQuantizer: g_bits={self.bits} leaves a single level (zero); use g_bits >= 2.")
        if not 0 < self.opts["gamma_min"] <= self.opts["gamma_max"]:
            raise ValueError("GradQuantizer: need 0 < gamma_min <= gamma_max (e.g. 1e-3 and 1.0).")
        g0 = 1.0 if self.opts["mode"] == "minmax" else float(self.opts["gamma0"])
        self.register_buffer("gamma", torch.tensor([g0]))
        self.register_buffer("clip_fraction", torch.zeros(1))
        self.register_buffer("r_sum", torch.zeros(1))
        self.register_buffer("r_count", torch.zeros(1))
        self.register_buffer("n_backward", torch.zeros(1, dtype=torch.int64))
        self.last_step: Optional[torch.Tensor] = None
        # CPU only: the random bits are kept between backward passes (2 bytes per output element; never handed out), and the output buffer is reused once nothing references it any more,
        # because fresh large CPU allocations cost page faults on every step
        self._scratch: Dict[str, torch.Tensor] = Scratch()

    @property
    def target(self) -> float:
        """The clip fraction the interval update aims at: α / (2^b − 1)."""
        return float(self.opts["alpha"]) / (2**self.bits - 1)

    @property
    def adaptive(self) -> bool:
        return self.opts["mode"] == "adaptive"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fq_on and x.requires_grad and torch.is_grad_enabled():
            x.register_hook(self._hook)
        return x

    def quantize(self, x: torch.Tensor) -> torch.Tensor:  # the forward pass never changes values
        return x

    # ------------------------------------------------------------------------------------------- backward
    @torch.no_grad()
    def _hook(self, g: torch.Tensor) -> torch.Tensor:
        if is_narrow_float(g.dtype):  # a bf16/fp16 gradient is quantized in float32 (base.compute_dtype)
            return self._hook(g.to(compute_dtype(g.dtype))).to(g.dtype)
        gamma = self.gamma
        cache = self._scratch if g.device.type == "cpu" else None  # CPU: no caching allocator, so reuse buffers
        gmax, above = max_and_count_above(g, gamma)
        r = above.float() / max(g.numel(), 1)
        step = grid_step(gamma, gmax, self.bits, g.dtype)
        gq = quantize_into(reusable_output(cache, g), g, self.bits, step, self.opts["rounding"], self.opts["noise"],
                            cache)
        self.last_step = step
        self.clip_fraction.copy_(r.reshape(1))
        self.n_backward.add_(1)
        if not self.adaptive:
            return gq
        if not self._init_done:
            self._initialise_gamma(g)
            if self.opts["init"] != "none":
                return gq
        nonzero = (gmax > 0).to(self.gamma.dtype)
        if self.opts["update"] == "backward":
            self._apply_update(r, nonzero)
        else:
            self.r_sum.add_(r * nonzero)
            self.r_count.add_(nonzero)
        return gq

    def _apply_update(self, r: torch.Tensor, weight: torch.Tensor) -> None:
        """γ ← clamp(γ + ε·sign(R − target)), applied with weight 0/1 (0 = G was all zero: no update)."""
        delta = self.opts["eps"] * torch.sign(r - self.target) * weight
        self.gamma.add_(delta.reshape(1)).clamp_(self.opts["gamma_min"], self.opts["gamma_max"])

    def _initialise_gamma(self, g: torch.Tensor) -> None:
        how, o = self.opts["init"], self.opts
        if how == "ema_search":
            new = ema_search_gamma(g, self.target, float(self.gamma), o["init_step"] or o["eps"],
                                   o["init_momentum"], o["gamma_min"], o["init_max_iters"])
        elif how == "quantile":
            a = g.detach().abs().flatten().float()
            gmax = float(a.amax())
            k = int(math.floor(self.target * a.numel()))  # k elements may lie above the threshold
            new = float(torch.topk(a, k + 1).values[-1]) / gmax if gmax > 0 and k + 1 <= a.numel() else 1.0
        else:
            new = float(self.gamma)
        self.gamma.fill_(min(max(new, o["gamma_min"]), o["gamma_max"]))
        self.initialized.fill_(1)
        self._init_done = True
        log.debug("GradQuantizer: gamma initialised to %.4f (%s)", float(self.gamma), how)

    @torch.no_grad()
    def update_interval(self) -> None:
        """Apply one interval update from the R accumulated since the last call (``update="manual"``)."""
        if not self.adaptive or self.opts["update"] != "manual":
            return
        all_reduce_(self.r_sum, "mean")
        all_reduce_(self.r_count, "mean")
        has = (self.r_count > 0).to(self.gamma.dtype)
        self._apply_update(self.r_sum / self.r_count.clamp(min=1), has)
        self.r_sum.zero_()
        self.r_count.zero_()

    def reset(self) -> None:
        """Forget γ: the next backward initialises it again."""
        super().reset()
        self.gamma.fill_(1.0 if self.opts["mode"] == "minmax" else float(self.opts["gamma0"]))

    def extra_repr(self) -> str:
        return (f"method=grad, kind=grad, bits={self.bits}, mode={self.opts['mode']}, "
                f"gamma={float(self.gamma):.4f}, update={self.opts['update']}")
