"""Drawing a block partition: the fx graph laid out by topological generation, nodes coloured by block.

Cut nodes (block exits) are drawn larger with a black outline; free nodes (``get_attr``, constants) are grey and
small; placeholders and the output are white. The layout puts each topological generation of the graph on one row
(top to bottom), so it stays readable for graphs of several hundred nodes; labels are drawn only up to
``max_labels`` nodes. Rendering uses matplotlib's non-interactive ``Agg`` backend, so it works on headless machines.

Example:
    >>> import os, tempfile
    >>> from torch import fx, nn
    >>> from fxqat.graph import partition
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)))
    >>> path = os.path.join(tempfile.mkdtemp(), "blocks.png")
    >>> plot_partition(gm, partition(gm), path) == path and os.path.getsize(path) > 0
    True
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import networkx as nx
import torch.fx as fx

from fxqat.graph.blocks import Block
from fxqat.graph.nxview import SINK, SOURCE, to_networkx

__all__ = ["layered_layout", "plot_partition"]

log = logging.getLogger(__name__)


def layered_layout(view: nx.DiGraph) -> Dict[str, Tuple[float, float]]:
    """Positions for a DAG: one row per topological generation, nodes of a row spread evenly and centred.

    Example:
        >>> import networkx as nx
        >>> pos = layered_layout(nx.DiGraph([("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")]))
        >>> pos["a"], pos["d"], sorted([pos["b"], pos["c"]])
        ((0.0, 0.0), (0.0, -2.0), [(-0.5, -1.0), (0.5, -1.0)])
    """
    pos: Dict[str, Tuple[float, float]] = {}
    for depth, layer in enumerate(nx.topological_generations(view)):
        layer = sorted(layer, key=lambda n: view.nodes[n].get("order", 0))
        width = len(layer)
        for k, node in enumerate(layer):
            pos[node] = (k - (width - 1) / 2.0, -float(depth) + 0.0)
    return pos


def plot_partition(
    gm: fx.GraphModule,
    blocks: Sequence[Block],
    path: Union[str, os.PathLike],
    *,
    max_labels: int = 120,
    dpi: int = 100,
    block_colors: Optional[Mapping[int, Any]] = None,
    block_labels: Optional[Mapping[int, str]] = None,
    legend: Optional[Mapping[str, Any]] = None,
    title: Optional[str] = None,
) -> str:
    """Draws ``gm``'s graph with nodes coloured by block and cut nodes highlighted, and saves it as an image.

    Args:
        gm: the partitioned GraphModule.
        blocks: its partition (:func:`fxqat.graph.partition`).
        path: where to write the image (PNG by extension; the directory must exist).
        max_labels: node names are drawn only when the graph has at most this many nodes.
        dpi: resolution of the saved figure.
        block_colors: a matplotlib colour per block index (default: one ``tab20`` colour per block), e.g. the
            bit-width each block was given (:func:`fxqat.mixed.plot.plot_allocation`).
        block_labels: the text drawn next to each block's exit (default ``"{index}: {name}"``).
        legend: ``{label: colour}`` entries of a legend (default: none).
        title: the figure title (default: model name, block and node counts).

    Returns:
        ``str(path)``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    view = to_networkx(gm.graph)
    view.remove_nodes_from([SOURCE, SINK])
    pos = layered_layout(view)
    block_of = {name: b.index for b in blocks for name in b.nodes}
    exits = {b.exit for b in blocks}
    cmap = plt.get_cmap("tab20")
    color_of = dict(block_colors) if block_colors is not None else {b.index: cmap(b.index % 20) for b in blocks}
    colors, sizes, edgecolors = [], [], []
    for node in view.nodes:
        op = view.nodes[node]["op"]
        if node in block_of and op != "get_attr":
            colors.append(color_of.get(block_of[node], "lightgrey"))
        elif op in ("placeholder", "output"):
            colors.append("white")
        else:
            colors.append("lightgrey")
        sizes.append(160 if node in exits else 40 if op == "get_attr" else 70)
        edgecolors.append("black" if node in exits or op in ("placeholder", "output") else "none")
    rows = max((-y for _, y in pos.values()), default=0) + 1
    cols = max((abs(x) for x, _ in pos.values()), default=0) * 2 + 1
    fig, ax = plt.subplots(figsize=(min(4 + 0.6 * cols, 40), min(3 + 0.35 * rows, 200)))
    try:
        nx.draw_networkx_edges(view, pos, ax=ax, arrows=False, width=0.5, edge_color="grey")
        nx.draw_networkx_nodes(
            view, pos, ax=ax, node_color=colors, node_size=sizes, edgecolors=edgecolors, linewidths=1.0
        )
        if view.number_of_nodes() <= max_labels:
            nx.draw_networkx_labels(view, {k: (x + 0.08, y) for k, (x, y) in pos.items()}, ax=ax, font_size=6,
                                    horizontalalignment="left")
        for b in blocks:
            if b.exit in pos:
                x, y = pos[b.exit]
                text = (block_labels or {}).get(b.index, f"{b.index}: {b.name}")
                label_color = color_of.get(b.index, "black") if block_colors is None else "black"
                ax.annotate(text, (x, y), xytext=(-12, 0), textcoords="offset points",
                            ha="right", va="center", fontsize=7, color=label_color, fontweight="bold")
        if legend:
            from matplotlib.patches import Patch

            ax.legend(handles=[Patch(color=c, label=k) for k, c in legend.items()], loc="upper right", fontsize=7)
        xs = [x for x, _ in pos.values()] or [0.0]
        ax.set_xlim(min(xs) - 1.5, max(xs) + 1.5)
        ax.set_ylim(-rows, 1.0)
        ax.set_title(title or f"{type(gm).__name__}: {len(blocks)} blocks, {view.number_of_nodes()} nodes")
        ax.axis("off")
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
    log.info("wrote partition plot of %d nodes to %s", view.number_of_nodes(), path)
    return str(path)
