"""ExecuTorch: a trained fxqat model as a ``.pte`` program for ExecuTorch's XNNPACK backend (CPU).

:func:`to_executorch` hands the model to torchao (:func:`fxqat.export.to_torchao`, scales stored in bfloat16 as
XNNPACK's 4-bit groupwise kernels keep them), exports it with ``torch.export``, lowers it with
``to_edge_transform_and_lower(..., partitioner=[XnnpackPartitioner()])`` and serialises the program. 8da4w linear
layers become XNNPACK's dynamically quantized fully-connected operator (int8 per-token activations computed at run
time, ``qb4w`` 4-bit groupwise weights, two codes per byte); a plain (FP) model is lowered in float32.
:func:`load_executorch` runs a ``.pte`` with ExecuTorch's Python runtime.

What XNNPACK takes (executorch 1.5.1): dynamic int8 activations with 4-bit per-group or 4/8-bit per-channel weights,
in float32 or float16 models; a bfloat16 model is refused (:func:`check_xnnpack_weights`): export ``qm.float()``,
which has the same codes.
Weight-only layers (``IntxWeightOnlyConfig``, the ``int*_weight_only`` presets) are refused: the XNNPACK partitioner
of executorch 1.5.1 delegates their ``dequantize_affine`` and produces wrong outputs (max |Δ| ≈ 8e3 on torchao's
own ``IntxWeightOnlyConfig`` MLP here), and the portable runtime has no ``dequantize_affine`` kernel.

Example:
    >>> import os, tempfile, torch, torch.nn as nn, fxqat  # doctest: +SKIP
    >>> from fxqat.export import to_executorch, load_executorch  # doctest: +SKIP
    >>> net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))  # doctest: +SKIP
    >>> x = torch.randn(4, 64)  # doctest: +SKIP
    >>> qm = fxqat.prepare_qat(net, (x,), fxqat.QATConfig.preset("8da4w")); _ = qm(x); qm = qm.eval()  # doctest: +SKIP
    >>> path = to_executorch(qm, (x,), os.path.join(tempfile.mkdtemp(), "m.pte"))  # doctest: +SKIP
    >>> bool((load_executorch(path)(x)[0] - qm(x)).abs().max() < 1e-2)  # doctest: +SKIP
    True
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Callable, List, Optional

import torch
from torch import nn

from fxqat.export.affine import ExportError, cpu_inputs
from fxqat.export.torchao_handoff import to_torchao
from fxqat.quantizers.base import Quantizer

__all__ = ["to_executorch", "load_executorch", "check_xnnpack_weights", "XNNPACK_WEIGHTS"]

log = logging.getLogger(__name__)


def _executorch():
    """``(to_edge_transform_and_lower, XnnpackPartitioner, IntxUnpackedToInt8Tensor)``, imported on first use
    (executorch is an optional extra; it depends on torchao)."""
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
        from torchao.quantization import IntxUnpackedToInt8Tensor
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("fxqat.export.to_executorch needs executorch: pip install 'fxqat[executorch]'.") from exc
    return to_edge_transform_and_lower, XnnpackPartitioner, IntxUnpackedToInt8Tensor


#: weight dtypes XNNPACK's dynamically quantized fully-connected operator takes, per group and per channel
XNNPACK_WEIGHTS = {"per_group": (torch.int4,), "per_channel": (torch.int4, torch.int8)}


def check_xnnpack_weights(model: nn.Module) -> None:
    """Raise :class:`~fxqat.export.ExportError` for torchao weights XNNPACK cannot run (see the module docstring):
    weight-only layers, bfloat16 layers, per-group weights of other than 4 bits, per-channel weights of other than 4
    or 8 bits."""
    intx = _executorch()[2]
    for name, p in model.named_parameters():
        t = p.data if isinstance(p, nn.Parameter) else p
        if not isinstance(t, intx):
            continue
        layer = name.rpartition(".")[0]
        if t.activation_quantization is None:
            raise ExportError(
                f"layer {layer!r} is weight-only ({t.target_dtype} weights, float activations): ExecuTorch's XNNPACK "
                "backend runs quantized linear layers with dynamically quantized int8 activations only (the "
                "partitioner of executorch 1.5 mis-lowers weight-only dequantize_affine). Train with "
                "QATConfig.preset('8da4w') for XNNPACK, or deploy weight-only models through torchao (to_torchao)."
            )
        if t.dtype == torch.bfloat16:
            raise ExportError(
                f"layer {layer!r} is a bfloat16 8da4w layer: ExecuTorch's XNNPACK backend runs dynamically quantized "
                "linear layers on float32 or float16 activations only (executorch 1.5.1 leaves a bfloat16 one "
                "undelegated, and its runtime has no kernel for torchao's quantize/dequantize ops). Export a float32 "
                "copy, to_executorch(qm.float(), (x.float(),)): fxqat's scales are float32 and bfloat16 weights "
                "widen exactly, so the program has the same integer codes."
            )
        gran = "per_group" if t.block_size[-1] != t.shape[-1] else "per_channel"
        if t.target_dtype not in XNNPACK_WEIGHTS[gran]:
            raise ExportError(
                f"layer {layer!r}: XNNPACK takes {gran} weights of {[str(d) for d in XNNPACK_WEIGHTS[gran]]} only, "
                f"not {t.target_dtype} (block size {t.block_size}); use w_bits=4 (or 8 per channel)."
            )


def to_executorch(model: nn.Module, example_inputs: Any, path: "Optional[str | os.PathLike]" = None, *,
                  dynamic_shapes: Any = None) -> "str | bytes":
    """Export ``model`` as an ExecuTorch program lowered to XNNPACK; write it to ``path`` (or return its bytes).

    Args:
        model: a trained model from :func:`fxqat.prepare_qat` (handed to torchao first, scales in bfloat16), or a
            plain module (an FP model, or one already holding torchao tensors).
        example_inputs: a tuple of inputs; the program is specialised to their shapes unless ``dynamic_shapes``
            (``torch.export``'s argument) says otherwise.
        path: the ``.pte`` file to write; None returns the serialised program.
        dynamic_shapes: passed to ``torch.export.export``.

    Returns:
        ``path`` as a string, or the program's bytes.

    Raises:
        ExportError: a layer XNNPACK cannot run (weight-only, non-4-bit groups) or that has no torchao form.
    """
    to_edge_transform_and_lower, XnnpackPartitioner, _ = _executorch()
    inputs = cpu_inputs(example_inputs)
    if any(isinstance(m, Quantizer) for m in model.modules()):
        model = to_torchao(model, scale_dtype=torch.bfloat16)
    check_xnnpack_weights(model)
    model = model.cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        exported = torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes, strict=False)
        program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch()
    if path is None:
        return program.buffer
    path = os.fspath(path)
    with open(path, "wb") as f:
        f.write(program.buffer)
    log.info("fxqat: wrote ExecuTorch program (XNNPACK) to %s (%d bytes)", path, os.path.getsize(path))
    return path


def load_executorch(program: "str | os.PathLike | bytes", method: str = "forward") -> Callable[..., List[torch.Tensor]]:
    """A callable running ``method`` of an ExecuTorch program (a ``.pte`` path or its bytes) with ExecuTorch's
    Python runtime: ``f(*tensors)`` returns the list of the program's outputs (its flattened output pytree)."""
    try:
        from executorch.runtime import Runtime
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("fxqat.export.load_executorch needs executorch: pip install 'fxqat[executorch]'.") from exc
    src = program if isinstance(program, bytes) else os.fspath(program)
    loaded = Runtime.get().load_program(src).load_method(method)

    def run(*inputs: torch.Tensor) -> List[torch.Tensor]:
        return list(loaded.execute([t.detach().cpu().contiguous() for t in inputs]))

    return run
