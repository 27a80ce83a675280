"""EWGS: Element-Wise Gradient Scaling (Lee, Kim, Ham, CVPR 2021; methods.md §6, official code cvlab-yonsei/EWGS).

With learnable bounds ``l < u`` and ``L = 2^b`` levels::

    x_n = clip((x − l)/(u − l), 0, 1)
    x_q = ⌊x_n·(L − 1)⌉ / (L − 1)
    backward:  g_{x_n} = g_{x_q} · (1 + δ·sign(g_{x_q})·(x_n − x_q))

``δ`` is a buffer: :func:`refresh_ewgs_delta` sets ``δ = max(0, (Tr(H)/N) / (3·σ(g_{x_q})))`` with the Hessian
trace of the loss w.r.t. ``x_q`` estimated by Hutchinson's method (the paper: 10 batches, refreshed every epoch on
ImageNet, every 10 epochs on CIFAR). Weights are mapped back to [−1, 1] as ``2·x_q − 1`` and multiplied by a
learnable output scale initialised to ``mean|w| / mean|2·x_q − 1|``.
Initialisation: ``u_W, l_W = ±3·std(W)``, ``u_A = 3·std(x)/√(1 − 2/π)``, ``l_A = min(x)``; a spread that is zero
relative to max|x| (constant data) falls back to ``±max|W|`` and ``u_A = max|x|``.

fxqat's reconstruction [R]:

* The paper's output scale multiplies the *layer output* (``mean|y_fp| / mean|y_q|`` of the conv); a quantizer
  does not see the layer, so fxqat scales the quantized weight instead (``out_scale``: ``"learnable"``
  (default), ``"fixed"`` or ``"none"``).
* ``act_output``: ``"denorm"`` (default) returns ``l + (u − l)·x_q`` so activations keep their units;
  ``"unit"`` returns the paper's ``x_q`` in [0, 1] (rely on a following BN or the weight output scale).
* ``delta``: initial δ (1e-3) before the first refresh.
* ``impl``: ``"function"`` (default) computes the forward and the gradients of ``x``, ``l``, ``u`` and the output
  scale in one ``torch.autograd.Function`` (:class:`~fxqat.quantizers._ewgs_function.EWGSFunction`: a few
  elementwise passes and dot products, about half the CPU step-time overhead of the plain ops; forward
  bit-identical, gradients equal up to float rounding);
  ``"autograd"`` uses plain tensor ops around the EWGS discretizer (twice differentiable).
  :func:`refresh_ewgs_delta` needs a Hessian and uses the autograd path whatever ``impl`` says.

Example:
    >>> import torch
    >>> from fxqat.config import QuantSpec
    >>> q = EWGSQuantizer(QuantSpec(bits=2, method="ewgs", kind="weight"))
    >>> y = q(torch.randn(32, 8))
    >>> len(torch.unique(y)) <= 4
    True
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, List, Optional

import torch
from torch import nn

from fxqat.method_registry import register
from fxqat.quantizers._ewgs_function import EWGSFunction
from fxqat.quantizers._zoo_utils import (
    StateShapeMixin,
    act_clip_std,
    axis_of,
    check_choice,
    is_degenerate,
    reduce,
    set_tensor,
)
from fxqat.quantizers.base import NotAffineError, Quantizer, use_function
from fxqat.quantizers.layout import channel_view

__all__ = ["EWGSQuantizer", "ewgs_discretize", "refresh_ewgs_delta"]

log = logging.getLogger(__name__)
_EPS = 1e-8


class _EWGSDiscretizer(torch.autograd.Function):
    """Round to ``n`` steps in [0, 1]; backward scales each element's gradient by ``1 + δ·sign(g)·(x_n − x_q)``.

    The backward is written with differentiable ops (no ``once_differentiable``), so a Hessian through it works.
    """

    @staticmethod
    def forward(ctx, x_n: torch.Tensor, n: int, delta: torch.Tensor) -> torch.Tensor:
        x_q = torch.round(x_n * n) / n
        ctx.save_for_backward(x_n - x_q, delta)
        return x_q

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        diff, delta = ctx.saved_tensors
        return g * (1 + delta * torch.sign(g) * diff), None, None


def ewgs_discretize(x_n: torch.Tensor, levels: int, delta) -> torch.Tensor:
    """EWGS discretizer on ``x_n ∈ [0, 1]`` with ``levels`` = L = 2^b output values."""
    delta = torch.as_tensor(delta, dtype=x_n.dtype, device=x_n.device)
    return _EWGSDiscretizer.apply(x_n, levels - 1, delta)


@register("ewgs")
class EWGSQuantizer(StateShapeMixin, Quantizer):
    """EWGS fake-quantizer: learnable [l, u], 2^b levels, element-wise gradient scaling.

    Options:
        delta: initial δ (1e-3) [R].
        out_scale: weights: ``"learnable"`` (default), ``"fixed"`` or ``"none"`` [R].
        act_output: activations: ``"denorm"`` (default) or ``"unit"`` (paper) [R].
        impl: ``"function"`` (default, fast) or ``"autograd"`` (plain ops, twice differentiable).
    """

    default_options = {"delta": 1e-3, "out_scale": "learnable", "act_output": "denorm", "impl": "function"}

    def __init__(self, spec, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        name = type(self).__name__
        check_choice(name, "out_scale", self.opts["out_scale"], ("learnable", "fixed", "none"))
        check_choice(name, "act_output", self.opts["act_output"], ("denorm", "unit"))
        check_choice(name, "impl", self.opts["impl"], ("function", "autograd"))
        self.lower = nn.Parameter(torch.zeros(1))
        self.upper = nn.Parameter(torch.ones(1))
        self.register_buffer("delta", torch.full((1,), float(self.opts["delta"])))
        if self.kind == "weight" and self.opts["out_scale"] == "learnable":
            self.out_scale = nn.Parameter(torch.ones(1))
        else:
            self.register_buffer("out_scale", torch.ones(1))
        self._capture = False
        self.captured: Optional[torch.Tensor] = None

    @property
    def levels(self) -> int:
        return 2**self.bits

    @torch.no_grad()
    def _init_from(self, x: torch.Tensor) -> None:
        axis = axis_of(self)
        if self.kind == "weight":
            sd, mx = reduce(x.float(), axis, "std"), reduce(x.float(), axis, "absmax")
            sd = torch.where(is_degenerate(sd, mx), mx / 3, sd).clamp(min=_EPS)  # constant weights: ±max|w|
            set_tensor(self, "upper", 3 * sd)
            set_tensor(self, "lower", -3 * sd)
            if self.opts["out_scale"] != "none":
                wq = 2 * self._unit(x.float()) - 1
                o = reduce(x.float(), axis, "absmean") / reduce(wq, axis, "absmean").clamp(min=_EPS)
            else:
                o = torch.ones_like(sd)
            set_tensor(self, "out_scale", o)
        else:
            lo = reduce(x.float(), None, "min")
            up = act_clip_std(x)
            set_tensor(self, "lower", lo)
            set_tensor(self, "upper", torch.where(up > lo, up, lo + reduce(x.float(), None, "absmax") + 1e-3))

    def _bounds(self, x: torch.Tensor):
        lo, up = self.lower, self.upper
        if self.per_channel and lo.numel() > 1:
            lo, up = channel_view(lo, x, self.ch_axis), channel_view(up, x, self.ch_axis)
        return lo, up

    def _unit(self, x: torch.Tensor) -> torch.Tensor:
        """x_q ∈ [0, 1] (with the EWGS backward); keeps it in ``captured`` while :func:`refresh_ewgs_delta` runs."""
        lo, up = self._bounds(x)
        width = (up - lo).clamp(min=_EPS)
        x_n = torch.clamp((x - lo) / width, 0, 1)
        x_q = ewgs_discretize(x_n, self.levels, self.delta)
        if self._capture:
            self.captured = x_q
        return x_q

    def _out_scale(self, x: torch.Tensor) -> torch.Tensor:
        o = self.out_scale
        if self.per_channel and o.numel() > 1:
            o = channel_view(o, x, self.ch_axis)
        return o

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self._capture or self.opts["impl"] == "autograd" or not use_function():  # Hessian for δ; compile
            return self._quantize_autograd(x)
        lo, up = self._bounds(x)
        width = (up - lo).clamp(min=_EPS)
        if self.kind == "weight":
            return EWGSFunction.apply(x, lo, width, self._out_scale(x), self.delta, self.levels - 1, "weight")
        return EWGSFunction.apply(x, lo, width, None, self.delta, self.levels - 1, self.opts["act_output"])

    def _quantize_autograd(self, x: torch.Tensor) -> torch.Tensor:
        x_q = self._unit(x)
        if self.kind == "weight":
            return (2 * x_q - 1) * self._out_scale(x)
        if self.opts["act_output"] == "unit":
            return x_q
        lo, up = self._bounds(x)
        return lo + (up - lo).clamp(min=_EPS) * x_q

    @torch.no_grad()
    def grid(self) -> torch.Tensor:
        """Eval-mode output levels: shape ``[L]`` per-tensor or ``[C, L]`` per-channel."""
        n = self.levels - 1
        u = (torch.arange(0, n + 1, dtype=self.lower.dtype, device=self.lower.device) / n)[None, :]
        if self.kind == "weight":
            g = (2 * u - 1) * self.out_scale.reshape(-1, 1)
        elif self.opts["act_output"] == "unit":
            g = u
        else:
            lo, up = self.lower.reshape(-1, 1), self.upper.reshape(-1, 1)
            g = lo + (up - lo).clamp(min=_EPS) * u
        return g[0] if g.shape[0] == 1 else g

    def affine_qparams(self):
        if self.kind == "weight":
            raise NotAffineError(
                "EWGSQuantizer: weights use 2^b levels symmetric about 0 without a zero level, and an output scale "
                "independent of the input step, so there is no integer affine equivalent."
            )
        n = self.levels - 1
        lo, up = self.lower.detach(), self.upper.detach()
        if self.opts["act_output"] == "unit":
            raise NotAffineError("EWGSQuantizer: act_output='unit' rescales to [0, 1]; use act_output='denorm'.")
        scale = (up - lo).clamp(min=_EPS) / n
        z = -lo / scale
        if not torch.allclose(z, torch.round(z), atol=1e-4, rtol=0):
            raise NotAffineError(
                f"EWGSQuantizer: lower bound l={lo.flatten().tolist()} is not a multiple of the step "
                f"{scale.flatten().tolist()}, so there is no integer zero point."
            )
        return scale, torch.round(z).to(torch.int32), 0, n


def _rademacher(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    return torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1


def _split_batch(batch):
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError("refresh_ewgs_delta: each batch must be an (inputs, target) pair.")


def refresh_ewgs_delta(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: Iterable,
    n_hutchinson: int = 1,
    generator: Optional[torch.Generator] = None,
) -> List[float]:
    """Set ``δ = max(0, (Tr(H)/N) / (3·σ(g_{x_q})))`` on every :class:`EWGSQuantizer` of ``model``.

    For each ``(inputs, target)`` in ``batches``: ``loss = loss_fn(model(inputs), target)``; ``g = ∂loss/∂x_q``
    (kept with ``create_graph``), then ``n_hutchinson`` Rademacher probes ``v`` give ``vᵀ H v`` per quantizer (one
    Hessian-vector product per probe for all quantizers at once). Per batch, each quantizer's ratio
    ``(Tr(H)/N) / (3·std(g))`` is averaged over batches (as the official code does) and clamped at 0.
    The model's train/eval mode is left as it is.

    Returns:
        The new δ of each EWGS quantizer, in ``model.modules()`` order.

    Example:
        >>> import torch
        >>> from fxqat.config import QuantSpec
        >>> torch.manual_seed(0) is not None
        True
        >>> q = EWGSQuantizer(QuantSpec(bits=2, method="ewgs", kind="act"))
        >>> net = torch.nn.Sequential(q, torch.nn.Linear(4, 3))
        >>> batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
        >>> d = refresh_ewgs_delta(net, torch.nn.functional.cross_entropy, batches, n_hutchinson=4)
        >>> len(d) == 1 and d[0] >= 0.0
        True
    """
    qs = [m for m in model.modules() if isinstance(m, EWGSQuantizer)]
    if not qs:
        raise ValueError(
            "refresh_ewgs_delta: the model holds no EWGSQuantizer; build it with QATConfig(method='ewgs')."
        )
    sums = [0.0] * len(qs)
    n_batches = 0
    try:
        for q in qs:
            q._capture = True
        for batch in batches:
            inputs, target = _split_batch(batch)
            for q in qs:
                q.captured = None
            loss = loss_fn(model(inputs), target)
            used = [i for i, q in enumerate(qs) if q.captured is not None and q.captured.requires_grad]
            xs = [qs[i].captured for i in used]
            gs = torch.autograd.grad(loss, xs, create_graph=True, allow_unused=True)
            gs = [torch.zeros_like(x) if g is None else g for x, g in zip(xs, gs)]
            traces = [0.0] * len(xs)
            for _ in range(n_hutchinson):
                vs = [_rademacher(x, generator) for x in xs]
                hv = torch.autograd.grad(gs, xs, grad_outputs=vs, retain_graph=True, allow_unused=True)
                for j, (h, v) in enumerate(zip(hv, vs)):
                    if h is not None:
                        traces[j] += float((h * v).sum()) / n_hutchinson
            for j, i in enumerate(used):
                sd = float(gs[j].detach().std()) if gs[j].numel() > 1 else 0.0
                if sd > 0:
                    sums[i] += traces[j] / xs[j].numel() / (3.0 * sd)
            n_batches += 1
    finally:
        for q in qs:
            q._capture = False
            q.captured = None
    if n_batches == 0:
        raise ValueError("refresh_ewgs_delta: batches is empty; pass a few (inputs, target) pairs (the paper uses 10).")
    deltas = []
    for q, s in zip(qs, sums):
        d = max(0.0, s / n_batches)
        q.delta.fill_(d)
        deltas.append(d)
    log.info("refresh_ewgs_delta: δ = %s", deltas)
    return deltas
