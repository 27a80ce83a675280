"""Tensor operations of the LBT gradient quantizer (methods.md §3); :class:`fxqat.quantizers.grad.GradQuantizer`
applies them in its backward hook.

Quantizing a gradient ``G`` on the symmetric ``2^b − 1``-level grid clipped at ±γ·max|G| with stochastic rounding
(:func:`quantize_gradient`), the noise sources (:func:`uniform_noise`), the exact max and clip count in about two
reads of ``G`` on CPU (:func:`max_and_count_above`), the clip fraction ``R`` (:func:`clip_fraction`) and LBT's
initial γ search (:func:`ema_search_gamma`). On CPU, scratch buffers are reused between backward passes: fresh large
allocations cost page faults on every step.

Example:
    >>> g_q, step = quantize_gradient(torch.tensor([-1.0, 0.25, 1.0]), 2, torch.tensor([1.0]), "nearest")
    >>> g_q.tolist(), float(step)
    ([-1.0, 0.0, 1.0], 1.0)
"""

from __future__ import annotations

import math
import sys
from typing import Dict, Optional, Tuple

import torch

__all__ = [
    "quantize_gradient", "uniform_noise", "uniform_noise_codes", "noise_from_codes", "clip_fraction", "max_and_count_above", "ema_search_gamma", "Scratch",
    "scratch_buffer", "reusable_output", "grid_step", "quantize_into",
]


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
    bits = scratch_buffer(scratch, "bits", (n + per_word - 1) // per_word, torch.int64, like.device).random_(-(2**63), None)
    if kind == "int8":
        out.copy_(bits.view(torch.int8)[:n].view_as(like))
        return out.add_(0.5).mul_(2.0**-8)
    out.copy_(bits.view(torch.int16)[:n].view_as(like))
    return out.mul_(2.0**-16)


@torch.library.custom_op("fxqat::uniform_noise_codes", mutates_args=())
def uniform_noise_codes(like: torch.Tensor, kind: str) -> torch.Tensor:
    """The random integers behind :func:`uniform_noise` as a torch operator, for compiled code.

    ``"int8"``: int8 codes ``k`` (the noise is ``(k + ½)/2^8``); ``"int16"``: int16 codes (``k/2^16``); ``"uniform"``
    and ``"exact"``: the float noise itself. Inductor calls it as one extern kernel, instead of generating a Philox
    draw per element (several times slower on CPU than the packed draw), and fuses the conversion to float into the
    code that uses the noise (:func:`noise_from_codes`). It consumes torch's global RNG exactly as
    :func:`uniform_noise` does.

    Example:
        >>> torch.manual_seed(0); a = noise_from_codes(uniform_noise_codes(torch.empty(5), "int8"), "int8")
        >>> torch.manual_seed(0); bool(torch.equal(a, uniform_noise(torch.empty(5), "int8")))
        True
    """
    if kind in ("uniform", "exact"):
        return torch.empty_like(like).uniform_(-0.5, 0.5)
    per_word = 8 if kind == "int8" else 4
    n = like.numel()
    bits = torch.empty((n + per_word - 1) // per_word, dtype=torch.int64, device=like.device).random_(-(2**63), None)
    return bits.view(torch.int8 if kind == "int8" else torch.int16)[:n].view(like.shape).clone()


@uniform_noise_codes.register_fake
def _noise_codes_shape(like: torch.Tensor, kind: str) -> torch.Tensor:
    dtype = {"int8": torch.int8, "int16": torch.int16}.get(kind, like.dtype)
    return torch.empty(like.shape, dtype=dtype, device=like.device)


def noise_from_codes(codes: torch.Tensor, kind: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Noise in [−½, ½) from :func:`uniform_noise_codes` (the same values :func:`uniform_noise` writes)."""
    if kind == "int8":
        return (codes.to(dtype) + 0.5) * 2.0**-8
    if kind == "int16":
        return codes.to(dtype) * 2.0**-16
    return codes.to(dtype)


class Scratch(dict):
    """Scratch buffers of one quantizer: not copied by ``deepcopy`` and not pickled (they are rebuilt on demand)."""

    def __deepcopy__(self, memo) -> "Scratch":
        return Scratch()

    def __reduce__(self):
        return (Scratch, ())


def scratch_buffer(cache: Optional[Dict[str, torch.Tensor]], key: str, n: int, dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
    """A 1-D buffer of ``n`` elements, reused from ``cache`` when it is large enough (``cache=None``: fresh)."""
    if cache is None:
        return torch.empty(n, dtype=dtype, device=device)
    buf = cache.get(key)
    if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
        buf = cache[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n]


def reusable_output(cache: Optional[Dict[str, torch.Tensor]], like: torch.Tensor) -> torch.Tensor:
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


def grid_step(gamma: torch.Tensor, gmax: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.clamp(gamma.to(dtype).reshape(()) * gmax / (2 ** (bits - 1) - 1), min=torch.finfo(dtype).tiny)


def quantize_into(out: torch.Tensor, g: torch.Tensor, bits: int, step: torch.Tensor, rounding: str,
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
    step = grid_step(gamma, gmax, bits, g.dtype)
    return quantize_into(torch.empty_like(g), g, bits, step, rounding, noise), step


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
