"""Hierarchical capture: graph regions where torch.fx traces, eager regions elsewhere (see docs/capture.md)."""

from fxqat.layer_registry import is_weight_layer, register_weight_layer

__all__ = ["register_weight_layer", "is_weight_layer"]
