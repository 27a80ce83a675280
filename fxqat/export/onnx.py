"""ONNX QDQ export: QuantizeLinear/DequantizeLinear pairs with fxqat's learned scales, checked by ``onnx.checker``.

:func:`to_onnx` replaces each quantizer of an FP copy of the trained model by ``torch.fake_quantize_per_tensor_affine``
(activations) or ``..._per_channel_affine`` (weights), which the TorchScript-based exporter
(``torch.onnx.export(..., dynamo=False)``) writes as ``QuantizeLinear -> DequantizeLinear``.

**Bit-widths below 8.** ONNX QDQ has no ``quant_min``/``quant_max``: ``QuantizeLinear`` saturates to its output
type (int8 or uint8), and the exporter accepts only the full 8-bit ranges. fxqat therefore puts the values on an
int8/uint8 carrier and writes an explicit ``Clip(x, (qmin - zp)·s, (qmax - zp)·s)`` *before* ``QuantizeLinear``
for activations whose range is narrower than the carrier; clipping to the two outermost levels then quantizing on
the carrier gives exactly the codes of the narrow grid. The ``Clip`` sits in front of ``Q``, so the
``Q -> DQ -> Conv`` pattern that QDQ-aware runtimes (onnxruntime, TensorRT) fuse is intact. Weights need no
``Clip``: they are pre-quantized with their own fxqat quantizer, so they already lie on the narrow grid and
``QuantizeLinear`` maps them to in-range codes.

Example:
    >>> import os, tempfile, torch, torch.nn as nn, fxqat
    >>> from fxqat.export import to_onnx
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> x = torch.randn(16, 4)
    >>> qm = fxqat.prepare_qat(net, (x,), fxqat.QATConfig(w_bits=4, a_bits=4)); _ = qm(x); qm = qm.eval()
    >>> path = to_onnx(qm, (x,), os.path.join(tempfile.mkdtemp(), "m.onnx"))
    >>> import onnx; sorted({n.op_type for n in onnx.load(path).graph.node} & {"QuantizeLinear", "Clip"})
    ['Clip', 'QuantizeLinear']
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
from torch import nn

from fxqat.export.affine import AffineParams, QuantPoint, cpu_inputs, fp_module, require_float32, safe_name

__all__ = ["QDQ", "to_onnx"]

log = logging.getLogger(__name__)


class QDQ(nn.Module):
    """One quantization point as the exporter sees it: optional clip, then fake-quant on the 8-bit carrier.

    Args:
        params: the exported :class:`~fxqat.export.affine.AffineParams`.
        clip: clip to the real bit-width's range first (activations narrower than the carrier).
    """

    def __init__(self, params: AffineParams, clip: bool) -> None:
        super().__init__()
        self.clip = clip and params.narrow
        self.axis = params.ch_axis
        self.cmin, self.cmax = params.carrier_range
        lo, hi = params.clip_range()
        scale = params.scale if params.per_channel else params.scale.reshape(())
        zp = params.zero_point if params.per_channel else params.zero_point.reshape(())
        self.register_buffer("scale", scale.clone())
        self.register_buffer("zero_point", zp.clone())
        self.lo, self.hi = float(lo.min()), float(hi.max())
        self.offset = params.offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.offset:
            x = x - self.offset
        if self.clip:
            x = torch.clamp(x, self.lo, self.hi)
        if self.axis is not None:
            y = torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, self.axis, self.cmin, self.cmax)
        else:
            y = torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.cmin, self.cmax)
        return y + self.offset if self.offset else y


def _qdq_point(gm: fx.GraphModule, node: fx.Node, point: QuantPoint) -> fx.Node:
    if not hasattr(gm, "fxqat_qdq"):
        gm.add_module("fxqat_qdq", nn.Module())
    name = f"fxqat_qdq.{safe_name(point.quantizer.split('.')[-1])}"
    gm.add_submodule(name, QDQ(point.params, clip=point.kind == "act"))
    return gm.graph.call_module(name, (node.args[0],))


def to_onnx(
    qm: fx.GraphModule,
    example_inputs: Any,
    path: "str | os.PathLike",
    opset_version: int = 17,
    input_names: Optional[Sequence[str]] = None,
    output_names: Optional[Sequence[str]] = None,
    dynamic_batch: bool = True,
    check: bool = True,
) -> str:
    """Write ``qm`` (trained, eval mode) as an ONNX QDQ model at ``path`` and validate it with ``onnx.checker``.

    Args:
        qm: a model from :func:`fxqat.prepare_qat` (quantizers initialised).
        example_inputs: a tuple of inputs (shapes only matter; the batch dimension is dynamic by default).
        path: the ``.onnx`` file to write.
        opset_version: ONNX opset (>= 13 for per-channel weights).
        input_names, output_names: graph input/output names (default ``input_i`` / ``output_i``).
        dynamic_batch: mark dimension 0 of every input and output as dynamic.
        check: run ``onnx.checker.check_model`` on the written file.

    Returns:
        ``path`` as a string.

    Raises:
        ExportError: naming the module/quantizer that cannot be represented, or a bfloat16/float16 model.
    """
    require_float32(qm, "to_onnx", "the QDQ graph quantizes float32 tensors (QuantizeLinear takes no bfloat16 or "
                    "float16 input before opset 19).")
    inputs = cpu_inputs(example_inputs)
    fp, _ = fp_module(qm, _qdq_point)
    with torch.no_grad():
        out = fp(*inputs)
    n_out = len(out) if isinstance(out, (tuple, list)) else 1
    input_names = list(input_names or [f"input_{i}" for i in range(len(inputs))])
    output_names = list(output_names or [f"output_{i}" for i in range(n_out)])
    dynamic_axes = {n: {0: "batch"} for n in input_names + output_names} if dynamic_batch else None
    path = os.fspath(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        torch.onnx.export(
            fp, inputs, path, dynamo=False, opset_version=opset_version, input_names=input_names,
            output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True,
        )
    if check:
        try:
            import onnx
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("fxqat.export.to_onnx(check=True) needs onnx: pip install 'fxqat[export]'.") from exc
        onnx.checker.check_model(path, full_check=True)
    log.info("fxqat: wrote ONNX QDQ model to %s", path)
    return path
