"""torch.ao interop: fxqat quantizers inside a ``QConfigMapping`` (inward), and trained fxqat models handed to
torch.ao's FX flow as reference quantized models (outward).

**Inward.** :func:`to_qconfig_mapping` turns a :class:`fxqat.QATConfig` into a torch.ao ``QConfigMapping`` whose
fake-quantizers are fxqat quantizers (LSQ, QIL, PACT, ...), for ``prepare_qat_fx``. torch.ao's native backend only
quantizes activations on ``quint8``, so activation quantizers are unsigned unless ``config.act_signed is True``.
torch.ao's *non-decomposed* reference ops quantize on the full 8-bit carrier: below 8 bits the fake-quant model
clips to the real range, the ``convert_to_reference_fx`` model does not (use :func:`to_torch_ao` for exact parity).

**Outward.** :func:`to_torch_ao` rebuilds an FP copy of a trained fxqat model in module form, with an
``nn.Hardtanh`` at each activation quantizer (the clip to the real bit-width's range; on ``quint8``/``qint8``
carriers torch.ao quantizes on the full 8-bit range), gives torch.ao one ``QConfig`` per layer whose fake-quantizer
holds fxqat's learned scale and zero point (:class:`FixedAffineFakeQuantize`), and runs ``prepare_qat_fx`` then
``convert_to_reference_fx`` with a backend config that quantizes exactly what fxqat quantized: layer weights and
layer inputs, not layer outputs (no conv-bn fusion either, since fxqat quantizes the unfused weight).

Example:
    >>> import torch, torch.nn as nn, fxqat
    >>> from fxqat.export import to_torch_ao
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    >>> x = torch.randn(4, 3, 8, 8)
    >>> qm = fxqat.prepare_qat(net, (x,), fxqat.QATConfig(w_bits=4, a_bits=4)); _ = qm(x); qm = qm.eval()
    >>> ref = to_torch_ao(qm, (x,))
    >>> bool((ref(x) - qm(x)).abs().max() < 1e-4)
    True
"""

from __future__ import annotations

import operator
import warnings
from typing import Any, Dict, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import FakeQuantizeBase, PlaceholderObserver, QConfig, QConfigMapping

from fxqat.config import QATConfig
from fxqat.export.affine import (
    AffineParams,
    ExportError,
    QuantPoint,
    cpu_inputs,
    fp_module,
    require_float32,
    safe_name,
)
from fxqat.method_registry import get_method

__all__ = ["FixedAffineFakeQuantize", "to_qconfig_mapping", "to_torch_ao", "fxqat_backend_config"]

_FP = PlaceholderObserver.with_args(dtype=torch.float)


class FixedAffineFakeQuantize(FakeQuantizeBase):
    """A torch.ao fake-quantizer with fixed, exported parameters (per tensor or per channel, any range <= 8 bits).

    Args:
        params: the :class:`~fxqat.export.affine.AffineParams` to carry.
    """

    def __init__(self, params: AffineParams, **kwargs: Any) -> None:
        super().__init__()
        self.register_buffer("scale", params.scale.clone())
        self.register_buffer("zero_point", params.zero_point.clone())
        self.quant_min, self.quant_max = params.qmin, params.qmax
        self.dtype = params.torch_qdtype
        self.qscheme = params.qscheme
        self.ch_axis = params.ch_axis if params.ch_axis is not None else -1
        self.is_dynamic = False

    @property
    def activation_post_process(self) -> "FixedAffineFakeQuantize":
        return self  # torch.ao's backend checks read quant_min/quant_max here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.fake_quant_enabled[0]):
            return x
        if self.ch_axis >= 0:
            return torch.fake_quantize_per_channel_affine(
                x, self.scale, self.zero_point, self.ch_axis, self.quant_min, self.quant_max
            )
        return torch.fake_quantize_per_tensor_affine(
            x, float(self.scale), int(self.zero_point), self.quant_min, self.quant_max
        )

    def calculate_qparams(self, **kwargs: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.scale, self.zero_point

    def extra_repr(self) -> str:
        return f"qmin={self.quant_min}, qmax={self.quant_max}, dtype={self.dtype}, per_channel={self.ch_axis >= 0}"


def fxqat_backend_config():
    """A torch.ao ``BackendConfig`` for fxqat's semantics: conv/linear with quantized weights and float
    input/output (their input is quantized by the ``nn.Hardtanh`` in front), ``nn.Hardtanh`` quantized on its input
    and sharing that observer with its output; no fusion patterns."""
    import torch.ao.nn.qat as nnqat
    import torch.ao.nn.quantized.reference as nnqr
    from torch.ao.quantization.backend_config import BackendConfig, BackendPatternConfig, DTypeConfig, ObservationType

    weighted = [
        DTypeConfig(input_dtype=torch.float, output_dtype=torch.float, weight_dtype=wd, bias_dtype=torch.float)
        for wd in (torch.qint8, torch.quint8)
    ]
    act = [DTypeConfig(input_dtype=d, output_dtype=d) for d in (torch.quint8, torch.qint8)]
    cfg = BackendConfig("fxqat")
    layers = [
        (nn.Conv1d, nnqat.Conv1d, nnqr.Conv1d), (nn.Conv2d, nnqat.Conv2d, nnqr.Conv2d),
        (nn.Conv3d, nnqat.Conv3d, nnqr.Conv3d), (nn.Linear, nnqat.Linear, nnqr.Linear),
    ]
    for fp, qat, ref in layers:
        for pattern in (fp, qat):
            pc = (
                BackendPatternConfig(pattern)
                .set_observation_type(ObservationType.OUTPUT_USE_DIFFERENT_OBSERVER_AS_INPUT)
                .set_dtype_configs(weighted)
                .set_root_module(fp)
                .set_reference_quantized_module(ref)
            )
            if pattern is fp:
                pc.set_qat_module(qat)
            cfg.set_backend_pattern_config(pc)
    cfg.set_backend_pattern_config(
        BackendPatternConfig(nn.Hardtanh)
        .set_observation_type(ObservationType.OUTPUT_SHARE_OBSERVER_WITH_INPUT)
        .set_dtype_configs(act)
    )
    return cfg


# ------------------------------------------------------------------------------------------------ inward
def _qconfig(config: QATConfig, w_bits: int, a_bits: int, method: Optional[str], act_signed: Optional[bool]) -> QConfig:
    w_spec = config.spec_for("weight", bits=w_bits, method=method)
    signed = act_signed if act_signed is not None else (config.act_signed is True)
    a_spec = config.spec_for("act", bits=a_bits, method=method, signed=signed)
    return QConfig(
        activation=get_method(a_spec.method).with_args(spec=a_spec),
        weight=get_method(w_spec.method).with_args(spec=w_spec),
    )


def to_qconfig_mapping(config: QATConfig, model: Optional[nn.Module] = None) -> QConfigMapping:
    """A torch.ao ``QConfigMapping`` that uses fxqat quantizers, for ``prepare_qat_fx``.

    The global ``QConfig`` has ``config``'s weight and activation quantizers. ``config.overrides`` whose ``match``
    is a module type become ``set_object_type`` entries; name globs need ``model`` (they are expanded over its
    ``named_modules()``, first match wins); ``skip=True`` maps to ``None`` (kept in FP). ``first_last`` is an fxqat
    graph policy and is not expressed here (add an ``Override`` by name instead).

    Example:
        >>> import torch, torch.nn as nn, fxqat
        >>> from torch.ao.quantization.quantize_fx import prepare_qat_fx
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
        >>> mapping = to_qconfig_mapping(fxqat.QATConfig(w_bits=4, a_bits=4, method="lsq"))
        >>> pm = prepare_qat_fx(net.train(), mapping, (torch.randn(2, 3, 8, 8),))
        >>> type(pm.get_submodule("0").weight_fake_quant).__name__
        'LSQQuantizer'
    """
    if not isinstance(config, QATConfig):
        raise TypeError(f"to_qconfig_mapping expects a fxqat.QATConfig, got {type(config).__name__}.")
    mapping = QConfigMapping().set_global(_qconfig(config, config.w_bits, config.a_bits, None, None))
    by_name = [o for o in config.overrides if isinstance(o.match, str)]
    if by_name and model is None:
        raise ValueError(
            f"to_qconfig_mapping: override(s) {[o.match for o in by_name]} match module names; pass the model, "
            "e.g. to_qconfig_mapping(config, model=net)."
        )

    def qc(o):
        if o.skip:
            return None
        signed = o.act_signed if o.act_signed is not None else None
        return _qconfig(config, o.w_bits or config.w_bits, o.a_bits or config.a_bits, o.method, signed)

    for o in reversed([o for o in config.overrides if isinstance(o.match, type)]):  # first match wins
        mapping.set_object_type(o.match, qc(o))
    if model is not None:
        for name, mod in model.named_modules():
            if not name:
                continue
            o = next((o for o in config.overrides if o.matches(name, mod)), None)
            if o is not None and isinstance(o.match, str):
                mapping.set_module_name(name, qc(o))
    return mapping


# ------------------------------------------------------------------------------------------------ outward
_LAYER_FNS = {F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d, F.linear: nn.Linear}


def _act_point(gm: fx.GraphModule, node: fx.Node, point: QuantPoint) -> fx.Node:
    if point.kind == "weight":
        return node.args[0]  # pre-quantized in the copy; torch.ao re-quantizes it on the same grid
    lo, hi = point.params.clip_range()
    name = f"fxqat_act.{safe_name(point.quantizer.split('.')[-1])}"
    if not hasattr(gm, "fxqat_act"):
        gm.add_module("fxqat_act", nn.Module())
    gm.add_submodule(name, nn.Hardtanh(float(lo), float(hi)))
    off = point.params.offset
    x = gm.graph.call_function(operator.sub, (node.args[0], off)) if off else node.args[0]
    y = gm.graph.call_module(name, (x,))
    return gm.graph.call_function(operator.add, (y, off)) if off else y


def _is_module_call(node: fx.Node, mod: nn.Module, layer: str) -> bool:
    """Whether ``node`` (``F.conv*``/``F.linear``) computes exactly ``mod(node.args[0])``."""
    args, w = node.args, node.args[1]
    if node.kwargs or str(w.target) != f"{layer}.weight":
        return False
    b = args[2] if len(args) > 2 else None
    if mod.bias is None:
        if b is not None:
            return False
    elif not (isinstance(b, fx.Node) and b.op == "get_attr" and str(b.target) == f"{layer}.bias"):
        return False
    if isinstance(mod, nn.Linear):
        return len(args) <= 3
    if mod.padding_mode != "zeros":
        return False
    return tuple(args[3:]) == (mod.stride, mod.padding, mod.dilation, mod.groups)


def _to_module_form(gm: fx.GraphModule, points: Dict[str, QuantPoint]) -> Dict[str, QuantPoint]:
    """Turn fxqat's ``F.conv2d(x, w, b, ...)`` layers back into ``self.conv(x)``; return layer name -> weight point."""
    by_source = {p.source: p for p in points.values() if p.kind == "weight"}
    layers: Dict[str, QuantPoint] = {}
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and len(node.args) > 1 and isinstance(node.args[1], fx.Node):
            w = node.args[1]
            if w.op != "get_attr" or str(w.target) not in by_source:
                continue
            layer = node.meta.get("fxqat.module")
            cls = _LAYER_FNS.get(node.target)
            mod = gm.get_submodule(layer) if layer else None
            if cls is None or type(mod) is not cls or not _is_module_call(node, mod, layer):
                raise ExportError(
                    f"to_torch_ao: layer {layer or node.name!r} ({getattr(node.target, '__name__', node.target)}) "
                    "is not a plain nn.Conv1d/2d/3d or nn.Linear module call, which torch.ao's FX flow needs to "
                    "carry its weight scale; use fxqat.export.to_pt2e or to_onnx for this model."
                )
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(layer, (node.args[0],))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            layers[layer] = by_source[str(w.target)]
    missing = [p.quantizer for p in by_source.values() if p not in layers.values()]
    if missing:
        raise ExportError(f"to_torch_ao: weight quantizer(s) {missing} do not feed a conv/linear module layer.")
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return layers


def to_torch_ao(qm: fx.GraphModule, example_inputs: Any) -> fx.GraphModule:
    """A torch.ao reference quantized model (``convert_to_reference_fx``) carrying ``qm``'s learned parameters.

    Every quantized conv/linear becomes a torch.ao reference module (``torch.ao.nn.quantized.reference``) whose
    weight ``quantize``/``dequantize`` uses fxqat's learned scale and zero point; every activation quantizer
    becomes ``Hardtanh(lo, hi) -> quantize_per_tensor -> dequantize`` with its learned scale and zero point
    (``lo, hi`` = the real bit-width's range). Requires <= 8 bits and affine quantizers.

    Raises:
        ExportError: naming the module/quantizer that cannot be represented, or a bfloat16/float16 model.
    """
    from torch.ao.quantization.quantize_fx import convert_to_reference_fx, prepare_qat_fx

    require_float32(qm, "to_torch_ao", "torch.ao's quantize_per_tensor takes float32 tensors only.")
    inputs = cpu_inputs(example_inputs)
    fp, points = fp_module(qm, _act_point)
    layers = _to_module_form(fp, points)
    mapping = QConfigMapping()
    for layer, p in layers.items():
        weight = FixedAffineFakeQuantize.with_args(params=p.params)
        mapping.set_module_name(layer, QConfig(activation=_FP, weight=weight))
    for p in points.values():
        if p.kind == "act":
            fq = FixedAffineFakeQuantize.with_args(params=p.params)
            mapping.set_module_name(f"fxqat_act.{safe_name(p.quantizer.split('.')[-1])}", QConfig(fq, _FP))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        prepared = prepare_qat_fx(fp.train(), mapping, inputs, backend_config=fxqat_backend_config())
        prepared.eval()
        ref = convert_to_reference_fx(prepared, backend_config=fxqat_backend_config())
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref
