"""Hypothesis strategies for hierarchical capture: random nested module trees with untraceable modules.

:func:`eager_tree_st` draws ``(model, example_input)``: a root whose forward is data-dependent (so it can never be
traced) running a ``ModuleList`` chain of 2..4 random subtrees. A subtree node is one of

* ``Plain``: a traceable ``Linear``-``ReLU`` stack (a graph region);
* ``DataDep``: ``if x.sum() > 0`` around its children (control flow on a tensor value);
* ``Kwargs``: ``forward(x, scale=None, **kwargs)`` called with keyword arguments;
* ``ProxyIter``: unpacks ``torch.split`` of its input (iteration over a Proxy);
* ``PyScalar``: reads ``float(x.mean())`` (a Python number from a tensor);
* ``Twice``: one ``Linear`` called twice (one Parameter, one weight quantizer);

nested up to ``max_depth`` levels; every node keeps the feature size ``D``. No randomness in forward, no dropout.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from hypothesis import strategies as st
from torch import nn

__all__ = ["eager_tree_st", "region_calls_st", "D", "KINDS"]

D = 8
KINDS = ("Plain", "DataDep", "Kwargs", "ProxyIter", "PyScalar", "Twice")


class Plain(nn.Module):
    def __init__(self, children: List[nn.Module]) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D, D), nn.ReLU(), *children)

    def forward(self, x):
        return self.body(x)


class DataDep(nn.Module):
    def __init__(self, children: List[nn.Module]) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.kids = nn.ModuleList(children)

    def forward(self, x):
        x = self.fc(x)
        if x.sum() > 0:
            x = x * 0.5
        for k in self.kids:
            x = k(x)
        return x


class Kwargs(nn.Module):
    def __init__(self, children: List[nn.Module]) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.kids = nn.ModuleList(children)

    def forward(self, x, scale=None, **kwargs):
        x = self.fc(x) if scale is None else self.fc(x) * scale
        for k in self.kids:
            x = k(x)
        return x


class ProxyIter(nn.Module):
    def __init__(self, children: List[nn.Module]) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.kids = nn.ModuleList(children)

    def forward(self, x):
        a, b = torch.split(self.fc(x), [D // 2, D - D // 2], dim=-1)
        x = torch.cat([b, a], dim=-1)
        for k in self.kids:
            x = k(x)
        return x


class PyScalar(nn.Module):
    def __init__(self, children: List[nn.Module]) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.kids = nn.ModuleList(children)

    def forward(self, x):
        m = float(x.detach().abs().mean()) + 1.0
        x = self.fc(x) / m
        for k in self.kids:
            x = k(x)
        return x


class Twice(nn.Module):
    def __init__(self, children: List[nn.Module]) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.kids = nn.ModuleList(children)

    def forward(self, x):
        x = self.fc(torch.tanh(self.fc(x)))
        for k in self.kids:
            x = k(x)
        return x


class Root(nn.Module):
    """Data-dependent root over a chain of subtrees and a head."""

    def __init__(self, layers: List[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        if x.numel() == 0:
            return x
        for layer in self.layers:
            x = layer(x, scale=None) if isinstance(layer, Kwargs) else layer(x)
        return {"logits": self.head(x)}


_CLASSES = {c.__name__: c for c in (Plain, DataDep, Kwargs, ProxyIter, PyScalar, Twice)}


@st.composite
def _node_st(draw: st.DrawFn, depth: int) -> nn.Module:
    kind = draw(st.sampled_from(KINDS))
    n_kids = draw(st.integers(0, 2)) if depth > 0 else 0
    kids = [draw(_node_st(depth - 1)) for _ in range(n_kids)]
    return _CLASSES[kind](kids)


@st.composite
def eager_tree_st(draw: st.DrawFn, max_depth: int = 2) -> Tuple[nn.Module, torch.Tensor]:
    """``(model, example_input)``; parameters seeded from the draw, the global RNG untouched."""
    seed = draw(st.integers(0, 2**16))
    n_layers = draw(st.integers(2, 4))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = [draw(_node_st(max_depth)) for _ in range(n_layers)]
        for layer in layers:  # re-initialise: modules were built while drawing
            for m in layer.modules():
                if isinstance(m, nn.Linear):
                    m.reset_parameters()
        model = Root(layers)
        x = torch.randn(2, D)
    return model.eval(), x


@st.composite
def region_calls_st(draw: st.DrawFn, max_calls: int = 5) -> List[Tuple[int, int, int, bool, bool]]:
    """A sequence of calls of an attention layer as a decoder makes them: ``(batch, new tokens, cached tokens,
    masked, cached)`` (one-token decoding steps, prompts, a mask tensor or ``None``, a cache or none)."""
    calls = []
    for _ in range(draw(st.integers(1, max_calls))):
        cached = draw(st.booleans())
        calls.append((draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(0, 3)) if cached else 0,
                      draw(st.booleans()), cached))
    return calls
