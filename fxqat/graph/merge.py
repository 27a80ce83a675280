"""Granularity: how the atomic segments between consecutive cut nodes are merged into blocks.

:func:`fxqat.graph.partition` first splits the path nodes at every cut node into *segments* (the finest partition
with one entry and one exit tensor), then groups consecutive segments with the rules here. Every rule only merges
*consecutive* segments, so a group still has one entry and one exit.

**Structural grouping** (``structural=True``, the default) **[R]**. The module hierarchy recorded by the tracer
(``node.meta["nn_module_stack"]``, or the qualified ``call_module`` targets when it is missing) is walked top-down.
At each module, its children's segment spans are merged where they overlap into *pieces*; a segment that no child
touches is a *glue* piece. A piece made of one child spanning several segments is *descended into* (recursively
split) when it holds at least two segments with a quantized node and its class is not *atomic*; otherwise it stays
whole. A class is atomic when one of its instances (not a plain ``Sequential``/``ModuleList``/``ModuleDict``)
has submodules, holds a quantized node and lies inside one segment, e.g. a residual block: then all its instances
stay whole, including those without a skip connection (MobileNetV2's inverted residuals). Within a module, each piece
with a quantized node starts a new group. A piece without one

* joins the previous group when that group's piece is a leaf module or glue (BN/ReLU/pool after a conv: the stem);
* otherwise (after a composite piece such as a residual block) waits for the next quantized piece and joins it
  (``avgpool`` and ``flatten`` join ``fc``: the head), except when that next piece is the first group of a
  descended child, where it goes back to the previous group (a pool between the stem and ``layer1``);
* at the start or the end of a module, it is handed to the parent module, which applies the same rules.

**Flat grouping** (``structural=False``): the same rule over the segments alone: each segment with a quantized node
starts a group, the others join the previous group (leading ones the first).

**Layers** (``cuts="layers"``, :func:`layer_groups`): a *layer* is a call of a module with submodules, held in a
``ModuleList``/``Sequential`` (a transformer block in ``blocks``, a ResNet block in ``layer1``), whether the container
is called (it is then on the module stack) or iterated in ``forward`` (``for blk in self.blocks``: named by
``containers``). Two neighbouring
groups are merged when the segments on both sides of their boundary lie in the same layers (no layer begins or
ends there): a transformer block, cut by default after its attention and after its MLP, becomes one group.

**Boundaries and max_blocks** (:func:`split_at`, :func:`merge_cheapest`): forced block ends split groups (they win over
the "one quantized layer per block" rule); ``max_blocks`` then merges the adjacent pair with the smallest summed
cost, never across a forced end.

Example:
    >>> flat_groups([True, False, False, True, True, False])
    [[0, 1, 2], [3], [4, 5]]
    >>> merge_cheapest([[0], [1], [2], [3]], costs=[5, 1, 1, 9], max_groups=2, forced=set())
    [[0, 1, 2], [3]]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Collection, Dict, List, Sequence, Set, Tuple

__all__ = ["StackEntry", "flat_groups", "structural_groups", "layer_groups", "split_at", "merge_cheapest"]

log = logging.getLogger(__name__)

GENERIC_CONTAINERS = frozenset(
    f"torch.nn.modules.container.{name}" for name in ("Sequential", "ModuleList", "ModuleDict", "ParameterList")
)


@dataclass(frozen=True)
class StackEntry:
    """One level of a node's module stack.

    Attributes:
        key: the tracer's key for this module *call* (unique per call, e.g. ``"layer1.0.relu@1"``).
        path: the module's qualified name (``"layer1.0.relu"``).
        cls: the module's class as ``"module.QualName"``.
    """

    key: str
    path: str
    cls: str


@dataclass
class _Token:
    segs: List[int]
    quantized: bool
    kind: str  # "leaf" (leaf module or glue), "whole" (composite kept whole), "sub" (group of a descended child)


def _merge_tokens(tokens: Sequence[_Token]) -> Tuple[List[int], List[List[int]], List[int]]:
    """One level of grouping: returns (leading unquantized segments, groups, trailing unquantized segments)."""
    lead: List[int] = []
    groups: List[List[int]] = []
    pending: List[int] = []
    last_leaf = False
    for tok in tokens:
        if tok.quantized:
            if tok.kind == "sub" and pending and groups:  # e.g. a pool between a stem and layer1: stays with the stem
                groups[-1] += pending
                pending = []
            groups.append(pending + list(tok.segs))
            pending = []
            last_leaf = tok.kind == "leaf"
        elif not groups:
            lead += tok.segs
        elif last_leaf and not pending:  # BN / activation / pool right after a conv: its epilogue
            groups[-1] += tok.segs
        else:
            pending += tok.segs
    return lead, groups, pending


def _close(lead: List[int], groups: List[List[int]], trail: List[int], n: int) -> List[List[int]]:
    if not groups:
        return [list(range(n))] if n else []
    groups[0] = lead + groups[0]
    groups[-1] = groups[-1] + trail
    return groups


def flat_groups(seg_quantized: Sequence[bool]) -> List[List[int]]:
    """Groups segments so that each group starts at a segment with a quantized node (see module docstring).

    Args:
        seg_quantized: per segment, whether it holds a quantized node.

    Returns:
        Lists of consecutive segment indices covering ``range(len(seg_quantized))``.

    Example:
        >>> flat_groups([False, True, False, True])
        [[0, 1, 2], [3]]
        >>> flat_groups([False, False])
        [[0, 1]]
    """
    tokens = [_Token([i], q, "leaf") for i, q in enumerate(seg_quantized)]
    lead, groups, trail = _merge_tokens(tokens)
    return _close(lead, groups, trail, len(seg_quantized))


def structural_groups(
    seg_stacks: Sequence[Sequence[Tuple[StackEntry, ...]]],
    seg_node_quantized: Sequence[Sequence[bool]],
) -> List[List[int]]:
    """Groups segments along the module hierarchy (see the module docstring).

    Args:
        seg_stacks: per segment, the module stack of each of its nodes (outermost module first; ``()`` for nodes
            written directly in the root's ``forward``).
        seg_node_quantized: per segment, per node, whether the node is quantized (same shape as ``seg_stacks``).

    Returns:
        Lists of consecutive segment indices covering every segment once.

    Example:
        >>> e = lambda p, c="m.Block": StackEntry(p, p, c)
        >>> stacks = [[(e("stem", "m.Conv"),)], [(e("b0"), e("b0.c", "m.Conv"))], [(e("b1"), e("b1.c", "m.Conv"))],
        ...           [(e("b1"), e("b1.d", "m.Conv"))], [()], [(e("fc", "m.Linear"),)]]
        >>> quant = [[True], [True], [True], [True], [False], [True]]
        >>> structural_groups(stacks, quant)  # b0 lies in one segment, so b1 (same class) stays whole
        [[0], [1], [2, 3], [4, 5]]
    """
    n = len(seg_stacks)
    seg_q = [any(flags) for flags in seg_node_quantized]
    spans: Dict[Tuple[str, ...], List] = {}  # uid -> [first seg, last seg, class, has quantized node, has children]
    for s, (stacks, flags) in enumerate(zip(seg_stacks, seg_node_quantized)):
        for stack, q in zip(stacks, flags):
            for depth in range(1, len(stack) + 1):
                uid = tuple(entry.key for entry in stack[:depth])
                span = spans.setdefault(uid, [s, s, stack[depth - 1].cls, False, False])
                span[0], span[1] = min(span[0], s), max(span[1], s)
                span[3] = span[3] or q
                span[4] = span[4] or depth < len(stack)
    atomic = {sp[2] for sp in spans.values() if sp[0] == sp[1] and sp[3] and sp[4] and sp[2] not in GENERIC_CONTAINERS}
    log.debug("atomic module classes: %s", sorted(atomic))
    keyed = [[tuple(e.key for e in stack) for stack in stacks] for stacks in seg_stacks]

    def level(prefix: Tuple[str, ...], lo: int, hi: int) -> List[_Token]:
        depth = len(prefix)
        child: Dict[Tuple[str, ...], List[int]] = {}
        for s in range(lo, hi + 1):
            for keys in keyed[s]:
                if len(keys) > depth and keys[:depth] == prefix:
                    span = child.setdefault(keys[: depth + 1], [s, s])
                    span[0], span[1] = min(span[0], s), max(span[1], s)
        pieces: List[List] = []
        for uid, (a, b) in sorted(child.items(), key=lambda kv: kv[1][0]):
            if pieces and a <= pieces[-1][1]:
                pieces[-1][1] = max(pieces[-1][1], b)
                pieces[-1][2].append(uid)
            else:
                pieces.append([a, b, [uid]])
        tokens: List[_Token] = []
        cursor = lo
        for a, b, uids in pieces:
            tokens += [_Token([s], seg_q[s], "leaf") for s in range(cursor, a)]
            uid = uids[0]
            if len(uids) == 1 and b > a and sum(seg_q[a : b + 1]) >= 2 and spans[uid][2] not in atomic:
                lead, groups, trail = _merge_tokens(level(uid, a, b))
                tokens += [_Token(lead, False, "whole")] if lead else []
                tokens += [_Token(g, True, "sub") for g in groups]
                tokens += [_Token(trail, False, "whole")] if trail else []
            else:
                leaf = len(uids) == 1 and not spans[uid][4]
                tokens.append(_Token(list(range(a, b + 1)), any(seg_q[a : b + 1]), "leaf" if leaf else "whole"))
            cursor = b + 1
        tokens += [_Token([s], seg_q[s], "leaf") for s in range(cursor, hi + 1)]
        return tokens

    lead, groups, trail = _merge_tokens(level((), 0, n - 1)) if n else ([], [], [])
    return _close(lead, groups, trail, n)


def layer_groups(
    groups: Sequence[Sequence[int]], seg_stacks: Sequence[Sequence[Tuple[StackEntry, ...]]],
    containers: Collection[str] = (),
) -> List[List[int]]:
    """Merges neighbouring groups whose boundary falls inside a layer (see *Layers* in the module docstring).

    Args:
        groups: consecutive segment indices (what :func:`structural_groups` returns).
        seg_stacks: per segment, the module stack of each of its nodes.
        containers: qualified names of the model's ``ModuleList``/``Sequential`` modules (their children are layers
            even when the container itself is never called).

    Example:
        >>> e = lambda p, c="m.Block": StackEntry(p, p, c)
        >>> seq = "torch.nn.modules.container.Sequential"
        >>> layer = lambda i, part: (e("blocks", seq), e(f"blocks.{i}"), e(f"blocks.{i}.{part}", "m.Linear"))
        >>> stacks = [[(e("stem", "m.Linear"),)], [layer(0, "attn")], [layer(0, "mlp")], [layer(1, "attn")],
        ...           [layer(1, "mlp")]]
        >>> layer_groups([[0], [1], [2], [3], [4]], stacks)
        [[0], [1, 2], [3, 4]]
    """
    composite = set()
    for stacks in seg_stacks:
        for stack in stacks:
            for depth in range(1, len(stack)):
                composite.add(tuple(entry.key for entry in stack[:depth]))

    held = set(containers)

    def layers_of(seg: int) -> frozenset:
        found = set()
        for stack in seg_stacks[seg]:
            for d in range(len(stack)):
                uid = tuple(entry.key for entry in stack[: d + 1])
                in_container = (d > 0 and stack[d - 1].cls in GENERIC_CONTAINERS) or \
                    stack[d].path.rpartition(".")[0] in held
                if in_container and stack[d].cls not in GENERIC_CONTAINERS and uid in composite:
                    found.add(uid)
        return frozenset(found)

    out: List[List[int]] = []
    for group in groups:
        if out and group and out[-1]:
            left, right = layers_of(out[-1][-1]), layers_of(group[0])
            if left and left == right:
                out[-1] += list(group)
                continue
        out.append(list(group))
    return out


def split_at(groups: Sequence[Sequence[int]], forced: Set[int]) -> List[List[int]]:
    """Splits groups so that every segment index in ``forced`` ends a group.

    Example:
        >>> split_at([[0, 1, 2], [3, 4]], {0, 3})
        [[0], [1, 2], [3], [4]]
    """
    out: List[List[int]] = []
    for group in groups:
        current: List[int] = []
        for s in group:
            current.append(s)
            if s in forced:
                out.append(current)
                current = []
        if current:
            out.append(current)
    return out


def merge_cheapest(
    groups: Sequence[Sequence[int]], costs: Sequence[float], max_groups: int, forced: Set[int]
) -> List[List[int]]:
    """Merges adjacent groups, cheapest pair first, until at most ``max_groups`` remain.

    The cost of a pair is the sum of its groups' costs (``costs`` is per group); ties go to the earliest pair. Two
    groups are never merged when the first ends at a segment in ``forced``.

    Raises:
        ValueError: when ``forced`` ends alone need more than ``max_groups`` groups.

    Example:
        >>> merge_cheapest([[0], [1], [2]], costs=[1, 1, 1], max_groups=1, forced=set())
        [[0, 1, 2]]
    """
    if max_groups < 1:
        raise ValueError(f"max_blocks={max_groups} must be at least 1.")
    groups = [list(g) for g in groups]
    costs = list(costs)
    while len(groups) > max_groups:
        candidates = [(costs[i] + costs[i + 1], i) for i in range(len(groups) - 1) if groups[i][-1] not in forced]
        if not candidates:
            raise ValueError(
                f"max_blocks={max_groups} is smaller than the {len(groups)} blocks the boundaries require; "
                f"raise max_blocks or pass fewer boundaries."
            )
        _, i = min(candidates)
        groups[i : i + 2] = [groups[i] + groups[i + 1]]
        costs[i : i + 2] = [costs[i] + costs[i + 1]]
    return groups
