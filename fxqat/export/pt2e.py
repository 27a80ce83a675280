"""torchao PT2E: a ``torch.export``-ed model annotated with fxqat's learned parameters, converted to a q/dq graph.

:func:`to_pt2e` builds an FP copy of the trained model in which each quantizer is a marker op
``torch.ops.fxqat.qpoint(x, index)`` (an identity that survives ``torch.export``), exports it, annotates every
marker's input with a ``QuantizationSpec`` whose observer (``FixedAffineObserver``) holds the learned scale and
zero point (the *real* ``quant_min``/``quant_max`` of the bit-width on an int8/uint8 carrier: torchao's decomposed
``quantize_per_tensor``/``per_channel`` ops clip to it), then runs ``prepare_pt2e`` and ``convert_pt2e`` and removes
the markers. Weights are folded to integer constants (``fold_quantize=True``) followed by ``dequantize``. A marker
``qpoint(y, -1)`` after each quantized layer stops ``prepare_pt2e`` from folding BatchNorm into the quantized weight
(fxqat trains with BN applied in float after the quantized conv).

Example:
    >>> import torch, torch.nn as nn, fxqat
    >>> from fxqat.export import to_pt2e
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> x = torch.randn(16, 4)
    >>> qm = fxqat.prepare_qat(net, (x,), fxqat.QATConfig(w_bits=4, a_bits=4)); _ = qm(x); qm = qm.eval()
    >>> pm = to_pt2e(qm, (x,))
    >>> bool((pm(x) - qm(x)).abs().max() < 1e-4)
    True
"""

from __future__ import annotations

import functools
import operator
import warnings
from typing import Any, Dict, Tuple
from unittest import mock

import torch
import torch.fx as fx

from fxqat.export.affine import AffineParams, ExportError, QuantPoint, cpu_inputs, fp_module

__all__ = ["pt2e_quantizer", "to_pt2e", "qpoint"]


@torch.library.custom_op("fxqat::qpoint", mutates_args=())
def qpoint(x: torch.Tensor, index: int) -> torch.Tensor:
    """Marks fxqat quantization point ``index`` in an exported graph (identity; a copy, as custom ops may not alias)."""
    return x.clone()


@qpoint.register_fake
def _(x: torch.Tensor, index: int) -> torch.Tensor:
    return torch.empty_like(x)


@functools.lru_cache(maxsize=None)
def _classes():
    """``(FixedAffineObserver, FxqatQuantizer)``, defined on first use because torchao is an optional extra."""
    try:
        from torchao.quantization.pt2e import ObserverBase
        from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec, Quantizer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("fxqat.export.to_pt2e needs torchao: pip install 'fxqat[export]'.") from exc

    class FixedAffineObserver(ObserverBase):
        """A torchao observer that ignores data and reports fixed (exported fxqat) parameters."""

        def __init__(self, params: AffineParams, **kwargs: Any) -> None:
            super().__init__(dtype=params.int_dtype, is_dynamic=False)
            self.register_buffer("scale", params.scale.clone())
            self.register_buffer("zero_point", params.zero_point.clone())
            self.quant_min, self.quant_max = params.qmin, params.qmax
            self.qscheme = params.qscheme
            self.ch_axis = params.ch_axis if params.ch_axis is not None else 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

        def calculate_qparams(self, **kwargs: Any) -> Tuple[torch.Tensor, torch.Tensor]:
            return self.scale, self.zero_point

    def spec(params: AffineParams) -> QuantizationSpec:
        return QuantizationSpec(
            dtype=params.int_dtype,
            observer_or_fake_quant_ctr=FixedAffineObserver.with_args(params=params),
            quant_min=params.qmin,
            quant_max=params.qmax,
            qscheme=params.qscheme,
            ch_axis=params.ch_axis,
            is_dynamic=False,
        )

    class FxqatQuantizer(Quantizer):
        """torchao Quantizer that annotates each ``fxqat::qpoint`` marker's input with fxqat's fixed parameters."""

        def __init__(self, points: Dict[int, QuantPoint]) -> None:
            super().__init__()
            self.points = points

        def annotate(self, model: fx.GraphModule) -> fx.GraphModule:
            seen = set()
            for node in model.graph.nodes:
                if node.op == "call_function" and node.target == torch.ops.fxqat.qpoint.default:
                    idx = int(node.args[1])
                    if idx < 0:
                        continue  # a barrier against conv/linear-BN folding, not a quantizer
                    node.meta["quantization_annotation"] = QuantizationAnnotation(
                        input_qspec_map={node.args[0]: spec(self.points[idx].params)}, _annotated=True
                    )
                    seen.add(idx)
            missing = sorted(set(self.points) - seen)
            if missing:
                raise ExportError(
                    f"to_pt2e: quantizer(s) {[self.points[i].quantizer for i in missing]} were lost by torch.export."
                )
            return model

        def validate(self, model: fx.GraphModule) -> None:
            pass

    return FixedAffineObserver, FxqatQuantizer


def pt2e_quantizer(points: Dict[int, QuantPoint]):
    """The torchao ``Quantizer`` (an ``FxqatQuantizer``) that annotates ``fxqat::qpoint`` markers with ``points``
    (index -> :class:`~fxqat.export.affine.QuantPoint`, as numbered by :func:`fxqat.export.quant_points`)."""
    return _classes()[1](points)


def _marker(gm: fx.GraphModule, node: fx.Node, point: QuantPoint) -> fx.Node:
    off = point.params.offset
    x = gm.graph.call_function(operator.sub, (node.args[0], off)) if off else node.args[0]
    y = gm.graph.call_function(torch.ops.fxqat.qpoint.default, (x, point.index))
    return gm.graph.call_function(operator.add, (y, off)) if off else y


def _add_bn_barriers(gm: fx.GraphModule) -> None:
    """fxqat quantizes a layer's own weight, with BatchNorm applied after it in float; ``prepare_pt2e`` would fold
    BN into the conv/linear weight. A marker ``qpoint(y, -1)`` after each layer whose weight is quantized keeps them
    apart."""
    def is_marker(n) -> bool:
        return isinstance(n, fx.Node) and n.op == "call_function" and n.target == torch.ops.fxqat.qpoint.default

    for node in list(gm.graph.nodes):
        if node.op == "call_function" and not is_marker(node) and len(node.args) > 1 and is_marker(node.args[1]):
            with gm.graph.inserting_after(node):
                barrier = gm.graph.call_function(torch.ops.fxqat.qpoint.default, (node, -1))
            node.replace_all_uses_with(barrier, delete_user_cb=lambda u: u is not barrier)
    gm.graph.lint()
    gm.recompile()


def _strip_markers(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.fxqat.qpoint.default:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


def _convert_without_qat_bn_fold(prepared: fx.GraphModule, convert_pt2e) -> fx.GraphModule:
    """``convert_pt2e`` without its ``_fold_conv_bn_qat`` step when the model has BatchNorm.

    That step only rewrites the conv-BN patterns that ``prepare_qat_pt2e`` creates (none here: fxqat models go
    through ``prepare_pt2e``, with BN kept apart), but it traces ~100 pattern graphs with ``torch.export``, about
    40 s on two CPU cores. Skipping it leaves the result unchanged; if torchao renames the function, the full
    ``convert_pt2e`` runs.
    """
    import torchao.quantization.pt2e.quantize_pt2e as qp

    if not hasattr(qp, "_fold_conv_bn_qat"):  # pragma: no cover - other torchao versions
        return convert_pt2e(prepared)
    with mock.patch.object(qp, "_fold_conv_bn_qat", lambda m: m):
        return convert_pt2e(prepared)


def to_pt2e(qm: fx.GraphModule, example_inputs: Any, dynamic_batch: bool = True) -> fx.GraphModule:
    """The torchao PT2E q/dq model (``convert_pt2e`` output) carrying ``qm``'s learned scales and zero points.

    Every activation quantizer becomes ``quantize_per_tensor -> dequantize`` (``quantized_decomposed`` ops, clipped
    to the real bit-width's range); every quantized weight an integer constant followed by ``dequantize`` (per
    channel where fxqat used per-channel scales). The result is callable like ``qm`` in eval mode; with
    ``dynamic_batch`` (default) dimension 0 of every tensor input is exported as dynamic (``Dim.AUTO``: it stays
    static only where the model itself fixes it). Like every ``convert_pt2e`` result it is already in inference
    form and refuses ``.train()``/``.eval()``.

    Raises:
        ExportError: naming the module/quantizer that cannot be represented.
    """
    _classes()  # a clear ImportError without torchao
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    inputs = cpu_inputs(example_inputs)
    fp, points = fp_module(qm, _marker)
    _add_bn_barriers(fp)
    by_index = {p.index: p for p in points.values()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        dyn = None
        if dynamic_batch:
            dyn = tuple({0: torch.export.Dim.AUTO} if isinstance(t, torch.Tensor) and t.dim() else None for t in inputs)
        exported = torch.export.export(fp, inputs, dynamic_shapes=dyn, strict=False).module()
        prepared = prepare_pt2e(exported, pt2e_quantizer(by_index))
        prepared(*inputs)  # fixed parameters: one pass only exercises the observers
        converted = _convert_without_qat_bn_fold(prepared, convert_pt2e)
    _strip_markers(converted)
    for p in converted.parameters():
        p.requires_grad_(False)
    return converted
