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
import sys
from typing import Dict, Optional, Tuple

import torch

from fxqat.quantizers.base import Quantizer
from fxqat.quantizers.registry import register

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


def uniform_noise(like: torch.Tensor, kind: str = "int8", out: Optional[torch.Tensor] = None,
                  scratch: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """Noise ``u`` in [−½, ½) shaped like ``like``, from torch's global RNG (written into ``out`` when given).

    ``"uniform"``: ``uniform_(-0.5, 0.5)`` (as the official code). ``"int16"`` **[R]**: ``k/2^16`` with k a uniform
    16-bit integer, four per 64-bit draw: about 3× cheaper on CPU; stochastic rounding with it is biased by less than
    2^-16 of a grid step (towards zero by at most that much). ``"int8"`` **[R]**: ``(k + ½)/2^8`` with k a uniform
    8-bit integer, eight per 64-bit draw (half the random bits of ``"int16"``): 256 values placed symmetrically, so
    the noise has mean 0 and stochastic rounding is off by at most 2^-9 of a grid step for any input (0 on average
    over a bin), against a rounding noise of up to ½ step. ``scratch``: a dict in which to keep the random-bits
    buffer between calls (saves re-allocating it; the buffer never leaves this function).
    """
    out = torch.empty_like(like) if out is None else out
    if kind == "uniform":
        return out.uniform_(-0.5, 0.5)
    n = like.numel()
    per_word = 8 if kind == "int8" else 4
    bits = _scratch(scratch, "bits", (n + per_word - 1) // per_word, torch.int64, like.device).random_(-(2**63), None)
    if kind == "int8":
        out.copy_(bits.view(torch.int8)[:n].view_as(like))
        return out.add_(0.5).mul_(2.0**-8)
    out.copy_(bits.view(torch.int16)[:n].view_as(like))
    return out.mul_(2.0**-16)


class _Scratch(dict):
    """Scratch buffers of one quantizer: not copied by ``deepcopy`` and not pickled (they are rebuilt on demand)."""

    def __deepcopy__(self, memo) -> "_Scratch":
        return _Scratch()

    def __reduce__(self):
        return (_Scratch, ())


def _scratch(cache: Optional[Dict[str, torch.Tensor]], key: str, n: int, dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
    """A 1-D buffer of ``n`` elements, reused from ``cache`` when it is large enough (``cache=None``: fresh)."""
    if cache is None:
        return torch.empty(n, dtype=dtype, device=device)
    buf = cache.get(key)
    if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
        buf = cache[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n]


def _reusable_output(cache: Optional[Dict[str, torch.Tensor]], like: torch.Tensor) -> torch.Tensor:
    """The buffer for the quantized gradient: last step's when nothing references it any more (its Python object is
    held by ``cache`` alone, no other tensor shares its storage), else a fresh one."""
    if cache is None:
        return torch.empty_like(like)
    buf = cache.get("out")
    try:
        free = (
            buf is not None and buf.shape == like.shape and buf.dtype == like.dtype and buf.device == like.device
            and sys.getrefcount(buf) == 3  # cache + ``buf`` + the call's argument
            and buf._use_count() == 1 and torch._C._storage_Use_Count(buf.untyped_storage()._cdata) <= 2
        )
    except (AttributeError, RuntimeError):  # internals changed: never reuse
        free = False
    if not free:
        buf = cache["out"] = torch.empty_like(like)
    return buf


def _grid_step(gamma: torch.Tensor, gmax: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.clamp(gamma.to(dtype).reshape(()) * gmax / (2 ** (bits - 1) - 1), min=torch.finfo(dtype).tiny)


def _quantize_into(out: torch.Tensor, g: torch.Tensor, bits: int, step: torch.Tensor, rounding: str,
                   noise: str, scratch: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """``out ← step·⌊clip(g/step + u)⌉`` (``out`` may hold scratch data; it is overwritten)."""
    half = 2 ** (bits - 1) - 1
    if rounding == "stochastic":
        uniform_noise(g, noise, out=out, scratch=scratch).addcdiv_(g, step)
    else:
        torch.div(g, step, out=out)
    out.clamp_(-half, half).round_()
    return out.mul_(step)


def quantize_gradient(
    g: torch.Tensor, bits: int, gamma: torch.Tensor, rounding: str = "stochastic", gmax: Optional[torch.Tensor] = None,
    noise: str = "int8",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``g`` on the symmetric ``2^bits − 1``-level grid clipped at ±γ·max|g|.

    Args:
        g: the gradient. bits: bit-width (>= 2). gamma: the clipping factor γ (a 1-element tensor).
        rounding: ``"stochastic"`` (⌊x + u⌉, u uniform in [−½, ½)) or ``"nearest"``.
        gmax: max|g| when already known. noise: the noise source (see :func:`uniform_noise`).

    Returns:
        ``(g_q, step)``: every element of ``g_q`` is k·step for an integer |k| ≤ 2^{bits−1} − 1.

    Example:
        >>> g_q, step = quantize_gradient(torch.tensor([-1.0, 0.25, 1.0]), 2, torch.tensor([1.0]), "nearest")
        >>> g_q.tolist(), float(step)
        ([-1.0, 0.0, 1.0], 1.0)
    """
    if gmax is None:
        gmax = g.detach().abs().amax()
    step = _grid_step(gamma, gmax, bits, g.dtype)
    return _quantize_into(torch.empty_like(g), g, bits, step, rounding, noise), step


def max_and_count_above(g: torch.Tensor, gamma: torch.Tensor, chunk: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(max|g|, count(|g| > γ·max|g|))`` exactly, in about two reads of ``g`` on CPU.

    On CPU ``g`` is cut into chunks of ``chunk`` elements; the per-chunk max|g| (``amax`` and ``amin``, no |g| tensor
    written) gives the global max, and only the chunks whose max exceeds the threshold are counted in. The clip
    fraction the interval update aims at is about 10⁻⁴, so these are few chunks; when more than a quarter of them
    qualify (e.g. a small γ before the update has settled), the whole tensor is counted instead. Elsewhere (GPU):
    ``abs``, ``amax`` and ``count_nonzero`` (no host synchronisation).

    Example:
        >>> m, k = max_and_count_above(torch.tensor([-4.0, 1.0, 3.5, 0.5] * 100), torch.tensor([0.8]))
        >>> float(m), int(k)
        (4.0, 200)
    """
    flat = g.detach().reshape(-1)
    full = flat.numel() // chunk * chunk
    if g.device.type != "cpu" or full == 0:
        a = flat.abs()
        gmax = a.amax() if a.numel() else a.new_zeros(())
        return gmax, torch.count_nonzero(a > gamma.to(a.dtype).reshape(()) * gmax)
    head, tail = flat[:full].view(-1, chunk), flat[full:]
    cmax = torch.maximum(head.amax(1), head.amin(1).neg_())
    gmax = cmax.amax()
    if tail.numel():
        gmax = torch.maximum(gmax, tail.abs().amax())
    thr = gamma.to(g.dtype).reshape(()) * gmax
    rows = torch.nonzero(cmax > thr).squeeze(1)
    if rows.numel() * 4 > cmax.numel():
        return gmax, torch.count_nonzero(flat.abs() > thr)
    count = torch.count_nonzero(head.index_select(0, rows).abs_() > thr)
    if tail.numel():
        count = count + torch.count_nonzero(tail.abs() > thr)
    return gmax, count


def clip_fraction(g: torch.Tensor, gamma: torch.Tensor, gmax: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``mean(|g| > γ·max|g|)`` as a float32 scalar tensor (the R of LBT)."""
    a = g.detach().abs()
    gmax = a.amax() if gmax is None else gmax
    return torch.count_nonzero(a > gamma.to(a.dtype).reshape(()) * gmax).float() / max(a.numel(), 1)


@torch.no_grad()
def ema_search_gamma(
    g: torch.Tensor, target: float, gamma0: float = 1.0, step: float = 1e-3, momentum: float = 0.999,
    gamma_min: float = 1e-3, max_iters: int = 5000,
) -> float:
    """LBT's initial γ: step down from ``gamma0`` until the EMA (from 0) of R first exceeds ``target``, then step back.

    Candidates are scanned in chunks of 128; R for a chunk comes from sorting only the elements above its lowest
    threshold (a small tail of |g| for the usual γ), so the search costs a few passes over ``g``.

    Example:
        >>> g = torch.linspace(-1, 1, 10001)
        >>> 0.001 <= ema_search_gamma(g, target=0.01) < 1.0
        True
    """
    a = g.detach().abs().flatten().float()
    n = a.numel()
    gmax = a.amax()
    if n == 0 or float(gmax) == 0.0:
        return gamma0
    n_cand = max(1, min(max_iters, int(math.floor((gamma0 - gamma_min) / step + 1e-9)) + 1))
    gammas = (gamma0 - step * torch.arange(n_cand, dtype=torch.float64)).float()
    ema, gamma = 0.0, gamma0
    for start in range(0, n_cand, 128):
        chunk = gammas[start:start + 128]
        thr = chunk * gmax
        tail, _ = torch.sort(a[a > thr[-1]])
        counts = tail.numel() - torch.searchsorted(tail, thr, right=True)
        for gm, c in zip(chunk.tolist(), counts.tolist()):
            gamma = gm
            ema = momentum * ema + (1.0 - momentum) * (c / n)
            if ema > target:
                return min(gamma + step, gamma0)
    return max(gamma - step, gamma_min)


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

    def __init__(self, spec, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        if spec.kind != "grad":
            raise ValueError(
                f"GradQuantizer: method 'grad' quantizes gradients only (got kind={spec.kind!r}); choose a weight/"
                "activation method (e.g. method='lsq') and set QATConfig(g_bits=4) for gradient quantization."
            )
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
        self._scratch: Dict[str, torch.Tensor] = _Scratch()

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
        gamma = self.gamma
        cache = self._scratch if g.device.type == "cpu" else None  # CPU: no caching allocator, so reuse buffers
        gmax, above = max_and_count_above(g, gamma)
        r = above.float() / max(g.numel(), 1)
        step = _grid_step(gamma, gmax, self.bits, g.dtype)
        gq = _quantize_into(_reusable_output(cache, g), g, self.bits, step, self.opts["rounding"], self.opts["noise"],
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
        from fxqat.quantizers.base import _all_reduce

        _all_reduce(self.r_sum, "mean")
        _all_reduce(self.r_count, "mean")
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
