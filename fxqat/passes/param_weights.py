"""Which dimension of a weight parameter a matmul-like op reduces over, and the quantizer layout that follows.

A weight is "any parameter that enters a matmul-like op": ``F.linear``, ``matmul``/``mm``/``bmm``/``@``, ``einsum``,
grouped expert matmuls (``torch._grouped_mm`` and transformers' fallback operator), convolutions and (with
``QATConfig.quantize_embeddings``) embedding lookups. The op may see a *view* of the parameter: one expert's slice
``w[e]``, a gathered ``w[expert_ids]``, a transpose ``w.transpose(-2, -1)``. :func:`follow_view` maps each dim of such a
view back to a dim of the parameter, and :func:`weight_use` names the parameter dims an op reduces over. The
quantizer then sees the parameter as ``[rows, reduction]`` (:func:`to_rows`): the reduction dims last and flattened,
every other dim (output channel, expert, ...) flattened into rows. A Linear weight ``[out, in]`` and a conv weight
``[out, in, kh, kw]`` are their own row layout, so per-channel and per-group scales mean what they always did; a
Mixtral expert tensor ``[experts, 2·inter, hidden]`` gets one row per (expert, output channel) and groups along
``hidden``; GPT-OSS's transposed ``[experts, hidden, 2·inter]`` groups along ``hidden`` too (its dim 1).

Example:
    >>> import torch
    >>> w = torch.arange(24.0).reshape(2, 3, 4)  # (experts, out, in)
    >>> layout = (2,)  # reduced over dim 2
    >>> rows = to_rows(w, layout); tuple(rows.shape)
    (6, 4)
    >>> bool(torch.equal(from_rows(rows, w.shape, layout), w))
    True
    >>> follow_view("transpose", (0, 1, 2), (-2, -1), 3)
    (0, 2, 1)
    >>> weight_use("matmul", 1, (0, 2, 1), (None, None))
    ('matmul', (2,))
"""

from __future__ import annotations

import math
import operator
from typing import Any, Optional, Sequence, Tuple

import torch

__all__ = ["Dims", "follow_view", "weight_use", "to_rows", "from_rows", "op_name", "MATMUL_OPS", "VIEW_OPS",
           "ROUTER_PASS_OPS", "ROUTER_SINKS", "merge_layouts"]

#: for each dim of a tensor derived from a parameter, the parameter dim it is (None: a new dim)
Dims = Tuple[Optional[int], ...]

#: ops that return a view or copy of one tensor with the same values (dims followed by :func:`follow_view`)
VIEW_OPS = frozenset({
    "__getitem__", "transpose", "swapaxes", "t", "mT", "T", "permute", "unsqueeze", "contiguous", "clone", "detach",
    "to", "float", "half", "bfloat16", "type_as", "squeeze",
})
#: matmul-like ops (see :func:`weight_use`)
MATMUL_OPS = frozenset({
    "linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm", "addbmm", "einsum",
    "_grouped_mm", "grouped_mm", "grouped_mm_fallback", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
    "conv_transpose2d", "conv_transpose3d", "embedding",
})
#: ops a router's logits pass through on their way to the expert choice (elementwise, reshapes, normalisers)
ROUTER_PASS_OPS = frozenset({"softmax", "sigmoid", "float", "to", "view", "reshape", "log_softmax", "__add__",
                             "add", "__truediv__", "div", "__getitem__", "type_as", "contiguous"})
#: ops that choose experts from router scores
ROUTER_SINKS = frozenset({"topk", "argmax", "argsort", "sort"})


def op_name(func: Any) -> str:
    """A plain name for a function, method, operator overload or property getter (``Tensor.mT`` -> ``"mT"``)."""
    if func is operator.getitem:
        return "__getitem__"
    if func is operator.matmul:
        return "matmul"
    owner = getattr(func, "__self__", None)
    name = getattr(func, "__name__", "") or ""
    if name == "__get__" and owner is not None:
        return getattr(owner, "__name__", "")
    if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(getattr(func, "_opname", None) or name).split(".")[0]
    return name


def _dim(d: int, n: int) -> int:
    return d + n if d < 0 else d


def _index_dims(dims: Dims, idx: Any) -> Optional[Dims]:
    """Dims after ``t[idx]``: ints drop a dim, slices and one 1-D tensor index keep it, None adds one."""
    items = idx if isinstance(idx, tuple) else (idx,)
    if sum(isinstance(i, torch.Tensor) for i in items) > 1:
        return None
    if any(i is Ellipsis for i in items):
        k = items.index(Ellipsis)
        fill = len(dims) - sum(1 for i in items if i is not None and i is not Ellipsis)
        items = items[:k] + (slice(None),) * fill + items[k + 1:]
    out, pos = [], 0
    for i in items:
        if i is None:
            out.append(None)
            continue
        if pos >= len(dims):
            return None
        if isinstance(i, (int, torch.SymInt)) or (isinstance(i, torch.Tensor) and i.dim() == 0):
            pos += 1
        elif isinstance(i, slice) or (isinstance(i, torch.Tensor) and i.dim() == 1 and not i.is_floating_point()):
            if isinstance(i, torch.Tensor) and i.dtype == torch.bool:
                return None
            out.append(dims[pos])
            pos += 1
        else:
            return None
    return tuple(out) + tuple(dims[pos:])


def follow_view(name: str, dims: Dims, rest: Sequence[Any], out_ndim: Optional[int]) -> Optional[Dims]:
    """The dims of the result of view op ``name`` applied to a tensor with ``dims`` (``rest``: its other arguments);
    None when the op is not followed (fxqat then loses track of the parameter along that path)."""
    n = len(dims)
    if name in ("contiguous", "clone", "detach", "to", "float", "half", "bfloat16", "type_as"):
        return dims
    if name == "__getitem__":
        return _index_dims(dims, rest[0]) if rest else None
    if name in ("transpose", "swapaxes"):
        if len(rest) < 2:
            return None
        a, b = _dim(int(rest[0]), n), _dim(int(rest[1]), n)
        out = list(dims)
        out[a], out[b] = out[b], out[a]
        return tuple(out)
    if name in ("t", "T", "mT"):
        if n < 2:
            return dims
        out = list(dims)
        if name == "T":
            return tuple(reversed(out))
        out[-1], out[-2] = out[-2], out[-1]
        return tuple(out)
    if name == "permute":
        order = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        return tuple(dims[_dim(int(d), n)] for d in order) if len(order) == n else None
    if name == "unsqueeze":
        d = _dim(int(rest[0]), n + 1) if rest else 0
        return dims[:d] + (None,) + dims[d:]
    if name == "squeeze":
        if out_ndim == n:
            return dims
        if rest and isinstance(rest[0], int):
            d = _dim(rest[0], n)
            return dims[:d] + dims[d + 1:] if out_ndim == n - 1 else dims
        return None
    return None


def _einsum_reduced(equation: str, pos: int, n_operands: int) -> Optional[Tuple[int, ...]]:
    eq = equation.replace(" ", "")
    if "..." in eq or "->" not in eq:
        return None
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != n_operands or pos >= len(terms):
        return None
    others = set("".join(t for i, t in enumerate(terms) if i != pos))
    return tuple(i for i, c in enumerate(terms[pos]) if c not in out and c in others)


def weight_use(name: str, pos: int, dims: Dims, args: Sequence[Any]) -> Optional[Tuple[str, Tuple[int, ...]]]:
    """``(op, reduced parameter dims)`` when op ``name`` uses the tracked tensor (``dims``, at argument ``pos``) as
    a weight; None when it does not (an activation operand, a bias, an op that is no product).

    ``args`` are the op's positional arguments (for ``einsum``, its equation and operands).
    """
    n = len(dims)

    def mapped(local: Sequence[int]) -> Optional[Tuple[int, ...]]:
        got = tuple(dims[_dim(d, n)] for d in local)
        return None if not got or any(g is None for g in got) else tuple(sorted(got))

    if name == "linear":
        return ("linear", mapped((-1,))) if pos == 1 and n >= 2 and mapped((-1,)) else None
    if name == "embedding":
        return ("embedding", mapped((-1,))) if pos == 1 and n == 2 and mapped((-1,)) else None
    if name.startswith("conv_transpose"):
        return (name, mapped(tuple(d for d in range(n) if d != 1))) if pos == 1 and n >= 3 else None
    if name.startswith("conv"):
        return (name, mapped(tuple(range(1, n)))) if pos == 1 and n >= 3 else None
    if name in ("addmm", "baddbmm", "addbmm"):
        name, pos = "matmul", pos - 1
        if pos < 0:
            return None
    if name == "einsum":
        eq = args[0] if args and isinstance(args[0], str) else None
        n_ops = len(args) - 1
        if n_ops == 1 and isinstance(args[1], (list, tuple)):
            n_ops = len(args[1])
        red = _einsum_reduced(eq, pos - 1, n_ops) if eq is not None else None
        got = mapped(red) if red else None
        return ("einsum", got) if got else None
    if name in MATMUL_OPS and n >= 2:  # matmul family and grouped mm: A[..., k] @ B[..., k, n]
        local = (-1,) if pos == 0 else (-2,)
        got = mapped(local)
        return ("matmul" if "grouped" not in name else "grouped_mm", got) if got else None
    return None


def merge_layouts(a: Optional[Tuple[int, ...]], b: Tuple[int, ...]) -> Optional[Tuple[int, ...]]:
    """The layout of a parameter used twice: the same reduced dims, or None when the uses disagree."""
    return b if a is None or a == b else None


def to_rows(w: torch.Tensor, reduced: Tuple[int, ...]) -> torch.Tensor:
    """``w`` as ``[rows, reduction]``: the ``reduced`` dims last (flattened), every other dim flattened into rows."""
    keep = [d for d in range(w.dim()) if d not in reduced]
    order = keep + list(reduced)
    if keep == [0] and w.dim() == 2:  # a Linear weight [out, in]: already its rows
        return w
    moved = w.permute(order) if order != list(range(w.dim())) else w
    return moved.reshape(math.prod(w.shape[d] for d in keep), -1)


def from_rows(rows: torch.Tensor, shape: Sequence[int], reduced: Tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`to_rows` for a parameter of ``shape``."""
    n = len(shape)
    keep = [d for d in range(n) if d not in reduced]
    order = keep + list(reduced)
    if keep == [0] and n == 2:
        return rows
    moved = rows.reshape([shape[d] for d in order])
    if order == list(range(n)):
        return moved
    inverse = [order.index(d) for d in range(n)]
    return moved.permute(inverse).contiguous()  # the parameter's own memory layout: kernels then sum in its order
