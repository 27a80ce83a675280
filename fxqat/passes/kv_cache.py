"""KV-cache fake quantization: the keys and values of attention on an int grid (``QATConfig(kv_bits=...)``).

LLM-QAT's W4A8-KV4 recipe stores the attention keys and values in 4 bits; training with them fake-quantized lets the
model adapt. :func:`quantize_kv` finds, in a graph (a whole traced model or a graph region such as a captured
``LlamaDecoderLayer``), the keys and values of each attention and puts a :class:`KVQuantizer` on them:

* where the graph stores them in a cache (``cache.update(key, value, layer_idx, ...)`` on an opaque cache input): the
  two tensors handed to ``update``, so that the cache holds the quantized values (and attention reads them back);
* else (no cache, e.g. training with ``use_cache=False``) the ``key`` and ``value`` of
  ``F.scaled_dot_product_attention``, or, for attention written out, the key of ``Q @ K^T`` (before its transpose)
  and the value of ``P @ V``.

The grid is dynamic and asymmetric (:class:`fxqat.quantizers.dynamic.DynamicQuantizer`, torchao's per-token
arithmetic), with ``kv_bits`` bits and one scale and zero point per

* ``"per_token"``: key or value vector of one token in one head (a row of ``head_dim`` values), or
* ``"per_head"``: head (all tokens and channels of one head of one sequence).

A key repeated for grouped-query attention (``repeat_kv``) is quantized after the repeat; each copy of a head gets
the scale of its original, so the values are those of quantizing the key-value heads.

Example:
    >>> import torch, torch.fx as fx
    >>> def attention(q, k, v):
    ...     return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    >>> gm = fx.symbolic_trace(attention)
    >>> quantize_kv(gm, bits=4, granularity="per_token")
    2
    >>> k = torch.randn(1, 2, 5, 8)
    >>> codes = gm.fxqat_kv.k_0(k)  # the key's quantizer: 16 levels per token
    >>> int(codes[0, 0, 0].unique().numel()) <= 16
    True
"""

from __future__ import annotations

import warnings
from typing import List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxqat.passes.matmuls import matmul_inputs
from fxqat.quant_spec import QuantSpec
from fxqat.quantizers.dynamic import DynamicQuantizer

__all__ = ["KVQuantizer", "quantize_kv", "kv_operands", "warn_if_no_kv", "KV_CONTAINER", "KV_GRANULARITIES"]

KV_CONTAINER = "fxqat_kv"
KV_GRANULARITIES = ("per_token", "per_head")
_TRANSPOSES = ("transpose", "permute", "mT")
_PASS_THROUGH = ("softmax", "dropout", "to", "type", "float", "contiguous")


class KVQuantizer(nn.Module):
    """Dynamic asymmetric fake quantization of a key or value tensor ``(..., tokens, head_dim)``.

    Args:
        bits: bits of the grid.
        granularity: ``"per_token"`` (a scale per row of the last dim) or ``"per_head"`` (per slice of the last two).
    """

    def __init__(self, bits: int, granularity: str = "per_token") -> None:
        super().__init__()
        if granularity not in KV_GRANULARITIES:
            raise ValueError(f"KVQuantizer: granularity={granularity!r}; use one of {KV_GRANULARITIES}.")
        self.granularity = granularity
        self.quant = DynamicQuantizer(QuantSpec(bits=bits, method="dynamic", kind="act", granularity="per_token"))

    @property
    def bits(self) -> int:
        return self.quant.bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.granularity == "per_head":
            return self.quant(x.reshape(*x.shape[:-2], -1)).reshape(x.shape)
        return self.quant(x)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, granularity={self.granularity!r}"


def _is_transpose(node: fx.Node) -> bool:
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return node.op in ("call_method", "call_function") and name in _TRANSPOSES


def _name(node: fx.Node) -> str:
    return node.target if node.op == "call_method" else getattr(node.target, "__name__", "")


def _descends(node: fx.Node, start: fx.Node, depth: int = 8) -> bool:
    """Whether ``node`` is ``start`` or is reached from it through softmax/dropout/cast nodes (``depth`` steps)."""
    for _ in range(depth):
        if node is start:
            return True
        if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
            return False
        if node.op in ("call_module",) or _name(node) in _PASS_THROUGH or node.op == "call_function":
            node = node.args[0]
        else:
            return False
    return node is start


def kv_operands(graph: fx.Graph) -> List[Tuple[fx.Node, int, str]]:
    """``(node, argument position, "k" or "v")`` of every key and value to quantize in ``graph`` (module docstring)."""
    out: List[Tuple[fx.Node, int, str]] = []
    for node in graph.nodes:  # a cache: what it stores
        if (node.op == "call_method" and node.target == "update" and len(node.args) >= 3
                and isinstance(node.args[0], fx.Node) and node.args[0].op == "placeholder"):
            out += [(node, 1, "k"), (node, 2, "v")]
    if out:
        return out
    products = [n for n in graph.nodes if matmul_inputs(n)]
    for node in products:
        if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
            out += [(node, 1, "k"), (node, 2, "v")]
    for qk in products:
        if qk.target is F.scaled_dot_product_attention:
            continue
        pv: Optional[fx.Node] = next((n for n in products if n is not qk and n.target is not
                                      F.scaled_dot_product_attention and _descends(n.args[0], qk)), None)
        key = qk.args[1]
        if pv is None or not isinstance(key, fx.Node) or not _is_transpose(key):
            continue
        out += [(key, 0, "k"), (pv, 1, "v")]
    return out


def quantize_kv(gm: fx.GraphModule, bits: int, granularity: str = "per_token") -> int:
    """Insert a :class:`KVQuantizer` on every key and value of ``gm`` (in place, recompiled); returns how many.

    The quantizers live under ``gm.fxqat_kv`` as ``k_<i>`` / ``v_<i>``.
    """
    targets = kv_operands(gm.graph)
    if not targets:
        return 0
    if not hasattr(gm, KV_CONTAINER):
        gm.add_module(KV_CONTAINER, nn.Module())
    container = getattr(gm, KV_CONTAINER)
    for i, (node, pos, kind) in enumerate(targets):
        name = f"{kind}_{i // 2}"
        container.add_module(name, KVQuantizer(bits, granularity))
        with gm.graph.inserting_before(node):
            q = gm.graph.call_module(f"{KV_CONTAINER}.{name}", (node.args[pos],))
        args = list(node.args)
        args[pos] = q
        node.args = tuple(args)
    gm.graph.lint()
    gm.recompile()
    return len(targets)


def warn_if_no_kv(model: nn.Module, kv_bits: Optional[int]) -> None:
    """``warnings.warn`` when ``kv_bits`` is set but ``model`` has no :class:`KVQuantizer` (no attention's keys and
    values were found in a graph: the option did nothing)."""
    if kv_bits is not None and not any(isinstance(m, KVQuantizer) for m in model.modules()):
        warnings.warn(
            f"fxqat: QATConfig(kv_bits={kv_bits}) found no attention keys and values to quantize in "
            f"{type(model).__name__}: attention is quantized where it sits in a graph region (see "
            "fxqat.capture_report(model) for the eager ones). The model is prepared without KV-cache quantization.",
            UserWarning, stacklevel=3)
