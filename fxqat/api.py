"""The public one-liners: ``prepare_qat``, ``quantizers``, ``set_quantization``, ``calibrate``, ``convert``.

Example:
    >>> import torch, torchvision, fxqat
    >>> model = torchvision.models.resnet18(num_classes=10)
    >>> x = torch.randn(2, 3, 64, 64)
    >>> qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(w_bits=4, a_bits=4))
    >>> qm(x).shape
    torch.Size([2, 10])
    >>> sum(q.kind == "weight" for q in fxqat.named_quantizers(qm).values())
    21
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

from fxqat.capture.eager_model import convert_eager, eager_blocks, is_eager_model, prepare_eager
from fxqat.capture.hierarchy import CAPTURE_ATTR
from fxqat.capture.layer_quant import is_quantized_layer
from fxqat.capture.lora import has_lora_layers, pin_deepcopy
from fxqat.capture.lora_merge import merge_lora, peft_inner, prefixed_report
from fxqat.capture.param_graph import finish_graph_params, plan_graph_params
from fxqat.capture.param_quant import freeze_params
from fxqat.capture.shapes import propagate_shapes
from fxqat.config import HybridConfig, QATConfig, track_overrides, warn_unmatched_overrides
from fxqat.graph.blocks import Block, partition
from fxqat.mixed.allocate import Allocation
from fxqat.passes.annotate import annotate, is_weight_layer_node
from fxqat.passes.build_hybrid import build_hybrid, mark_cuts
from fxqat.passes.convert import convert_graph
from fxqat.passes.insert_quant import CONTAINER, QROLE, insert_quant
from fxqat.passes.kv_cache import quantize_kv, warn_if_no_kv
from fxqat.passes.normalize import normalize
from fxqat.quantizers.control import calibrate, named_quantizers, set_quantization, trainable_parameters
from fxqat.trace import TraceFailure, trace

__all__ = [
    "prepare_qat", "named_quantizers", "set_quantization", "calibrate", "convert", "trainable_parameters",
    "prepare_fp_graph", "find_blocks",
]

log = logging.getLogger(__name__)


def _as_tuple(example_inputs: Any) -> Tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise TypeError(
            f"example_inputs must be a tuple of the model's positional inputs (e.g. (x,)), got "
            f"{type(example_inputs).__name__}."
        )
    return example_inputs


def prepare_fp_graph(
    model: nn.Module,
    example_inputs: Any,
    config: Optional[QATConfig] = None,
    inplace: bool = False,
    concrete_args: Optional[Dict[str, Any]] = None,
) -> fx.GraphModule:
    """Trace and normalise ``model`` (no quantizers yet), with shape metadata from ``example_inputs``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxqat expects a torch.nn.Module, got {type(model).__name__}: pass your model object.")
    config = config or QATConfig()
    inputs = _as_tuple(example_inputs)
    work = model if inplace else copy.deepcopy(model)
    gm = trace(work, concrete_args, config.leaf_modules)
    gm = normalize(gm)
    propagate_shapes(gm, inputs, type(model).__name__)
    gm.train(model.training)
    return gm


def prepare_qat(
    model: nn.Module,
    example_inputs: Any,
    config: Optional[QATConfig] = None,
    inplace: bool = False,
    concrete_args: Optional[Dict[str, Any]] = None,
    example_kwargs: Optional[Dict[str, Any]] = None,
) -> nn.Module:
    """Turn ``model`` into a QAT model: capture, annotate, insert quantizers, and (optionally) build hybrid paths.

    When the root forward traces, the result is a ``torch.fx.GraphModule``. When it does not (a Hugging Face model,
    data-dependent Python), capture is hierarchical (docs/capture.md): the result is a copy of ``model`` (same class,
    same module tree) whose traceable children are graph regions and whose other weight layers are quantized in
    place; ``model.fxqat_capture`` reports which region is which.

    Args:
        model: any ``nn.Module``; it is not modified unless ``inplace=True``.
        example_inputs: a tuple of the model's positional inputs (one small batch).
        config: a :class:`~fxqat.config.QATConfig` (default: LSQ W4A4, first/last layer at 8 bits), or the
            ``(config, allocation)`` pair :func:`fxqat.allocate_bits` returns.
        inplace: work on ``model`` itself instead of a copy (the result then shares its modules).
        concrete_args: non-tensor arguments to specialise while tracing.
        example_kwargs: keyword inputs of the example call (e.g. ``{"attention_mask": mask}``); the captured graph
            regions are specialised to how the model is called with them.

    Returns:
        A module whose output has the structure of ``model``'s; with ``config.hybrid`` it returns
        ``HybridOutput(lp, paths, fp)`` in train mode.

    Raises:
        ValueError: ``model`` was already prepared (it holds fxqat quantizers).

    Warns:
        UnmatchedOverrideWarning: an ``Override`` of ``config`` decides no layer (its pattern matches no quantizable
            layer, or earlier overrides take all of them); the message names the pattern and the closest layer names.

    Example:
        >>> import torch, torch.nn as nn, fxqat
        >>> qm = fxqat.prepare_qat(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), (torch.randn(2, 4),))
        >>> sorted(fxqat.named_quantizers(qm))
        ['fxqat_quant.a__1', 'fxqat_quant.a_input_1', 'fxqat_quant.w_0', 'fxqat_quant.w_2']
    """
    config = config or QATConfig()
    if isinstance(config, tuple) and len(config) == 2 and isinstance(config[1], Allocation):
        config = config[0]  # what fxqat.allocate_bits returns: (config, allocation)
    if not isinstance(config, QATConfig):
        raise TypeError(f"config must be a fxqat.QATConfig, got {type(config).__name__}.")
    _check_not_prepared(model)
    with track_overrides() as use:
        qm = _prepare(model, example_inputs, config, inplace, concrete_args, example_kwargs)
    warn_unmatched_overrides(config, use, type(model).__name__)
    warn_if_no_kv(qm, config.kv_bits)
    return qm


def _prepare(model: nn.Module, example_inputs: Any, config: QATConfig, inplace: bool,
             concrete_args: Optional[Dict[str, Any]], example_kwargs: Optional[Dict[str, Any]]) -> nn.Module:
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise TypeError(f"example_kwargs must be a dict of keyword inputs, got {type(example_kwargs).__name__}.")
    if peft_inner(model) is not None and has_lora_layers(model):  # PEFT's wrapper: capture starts at its model
        work = model if inplace else copy.deepcopy(model)
        prefix, inner = peft_inner(work)
        _prepare(inner, example_inputs, config, True, concrete_args, example_kwargs)  # in place (eager: LoRA)
        setattr(work, CAPTURE_ATTR, prefixed_report(getattr(inner, CAPTURE_ATTR), prefix + "."))
        pin_deepcopy(work)
        return work.train(model.training)
    try:
        if example_kwargs:
            raise TraceFailure("the example call passes keyword arguments")
        if has_lora_layers(model):  # LoRA layers are quantized in place (fxqat.capture.lora)
            if config.hybrid is not None:
                raise ValueError(f"{type(model).__name__} holds LoRA layers: block replacement (QATConfig.hybrid) is "
                                 "not supported with LoRA; train with distillation (fxqat.kd_loss) instead.")
            raise TraceFailure("the model holds LoRA layers (their base layers are quantized in place)")
        gm = prepare_fp_graph(model, example_inputs, config, inplace, concrete_args)
    except TraceFailure as exc:
        reason = _root_reason(exc)
        log.info("fxqat: the root forward of %s runs eagerly (%s); capturing its children", type(model).__name__,
                 reason)
        work = model if inplace else copy.deepcopy(model)
        fp = copy.deepcopy(model) if config.hybrid is not None and config.hybrid.partner == "frozen" else None
        qm = prepare_eager(work, _as_tuple(example_inputs), dict(example_kwargs or {}), config, reason, fp)
        qm.train(model.training)
        return qm
    plan, uses = plan_graph_params(model, _as_tuple(example_inputs), config)  # weights that are no layer modules
    annotate(gm, config, fp_weights=plan.fp_layer_weights)
    n_layers = sum(1 for n in gm.graph.nodes if is_weight_layer_node(n))
    if n_layers == 0:
        log.warning("fxqat: %s has no conv/linear layer to quantize; the model is returned unchanged.",
                    type(model).__name__)
    fp_graph = None
    if config.hybrid is not None:
        fp_graph = mark_cuts(gm, config)
    insert_quant(gm, config)
    if config.kv is not None:
        quantize_kv(gm, config.kv.bits, config.kv.granularity)
    finish_graph_params(gm, plan, uses, config)
    if config.hybrid is not None:
        gm = build_hybrid(gm, fp_graph, config.hybrid)
    gm.train(model.training)
    return gm


def _check_not_prepared(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxqat expects a torch.nn.Module, got {type(model).__name__}: pass your model object.")
    found = next((n for n, m in model.named_modules()  # quantizers fxqat inserted (a user's own quantizer is fine)
                  if is_quantized_layer(m) or is_eager_model(m) or hasattr(m, CONTAINER)), None)
    if found is not None:
        raise ValueError(
            f"{type(model).__name__} is already prepared for QAT (fxqat quantizers at {found or '<root>'!r}); preparing "
            "it again would stack a second set of quantizers. Pass the original FP model to prepare_qat, or call "
            "fxqat.convert on the prepared one for inference."
        )


def _root_reason(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    text = f"{type(cause).__name__}: {cause}".strip().splitlines()
    return text[0][:200] if text else type(cause).__name__


def find_blocks(
    model: nn.Module,
    example_inputs: Any,
    config: Optional[QATConfig] = None,
    concrete_args: Optional[Dict[str, Any]] = None,
) -> list:
    """The blocks block replacement would use for ``model`` (a list of :class:`fxqat.graph.Block`).

    Blocks end at residual boundaries (nodes every input-to-output path passes through) and each holds at least one
    layer that ``config`` quantizes; ``config.hybrid`` (if set) supplies ``max_blocks``, ``boundaries`` and ``cuts``
    (``"layers"``: one block per layer of a ``ModuleList``/``Sequential`` stack; ``"residual"``: every residual
    boundary, on eager-root models also inside their traced layers). Each block's ``modules`` holds every weight
    layer it computes, and each quantized weight layer is in exactly one block.
    A model ``prepare_qat`` returned gives the blocks of the FP model it was prepared from (``example_inputs`` and
    ``config`` are then not used).

    Example:
        >>> import torch, torchvision, fxqat
        >>> blocks = fxqat.find_blocks(torchvision.models.resnet18(), (torch.randn(1, 3, 64, 64),))
        >>> [b.name for b in blocks][:3]
        ['stem', 'layer1.0', 'layer1.1']
    """

    config = config or QATConfig()
    h = config.hybrid or HybridConfig()
    if is_eager_model(model):
        return eager_blocks(model, h.cuts)
    if isinstance(model, fx.GraphModule) and named_quantizers(model):  # prepared already: the partition of its FP graph
        return _prepared_blocks(model)
    try:
        gm = prepare_fp_graph(model, example_inputs, config, concrete_args=concrete_args)
    except TraceFailure:
        return eager_blocks(prepare_qat(model, example_inputs, config.with_(hybrid=None)), h.cuts)
    annotate(gm, config)
    return partition(gm, is_weight_layer_node, max_blocks=h.max_blocks, boundaries=h.boundaries,
                     cuts="layers" if h.cuts == "layers" else "residual")


def _prepared_blocks(gm: fx.GraphModule) -> List[Block]:
    """The blocks of a prepared graph model (those of the FP model it came from).

    A hybrid model keeps the partition it was built with; for a plain one the graph is partitioned with every
    quantizer node read as the identity (so the cuts fall where they fall in the FP graph).
    """
    if gm.meta.get("fxqat.blocks"):
        return list(gm.meta["fxqat.blocks"])
    graph = copy.deepcopy(gm.graph)
    for node in list(graph.nodes):
        if node.op == "call_module" and QROLE in node.meta:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    return partition(fx.GraphModule(gm, graph), is_weight_layer_node)


def convert(qm: fx.GraphModule) -> fx.GraphModule:
    """The LP inference model: no hybrid paths or FP partner, weights pre-quantized, quantizer state frozen.

    Pre-quantized weights are non-persistent buffers, so ``convert(qm).state_dict()`` has exactly the keys of a
    plain ``prepare_qat`` model (and loads into one); loading a state_dict into the converted model refreshes them.
    An eager-root model (hierarchical capture) keeps its module tree: its weights are replaced by their
    fake-quantized values and its weight quantizers disabled.
    """
    if has_lora_layers(qm):  # adapters first merged into their base layers: exactly the codes training saw
        qm = merge_lora(qm)
    if is_eager_model(qm):
        return convert_eager(qm)
    return convert_graph(qm, freeze_params)
