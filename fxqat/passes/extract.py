"""extract: re-exports :mod:`fxqat.graph.subgraph` (sub-graphs between cut nodes, as views sharing the root's modules).

The code lives in the graph layer so that :mod:`fxqat.graph.split` and :mod:`fxqat.graph.nxview` need no import from
``fxqat.passes``; this module keeps the old import path working.

Example:
    >>> from fxqat.passes.extract import OUTPUT, extract
    >>> OUTPUT
    'output'
"""

from fxqat.graph.subgraph import OUTPUT, extract, view

__all__ = ["extract", "view", "OUTPUT"]
