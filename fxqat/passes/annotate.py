"""annotate: decide, per node, which tensors get which quantizer.

A *quantized layer* is one of

* ``"module"``: a ``call_module`` of ``nn.Conv{1,2,3}d``, ``nn.ConvTranspose{1,2,3}d`` or ``nn.Linear`` (or a subclass
  that keeps the base ``forward``) with zero padding mode; ``insert_quant`` rewrites it to its functional form with
  a quantized weight;
* ``"functional"``: a ``call_function`` of ``F.linear`` / ``F.conv*`` / ``F.conv_transpose*`` (e.g. inside attention
  code, or a conv subclass with its own ``forward`` that was traced through, like weight standardisation: the
  weight quantizer then sees the weight the layer really uses);
* ``"opaque"``: a leaf ``call_module`` whose descendants hold conv/linear weights (``nn.MultiheadAttention``, modules
  the tracer could not enter): those weights are quantized by substitution, the module's own code still runs.

With ``config.quantize_matmuls``, products of two activations (attention's ``Q @ K^T``, ``P @ V``,
``scaled_dot_product_attention``; :mod:`fxqat.passes.matmuls`) are annotated too, style ``"matmul"``: no weight, an
activation spec for each operand; they are not weight layers (no first/last policy, no gradient quantizer, not
counted by the block partition).

The weights of each layer and the activation it reads (its first argument) get :class:`~fxqat.config.QuantSpec`s.
First/last policy: the first and last quantized layer in topological order (those named by
``config.first_last_layers``) use ``config.first_last`` bits (or stay FP when it is None). With
``config.act=None`` no activation is quantized (weight-only). Per-group weights are checked here: a weight
whose input size is not a multiple of ``group_size`` raises a ValueError naming the layer. Overrides match the layer's owning module name. The signedness of an activation comes from
its producer: outputs of ReLU-like functions (through pooling, reshapes and dropout) are unsigned, others are
decided from the first batch (``config.act_signed="auto"``).

Results: ``node.meta["fxqat.qspec"]`` holds a :class:`LayerQuant`.

Example:
    >>> import torch.nn as nn
    >>> from fxqat.config import QATConfig
    >>> from fxqat.trace import trace
    >>> gm = annotate(trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.Linear(2, 2))),
    ...               QATConfig(w_bits=3, first_last=None))
    >>> [(n.target, n.meta["fxqat.qspec"].weights[0][1].bits) for n in gm.graph.nodes if "fxqat.qspec" in n.meta]
    [('2', 3)]
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, replace
from typing import Collection, Dict, List, Optional, Tuple, Union

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxqat.config import Override, QATConfig, QuantSpec
from fxqat.graph.modinfo import input_free_nodes, parameter_sources
from fxqat.layer_registry import weight_layer_entry
from fxqat.passes.matmuls import matmul_inputs
from fxqat.passes.signedness import is_float_tensor, producer_unsigned
from fxqat.quantizers.base import Quantizer

__all__ = ["LayerQuant", "annotate", "annotated_layers", "is_weight_layer_node", "layer_style", "QMETA",
           "WEIGHT_FUNCTIONS"]

QMETA = "fxqat.qspec"

_CONV_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
_BASE_FORWARDS = {c.forward for c in _CONV_LINEAR}
#: functional layers and the position of their weight argument
WEIGHT_FUNCTIONS = {
    F.linear: 1, F.conv1d: 1, F.conv2d: 1, F.conv3d: 1,
    F.conv_transpose1d: 1, F.conv_transpose2d: 1, F.conv_transpose3d: 1,
}
_NOT_LAYERS = {getattr, operator.getitem, len}


@dataclass(frozen=True)
class LayerQuant:
    """The quantization decision for one layer node.

    Attributes:
        style: ``"module"``, ``"functional"`` or ``"opaque"`` (see the module docstring).
        owner: qualified name of the module the layer belongs to (used for names, overrides, first/last).
        weights: ``(where, spec)`` pairs; ``where`` is the weight's argument position (functional), ``"weight"``
            (module) or a parameter path inside the opaque module.
        act: the spec of the layer's input activation, or None to leave it in FP.
        first_last: the layer got its bits from the ``first_last`` policy (its gradient quantizer follows it).
        inputs: further activation inputs ``(argument position, spec)`` after the first (style ``"matmul"``: the
            second operand of ``Q @ K^T``, the key and value of ``scaled_dot_product_attention``).
    """

    style: str
    owner: str
    weights: Tuple[Tuple[Union[int, str], QuantSpec], ...]
    act: Optional[QuantSpec]
    first_last: bool = False
    inputs: Tuple[Tuple[int, QuantSpec], ...] = ()


def _check_groups(gm: fx.GraphModule, owner: str, where, spec: QuantSpec, style: str, node: fx.Node) -> None:
    """Raise a ValueError naming the layer when its weight does not split into ``spec.group_size`` groups."""
    if spec.granularity != "per_group":
        return
    path = f"{owner}.{where}" if style == "module" or style == "opaque" else None
    if style == "functional" and isinstance(where, int) and where < len(node.args):
        w = node.args[where]
        path = str(w.target) if isinstance(w, fx.Node) and w.op == "get_attr" else None
    try:
        weight = gm.get_parameter(path) if path else None
    except AttributeError:
        weight = None
    if weight is None:
        return
    n_in = weight.movedim(spec.ch_axis, 0)[0].numel()
    if n_in % spec.group_size:
        raise ValueError(
            f"layer {owner or node.name!r}: weight {path} of shape {tuple(weight.shape)} has {n_in} input elements "
            f"per output channel, not divisible by group_size={spec.group_size}; change group_size or add "
            f"fxqat.Override({owner!r}, skip=True) (or a per-channel override) for this layer."
        )


def layer_style(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    """The quantized-layer style of ``node``, or None when it is not a quantizable layer."""
    if node.op == "call_function" and _weight_positions(gm, node):
        return "functional"
    if node.op != "call_module":
        return None
    mod = gm.get_submodule(node.target)
    if isinstance(mod, _CONV_LINEAR) and type(mod).forward in _BASE_FORWARDS:
        plain_call = len(node.args) == 1 and not node.kwargs
        if getattr(mod, "padding_mode", "zeros") == "zeros" and plain_call:
            return "module"
    if _opaque_weights(mod):
        return "opaque"
    return None


def _weight_positions(gm: fx.GraphModule, node: fx.Node) -> List[int]:
    """Argument positions of a call_function that carry a layer weight.

    Known functional layers name their weight position; any other function (e.g. torchvision's ``fx.wrap``-ed
    ``shifted_window_attention``) counts when an argument is the ``weight`` of a conv/linear module.
    """
    if node.target in WEIGHT_FUNCTIONS:
        return [WEIGHT_FUNCTIONS[node.target]]
    if node.target in _NOT_LAYERS:  # reads a weight's attribute (``w.device``, ``w.shape``): not a layer
        return []
    found = []
    for i, a in enumerate(node.args):
        if isinstance(a, fx.Node) and a.op == "get_attr" and str(a.target).endswith(".weight"):
            owner = gm.get_submodule(str(a.target).rpartition(".")[0])
            if isinstance(owner, _CONV_LINEAR):
                found.append(i)
    return found


def _opaque_weights(mod: nn.Module) -> List[str]:
    """Parameter paths of the conv/linear-like weights held by a leaf module."""
    found = []
    for name, sub in mod.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(sub, Quantizer):  # already quantized (an eager region inside the leaf): nothing to add
            return []
        entry = weight_layer_entry(sub)
        if entry is not None:
            found.append(prefix + entry.weight)
        elif isinstance(sub, nn.MultiheadAttention):
            for p in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if isinstance(getattr(sub, p, None), nn.Parameter):
                    found.append(prefix + p)
    return found


def _owner(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    pos = _weight_positions(gm, node)
    w = node.args[pos[0]] if pos and len(node.args) > pos[0] else node.kwargs.get("weight")
    if isinstance(w, fx.Node) and w.op == "get_attr":
        return str(w.target).rpartition(".")[0]
    if isinstance(w, fx.Node):  # a transformed weight (weight standardisation): the module holding the parameter
        owners = {p.rpartition(".")[0] for p in parameter_sources(w, gm)}
        if len(owners) == 1:
            return owners.pop()
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack), "") if stack else ""


def annotate(
    gm: fx.GraphModule, config: QATConfig, prefix: str = "", first_last_names: Optional[Collection[str]] = None,
    fp_weights: Collection[str] = (),
) -> fx.GraphModule:
    """Write ``node.meta["fxqat.qspec"]`` on every layer to quantize (in place; returns ``gm``).

    Args:
        gm: the traced graph (a whole model, or a graph region of one).
        config: what to quantize.
        prefix: the qualified name of ``gm`` inside the user's model (``"model.layers.0."``), for overrides.
        first_last_names: qualified names of the model's first and last layer when ``gm`` is a region of a larger
            model (None: the first and last layer of ``gm`` itself).
        fp_weights: qualified parameter names (with ``prefix``) whose layers stay FP (mixture-of-experts routers,
            :func:`fxqat.capture.param_quant.plan_params`).
    """
    layers = [n for n in gm.graph.nodes if layer_style(gm, n) is not None]
    if first_last_names is None:
        first_last = set()
        if layers:
            first_last = {layers[i] for i, end in ((0, "first"), (-1, "last")) if end in config.first_last_layers}
    else:
        first_last = {n for n in layers if prefix + _owner(gm, n) in first_last_names}
    for node in layers:
        style = layer_style(gm, node)
        owner = _owner(gm, node)
        mod = gm.get_submodule(owner) if owner and style != "functional" else None
        ov: Optional[Override] = config.override_for(prefix + owner, mod)
        if ov is not None and ov.skip:
            continue
        w_bits = ov.w_bits if ov and ov.w_bits else None
        a_bits = ov.a_bits if ov and ov.a_bits else None
        by_policy = node in first_last and not (ov and (ov.w_bits or ov.a_bits))
        if by_policy:
            if config.first_last is None:
                continue
            w_bits = a_bits = config.first_last
        method = ov.method if ov else None
        if style == "functional":
            where: List[Union[int, str]] = list(_weight_positions(gm, node))
        elif style == "module":
            where = ["weight"]
        else:
            where = list(_opaque_weights(gm.get_submodule(node.target)))
        if fp_weights:  # routers stay FP; an opaque leaf may hold a router beside quantized layers
            where = [w for w in where if _weight_name(node, owner, w, style, prefix) not in fp_weights]
            if not where:
                continue
        try:
            wspec = config.spec_for("weight", bits=w_bits, method=method)
        except ValueError as e:
            raise ValueError(f"layer {owner or node.name!r}: {e}") from None
        if isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) or node.target in (
            F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
        ):
            wspec = QuantSpec(**{**wspec.__dict__, "ch_axis": 1})  # ConvTranspose weights are (in, out/groups, ...)
        for w in where:
            _check_groups(gm, owner, w, wspec, style, node)
        weights = tuple((w, wspec) for w in where)
        act = None
        x = node.args[0] if node.args else None
        if config.act is not None and isinstance(x, fx.Node) and is_float_tensor(x):
            act = _act_spec(gm, x, config, ov, owner or node.name, a_bits)
        node.meta[QMETA] = LayerQuant(style=style, owner=owner, weights=weights, act=act, first_last=by_policy)
    _one_spec_per_weight(gm, layers, prefix)
    if config.quantize_matmuls and config.act is not None:
        _annotate_matmuls(gm, config, prefix)
    return gm


def _parameter_at(gm: fx.GraphModule, node: fx.Node, lq: LayerQuant, where: Union[int, str]) -> Optional[nn.Parameter]:
    """The Parameter a layer's weight quantizer reads at ``where`` (None for a computed weight)."""
    if lq.style != "functional":
        path: Optional[str] = f"{node.target}.{where}"
    else:
        w = node.args[where] if isinstance(where, int) and where < len(node.args) else node.kwargs.get("weight")
        path = str(w.target) if isinstance(w, fx.Node) and w.op == "get_attr" else None
    try:
        return gm.get_parameter(path) if path else None
    except AttributeError:
        return None


def _one_spec_per_weight(gm: fx.GraphModule, nodes: List[fx.Node], prefix: str) -> None:
    """Give every use of one Parameter the same weight spec, so that it gets one weight quantizer.

    A layer called twice (or two layers sharing a weight) can fall under different bit-widths, e.g. a ``Linear``
    that is the first layer (``first_last`` bits) and is called again in the middle of the model. The highest
    precision wins (the first such use in graph order on a tie), with a warning naming the layer.
    """
    uses: Dict[int, List[Tuple[fx.Node, Union[int, str], QuantSpec]]] = {}
    for node in nodes:
        lq = node.meta.get(QMETA)
        for where, spec in lq.weights if lq is not None else ():
            p = _parameter_at(gm, node, lq, where)
            if p is not None:
                uses.setdefault(id(p), []).append((node, where, spec))
    for group in uses.values():
        if len({spec for _, _, spec in group}) < 2:
            continue
        best = max((spec for _, _, spec in group), key=lambda s: s.bits)
        layers = sorted({prefix + (node.meta[QMETA].owner or node.name) for node, _, _ in group})
        warnings.warn(
            f"fxqat.passes.annotate: the weight of layer(s) {', '.join(layers)} is used {len(group)} times with "
            f"different weight bit-widths ({', '.join(str(s.bits) for _, _, s in group)}); it gets one weight "
            f"quantizer at the highest precision, {best.bits} bits. Add an fxqat.Override for the layer to choose "
            f"otherwise.", stacklevel=2)
        for node, where, _ in group:
            lq = node.meta[QMETA]
            node.meta[QMETA] = replace(lq, weights=tuple((w, best if w == where else s) for w, s in lq.weights))


def _weight_name(node: fx.Node, owner: str, where: Union[int, str], style: str, prefix: str) -> Optional[str]:
    """The qualified name of the parameter a layer reads at ``where`` (None when it is not a plain parameter)."""
    if style != "functional":
        return f"{prefix}{owner}.{where}" if owner else f"{prefix}{where}"
    w = node.args[where] if isinstance(where, int) and where < len(node.args) else node.kwargs.get("weight")
    return f"{prefix}{w.target}" if isinstance(w, fx.Node) and w.op == "get_attr" else None


def _act_spec(gm: fx.GraphModule, x: fx.Node, config: QATConfig, ov: Optional[Override], owner: str,
              bits: Optional[int] = None) -> QuantSpec:
    """The spec of the activation quantizer on input ``x`` of layer ``owner``: signedness from the override, the
    config, or the producer (after a ReLU: unsigned); ``bits`` (default: the override's ``a_bits``, else the
    config's) and method from the override."""
    if bits is None and ov is not None and ov.a_bits:
        bits = ov.a_bits
    if ov is not None and ov.act_signed is not None:
        signed: Optional[bool] = ov.act_signed
    elif config.act_signed != "auto":
        signed = bool(config.act_signed)
    else:
        signed = False if producer_unsigned(gm, x) else None
    try:
        return config.spec_for("act", bits=bits, method=ov.method if ov else None, signed=signed)
    except ValueError as e:
        raise ValueError(f"layer {owner!r}: {e}") from None


def _annotate_matmuls(gm: fx.GraphModule, config: QATConfig, prefix: str) -> None:
    """Style ``"matmul"``: both operands of activation products (:mod:`fxqat.passes.matmuls`) get act quantizers."""
    free = input_free_nodes(gm.graph)
    for node in gm.graph.nodes:
        positions = matmul_inputs(node, free)
        if not positions or QMETA in node.meta:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        last = next(reversed(stack.values())) if stack else ("", None)
        owner = str(last[0] if isinstance(last, tuple) else next(reversed(stack)))
        ov = config.override_for(prefix + owner, None)
        if ov is not None and ov.skip:
            continue
        specs = tuple((i, _act_spec(gm, node.args[i], config, ov, owner or node.name)) for i in positions
                      if is_float_tensor(node.args[i]))
        if len(specs) != len(positions):
            continue
        node.meta[QMETA] = LayerQuant(style="matmul", owner=owner, weights=(), act=specs[0][1], inputs=specs[1:])


def is_weight_layer_node(node: fx.Node) -> bool:
    """Whether ``annotate`` marked ``node`` as a quantized weight layer (the block partition's granularity)."""
    lq = node.meta.get(QMETA)
    return lq is not None and bool(lq.weights)


def annotated_layers(gm: fx.GraphModule) -> Dict[fx.Node, LayerQuant]:
    """Every annotated node and its decision, in graph order."""
    return {n: n.meta[QMETA] for n in gm.graph.nodes if QMETA in n.meta}
