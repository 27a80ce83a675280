"""Weight-only sensitivity baselines from a second-order expansion of the loss around the FP weights.

For block i with weights W_i quantized at b bits, δ = Q_b(W_i) − W_i (the model's own weight quantizers, set to b bits
and initialised from the weights), the loss increase is ``½ δᵀ H δ`` to second order [R: both estimators keep the ½,
so their unit is the loss; an allocation is unchanged by a common factor]:

* ``"fisher"``: H ≈ diag of the empirical Fisher, the squared gradient of the batch loss:
  ``S_i(b) = ½ Σ_w g_w² δ_w²`` (per batch, then averaged);
* ``"hessian"``: HAWQ-v2 (Dong et al., NeurIPS 2020): H_i ≈ (Tr H_i / n_i)·I with the trace from Hutchinson's
  estimator ``Tr H_i ≈ E[v_iᵀ H_ii v_i]``, v_i Rademacher on block i's weights (``hutchinson="block"``: one
  Hessian-vector product, a double backward, per block and probe; ``"joint"``: one v over all blocks, one product per
  probe, its cross terms between blocks add zero-mean noise): ``S_i(b) = ½ · Tr(H_i)/n_i · ‖δ_i‖²``.

Both run the model in eval mode with every quantizer off (the FP network on the latent weights) and leave it as it
was. Scaled dot-product attention runs on its math kernel, the one with a double backward.

Example:
    >>> import torch
    >>> g, d2 = torch.tensor([2.0, 1.0]), {2: torch.tensor([0.25, 1.0])}
    >>> fisher_terms([g], [d2], 2)  # ½ (4·0.25 + 1·1)
    1.0
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from fxqat.capture.layer_quant import WEIGHT_QUANT
from fxqat.layer_registry import weight_layer_entry
from fxqat.mixed.quant_layers import QuantLayer
from fxqat.quantizers.base import Quantizer

__all__ = ["weight_pairs", "weight_errors", "second_order_per_batch", "fisher_terms", "math_attention"]

Batch = Tuple[Tuple[torch.Tensor, ...], object]


def _layout(qm: nn.Module, qname: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """How the weight quantizer ``qname`` sees its weight (``to_out_in`` of an in-place transposed layer)."""
    if qname.endswith("." + WEIGHT_QUANT):
        entry = weight_layer_entry(qm.get_submodule(qname[: -len(WEIGHT_QUANT) - 1]))
        if entry is not None and entry.to_out_in is not None:
            return entry.to_out_in
    return lambda w: w


def weight_pairs(qm: nn.Module, layers: Sequence[QuantLayer]) -> List[Tuple[str, str]]:
    """``(weight quantizer, weight)`` pairs of ``layers``, each weight once.

    Raises:
        ValueError: a quantizer does not say which weight it quantizes (no ``weight_target``).
    """
    pairs, seen = [], set()
    for layer in layers:
        for qn, pn in zip(layer.weights, layer.params):
            if not pn:
                raise ValueError(f"layer {layer.name!r}: weight quantizer {qn!r} has no weight_target, so the "
                                 "Fisher/Hessian estimate cannot find its weight; use method='paths'.")
            if pn not in seen:
                seen.add(pn)
                pairs.append((qn, pn))
    return pairs


@torch.no_grad()
def weight_errors(qm: nn.Module, quantizers: Dict[str, Quantizer], pairs: Sequence[Tuple[str, str]],
                  bits: Sequence[int]) -> List[Dict[int, torch.Tensor]]:
    """``(Q_b(W) − W)²`` of every pair at every bit-width, in the weight's own layout.

    Each quantizer is set to b bits and re-initialised from its weight (the caller restores it); a disabled
    quantizer gives zero error.
    """
    out: List[Dict[int, torch.Tensor]] = [{} for _ in pairs]
    for b in bits:
        for k, (qn, pn) in enumerate(pairs):
            q, w = quantizers[qn], qm.get_parameter(pn)
            lay = _layout(qm, qn)
            q.set_bits(b)
            wl = lay(w.detach())
            out[k][b] = lay(q(wl) - wl).float().pow(2)
    return out


def fisher_terms(grads: Sequence[torch.Tensor], errors: Sequence[Dict[int, torch.Tensor]], bits: int) -> float:
    """``½ Σ g² δ²`` over the given weights at ``bits``."""
    return 0.5 * float(sum((g.detach().float().pow(2) * e[bits]).sum() for g, e in zip(grads, errors)))


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Scaled dot-product attention on its math kernel (double backward available) inside the block."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


def _rademacher(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, t.shape, generator=gen, device=t.device).to(t.dtype) * 2 - 1


def _traces(grads, params, starts, probes: int, hutchinson: str, gen: torch.Generator) -> np.ndarray:
    """Hutchinson estimates of Tr H_ii for every block from the (differentiable) gradients ``grads``."""
    n = len(starts) - 1
    trace = np.zeros(n)
    spans = [(0, len(params))] if hutchinson == "joint" else [(starts[i], starts[i + 1]) for i in range(n)]
    spans = [(a, b) for a, b in spans if b > a]
    for p in range(probes):
        for k, (a, b) in enumerate(spans):
            vs = [_rademacher(t, gen) for t in params[a:b]]
            gv = sum((g * v).sum() for g, v in zip(grads[a:b], vs))
            last = p == probes - 1 and k == len(spans) - 1
            hv = torch.autograd.grad(gv, params[a:b], retain_graph=not last)
            vhv = [float((v * h).sum()) for v, h in zip(vs, hv)]
            for i in range(n):  # joint: the part of v^T H v on block i (cross terms have zero mean)
                lo, hi = max(starts[i], a), min(starts[i + 1], b)
                if hi > lo:
                    trace[i] += sum(vhv[lo - a:hi - a]) / probes
    return trace


def second_order_per_batch(
    qm: nn.Module,
    batches: Sequence[Batch],
    loss_fn: Callable,
    blocks: Sequence[Sequence[Tuple[str, str]]],
    errors: Sequence[Sequence[Dict[int, torch.Tensor]]],
    bits: Sequence[int],
    method: str,
    probes: int = 1,
    seed: int = 0,
    step: Optional[Callable[[], None]] = None,
    hutchinson: str = "block",
) -> np.ndarray:
    """Per-batch estimates, shape ``(len(bits), len(batches), len(blocks))`` (module docstring).

    Args:
        blocks: per block, its ``(quantizer, weight)`` pairs; errors: their :func:`weight_errors`, same nesting.
        method: ``"fisher"`` or ``"hessian"``; probes: Rademacher vectors per batch (hessian); seed: of their
            generator.
        step: called after each batch (progress bars).
        hutchinson: ``"block"`` (HAWQ-v2: a probe vector per block, one Hessian-vector product per block and probe)
            or ``"joint"`` (one probe over every block, one product per probe; cheaper, but the cross terms between
            blocks add noise).
    """
    if hutchinson not in ("block", "joint"):
        raise ValueError(f"hutchinson={hutchinson!r}: use 'block' or 'joint'.")
    names = [pn for blk in blocks for _, pn in blk]
    params = [qm.get_parameter(pn) for pn in names]
    flat_err = [e for blk in errors for e in blk]
    sizes = [len(blk) for blk in blocks]
    counts = [sum(qm.get_parameter(pn).numel() for _, pn in blk) for blk in blocks]
    out = np.zeros((len(bits), len(batches), len(blocks)))
    if not params:
        return out
    dev = params[0].device
    gen = torch.Generator(device=dev).manual_seed(seed)
    for j, (args, target) in enumerate(batches):
        loss = loss_fn(qm(*args), target)
        grads = torch.autograd.grad(loss, params, create_graph=method == "hessian")
        starts = np.cumsum([0] + sizes)
        if method == "fisher":
            for i in range(len(blocks)):
                g, e = grads[starts[i]:starts[i + 1]], flat_err[starts[i]:starts[i + 1]]
                for bi, b in enumerate(bits):
                    out[bi, j, i] = fisher_terms(g, e, b)
        else:
            trace = _traces(grads, params, starts, probes, hutchinson, gen)
            for i in range(len(blocks)):
                e = flat_err[starts[i]:starts[i + 1]]
                for bi, b in enumerate(bits):
                    norm2 = float(sum(x[b].sum() for x in e))
                    out[bi, j, i] = 0.5 * trace[i] / max(counts[i], 1) * norm2
        if step is not None:
            step()
    return out
