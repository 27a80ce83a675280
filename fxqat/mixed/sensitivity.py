"""``fxqat.sensitivity``: how much the loss grows when each block is quantized to each candidate bit-width.

``method="paths"`` (the default) reads it off the mixed-precision paths of block replacement. A model prepared with
``HybridConfig()`` returns, in train mode, the paths "LP blocks 1..i, FP blocks i+1..n"; with the FP output as path
0 and the LP output as path n, the loss difference of consecutive paths ``L_i − L_{i−1}`` is what quantizing block i
adds, with blocks 1..i−1 already quantized and the blocks after it in FP. Every allocatable quantizer is set to b bits
(re-initialised at b bits from the data), one forward per batch measures all blocks at once, and
``S_i(b) = mean over batches of (L_i − L_{i−1})``; the spread is the standard deviation over the batches. The
differences telescope: ``Σ_i S_i(b) = L_LP(b) − L_FP``. The model is measured deterministically (every submodule in
eval mode, all paths) and left exactly as it was.

:func:`running_sensitivity` reads the same differences, at the model's current bit-widths, off the running averages
of the path losses that block replacement keeps while it trains (:mod:`fxqat.path_losses`): no extra forward pass.

``method="fisher"`` and ``method="hessian"`` are the weight-only baselines of :mod:`fxqat.mixed.second_order`;
they need no block replacement (pass ``blocks=`` for a model prepared without it).

Layers whose bits the ``first_last`` policy sets keep them (listed as ``fixed`` in the table) unless
``include_first_last=True``.

Example:
    >>> import torch, torch.nn as nn, fxqat
    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> qm = fxqat.prepare_qat(net, (x,), fxqat.QATConfig(hybrid=fxqat.HybridConfig()))
    >>> t = fxqat.sensitivity(qm, [(x, y)], bits=(2, 8))
    >>> [r.block for r in t.rows], t.row(1).modules, t.row(1).weight_count
    (['stem', '2', 'head'], ('2',), 256)
    >>> t.sensitivity_of(1, 2) > t.sensitivity_of(1, 8)
    True
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fxqat.capture.eager_model import eager_blocks, is_eager_model
from fxqat.graph.blocks import Block
from fxqat.hybrid_output import HybridOutput
from fxqat.mixed.quant_layers import QuantLayer, split_fixed
from fxqat.mixed.second_order import math_attention, second_order_per_batch, weight_errors, weight_pairs
from fxqat.mixed.state import hybrid_of, path_mode, preserved
from fxqat.mixed.table import METHODS, BlockSensitivity, SensitivityTable
from fxqat.quantizers.control import named_quantizers
from fxqat.training.losses import hybrid_loss

__all__ = ["sensitivity", "running_sensitivity", "task_loss"]

log = logging.getLogger(__name__)
LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


def task_loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a model output (logits, ``.logits``, ...; sequence logits against (N, T) targets)."""
    return hybrid_loss(out, target)[0]


def _batches(batches: Iterable[Any], device: torch.device) -> List[Tuple[Tuple[torch.Tensor, ...], Any]]:
    out = []
    for b in batches:
        if not (isinstance(b, (tuple, list)) and len(b) == 2):
            raise ValueError("sensitivity: each batch must be (inputs, target); inputs a tensor or a tuple of the "
                             f"model's positional inputs. Got {type(b).__name__}.")
        x, y = b
        args = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        out.append((args, y.to(device) if isinstance(y, torch.Tensor) else y))
    if not out:
        raise ValueError("sensitivity: batches is empty; give at least one (inputs, target) batch.")
    return out


def _ordered_paths(out: Any, n_blocks: int) -> List[Any]:
    if not isinstance(out, HybridOutput):
        raise ValueError("method='paths': the model did not return a HybridOutput in train mode; prepare it with "
                         "QATConfig(hybrid=fxqat.HybridConfig()).")
    by_id = dict(zip(out.path_ids or range(len(out.paths)), out.paths))
    if sorted(by_id) != list(range(n_blocks - 1)):
        raise ValueError(f"method='paths': the model returned paths {sorted(by_id)} for {n_blocks} blocks; pass the "
                         "model's own blocks (blocks=None).")
    return [by_id[i] for i in range(n_blocks - 1)]


def _path_per_batch(qm, batches, loss_fn, groups: Sequence[List[str]], bits, step) -> np.ndarray:
    qs = named_quantizers(qm)
    names = list(dict.fromkeys(n for g in groups for n in g))
    out = np.zeros((len(bits), len(batches), len(groups)))
    with torch.no_grad(), preserved(qs.values()) as restore, path_mode(qm):
        for bi, b in enumerate(bits):
            restore()  # every bit-width from the same state: quantizers initialised in the last pass start afresh
            for n in names:
                qs[n].set_bits(b)
            for j, (args, target) in enumerate(batches):
                res = qm(*args)
                outs = [res.fp, *_ordered_paths(res, len(groups)), res.lp]
                losses = [float(loss_fn(o, target)) for o in outs]
                out[bi, j] = np.diff(np.asarray(losses, dtype=np.float64))
                step()
    return out


def _second_order_per_batch(qm, batches, loss_fn, layers: Sequence[List[QuantLayer]], bits, method, probes, seed,
                            step, hutchinson) -> np.ndarray:
    qs = named_quantizers(qm)
    pairs = [weight_pairs(qm, ls) for ls in layers]
    modes = [(m, m.training) for m in qm.modules()]
    frozen = []
    try:
        for m, _ in modes:
            m.training = False
        with preserved(qs.values()):
            errors = [weight_errors(qm, qs, p, bits) for p in pairs]
            for q in qs.values():
                q.enable_fake_quant(False)  # the FP network on the latent weights
            for _, pn in (p for ps in pairs for p in ps):
                w = qm.get_parameter(pn)
                if not w.requires_grad:
                    frozen.append(w.requires_grad_(True))
            with math_attention():
                return second_order_per_batch(qm, batches, loss_fn, pairs, errors, bits, method, probes, seed, step,
                                              hutchinson)
    finally:
        for w in frozen:
            w.requires_grad_(False)
        for m, mode in modes:
            m.training = mode
        qm.zero_grad(set_to_none=True)


def _own_blocks(qm: nn.Module) -> List[Block]:
    """The block partition a prepared model carries: a hybrid graph root's, or an eager root's chain blocks.

    Raises:
        ValueError: ``qm`` carries none (a plain graph-root QAT model): pass blocks explicitly.
    """
    blocks = list(eager_blocks(qm)) if is_eager_model(qm) else list((getattr(qm, "meta", None) or {}).get(
        "fxqat.blocks", ()))
    if not blocks:
        raise ValueError(
            f"{type(qm).__name__} carries no block partition (it was prepared without block replacement): prepare it "
            "with QATConfig(hybrid=fxqat.HybridConfig()), or pass blocks=fxqat.find_blocks(fp_model, (x,), config)."
        )
    return blocks


def sensitivity(
    qm: nn.Module,
    batches: Iterable[Any],
    bits: Sequence[int] = (2, 3, 4, 8),
    method: str = "paths",
    *,
    loss_fn: Optional[LossFn] = None,
    blocks: Optional[Sequence[Block]] = None,
    kinds: Optional[Sequence[str]] = None,
    include_first_last: bool = False,
    probes: int = 1,
    hutchinson: str = "block",
    seed: int = 0,
    progress: bool = False,
) -> SensitivityTable:
    """Per-block sensitivity of the prepared model ``qm`` at each of ``bits`` (see the module docstring).

    Args:
        qm: a prepared model; for ``"paths"`` one prepared with block replacement (``mode="lp_prefix"``).
        batches: ``(inputs, target)`` pairs; ``inputs`` a tensor or a tuple of positional inputs.
        bits: candidate bit-widths.
        method: ``"paths"``, ``"fisher"`` or ``"hessian"``.
        loss_fn: ``(output, target) -> scalar`` (default :func:`task_loss`, cross-entropy).
        blocks: the partition to measure (default: the model's own; required for a plain graph-root model with the
            second-order methods, e.g. ``fxqat.find_blocks(fp_model, (x,), config)``). ``"paths"`` always uses the
            model's own blocks.
        kinds: quantizer kinds set to each bit-width: default ``("weight", "act")`` for paths; the second-order
            methods see weights only.
        include_first_last: also vary (and allocate) the layers of the ``first_last`` policy.
        probes: Hutchinson probes per batch (``"hessian"``).
        hutchinson: ``"block"`` (a probe per block, HAWQ-v2) or ``"joint"`` (one probe for all blocks: cheaper,
            noisier); see :mod:`fxqat.mixed.second_order`.
        seed: seed of the Hutchinson probes.
        progress: show a tqdm bar.

    Returns:
        A :class:`~fxqat.mixed.table.SensitivityTable`.
    """
    if method not in METHODS:
        raise ValueError(f"sensitivity: method={method!r}; use one of {METHODS}.")
    bits = tuple(sorted(set(int(b) for b in bits)))
    if not bits or not all(1 <= b <= 16 for b in bits):
        raise ValueError(f"sensitivity: bits={bits}: give bit-widths from 1 to 16, e.g. (2, 3, 4, 8).")
    if kinds is None:
        kinds = ("weight", "act") if method == "paths" else ("weight",)
    kinds = tuple(kinds)
    if not set(kinds) <= {"weight", "act"} or "weight" not in kinds:
        raise ValueError(f"sensitivity: kinds={kinds}: use ('weight', 'act') or ('weight',).")
    if method != "paths" and kinds != ("weight",):
        raise ValueError(f"sensitivity: method={method!r} measures weights only; use kinds=('weight',).")
    if method == "paths":
        hybrid_of(qm)  # raises for a model without paths
    if method == "paths" and blocks is not None:
        own = _own_blocks(qm)
        if [b.name for b in blocks] != [b.name for b in own]:
            raise ValueError("sensitivity: method='paths' measures the model's own blocks (its paths); leave blocks "
                             f"unset (the model has {[b.name for b in own]}).")
    blocks = list(_own_blocks(qm) if blocks is None else blocks)
    layout = split_fixed(qm, blocks, include_first_last)
    dev = next((p.device for p in qm.parameters()), torch.device("cpu"))
    data = _batches(batches, dev)
    loss_fn = loss_fn or task_loss
    t0 = time.perf_counter()
    bar = tqdm(total=len(bits) * len(data), desc=f"sensitivity ({method})", disable=not progress, leave=False)
    try:
        if method == "paths":
            groups = [[q for la in alloc for q in la.weights + (la.acts if "act" in kinds else ())]
                      for alloc, _ in layout]
            per = _path_per_batch(qm, data, loss_fn, groups, bits, bar.update)
        else:
            per = _second_order_per_batch(qm, data, loss_fn, [alloc for alloc, _ in layout], bits, method, probes,
                                          seed, lambda: bar.update(len(bits)), hutchinson)
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    mean = per.mean(axis=1)
    spread = per.std(axis=1, ddof=1) if len(data) > 1 else np.zeros_like(mean)
    rows = []
    for i, (blk, (alloc, fixed)) in enumerate(zip(blocks, layout)):
        rows.append(BlockSensitivity(
            block=blk.name, index=blk.index, modules=tuple(la.name for la in alloc),
            weight_count=sum(la.weight_count for la in alloc),
            sensitivity=tuple(float(v) for v in mean[:, i]), spread=tuple(float(v) for v in spread[:, i]),
            fixed=tuple(la.name for la in fixed)))
    info = {"probes": probes, "seed": seed, "hutchinson": hutchinson} if method == "hessian" else {}
    log.info("fxqat: %s sensitivity of %d blocks at %s bits over %d batches in %.1f s", method, len(rows), bits,
             len(data), elapsed)
    return SensitivityTable(method=method, bits=bits, rows=tuple(rows), kinds=kinds, n_batches=len(data),
                            time_s=elapsed, info=tuple(info.items()))


def running_sensitivity(qm: nn.Module, include_first_last: bool = False) -> SensitivityTable:
    """Per-block sensitivity at the model's current bit-widths from the path losses block replacement averaged while
    training (:class:`~fxqat.path_losses.PathLossAverages`, updated by :func:`fxqat.hybrid_loss`): no extra pass.

    ``S_i = L_i − L_{i−1}`` over ``[FP, paths..., LP]`` as in ``method="paths"``, but measured in train mode on the
    training batches, with the parameters of each step: the moving average of the per-step difference where both
    outputs ran in the same step (always with ``paths="all"``; spread: its moving standard deviation), else the
    difference of the outputs' moving averages (sampled paths; spread ``sqrt(var L_i + var L_{i−1})``, an upper
    bound), see :meth:`~fxqat.path_losses.PathLossAverages.block_differences`. ``bits`` holds one entry: the most
    common bit-width of the allocatable weight quantizers.

    Example:
        >>> import torch, torch.nn as nn, fxqat
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> qm = fxqat.prepare_qat(net, (x,), fxqat.QATConfig(w_bits=2, a_bits=2, hybrid=fxqat.HybridConfig()))
        >>> loss, _ = fxqat.hybrid_loss(qm(x), y)
        >>> t = running_sensitivity(qm)
        >>> t.bits, len(t.rows), t.n_batches
        ((2,), 3, 1)

    Raises:
        ValueError: the model has no block replacement, runs a mode other than ``lp_prefix``, or has not trained yet.
    """
    hybrid, holder = hybrid_of(qm)
    stats = getattr(holder, "fxqat_path_losses", None) or getattr(holder, "path_losses", None)
    if hybrid.mode != "lp_prefix" or stats is None:
        raise ValueError(f"running_sensitivity: needs mode='lp_prefix' (the model has mode={hybrid.mode!r}); use "
                         "fxqat.sensitivity(qm, batches) instead.")
    counts = stats.counts()
    if int(counts[-1]) == 0:
        raise ValueError("running_sensitivity: no training step has run yet: train with fxqat.hybrid_loss first, or "
                         "measure with fxqat.sensitivity(qm, batches).")
    mean, spread, paired = (t.numpy() for t in stats.block_differences())
    blocks = list(_own_blocks(qm))
    layout = split_fixed(qm, blocks, include_first_last)
    qs = named_quantizers(qm)
    widths = [qs[n].bits for alloc, _ in layout for la in alloc for n in la.weights]
    bits = max(set(widths), key=widths.count) if widths else 0
    rows = []
    for i, (blk, (alloc, fixed)) in enumerate(zip(blocks, layout)):
        rows.append(BlockSensitivity(
            block=blk.name, index=blk.index, modules=tuple(la.name for la in alloc),
            weight_count=sum(la.weight_count for la in alloc),
            sensitivity=(float(mean[i]),), spread=(float(spread[i]),),
            fixed=tuple(la.name for la in fixed)))
    info = {"source": "running", "decay": stats.decay, "updates": tuple(int(c) for c in counts),
            "paired": tuple(bool(p) for p in paired)}
    return SensitivityTable(method="paths", bits=(bits,), rows=tuple(rows), kinds=("weight", "act"),
                            n_batches=int(counts.min()), time_s=0.0, info=tuple(info.items()))
