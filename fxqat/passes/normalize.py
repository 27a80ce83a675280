"""normalize: a canonical graph for the later passes.

* A **stateless module called at several places** (torchvision's ``BasicBlock`` calls one ``self.relu`` twice) gets
  one copy per call site, so every ``call_module`` node owns its module and per-site decisions (which block it is
  in, which partner copy it maps to) never collide. Modules with parameters or buffers are never duplicated: shared
  weights stay shared.
* Dropout and every other node are left untouched.

Example:
    >>> import torch, torch.nn as nn
    >>> from fxqat.trace import trace
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc, self.act = nn.Linear(2, 2), nn.ReLU()
    ...     def forward(self, x):
    ...         return self.act(self.fc(self.act(x)))
    >>> gm = normalize(trace(Net()))
    >>> [n.target for n in gm.graph.nodes if n.op == "call_module"]
    ['act', 'fc', 'act_1']
"""

from __future__ import annotations

import copy
from collections import Counter

import torch.fx as fx

__all__ = ["normalize"]


def _stateless(module) -> bool:
    return not any(True for _ in module.parameters()) and not any(True for _ in module.buffers())


def normalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Give every call site of a shared stateless module its own copy (in place; returns ``gm``)."""
    counts = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    seen: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op != "call_module" or counts[node.target] < 2:
            continue
        module = gm.get_submodule(node.target)
        if not _stateless(module):
            continue
        seen[node.target] += 1
        if seen[node.target] == 1:
            continue  # the first call site keeps the original
        k = seen[node.target] - 1
        new_name = f"{node.target}_{k}"
        while _has(gm, new_name):
            k += 1
            new_name = f"{node.target}_{k}"
        gm.add_submodule(new_name, copy.deepcopy(module))
        node.target = new_name
    gm.graph.lint()
    gm.recompile()
    return gm


def _has(gm: fx.GraphModule, name: str) -> bool:
    try:
        gm.get_submodule(name)
        return True
    except AttributeError:
        return False
