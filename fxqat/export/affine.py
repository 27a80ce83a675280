"""What every export path shares: the learned affine parameters of each quantizer, and an FP copy of the LP graph.

An fxqat QAT model computes ``conv(Q_a(x), Q_w(W))``: activation quantizers sit on the *inputs* of conv/linear
layers and weight quantizers on their weights. Exporting means reading, for each quantizer node of the graph, the
eval-mode affine equivalent ``(scale, zero_point, qmin, qmax)`` (:meth:`fxqat.Quantizer.affine_qparams`) and
rebuilding the graph with a deployment-specific "quantization point" in place of each quantizer:

* :func:`quant_points` reads and checks them (one :class:`QuantPoint` per quantizer node);
* :func:`fp_module` copies the LP graph (no hybrid paths), pre-quantizes every weight with its own fxqat quantizer
  (so a deployment re-quantizing it on the same grid is exact) and calls ``make_point`` for each quantizer node.

Their parameters, per-group weights and 8-bit carriers included, are :class:`~fxqat.export.params.AffineParams`
(``fxqat/export/params.py``).

Example:
    >>> import torch, torch.nn as nn, fxqat
    >>> from fxqat.export.affine import quant_points
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> qm = fxqat.prepare_qat(net, (torch.randn(8, 4),), fxqat.QATConfig(w_bits=4, a_bits=4, first_last=None))
    >>> _ = qm(torch.randn(8, 4))
    >>> [(p.kind, p.layer, p.params.qmin, p.params.qmax) for p in quant_points(qm).values()]
    [('act', '2', 0, 15), ('weight', '2', -8, 7)]
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

from fxqat.export.params import AffineParams, ExportError, affine_params
from fxqat.passes.insert_quant import QROLE, OpaqueWeightQuant
from fxqat.quantizers.base import Quantizer, is_narrow_float

__all__ = [
    "ExportError", "AffineParams", "QuantPoint", "quant_points", "fp_module", "safe_name", "cpu_inputs",
    "affine_params", "lp_graph_copy", "require_float32",
]


def safe_name(name: str) -> str:
    """``name`` as a Python identifier (for submodule and buffer names)."""
    return re.sub(r"\W", "_", name) or "root"



@dataclass(frozen=True)
class QuantPoint:
    """One quantizer node of an fxqat graph, with its exported parameters.

    Attributes:
        index: position among the model's quantization points (stable: graph order).
        node: name of the quantizer's call node in the prepared graph.
        quantizer: qualified name of the quantizer module (e.g. ``"fxqat_quant.w_conv1"``).
        kind: ``"weight"`` or ``"act"``.
        layer: qualified name of the (first) layer that reads it.
        params: the :class:`AffineParams`.
        source: for weights, the ``get_attr`` target of the latent weight (e.g. ``"conv1.weight"``), else None.
    """

    index: int
    node: str
    quantizer: str
    kind: str
    layer: str
    params: AffineParams
    source: Optional[str]



def _check_supported(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if isinstance(mod, OpaqueWeightQuant):
            raise ExportError(
                f"module {mod.module_path!r} ({type(mod.module).__name__}) is an opaque leaf module whose weights "
                "fxqat quantizes inside its own forward (OpaqueWeightQuant); integer export cannot see those "
                f"weights. Keep it in FP with QATConfig(overrides=(Override({mod.module_path!r}, skip=True),)), or "
                "make it traceable (remove it from leaf_modules)."
            )
        if not isinstance(mod, Quantizer):
            inner = [n for n, m in mod.named_modules() if isinstance(m, Quantizer)]
            if inner:
                raise ExportError(
                    f"module {node.target!r} ({type(mod).__name__}) is a leaf module with quantizer(s) inside it "
                    f"({', '.join(inner[:3])}); export only handles quantizers that are nodes of the fxqat graph. "
                    "Let fxqat quantize that module (do not put quantizers inside leaf modules)."
                )


def _layer_of(node: fx.Node) -> str:
    for user in node.users:
        if "fxqat.module" in user.meta:
            return str(user.meta["fxqat.module"])
    return next((u.name for u in node.users), node.name)


def quant_points(qm: fx.GraphModule) -> Dict[str, QuantPoint]:
    """The enabled weight and activation quantizers of ``qm``'s graph, by node name, with exported parameters.

    Gradient quantizers (identity in the forward pass) and disabled quantizers are left out.

    Raises:
        ExportError: naming the module or quantizer, for an opaque leaf with quantized weights, a leaf module with
            a quantizer inside, an uninitialised quantizer, a non-affine eval function or more than 8 bits.
    """
    if not isinstance(qm, fx.GraphModule):
        hint = ""
        if any(isinstance(m, Quantizer) for m in qm.modules()):
            hint = (" This model was prepared through hierarchical capture (its root forward runs eagerly, e.g. a "
                    "Hugging Face model), which the Q/DQ paths do not handle: use fxqat.export.to_torchao(qm) "
                    "(linear layers, weight-only or 8da4w) and torch.export / fxqat.export.to_executorch.")
        raise ExportError(f"expected the GraphModule returned by fxqat.prepare_qat, got {type(qm).__name__}.{hint}")
    _check_supported(qm)
    points: Dict[str, QuantPoint] = {}
    for node in qm.graph.nodes:
        if node.op != "call_module" or not isinstance(qm.get_submodule(node.target), Quantizer):
            continue
        q = qm.get_submodule(node.target)
        kind = node.meta.get(QROLE, q.kind)
        if kind == "grad" or not q._fq_on:
            continue
        layer = _layer_of(node)
        if not q.is_initialized:
            raise ExportError(
                f"quantizer {node.target!r} of layer {layer!r} was never initialised: run the model on data "
                "(fxqat.calibrate(qm, batches) or a training step) before exporting."
            )
        src = node.args[0]
        source = str(src.target) if isinstance(src, fx.Node) and src.op == "get_attr" else None
        params = affine_params(str(node.target), q, layer)
        points[node.name] = QuantPoint(len(points), node.name, str(node.target), kind, layer, params, source)
    return points


def require_float32(qm: nn.Module, where: str, reason: str) -> None:
    """Raise :class:`ExportError` when ``qm`` holds bfloat16/float16 parameters, for an export path whose format
    quantizes float32 tensors only (``reason`` says which); the message says to export a float32 copy, which has the
    same integer codes (quantizer state is float32, narrow weights widen exactly)."""
    narrow = sorted({str(p.dtype).replace("torch.", "") for p in qm.parameters() if is_narrow_float(p.dtype)})
    if narrow:
        raise ExportError(
            f"{where}: the model holds {'/'.join(narrow)} parameters and {reason} Export a float32 copy, "
            f"{where}(qm.float(), ...): fxqat's quantizer parameters are float32 and the weights widen exactly, so "
            "the integer codes are the same (or use fxqat.export.to_pt2e or to_torchao, which keep the dtype)."
        )


def cpu_inputs(example_inputs: Any) -> Tuple:
    """``example_inputs`` as a tuple, tensors moved to the CPU."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    return tuple(t.detach().cpu() if isinstance(t, torch.Tensor) else t for t in inputs)


MakePoint = Callable[[fx.GraphModule, fx.Node, QuantPoint], fx.Node]


def fp_module(qm: fx.GraphModule, make_point: MakePoint) -> Tuple[fx.GraphModule, Dict[str, QuantPoint]]:
    """An eval-mode copy of ``qm``'s LP graph with each quantizer node replaced by ``make_point(gm, node, point)``.

    ``make_point`` is called with the graph's insertion point set just before the quantizer node and returns the
    node that replaces it. Latent weights read by a weight quantizer are replaced (in the copy) by their fxqat
    eval-mode quantized values. Gradient and disabled quantizers become the identity. ``qm`` is not modified; the
    copy lives on the CPU (export artefacts are built there; move the result afterwards if needed).
    """
    points = quant_points(qm)
    grouped = [p for p in points.values() if p.params.per_group]
    if grouped:
        p = grouped[0]
        raise ExportError(
            f"quantizer {p.quantizer!r} of layer {p.layer!r} has per-group weights (group_size="
            f"{p.params.group_size}; {len(grouped)} such quantizer(s)): the Q/DQ export paths (to_torch_ao, "
            "to_pt2e, to_onnx) carry per-tensor or per-channel scales only. Use fxqat.export.to_torchao(qm) "
            "(torchao's IntxUnpackedToInt8Tensor, for torch.export / ExecuTorch: fxqat.export.to_executorch)."
        )
    gm = lp_graph_copy(qm, "FxqatExport")
    graph = gm.graph
    with torch.no_grad():
        for node in list(graph.nodes):
            if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), Quantizer):
                continue
            q = gm.get_submodule(node.target)
            point = points.get(node.name)
            if point is not None and point.kind == "weight" and point.source is not None:
                w = gm.get_parameter(point.source) if _is_param(gm, point.source) else _get_attr(gm, point.source)
                w.copy_(q.eval()(w))
            if point is None:
                repl = node.args[0]
            else:
                with graph.inserting_before(node):
                    repl = make_point(gm, node, point)
            node.replace_all_uses_with(repl)
            graph.erase_node(node)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    for p in gm.parameters():
        p.requires_grad_(False)
    return gm, points


def lp_graph_copy(qm: fx.GraphModule, class_name: str) -> fx.GraphModule:
    """An eval-mode CPU copy of ``qm``'s LP graph (no hybrid paths) over a copy of its modules; layer modules are
    kept whole (a ``GraphModule`` only copies the attributes its graph reads)."""
    root = copy.deepcopy(qm).cpu()
    graph = copy.deepcopy(qm.graph)
    gm = fx.GraphModule(root, graph, class_name)
    for layer in {str(n.meta["fxqat.module"]) for n in graph.nodes if n.meta.get("fxqat.module")}:
        try:
            gm.add_submodule(layer, root.get_submodule(layer))
        except AttributeError:
            pass
    gm.eval()
    return gm


def _is_param(gm: nn.Module, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def _get_attr(gm: nn.Module, target: str) -> torch.Tensor:
    *path, name = target.split(".")
    mod = gm.get_submodule(".".join(path)) if path else gm
    return getattr(mod, name)
