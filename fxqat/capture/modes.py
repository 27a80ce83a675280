"""One graph for both training modes when a module's Python branches on its ``training`` flag.

Transformers attention code picks its dropout probability in Python: ``dropout=0.0 if not self.training else
self.attention_dropout`` (Llama, OPT) or ``self.attn_dropout.p if self.training else 0.0`` (GPT-2).
:class:`~fxqat.capture.example_tracer.ExampleTracer` follows such a branch in the mode the module is in and records
a *training guard*; :func:`fxqat.capture.region.trace_region` then traces the module again in the other mode and
hands both graphs to :func:`merge_modes`:

* the same program once the training guards are gone (the branch changes nothing that runs, e.g. a dropout
  probability of 0.0 either way): the graph holds for both modes as it is;
* the same program except for constants (the probability is 0.1 in train mode, 0.0 in eval mode): each differing
  constant becomes a :func:`by_mode` node that reads the module's ``training`` flag at run time, so the graph is
  exactly the train-mode program in train mode and the eval-mode program in eval mode; a :func:`uniform_modes`
  guard refuses a call in which the flags the branches read disagree (a submodule switched alone);
* anything else: ``None`` (the caller traces again with such branches failing, which keeps the module eager).

Example:
    >>> import torch, torch.fx as fx
    >>> def program(p):
    ...     g = fx.Graph(); x = g.placeholder("x"); flag = g.get_attr("training")
    ...     g.output(g.call_function(torch.nn.functional.dropout, (x, p), {"training": flag})); return g
    >>> merged = merge_modes(program(0.1), program(0.0), True, "training", ())
    >>> [n.target.__name__ for n in merged.nodes if n.op == "call_function"]
    ['by_mode', 'dropout']
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch.fx as fx

from fxqat.capture.example_tracer import TRAINING_GUARD, GuardFailure, is_guard

__all__ = ["same_program", "program_key", "merge_modes", "by_mode", "uniform_modes", "training_flags", "drop_training_guards"]

_CONSTANTS = (type(None), bool, int, float)


def by_mode(training: bool, if_train: Any, if_eval: Any) -> Any:
    """``if_train`` in train mode, ``if_eval`` in eval mode (a constant that a branch on ``training`` chose)."""
    return if_train if training else if_eval


@fx.node.has_side_effect
def uniform_modes(*flags: bool) -> None:
    """Raise :class:`GuardFailure` unless every flag is the same (the graph was merged for uniform modes)."""
    if len(set(bool(f) for f in flags)) > 1:
        raise GuardFailure(
            "fxqat captured this module's train-mode and eval-mode code as one graph, which holds when the module and "
            "its submodules are all in the same mode; call .train() or .eval() on the whole module (not on one "
            "submodule), or keep it eager with QATConfig(leaf_modules=[...])."
        )


def training_flags(graph: fx.Graph) -> Tuple[str, ...]:
    """The ``training`` attributes (``get_attr`` targets) that the conditions of the training guards read."""
    seen: Dict[str, None] = {}
    stack = [n.args[0] for n in graph.nodes if is_guard(n) and n.meta.get(TRAINING_GUARD)]
    visited = set()
    while stack:
        node = stack.pop()
        if not isinstance(node, fx.Node) or node in visited:
            continue
        visited.add(node)
        if node.op == "get_attr" and str(node.target).endswith("training"):
            seen[str(node.target)] = None
        stack.extend(node.all_input_nodes)
    return tuple(seen)


def drop_training_guards(graph: fx.Graph) -> fx.Graph:
    """``graph`` without its training guards and the flag reads and operator nodes only they used (in place)."""
    for node in reversed(list(graph.nodes)):
        if is_guard(node) and node.meta.get(TRAINING_GUARD):
            graph.erase_node(node)
        elif not node.users and (node.op == "get_attr" and str(node.target).endswith("training")
                                 or node.op == "call_function" and getattr(node.target, "__module__", "") in
                                 ("_operator", "operator")):
            graph.erase_node(node)
    return graph


def _diff(p: Any, q: Any, index: Dict[fx.Node, int], path: Tuple, out: List[Tuple[Tuple, Any, Any]]) -> bool:
    """Whether ``p`` and ``q`` (node arguments of two graphs) are the same up to constants (listed into ``out``)."""
    if isinstance(p, fx.Node) or isinstance(q, fx.Node):
        return isinstance(p, fx.Node) and isinstance(q, fx.Node) and index.get(p) == index.get(q, -1)
    if isinstance(p, (tuple, list)):
        return type(p) is type(q) and len(p) == len(q) and all(
            _diff(a, b, index, path + (i,), out) for i, (a, b) in enumerate(zip(p, q)))
    if isinstance(p, slice):
        inner: List[Tuple[Tuple, Any, Any]] = []  # a constant inside a slice cannot become a node: must be equal
        return isinstance(q, slice) and _diff((p.start, p.stop, p.step), (q.start, q.stop, q.step), index, path,
                                              inner) and not inner
    if isinstance(p, dict):
        return isinstance(q, dict) and list(p) == list(q) and all(
            _diff(p[k], q[k], index, path + (k,), out) for k in p)
    if type(p) is type(q) and (p is q or _equal(p, q)):
        return True
    if isinstance(p, _CONSTANTS) and isinstance(q, _CONSTANTS):
        out.append((path, p, q))
        return True
    return False


def _equal(p: Any, q: Any) -> bool:
    try:
        return bool(p == q)
    except Exception:  # noqa: BLE001 - values that do not compare
        return False


def _replace(obj: Any, path: Tuple, value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(obj, dict):
        return {k: (_replace(v, rest, value) if k == head else v) for k, v in obj.items()}
    items = [(_replace(v, rest, value) if i == head else v) for i, v in enumerate(obj)]
    return type(obj)(items)


def merge_modes(a: fx.Graph, b: fx.Graph, a_training: bool, flag: str, flags: Sequence[str]) -> Optional[fx.Graph]:
    """``a`` made to run ``b``'s constants in the other mode, or None when the programs differ otherwise.

    Args:
        a, b: the graphs traced in mode ``a_training`` and in the other mode, training guards dropped.
        a_training: the mode ``a`` was traced in.
        flag: the ``get_attr`` target of the flag that selects (the region's own ``training``).
        flags: every flag the branches read (they must agree at run time: a :func:`uniform_modes` guard).
    """
    na, nb = list(a.nodes), list(b.nodes)
    if len(na) != len(nb):
        return None
    pairs = {**{n: i for i, n in enumerate(na)}, **{n: i for i, n in enumerate(nb)}}
    diffs: List[Tuple[fx.Node, Tuple, Any, Any]] = []
    for x, y in zip(na, nb):
        if x.op != y.op or x.target != y.target:
            return None
        found: List[Tuple[Tuple, Any, Any]] = []
        if not _diff((x.args, x.kwargs), (y.args, y.kwargs), pairs, (), found):
            return None
        diffs += [(x, path, p, q) for path, p, q in found]
    if not diffs:
        return a
    first = next(n for n in na if n.op != "placeholder")
    with a.inserting_before(first):
        selector = a.create_node("get_attr", flag)
        others = [a.create_node("get_attr", f) for f in flags if f != flag]
        if others:
            a.call_function(uniform_modes, (selector, *others))
    for node, path, p, q in diffs:
        with a.inserting_before(node):
            train, evaluation = (p, q) if a_training else (q, p)
            choice = a.call_function(by_mode, (selector, train, evaluation))
        args_kwargs = _replace((node.args, node.kwargs), path, choice)
        node.args, node.kwargs = args_kwargs
    a.lint()
    return a


def _program(graph: fx.Graph, n_fixed: int, values: Optional[Sequence[Any]] = None) -> List[Any]:
    """The graph's non-placeholder nodes as (op, target, args), inputs past the first ``n_fixed`` as ``values``
    (None when not given)."""
    index: Dict[fx.Node, Any] = {}
    out = []
    n_inputs = 0
    for node in graph.nodes:
        if node.op == "placeholder":
            k = n_inputs - n_fixed
            index[node] = ("input", n_inputs) if k < 0 else (values[k] if values is not None else None)
            n_inputs += 1
            continue
        index[node] = ("node", len(out))
        args = fx.node.map_arg((node.args, node.kwargs), lambda a: index[a])
        out.append((node.op, node.target, args))
    return out


def same_program(fixed: fx.Graph, passing: fx.Graph, n_tensors: int, fixed_values: Optional[Sequence[Any]] = None,
                 passing_values: Optional[Sequence[Any]] = None) -> bool:
    """Whether ``passing`` (extra inputs after the first ``n_tensors``) runs ``fixed``'s code with those inputs at
    ``passing_values`` (None when not given); ``fixed``'s own extra inputs stand for ``fixed_values``."""
    try:
        return _program(fixed, n_tensors, fixed_values) == _program(passing, n_tensors, passing_values)
    except Exception:  # noqa: BLE001 - arguments that do not compare (tensors): not provably the same
        return False


def program_key(graph: fx.Graph) -> str:
    """A string equal for two graphs that run the same ops on the same inputs, numbers aside (a layer index)."""
    index: Dict[fx.Node, int] = {}
    out = []
    for k, node in enumerate(graph.nodes):
        index[node] = k
        args = fx.node.map_aggregate((node.args, node.kwargs), lambda v: ("node", index[v]) if isinstance(v, fx.Node)
                                     else type(v).__name__ if isinstance(v, (int, float)) and not isinstance(v, bool)
                                     else v)
        out.append((node.op, node.target, args))
    return repr(out)
