"""Hand-off to torchao: the linear layers of a trained fxqat model as torchao quantized tensors, with fxqat's scales.

:func:`to_torchao` returns an inference copy of a model from :func:`fxqat.prepare_qat` (plain or hybrid; a traced
``GraphModule`` or a hierarchically captured model such as a Hugging Face LM) in which no fxqat quantizer is left:
the weight of every quantized linear layer is a torchao ``IntxUnpackedToInt8Tensor`` (the b-bit codes stored as int8,
one scale and zero point per block) and the dynamic int8 per-token activation quantizer in front of it (8da4w)
becomes the tensor's ``activation_quantization="int8_asym_per_token"``. The tensor is built the way torchao's own
QAT convert step builds it from learned parameters: ``IntxUnpackedToInt8Tensor.from_hp`` with ``custom_scale`` and
``custom_zero_point`` (fxqat's learned scale, never recomputed), applied to fxqat's eval-mode quantized weight, so
the codes are exactly fxqat's and ``dequantize()`` gives fxqat's quantized weight back (checked for every layer).

That is the tensor torchao's ``quantize_`` makes for :func:`torchao_config`'s config
(``Int8DynamicActivationIntxWeightConfig`` for 8da4w, ``IntxWeightOnlyConfig`` for the int4/int3/int2 weight-only
presets), so torchao's deployment paths take the model as they take their own: ``torch.export`` and ExecuTorch's
XNNPACK lowering (:func:`fxqat.export.to_executorch`), ``torch.compile``, or repacking into ``IntxOpaqueTensor`` for
torchao's CPU kernels where that library is built.

Supported: linear layers (``nn.Linear`` modules and ``F.linear`` graph nodes) with an affine weight quantizer
(LSQ, ...) of 1-8 bits, per group (``block_size=(1, group_size)``) or per output channel (``(1, in_features)``),
and with either no activation quantizer or fxqat's 8-bit per-token ``"dynamic"`` one. Other quantized layers
(conv, static activation quantizers) raise :class:`~fxqat.export.ExportError` naming them; use the Q/DQ paths
(``to_pt2e``, ``to_onnx``) for those.

Example:
    >>> import torch, torch.nn as nn, fxqat
    >>> from fxqat.export import to_torchao
    >>> net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    >>> x = torch.randn(4, 64)
    >>> qm = fxqat.prepare_qat(net, (x,), fxqat.QATConfig.preset("8da4w")); _ = qm(x); qm = qm.eval()
    >>> tm = to_torchao(qm)
    >>> type(tm.get_parameter("0.weight")).__name__, bool(torch.equal(tm(x), fxqat.convert(qm)(x)))
    ('IntxUnpackedToInt8Tensor', True)
"""

from __future__ import annotations

import copy
import functools
from typing import Dict, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxqat.capture.eager_model import is_eager_model, lp_eager_copy
from fxqat.capture.hierarchy import CAPTURE_ATTR
from fxqat.capture.layer_quant import is_quantized_layer, unquantize_layer
from fxqat.capture.region import GraphRegion, restore_module
from fxqat.export.affine import ExportError, affine_params, lp_graph_copy
from fxqat.layer_registry import weight_layer_entry
from fxqat.passes.insert_quant import QROLE
from fxqat.quantizers.base import Quantizer, compute_dtype

__all__ = ["to_torchao", "torchao_config", "torchao_configs", "intx_weight", "PER_TOKEN_INT8"]

#: torchao's name of the dynamic activation quantization the 8da4w preset trains with
PER_TOKEN_INT8 = "int8_asym_per_token"


@functools.lru_cache(maxsize=None)
def _torchao():
    try:
        import torchao.quantization as tq
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("fxqat.export.to_torchao needs torchao: pip install 'fxqat[export]'.") from exc
    return tq


def _activation(aq: Optional[Quantizer], where: str) -> Optional[str]:
    """torchao's ``activation_quantization`` for the quantizer on a layer's input (None: weight-only)."""
    if aq is None or not aq._fq_on:
        return None
    if aq.is_dynamic and aq.granularity == "per_token" and aq.bits == 8:
        return PER_TOKEN_INT8
    raise ExportError(
        f"{where}: its input quantizer ({type(aq).__name__}, {aq.bits}-bit {aq.granularity}) has no torchao "
        "IntxUnpackedToInt8Tensor form, which carries weight-only layers and 8-bit dynamic per-token activations "
        "(the 8da4w preset) only. Export static activation quantizers with fxqat.export.to_pt2e or to_onnx."
    )


def _check_granularity(wq: Quantizer, where: str) -> None:
    if wq.granularity not in ("per_group", "per_channel") or wq.spec.ch_axis != 0:
        raise ExportError(
            f"{where}: {wq.granularity} weights (axis {wq.spec.ch_axis}) have no torchao intx config, which "
            "quantizes linear weights per group or per output channel (axis 0): use w_granularity='per_group' or "
            "'per_channel'."
        )


def _block_size(wq: Quantizer, shape: Tuple[int, ...], where: str) -> Tuple[int, int]:
    """``(1, group_size)`` per group, ``(1, in_features)`` per output channel."""
    _check_granularity(wq, where)
    if len(shape) != 2:
        raise ExportError(f"{where}: weight of shape {tuple(shape)} is not a 2-D linear weight.")
    return 1, int(wq.group_size if wq.granularity == "per_group" else shape[1])


def torchao_config(wq: Quantizer, aq: Optional[Quantizer] = None, where: str = "layer"):
    """The torchao config of the scheme that weight quantizer ``wq`` (and input quantizer ``aq``) train.

    ``Int8DynamicActivationIntxWeightConfig`` when ``aq`` is fxqat's 8-bit per-token dynamic quantizer, else
    ``IntxWeightOnlyConfig``; ``torch.int{bits}`` weights, ``PerGroup(group_size)`` or ``PerAxis(0)``, symmetric
    mapping when every zero point is 0. ``quantize_`` with it makes the same kind of tensor as :func:`to_torchao`,
    but with scales torchao computes itself from the latent weight: the hand-off keeps fxqat's instead.

    Example:
        >>> from fxqat.config import QATConfig
        >>> from fxqat.quantizers import make_quantizer
        >>> wq = make_quantizer(QATConfig.preset("int2_weight_only").spec_for("weight")); _ = wq(torch.randn(8, 64))
        >>> c = torchao_config(wq); type(c).__name__, c.weight_dtype, c.granularity.group_size
        ('IntxWeightOnlyConfig', torch.int2, 32)
    """
    tq = _torchao()
    _check_granularity(wq, where)
    gran = tq.PerGroup(int(wq.group_size)) if wq.granularity == "per_group" else tq.PerAxis(0)
    p = affine_params(where, wq, where)
    symmetric = p.signed and bool((p.zero_point == 0).all())
    mapping = tq.MappingType.SYMMETRIC if symmetric else tq.MappingType.ASYMMETRIC
    dtype = getattr(torch, f"int{wq.bits}")
    if _activation(aq, where) == PER_TOKEN_INT8:
        return tq.Int8DynamicActivationIntxWeightConfig(
            weight_dtype=dtype, weight_granularity=gran, weight_mapping_type=mapping
        )
    return tq.IntxWeightOnlyConfig(weight_dtype=dtype, granularity=gran, mapping_type=mapping)


@torch.no_grad()
def intx_weight(w: torch.Tensor, wq: Quantizer, aq: Optional[Quantizer] = None, where: str = "layer",
                scale_dtype: Optional[torch.dtype] = None):
    """``w`` quantized by ``wq`` as a torchao ``IntxUnpackedToInt8Tensor`` with ``wq``'s learned parameters.

    Args:
        w: the latent ``[out, in]`` weight.
        wq: its (initialised, affine) fxqat weight quantizer.
        aq: the quantizer on the layer's input: None (weight-only) or the 8-bit per-token dynamic one.
        where: the layer's name, for error messages.
        scale_dtype: store the scales in this dtype (rounded; the codes stay fxqat's), e.g. ``torch.bfloat16``,
            what XNNPACK's 4-bit groupwise kernels keep; None keeps them exact (float32 for a bf16/fp16 weight, as
            fxqat's quantizers hold them).

    Raises:
        ExportError: the quantizer or layer has no such form, or the tensor does not reproduce ``wq``'s output.
    """
    tq = _torchao()
    where = f"layer {where!r}"
    if not wq.is_initialized:
        raise ExportError(f"{where}: its weight quantizer was never initialised: run the model on data first.")
    act = _activation(aq, where)
    block = _block_size(wq, tuple(w.shape), where)
    p = affine_params(where, wq, where)
    n_blocks = (w.shape[0] // block[0], w.shape[1] // block[1])
    bits = wq.bits
    tmin, tmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if p.qmax - p.qmin != tmax - tmin:
        raise ExportError(f"{where}: codes [{p.qmin}, {p.qmax}] do not span torch.int{bits}'s range.")
    shift = tmin - p.qmin  # codes and zero point move together onto torch.int{bits}'s range
    zp = (p.zero_point + shift).reshape(n_blocks)
    if int(zp.min()) < -128 or int(zp.max()) > 127:
        raise ExportError(f"{where}: zero points {zp.flatten()[:4].tolist()} do not fit int8.")
    w_q = copy.deepcopy(wq).eval()(w.detach())
    # float32 scales for a bf16/fp16 weight too: dequantize() then computes (k - z)·s in float32 and rounds it to
    # the weight's dtype once, as fxqat's quantizer does (fxqat.quantizers.base.compute_dtype)
    scale = p.scale.reshape(n_blocks).to(device=w.device, dtype=compute_dtype(w.dtype))
    t = tq.IntxUnpackedToInt8Tensor.from_hp(
        w_q, block, getattr(torch, f"int{bits}"), activation_quantization=act, intx_choose_qparams_algorithm=None,
        custom_scale=scale, custom_zero_point=zp.to(device=w.device, dtype=torch.int8),
    )
    # w_q lies on the grid, so round(w_q / s) recovers fxqat's codes; dequantize() must give w_q back (to an ulp of
    # the weight: quantizers that compute (k - z)·s in another order than torchao differ in the last bit)
    err = float((t.dequantize() - w_q).abs().max()) if w.numel() else 0.0
    if err > 4 * torch.finfo(w.dtype).eps * max(float(w_q.abs().max()), 1e-30):
        raise ExportError(f"{where}: torchao's dequantized weight differs from fxqat's by {err:.3g}.")
    if scale_dtype is not None:
        t.scale = t.scale.to(scale_dtype)  # as torchao's own weight_scale_dtype option stores it
    return t


def _owner(root: nn.Module, target: str) -> Tuple[nn.Module, str]:
    path, _, name = target.rpartition(".")
    return (root.get_submodule(path) if path else root), name


def _set_weight(root: nn.Module, target: str, t: torch.Tensor) -> None:
    mod, name = _owner(root, target)
    if name in mod._parameters:
        del mod._parameters[name]
    elif name in mod._buffers:
        del mod._buffers[name]
    mod.register_parameter(name, nn.Parameter(t, requires_grad=False))


def _quantizer_node(gm: fx.GraphModule, node, role: str) -> Optional[Quantizer]:
    if isinstance(node, fx.Node) and node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, Quantizer) and node.meta.get(QROLE, mod.kind) == role:
            return mod
    return None


def _check_enabled(wq: Quantizer, aq: Optional[Quantizer], name: str) -> None:
    if not wq._fq_on and aq is not None and aq._fq_on:
        raise ExportError(
            f"layer {name!r}: its weight quantizer is disabled but its input quantizer is not; torchao's tensors "
            "quantize activations only together with the weight. Enable both or neither (fxqat.set_quantization)."
        )


def _hand_off_graph(gm: fx.GraphModule, prefix: str, configs: Dict[str, object], scale_dtype) -> None:
    """Rewrite ``F.linear(Q_a(x), Q_w(W), b)`` nodes of ``gm`` into ``F.linear(x, W_torchao, b)``."""
    done: Dict[str, torch.Tensor] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not F.linear or len(node.args) < 2:
            continue
        x, wnode = node.args[0], node.args[1]
        wq = _quantizer_node(gm, wnode, "weight")
        if wq is None:
            continue
        src = wnode.args[0]
        if not (isinstance(src, fx.Node) and src.op == "get_attr"):
            raise ExportError(f"linear node {node.name!r} in {prefix or '<root>'!r}: its weight is not a parameter.")
        layer = str(node.meta.get("fxqat.module") or src.target.rpartition(".")[0])
        name = f"{prefix}.{layer}" if prefix else layer
        aq = _quantizer_node(gm, x, "act")
        _check_enabled(wq, aq, name)
        target = str(src.target)
        if target not in done and wq._fq_on:
            done[target] = intx_weight(getattr(*_owner(gm, target)), wq, aq, name, scale_dtype)
            _set_weight(gm, target, done[target])
            configs[name] = torchao_config(wq, aq, name)
        node.args = (x.args[0] if aq is not None else x, src, *node.args[2:])
    for node in reversed(list(gm.graph.nodes)):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), Quantizer):
            q = gm.get_submodule(node.target)
            if node.users and (node.meta.get(QROLE, q.kind) == "grad" or not q._fq_on):
                node.replace_all_uses_with(node.args[0])  # identity in the forward pass
            if node.users:
                users = ", ".join(u.name for u in node.users)
                raise ExportError(
                    f"quantizer {node.target!r} ({type(q).__name__}, {q.bits}-bit {q.kind}) in "
                    f"{prefix or '<root>'!r} feeds {users}, which is not a linear layer: to_torchao hands off "
                    "linear layers only. Keep that layer in FP (Override(..., skip=True)) or use to_pt2e/to_onnx."
                )
            gm.graph.erase_node(node)
            gm.delete_submodule(node.target)
    container = getattr(gm, "fxqat_quant", None)
    if isinstance(container, nn.Module) and not any(True for _ in container.children()) and not container._buffers:
        delattr(gm, "fxqat_quant")
    gm.graph.lint()
    gm.recompile()


def _hand_off_layer(name: str, mod: nn.Module, configs: Dict[str, object], scale_dtype) -> None:
    """An in-place quantized ``nn.Linear`` (eager region) back to ``nn.Linear`` with a torchao weight."""
    entry = weight_layer_entry(mod)
    base = type(mod).__bases__[1]
    if not issubclass(base, nn.Linear) or entry.to_out_in is not None:
        raise ExportError(
            f"layer {name!r} ({base.__name__}) is quantized but is not an nn.Linear: to_torchao hands off linear "
            "layers only. Keep it in FP (Override(..., skip=True)) or use to_pt2e/to_onnx."
        )
    wq, aq = unquantize_layer(mod)
    _check_enabled(wq, aq, name)
    if wq._fq_on:
        t = intx_weight(mod.weight, wq, aq, name, scale_dtype)
        configs[name] = torchao_config(wq, aq, name)
        _set_weight(mod, "weight", t)


def _restore_regions(model: nn.Module) -> None:
    """Put the user's own modules back in place of the graph regions (whose graphs no longer hold a quantizer), so
    the model is the user's again, runs its own code (``torch.export`` sees e.g. the attention mask a Hugging Face
    model builds while tracing, which a region specialised to the eager call would refuse) and loses the capture
    report."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, GraphRegion) and name:
            parent, _, child = name.rpartition(".")
            model.get_submodule(parent)._modules[child] = restore_module(mod)
    model.__dict__.pop(CAPTURE_ATTR, None)


def _handed_off(qm: nn.Module, scale_dtype: Optional[torch.dtype] = None) -> Tuple[nn.Module, Dict[str, object]]:
    configs: Dict[str, object] = {}
    if isinstance(qm, fx.GraphModule) and not is_eager_model(qm):
        model = lp_graph_copy(qm, type(qm).__name__ + "Torchao")
        _hand_off_graph(model, "", configs, scale_dtype)
    elif is_eager_model(qm):
        model = lp_eager_copy(qm).cpu()
        for name, mod in list(model.named_modules()):
            if isinstance(mod, GraphRegion):
                _hand_off_graph(mod, name, configs, scale_dtype)
        for name, mod in list(model.named_modules()):
            if is_quantized_layer(mod):
                _hand_off_layer(name, mod, configs, scale_dtype)
        _restore_regions(model)
    else:
        raise ExportError(f"to_torchao expects a model from fxqat.prepare_qat, got {type(qm).__name__}.")
    left = [n for n, m in model.named_modules() if isinstance(m, Quantizer)]
    if left:
        raise ExportError(
            f"to_torchao: quantizer(s) {left[:3]} remain outside linear layers it can hand off (e.g. inside an opaque "
            "leaf module); keep those modules in FP or use to_pt2e/to_onnx."
        )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, configs


def to_torchao(qm: nn.Module, scale_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """An inference copy of ``qm`` whose quantized linear layers hold torchao ``IntxUnpackedToInt8Tensor`` weights.

    ``qm`` (from :func:`fxqat.prepare_qat`, trained, any device) is not modified. A traced model stays a
    ``GraphModule`` (nodes ``F.linear(x, W)``); a hierarchically captured one (a Hugging Face LM) becomes the user's
    model again, its own class and module tree with plain ``nn.Linear`` layers (graph regions are rebuilt into the
    modules they were traced from), as torchao's ``quantize_`` would leave it. Layers left in FP (``lm_head`` under
    the LLM presets) keep their float weight. Called like ``qm``, it computes what ``fxqat.convert(qm)`` computes
    (the same codes, scales and activation quantization).
    Like the other exports it is built on the CPU (``.to(device)`` moves torchao tensors too).

    Args:
        qm: the trained model.
        scale_dtype: dtype of the stored scales (see :func:`intx_weight`); ``torch.bfloat16`` rounds them as
            ExecuTorch's XNNPACK 4-bit groupwise kernels do, so the model then computes what the ``.pte`` computes.

    Raises:
        ExportError: naming the layer or quantizer that has no torchao form.
    """
    return _handed_off(qm, scale_dtype)[0]


def torchao_configs(qm: nn.Module) -> Dict[str, object]:
    """Layer name -> the torchao config (:func:`torchao_config`) of each layer :func:`to_torchao` hands off."""
    return _handed_off(qm)[1]
