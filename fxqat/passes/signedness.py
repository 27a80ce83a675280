"""Signedness of activations: is a tensor known to be non-negative from the op that produced it?

The outputs of ReLU-like functions (ReLU, ReLU6, sigmoid, hard sigmoid, softmax), also through pooling, reshapes,
concatenation and dropout, are unsigned; anything else is unknown (``None``), and the activation quantizer then
decides from the first batch (``QATConfig.act_signed="auto"``).

Example:
    >>> import torch, torch.nn as nn
    >>> from torch import fx
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(4, 2)))
    >>> [producer_unsigned(gm, n) for n in gm.graph.nodes if n.op == "call_module"]
    [True, True, None]
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["producer_unsigned", "is_float_tensor"]

_UNSIGNED_FUNCS = {F.relu, torch.relu, F.relu6, torch.sigmoid, F.sigmoid, F.softmax, torch.softmax, F.hardsigmoid}
_UNSIGNED_METHODS = {"relu", "relu_", "sigmoid", "softmax"}
_UNSIGNED_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Softmax, nn.Hardsigmoid)
_PASS_FUNCS = {torch.flatten, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool2d, F.adaptive_avg_pool2d,
               F.adaptive_max_pool2d, F.dropout, torch.cat, operator.getitem, torch.mean}
_PASS_METHODS = {"view", "reshape", "flatten", "mean", "permute", "transpose", "contiguous", "squeeze", "unsqueeze"}
_PASS_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d, nn.Flatten,
                 nn.Dropout, nn.Identity)


def producer_unsigned(gm: fx.GraphModule, node: fx.Node, depth: int = 0) -> Optional[bool]:
    """True when ``node`` is known non-negative (ReLU-like, possibly through shape/pool ops); None when unknown."""
    if depth > 16 or not isinstance(node, fx.Node):
        return None
    inputs = [a for a in node.all_input_nodes]
    if node.op == "call_function":
        if node.target in _UNSIGNED_FUNCS:
            return True
        if node.target in _PASS_FUNCS and inputs:
            res = [producer_unsigned(gm, a, depth + 1) for a in inputs if a.op != "get_attr"]
            return True if res and all(r is True for r in res) else None
    elif node.op == "call_method":
        if node.target in _UNSIGNED_METHODS:
            return True
        if node.target in _PASS_METHODS and inputs:
            return producer_unsigned(gm, inputs[0], depth + 1)
    elif node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, _UNSIGNED_MODULES):
            return True
        if isinstance(mod, _PASS_MODULES) and inputs:
            return producer_unsigned(gm, inputs[0], depth + 1)
    return None


def is_float_tensor(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    if meta is None:
        return True  # no shape information: assume a float tensor
    return hasattr(meta, "dtype") and meta.dtype.is_floating_point
