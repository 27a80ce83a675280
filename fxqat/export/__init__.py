"""Deploying trained fxqat models: torch.ao (QConfigMapping in, reference model out), torchao PT2E, ONNX QDQ,
torchao tensor subclasses (weight-only / 8da4w LLM layers), ExecuTorch (XNNPACK ``.pte``), llama.cpp (GGUF) and
Hugging Face checkpoints (``save_pretrained``, loaded by ``from_pretrained`` through transformers' torchao integration).

Every path carries the learned scales and zero points of each quantizer (its eval-mode affine equivalent, see
:meth:`fxqat.Quantizer.affine_qparams`) for bit-widths up to 8. ``docs/deploy.md`` says which path to pick for which
runtime. The PT2E, ONNX and torchao paths import torchao / onnx lazily (extra ``fxqat[export]``), the ExecuTorch
path executorch (extra ``fxqat[executorch]``).

Example:
    >>> import torch, torch.nn as nn, fxqat
    >>> from fxqat.export import to_torch_ao
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> x = torch.randn(16, 4)
    >>> qm = fxqat.prepare_qat(net, (x,), fxqat.QATConfig(w_bits=8, a_bits=8)); _ = qm(x); qm = qm.eval()
    >>> bool((to_torch_ao(qm, (x,))(x) - qm(x)).abs().max() < 1e-4)
    True
"""

from fxqat.export.affine import AffineParams, ExportError, QuantPoint, quant_points
from fxqat.export.executorch import load_executorch, to_executorch
from fxqat.export.gguf import GGUFVocab, to_gguf
from fxqat.export.hf_checkpoint import load_for_qat, save_pretrained
from fxqat.export.onnx import to_onnx
from fxqat.export.pt2e import pt2e_quantizer, to_pt2e
from fxqat.export.torch_ao import FixedAffineFakeQuantize, fxqat_backend_config, to_qconfig_mapping, to_torch_ao
from fxqat.export.torchao_handoff import to_torchao, torchao_config, torchao_configs

__all__ = [
    "to_qconfig_mapping", "to_torch_ao", "to_pt2e", "to_onnx", "ExportError", "quant_points", "QuantPoint",
    "AffineParams", "FixedAffineFakeQuantize", "pt2e_quantizer", "fxqat_backend_config", "to_torchao",
    "torchao_config", "torchao_configs", "to_executorch", "load_executorch", "to_gguf", "GGUFVocab",
    "save_pretrained", "load_for_qat",
]
