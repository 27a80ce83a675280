"""fxqat: quantization-aware training for any PyTorch model, as a torch.fx graph pass.

Example:
    >>> import torch, torch.nn as nn, fxqat
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    >>> qm = fxqat.prepare_qat(model, (torch.randn(2, 3, 8, 8),), fxqat.QATConfig(w_bits=4, a_bits=4))
    >>> qm(torch.randn(2, 3, 8, 8)).shape
    torch.Size([2, 10])
"""

import logging as _logging

from fxqat import quantizers
from fxqat.api import (
    calibrate,
    convert,
    find_blocks,
    prepare_qat,
    set_quantization,
    trainable_parameters,
)
from fxqat.capture.eager_model import capture_report
from fxqat.capture.hierarchy import CaptureReport
from fxqat.capture.lora_adopt import adopt_lora
from fxqat.capture.lora_merge import merge_lora
from fxqat.config import HybridConfig, KVSpec, Override, QATConfig, QuantSpec
from fxqat.export.torch_ao import to_qconfig_mapping
from fxqat.granularity import per_channel, per_group, per_head, per_tensor, per_token
from fxqat.graph.blocks import Block
from fxqat.layer_registry import register_weight_layer
from fxqat.mixed import Allocation, SensitivityTable, allocate_bits, running_sensitivity, sensitivity
from fxqat.passes.build_hybrid import HybridOutput
from fxqat.quantizers import NotAffineError, Quantizer, available_methods, named_quantizers
from fxqat.trace import TraceFailure, trace
from fxqat.training.losses import distillation_loss, hybrid_loss, kd_loss

_logging.getLogger(__name__).addHandler(_logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "prepare_qat", "convert", "named_quantizers", "quantizers", "set_quantization", "calibrate",
    "trainable_parameters", "find_blocks",
    "Block", "HybridOutput", "hybrid_loss", "distillation_loss", "kd_loss",
    "QATConfig", "HybridConfig", "QuantSpec", "KVSpec", "Override",
    "per_tensor", "per_channel", "per_group", "per_token", "per_head", "Quantizer", "NotAffineError", "available_methods",
    "trace", "TraceFailure", "to_qconfig_mapping", "capture_report", "CaptureReport", "register_weight_layer",
    "sensitivity", "running_sensitivity", "allocate_bits", "SensitivityTable", "Allocation",
    "merge_lora", "adopt_lora",
]
