"""Activation-by-activation products: attention's ``Q @ K^T`` and ``P @ V`` (``QATConfig(quantize_matmuls=True)``).

A weight layer multiplies an activation by a weight; attention also multiplies two activations. Where such a product
sits in a graph region (attention written in traced code), :func:`matmul_inputs` finds it and ``annotate`` gives
every operand an activation quantizer (the same kind of quantizer a weight layer's input gets, shared with any other
consumer of that tensor):

* ``torch.matmul``, ``torch.bmm``, the ``@`` operator and the ``Tensor.matmul`` / ``Tensor.bmm`` methods: both
  operands, when both depend on the model's inputs (a product with a parameter or a buffer is left alone: it is a
  weight layer fxqat does not know);
* ``F.scaled_dot_product_attention``: ``query``, ``key`` and ``value``. The attention probabilities are computed inside
  the fused kernel and stay in floating point; write the attention out (``softmax(q @ k^T) @ v``) to quantize them.

``torch.einsum`` and attention inside modules the tracer kept as leaves (or eager regions) are not covered. Operands
that are ReLU/softmax outputs get unsigned quantizers (``P`` in ``P @ V``), the others are decided from the first
batch, as for weight layers.

Example:
    >>> import torch
    >>> from torch import fx
    >>> def attention(q, k, v):
    ...     return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
    >>> gm = fx.symbolic_trace(attention)
    >>> [(n.name, matmul_inputs(n)) for n in gm.graph.nodes if matmul_inputs(n)]
    [('matmul', (0, 1)), ('matmul_1', (0, 1))]
"""

from __future__ import annotations

import operator
from typing import Collection, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxqat.graph.modinfo import input_free_nodes

__all__ = ["MATMUL_FUNCTIONS", "MATMUL_METHODS", "matmul_inputs"]

#: functions multiplying activations -> argument positions of the operands
MATMUL_FUNCTIONS = {torch.matmul: (0, 1), torch.bmm: (0, 1), operator.matmul: (0, 1),
                    F.scaled_dot_product_attention: (0, 1, 2)}
#: methods multiplying activations (``a.matmul(b)``) -> argument positions (0 is the tensor itself)
MATMUL_METHODS = {"matmul": (0, 1), "bmm": (0, 1)}


def matmul_inputs(node: fx.Node, free: Optional[Collection[fx.Node]] = None) -> Tuple[int, ...]:
    """Argument positions of the activation operands of ``node``, or ``()`` when it is not such a product.

    Every listed operand is an input-dependent tensor node (``free`` is :func:`fxqat.graph.modinfo.input_free_nodes`
    of the graph, computed when omitted); a product with a parameter, a buffer or a constant returns ``()``.
    """
    if node.op == "call_function":
        positions = MATMUL_FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        positions = MATMUL_METHODS.get(str(node.target))
    else:
        positions = None
    if not positions or len(node.args) < len(positions):
        return ()
    free = free if free is not None else input_free_nodes(node.graph)
    operands = [node.args[i] for i in positions]
    if not all(isinstance(a, fx.Node) and a not in free for a in operands):
        return ()
    return tuple(positions)
