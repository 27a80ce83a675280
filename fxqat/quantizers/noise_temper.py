"""Noise tempering: error-aware quantization through exponentially decaying noise (Wang et al., arXiv 2212.05603).

The abstract is all that was recovered (methods.md §5), so the equations are fxqat's reconstruction **[R]**::

    Q(x)  = s·⌊clip(x/s, Q_N, Q_P)⌉                          LSQ base: step size s, LSQ init and grad scale
    ρ(t)  = exp(−t/τ)                                          t = training forwards so far (buffer ``step``)
    ỹ     = x + ρ(t)·e + (1 − ρ(t))·(Q(x) − x)                training forward
          = Q(x) + ρ(t)·(x + e − Q(x))                         (the form computed: exactly Q(x) once ρ = 0)
    ∂L/∂x := κ·∂L/∂ỹ                                           κ learnable (init 1.0)

``e`` is noise at the bin size: ``"uniform"`` ``U(−s/2, s/2)`` (option ``uniform_draw`` [R]: ``"int8"``, the
default, draws it as ``s·(k + ½)/256`` with ``k`` a uniform 8-bit integer, eight per 64-bit random draw, about 5x
cheaper on CPU than ``uniform_`` with mean exactly 0 and variance ``(s²/12)(1 − 2^-16)``; ``"int16"`` as ``s·k/2^16``;
``"exact"`` with ``uniform_``; under ``torch.compile`` the same draw, through the ``fxqat::uniform_noise_codes`` operator), or ``"resampled"`` rounding errors
``s·(⌊z⌉ − z)`` of the same tensor (``z = clip(x/s)``) in a random permutation. ``ρ`` is set to 0 once it drops
below ``rho_floor``, so training ends on exact hard quantization. In evaluation the output is ``Q(x)``.

Gradients [R]: ``x`` gets ``κ·g``; ``κ`` gets ``Σ g·x`` (the forward is written ``κ·x − sg(κ·x) + sg(ỹ)``,
so its value does not depend on κ) times the LSQ gradient scale ``1/√(N·Q_P)``; ``s`` gets
``(1 − ρ)·∂Q/∂s`` (LSQ's step-size gradient) ``+ ρ·e/s`` (both noise types), also grad-scaled.

:class:`NoiseTemperFunction` computes the forward as ``s·(r + ρ·(v + u − r))`` (``v = x/s``, ``r = ⌊clip(v)⌉``,
``u = e/s``) in eight passes and the backward from three dot products:
``∂L/∂s = g_f·(Σ g·w − ρ·Σ g·v − (1 − ρ)·Σ g·v·[Q_N < v < Q_P])`` with ``w = y/s``, since
``(1 − ρ)·r + ρ·u = w − ρ·v``; ``∂L/∂κ = g_f·Σ g·x``; ``∂L/∂x = κ·g``.

Options: ``noise`` (``"uniform"``), ``uniform_draw`` (``"int8"``), ``tau`` (2000 steps), ``schedule`` (``"step"``: ``t`` advances on every
training forward; ``"manual"``: call :meth:`NoiseTemperQuantizer.advance`, e.g. once per epoch), ``kappa_init``
(1.0), ``learn_kappa`` (True), ``rho_floor`` (1e-4), ``grad_scale`` (True).

Example:
    >>> import torch
    >>> from fxqat.config import QuantSpec
    >>> q = NoiseTemperQuantizer(QuantSpec(bits=4, method="noise_temper", kind="weight"))
    >>> w = torch.randn(64)
    >>> y0 = q(w)                           # step 0: ρ = 1, pure noise x + e
    >>> bool(((y0 - w).abs() <= q.scale / 2 + 1e-6).all()), int(q.step)
    (True, 1)
    >>> _ = q.eval()
    >>> len(torch.unique(q(w))) <= 16
    True
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fxqat.method_registry import register
from fxqat.quantizers._zoo_utils import (
    StateShapeMixin,
    axis_of,
    check_choice,
    dot_to,
    grad_scaled,
    numel_per_scale,
    reduce,
    set_tensor,
)
from fxqat.quantizers.base import Quantizer, grad_inside, use_function
from fxqat.quantizers.grad_ops import noise_from_codes, uniform_noise, uniform_noise_codes
from fxqat.quantizers.layout import channel_view
from fxqat.quantizers.ste import clip_ste, round_ste

__all__ = ["NoiseTemperQuantizer", "NoiseTemperFunction"]

_EPS = 1e-8


class NoiseTemperFunction(torch.autograd.Function):
    """Noise-tempered LSQ fake-quantization with the backward of the module docstring.

    ``apply(x, s, kappa, rho, grad_factor, qmin, qmax, noise, draw="int8")``: ``s > 0`` broadcasts against ``x``; ``rho`` is a
    one-element tensor (read by tensor ops only, so ``torch.compile`` keeps one graph); ``noise`` is ``"uniform"``,
    ``"resampled"`` or None (evaluation: hard quantization, ρ ignored).
    """

    @staticmethod
    def forward(ctx, x, s, kappa, rho, grad_factor: float, qmin: int, qmax: int, noise, draw: str = "int8"):
        v = x / s
        c = torch.clamp(v, qmin, qmax)
        r = torch.round(c)
        if noise is None:
            w = r
        else:
            if noise == "uniform":
                u = uniform_noise(x, draw) if draw != "exact" else torch.empty_like(x).uniform_(-0.5, 0.5)
            else:  # rounding errors of the same tensor, in a random order
                err = (r - c).reshape(-1)
                u = err[torch.randperm(err.numel(), device=err.device)].reshape(x.shape)
            w = torch.addcmul(r, u.add_(v).sub_(r), rho)  # r + ρ·(v + u − r)
        ctx.save_for_backward(v, w, s, kappa, rho if noise is not None else None)
        ctx.grad_factor, ctx.qrange = grad_factor, (qmin, qmax)
        return w * s

    @staticmethod
    def backward(ctx, g):
        v, w, s, kappa, rho = ctx.saved_tensors
        need = ctx.needs_input_grad
        gf = ctx.grad_factor
        gx = g * kappa if need[0] else None
        gs = gk = None
        if need[1] or need[2]:
            gv = dot_to(g, v, s)  # Σ g·v (per channel of s)
        if need[1]:
            gm = grad_inside(g, v, *ctx.qrange)  # inside (Q_N, Q_P)
            inside = dot_to(gm, v, s)
            gs = dot_to(g, w, s) - inside if rho is None else dot_to(g, w, s) - rho * gv - (1 - rho) * inside
            gs = gs * gf
        if need[2]:  # Σ g·x = Σ_channels s·(Σ g·v)
            gk = (gv * s).sum().reshape(kappa.shape) * gf
        return gx, gs, gk, None, None, None, None, None, None


@register("noise_temper")
class NoiseTemperQuantizer(StateShapeMixin, Quantizer):
    """Noise-tempering fake-quantizer on an LSQ grid (per-tensor or per-channel step size)."""

    default_options = {
        "noise": "uniform",
        "uniform_draw": "int8",
        "tau": 2000.0,
        "schedule": "step",
        "kappa_init": 1.0,
        "learn_kappa": True,
        "rho_floor": 1e-4,
        "grad_scale": True,
    }

    def __init__(self, spec, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        name = type(self).__name__
        check_choice(name, "noise", self.opts["noise"], ("uniform", "resampled"))
        check_choice(name, "uniform_draw", self.opts["uniform_draw"], ("int8", "int16", "exact"))
        check_choice(name, "schedule", self.opts["schedule"], ("step", "manual"))
        if not float(self.opts["tau"]) > 0:
            raise ValueError(f"{name}: tau={self.opts['tau']!r}; use a positive number of steps (e.g. 2000).")
        self.scale = nn.Parameter(torch.ones(1))
        kappa = torch.full((1,), float(self.opts["kappa_init"]))
        if self.opts["learn_kappa"]:
            self.kappa = nn.Parameter(kappa)
        else:
            self.register_buffer("kappa", kappa)
        self.register_buffer("step", torch.zeros(1, dtype=torch.long))
        self.register_buffer("grad_factor", torch.ones(1))
        self._gf = 1.0  # Python mirror of grad_factor

    @torch.no_grad()
    def _init_from(self, x: torch.Tensor) -> None:
        qmax = max(self.qrange[1], 1)
        s = 2 * reduce(x.float(), axis_of(self), "absmean") / math.sqrt(qmax)
        set_tensor(self, "scale", s.clamp(min=_EPS))
        g = 1.0 / math.sqrt(numel_per_scale(self, x) * qmax) if self.opts["grad_scale"] else 1.0
        self.grad_factor.fill_(g)
        self._gf = float(self.grad_factor)

    def rho(self) -> float:
        """ρ(t) = exp(−t/τ), or 0 below ``rho_floor``."""
        return float(self._rho_tensor())

    def _rho_tensor(self) -> torch.Tensor:
        """ρ as a tensor computed from the ``step`` buffer: no Python read, so ``torch.compile`` keeps one graph."""
        r = torch.exp(-self.step.to(self.scale.dtype) / float(self.opts["tau"]))
        return torch.where(r < float(self.opts["rho_floor"]), torch.zeros_like(r), r)

    @torch.no_grad()
    def advance(self, n: int = 1) -> None:
        """Advance the tempering clock by ``n`` (automatic per training forward with ``schedule="step"``)."""
        self.step.add_(int(n))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = self.qrange
        s = self.scale.abs().clamp(min=_EPS)
        if self.per_channel:
            s = channel_view(s, x, self.ch_axis)
        # training: s·(r + ρ(v + u − r)), exactly Q once ρ = 0; evaluation: Q
        noise = self.opts["noise"] if self.training else None
        if use_function():
            y = NoiseTemperFunction.apply(x, s, self.kappa, self._rho_tensor(), self._gf, qmin, qmax, noise,
                                          self.opts["uniform_draw"])
        else:  # torch.compile: the same maths as plain ops, which inductor fuses
            y = self._quantize_plain(x, qmin, qmax, noise)
        if self.training and self.opts["schedule"] == "step":
            self.advance(1)
        return y

    def _quantize_plain(self, x: torch.Tensor, qmin: int, qmax: int, noise) -> torch.Tensor:
        g = self._gf
        s = grad_scaled(self.scale, g).abs().clamp(min=_EPS)
        if self.per_channel:
            s = channel_view(s, x, self.ch_axis)
        xd = x.detach()
        # x·(1/s): no per-element division forward or backward (the eager function divides; the values differ
        # only where an ulp of z moves a rounding tie); clip_ste: torch.clamp with float masks
        z = clip_ste(xd * (1 / s), qmin, qmax, lo_closed=False, hi_closed=False)
        q = round_ste(z) * s  # LSQ value and step-size gradient; x's gradient comes through κ below
        if noise is not None:
            if noise == "uniform":  # the eager draw as one operator (inductor's per-element Philox is slower)
                draw = self.opts["uniform_draw"]
                u = noise_from_codes(uniform_noise_codes(xd, draw), draw, xd.dtype)
            else:
                err = (torch.round(z) - z).detach().reshape(-1)
                u = err[torch.randperm(err.numel(), device=err.device)].reshape(x.shape)
            q = q + self._rho_tensor() * (xd + s * u - q)
        kx = grad_scaled(self.kappa, g) * x
        return kx - kx.detach() + q

    @torch.no_grad()
    def grid(self) -> torch.Tensor:
        """Eval-mode output levels: shape ``[L]`` per-tensor or ``[C, L]`` per-channel."""
        qmin, qmax = self.qrange
        s = self.scale.detach().abs().clamp(min=_EPS).reshape(-1, 1)
        g = torch.arange(qmin, qmax + 1, dtype=s.dtype, device=s.device) * s
        return g[0] if g.shape[0] == 1 else g

    def affine_qparams(self):
        qmin, qmax = self.qrange
        s = self.scale.detach().abs().clamp(min=_EPS)
        return s, torch.zeros(s.shape, dtype=torch.int32, device=s.device), qmin, qmax
