"""Prepare, partition and convert models whose root forward runs eagerly (hierarchical capture end to end).

Example:
    >>> import torch, torch.nn as nn
    >>> from fxqat.config import QATConfig
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
    ...     def forward(self, x):
    ...         for layer in self.layers:
    ...             x = layer(x) if x.sum() > -1e9 else x
    ...         return x
    >>> qm = prepare_eager(Net(), (torch.randn(2, 8),), {}, QATConfig(), "data-dependent")
    >>> [b.name for b in eager_blocks(qm)]
    ['layers.0', 'layers.1']
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from fxqat.capture.chain import ChainCut, find_chain
from fxqat.capture.eager_hybrid import make_eager_hybrid, remove_hybrid
from fxqat.capture.hierarchy import CAPTURE_ATTR, CaptureReport, Region, capture_eager
from fxqat.capture.inner_cuts import refine
from fxqat.capture.layer_quant import WEIGHT_QUANT, is_quantized_layer
from fxqat.capture.param_graph import PARAM_WEIGHTS_META, UNQUANTIZED_META
from fxqat.capture.param_quant import (
    ParamUseRecorder,
    freeze_params,
    layer_weight_names,
    param_quantizers,
    plan_params,
)
from fxqat.capture.param_report import NOT_USED, fp_params, quantized_param_ids, unquantized_params, warn_unexpected
from fxqat.capture.record import Call, record_calls
from fxqat.capture.region import GraphRegion
from fxqat.config import QATConfig
from fxqat.graph.blocks import Block
from fxqat.layer_registry import is_weight_layer, weight_layer_entry
from fxqat.passes.insert_quant import QROLE
from fxqat.passes.param_weights import MATMUL_OPS, op_name
from fxqat.quantizers.base import Quantizer

__all__ = [
    "prepare_eager", "eager_blocks", "convert_eager", "lp_eager_copy", "is_eager_model", "capture_report", "BLOCKS_ATTR",
]

log = logging.getLogger(__name__)
BLOCKS_ATTR = "fxqat_blocks"  # (layer-chain blocks, their cuts, the chain layers)
CUTS_ATTR = "fxqat_cuts"  # the HybridConfig.cuts block replacement was prepared with: "layers" or "residual"


def is_eager_model(model: nn.Module) -> bool:
    """True for a model prepared through hierarchical capture (eager root)."""
    return isinstance(getattr(model, CAPTURE_ATTR, None), CaptureReport)


def capture_report(qm: nn.Module) -> CaptureReport:
    """Graph and eager regions of a prepared model, why each eager region is eager, and the graph share.

    A model whose root traced is one graph region, with the submodules the tracer kept as leaves as eager regions.

    Example:
        >>> import torch, torch.nn as nn, fxqat
        >>> qm = fxqat.prepare_qat(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.randn(2, 4),))
        >>> r = fxqat.capture_report(qm); [(x.name, x.kind) for x in r.regions], r.graph_share
        ([('', 'graph')], 1.0)
    """
    report = getattr(qm, CAPTURE_ATTR, None)
    if isinstance(report, CaptureReport):
        return report
    if isinstance(getattr(qm, "meta", None), dict) and UNQUANTIZED_META not in qm.meta:
        qm.meta[UNQUANTIZED_META] = graph_unquantized(qm)
    meta = getattr(qm, "meta", {}) or {}
    opaque = tuple(meta.get("fxqat.opaque", ()))
    reasons = meta.get("fxqat.opaque_reasons", {})
    layers = tuple(n for n, m in qm.named_modules() if is_weight_layer(m) and not n.startswith("fxqat_partner"))
    inside = {o: tuple(n for n in layers if n == o or n.startswith(o + ".")) for o in opaque}
    eager = {n for v in inside.values() for n in v}
    regions = [Region("", "graph", "", tuple(n for n in layers if n not in eager))]
    regions += [Region(o, "eager", reasons.get(o, "not traceable"), inside[o]) for o in opaque]
    return CaptureReport(tuple(regions), layers, unquantized=meta.get(UNQUANTIZED_META, ()),
                         param_weights=meta.get(PARAM_WEIGHTS_META, ()))


def graph_unquantized(gm: nn.Module) -> tuple:
    """:func:`~fxqat.capture.param_report.unquantized_params` of a model whose root traced, reasons from the graph:
    the ops that read each parameter that got no weight quantizer."""
    reasons = {}
    graph = getattr(gm, "graph", None)
    for node in graph.nodes if graph is not None else ():
        if node.op != "get_attr":
            continue
        ops = sorted({op_name(u.target) if u.op == "call_function" else str(u.op) for u in node.users})
        products = [o for o in ops if o in MATMUL_OPS and o != "embedding"]
        if products:
            reasons[str(node.target)] = (f"enters {', '.join(products)} in the graph; fxqat gives weights read there "
                                         "no quantizer")
        elif ops == ["embedding"]:
            reasons[str(node.target)] = "FP by config: an embedding table (QATConfig.quantize_embeddings=False)"
        elif ops:
            reasons[str(node.target)] = f"{NOT_USED} (read by {', '.join(ops)})"
    for name, m in gm.named_modules():
        if is_weight_layer(m) and not name.startswith("fxqat_"):
            reasons.setdefault(f"{name}.{weight_layer_entry(m).weight}",
                               "FP by config: an Override(skip=True), the first_last=None policy, or a leaf fxqat "
                               "could not quantize")
    return unquantized_params(gm, quantized_param_ids(gm), reasons)


def _quantized_names(model: nn.Module) -> set:
    """Qualified names of modules that hold a weight quantizer (eager layers and graph regions)."""
    names = set()
    for name, m in model.named_modules():
        if is_quantized_layer(m) or param_quantizers(m):
            names.add(name)
        elif isinstance(m, GraphRegion):
            for node in m.graph.nodes:
                if node.meta.get(QROLE) == "weight":
                    names.add(name)
                    target = getattr(m.get_submodule(str(node.target)), "weight_target", "") or ""
                    if target:  # the layer itself (a region may hold the model's prefix: its embeddings)
                        names.add(target.rpartition(".")[0])
    return names


def _chain_groups(
    model: nn.Module, calls: Dict[str, Call], layers: Sequence[str], quantized: Callable[[str], bool],
) -> Tuple[List[Tuple[str, Tuple[str, ...]]], List[ChainCut]]:
    """Blocks ``[(name, module names)]`` and the cuts between them for the chain ``layers``.

    Args:
        model: the captured model.
        calls: its recorded calls.
        layers: the chain's layer names, in order.
        quantized: whether a qualified module name holds a quantized weight layer.
    """
    first, last = calls[layers[0]].seq, calls[layers[-1]].seq
    inside = tuple(n for n in calls if any(n == x or n.startswith(x + ".") for x in layers))
    before = tuple(n for n, c in sorted(calls.items(), key=lambda kv: kv[1].seq)
                   if c.seq < first and n not in inside and not any(n2.startswith(n + ".") for n2 in layers))
    after = tuple(n for n, c in sorted(calls.items(), key=lambda kv: kv[1].seq)
                  if c.seq > last and n not in inside)
    groups: List[Tuple[str, List[str]]] = [(x, [m for m in calls if m == x or m.startswith(x + ".")]) for x in layers]
    cuts: List[Tuple[str, str]] = [(x, "out") for x in layers[:-1]]
    if any(quantized(n) for n in before):
        groups.insert(0, ("prefix", list(before)))
        cuts.insert(0, (layers[0], "in"))
    else:
        groups[0][1][:0] = list(before)
    if any(quantized(n) for n in after):
        groups.append(("suffix", list(after)))
        cuts.append((layers[-1], "out"))
    else:
        groups[-1][1].extend(after)
    blocks = [(name, tuple(mods)) for name, mods in groups]
    return blocks, [ChainCut(i, layer, kind) for i, (layer, kind) in enumerate(cuts)]


def _partition(model: nn.Module, calls: Dict[str, Any], chain: Optional[Tuple[str, Tuple[str, ...]]]):
    if chain is None:
        return [], []
    quantized = _quantized_names(model)

    def holds_quant(n: str) -> bool:
        return any(q == n or q.startswith(n + ".") for q in quantized)

    groups, cuts = _chain_groups(model, calls, chain[1], holds_quant)
    blocks = []
    for i, (name, mods) in enumerate(groups):
        entry = "input" if i == 0 else f"{cuts[i - 1].layer}:{cuts[i - 1].kind}"
        exit_ = f"{cuts[i].layer}:{cuts[i].kind}" if i < len(cuts) else "output"
        blocks.append(Block(name=name, index=i, nodes=(), entry=entry, exit=exit_, modules=tuple(mods)))
    return blocks, cuts


def prepare_eager(
    model: nn.Module, args: Tuple, kwargs: Dict[str, Any], config: QATConfig, reason: str,
    fp_model: Optional[nn.Module] = None,
) -> nn.Module:
    """Capture ``model`` in place (eager root), insert quantizers, and build the hybrid model if configured.

    Args:
        model: a copy of the user's model (modified in place and returned).
        args, kwargs: one example call.
        config: what to quantize.
        reason: why the root forward could not be traced (shown in the capture report).
        fp_model: another copy of the user's FP model, the frozen partner (``config.hybrid.partner="frozen"``).
    """
    fp_model = fp_model if fp_model is not None or config.hybrid is None else copy.deepcopy(model)
    recorder = ParamUseRecorder(model)  # which parameters enter matmul-like ops, and how
    recorded = recorder.watch(record_calls, model, args, kwargs, is_weight_layer)  # before any quantizer exists
    layer_weights = layer_weight_names(model)
    plan = plan_params(model, recorder.uses, config, layer_weights)
    chain = find_chain(model, recorded[0], is_weight_layer)
    report = capture_eager(model, args, kwargs, config, reason, recorded, chain[1] if chain else (), plan)
    order = report.weight_layers
    ends = {order[i] for i, end in ((0, "first"), (-1, "last")) if order and end in config.first_last_layers}
    fp = fp_params(model, recorder.uses, plan.reasons, config, layer_weights, ends, report.uncalled)
    report = dataclasses.replace(report, unquantized=fp)
    setattr(model, CAPTURE_ATTR, report)
    warn_unexpected(report.unquantized, type(model).__name__, stacklevel=5)
    if not report.weight_layers:
        log.warning("fxqat: %s has no weight layer to quantize; the model is returned unchanged.",
                    type(model).__name__)
    blocks, cuts = _partition(model, recorded[0], chain)
    model.__dict__[BLOCKS_ATTR] = (tuple(blocks), tuple(cuts), chain[1] if chain else ())
    mode = config.hybrid.cuts if config.hybrid is not None else "auto"
    model.__dict__[CUTS_ATTR] = "layers" if mode == "auto" else mode
    if mode == "residual" and chain is not None:
        blocks, cuts = refine(model, blocks, cuts, chain[1])
    if config.hybrid is not None:
        if chain is None:
            raise ValueError(
                f"block replacement needs a chain of layers, but {type(model).__name__}'s eager forward calls no "
                "ModuleList/Sequential whose children pass one hidden state from one to the next. Use plain QAT "
                "(hybrid=None) for this model."
            )
        make_eager_hybrid(model, fp_model, chain[1], cuts, blocks, config.hybrid)
    return model


def eager_blocks(model: nn.Module, cuts: str = "auto") -> List[Block]:
    """The blocks of a model prepared by :func:`prepare_eager`.

    Args:
        model: the prepared eager-root model.
        cuts: ``"layers"`` (one block per chain layer), ``"residual"`` (also cut inside the layers that are graph
            regions, :func:`fxqat.capture.inner_cuts.refine`) or ``"auto"``: what block replacement of ``model`` uses
            (the ``HybridConfig.cuts`` it was prepared with; ``"layers"`` without block replacement).
    """
    blocks, chain_cuts, layers = model.__dict__.get(BLOCKS_ATTR, ((), (), ()))
    mode = model.__dict__.get(CUTS_ATTR, "layers") if cuts == "auto" else cuts
    if mode not in ("layers", "residual"):
        raise ValueError(f"eager_blocks: cuts={cuts!r}; use 'auto', 'layers' or 'residual'.")
    if mode == "residual" and layers:
        return refine(model, blocks, chain_cuts, layers)[0]
    return list(blocks)


def lp_eager_copy(qm: nn.Module) -> nn.Module:
    """An eval-mode copy of an eager-root QAT model without its hybrid parts (partner, paths, blocks, step counter);
    quantizers untouched."""
    lp = remove_hybrid(copy.deepcopy(qm))
    lp.__dict__.pop(BLOCKS_ATTR, None)
    lp.__dict__.pop(CUTS_ATTR, None)
    if "fxqat_step" in lp._buffers:
        del lp._buffers["fxqat_step"]
    return lp.eval()


@torch.no_grad()
def convert_eager(qm: nn.Module) -> nn.Module:
    """The inference model of an eager-root QAT model: no partner or paths, weights replaced by their fake-quantized
    values (weight quantizers then disabled), activation quantizers kept, everything frozen in eval mode."""
    lp = lp_eager_copy(qm)
    for m in lp.modules():
        if is_quantized_layer(m):
            entry = type(m)._fxqat_entry
            w = getattr(m, entry.weight)
            q = getattr(m, WEIGHT_QUANT)
            wq = entry.to_out_in(q(entry.to_out_in(w))) if entry.to_out_in else q(w)
            w.copy_(wq)
            q.enable_fake_quant(False)
        elif param_quantizers(m):
            freeze_params(m)
        if isinstance(m, GraphRegion):
            for node in m.graph.nodes:
                if node.meta.get(QROLE) == "weight" and node.args and getattr(node.args[0], "op", "") == "get_attr":
                    q = m.get_submodule(node.target)
                    w = m.get_parameter(node.args[0].target)
                    w.copy_(q(w))
                    q.enable_fake_quant(False)
    for p in lp.parameters():
        p.requires_grad_(False)
    for q in lp.modules():
        if isinstance(q, Quantizer):
            q.eval()
    return lp
