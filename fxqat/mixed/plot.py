"""Pictures of a bit allocation: the partition figure of :mod:`fxqat.graph.plot` coloured by each block's bits.

With the model's FP graph and its blocks (graph roots), every node is drawn in the colour of its block's bit-width
(blocks without allocated weights, e.g. a stem whose only layer follows the first/last policy, in grey); otherwise
(eager roots such as a transformers model) one bar per block, its length the block's weight count.

Example:
    >>> import os, tempfile, torch, torch.nn as nn, fxqat
    >>> from fxqat.api import prepare_fp_graph
    >>> from fxqat.mixed.table import BlockSensitivity, SensitivityTable
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> x = torch.randn(2, 4)
    >>> blocks = fxqat.find_blocks(net, (x,))
    >>> t = SensitivityTable("paths", (2, 8), tuple(BlockSensitivity(b.name, b.index, m, n, (0.5, 0.0), (0, 0))
    ...     for b, m, n in zip(blocks, [(), ("2",), ()], [0, 64, 0])))
    >>> _, alloc = fxqat.allocate_bits(t, avg_bits=2)
    >>> path = os.path.join(tempfile.mkdtemp(), "bits.png")
    >>> plot_allocation(alloc, path, gm=prepare_fp_graph(net, (x,)), blocks=blocks) == path
    True
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, Optional, Sequence, Union

import torch.fx as fx

from fxqat.graph.blocks import Block
from fxqat.graph.plot import plot_partition
from fxqat.mixed.allocate import Allocation
from fxqat.mixed.table import SensitivityTable

__all__ = ["bit_colors", "plot_allocation"]

PathLike = Union[str, os.PathLike]


def bit_colors(bits: Sequence[int]) -> Dict[int, Any]:
    """A colour per bit-width on a red (fewest bits) to green (most bits) scale, log-spaced.

    Example:
        >>> c = bit_colors([2, 4, 8]); len(c), c[2] != c[8]
        (3, True)
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("RdYlGn")
    bits = sorted(set(bits))
    lo, hi = math.log2(bits[0]), math.log2(bits[-1])
    return {b: cmap(0.1 + 0.8 * ((math.log2(b) - lo) / (hi - lo) if hi > lo else 0.5)) for b in bits}


def plot_allocation(
    allocation: Allocation,
    path: PathLike,
    *,
    gm: Optional[fx.GraphModule] = None,
    blocks: Optional[Sequence[Block]] = None,
    table: Optional[SensitivityTable] = None,
    title: Optional[str] = None,
    choices: Optional[Sequence[int]] = None,
) -> str:
    """Draw ``allocation`` and save it (PNG); returns ``str(path)``.

    Args:
        allocation: from :func:`fxqat.allocate_bits`.
        path: the image file.
        gm, blocks: the FP graph (``fxqat.api.prepare_fp_graph(model, (x,))``) and its blocks
            (``fxqat.find_blocks(model, (x,), config)``): the partition figure coloured by bits.
        table: without ``gm``: the sensitivity table, for each block's weight count (bar lengths).
        title: figure title (default: the average bits and the method).
        choices: the bit-widths the colour scale spans (default: the table's, else those used), so that figures of
            several allocations share colours.
    """
    bits = dict(allocation.bits)
    scale = list(choices or (table.bits if table is not None else ())) + list(bits.values())
    colors = bit_colors(scale or [4])
    title = title or (f"bits per block: {allocation.avg_bits:.2f} bits per weight on average "
                      f"({allocation.method} sensitivity)")
    legend = {f"{b} bits": colors[b] for b in sorted(set(bits.values()))}
    legend["fixed / not allocated"] = "lightgrey"
    if gm is not None and blocks is not None:
        block_colors = {b.index: colors[bits[b.name]] if b.name in bits else "lightgrey" for b in blocks}
        labels = {b.index: f"{b.index}: {b.name} ({bits[b.name]} b)" if b.name in bits else f"{b.index}: {b.name}"
                  for b in blocks}
        return plot_partition(gm, blocks, path, block_colors=block_colors, block_labels=labels, legend=legend,
                              title=title)
    return _plot_rows(allocation, path, colors, legend, table, title)


def _plot_rows(allocation: Allocation, path: PathLike, colors, legend, table, title) -> str:
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    bits = dict(allocation.bits)
    names = [r.block for r in table.rows] if table is not None else list(bits)
    counts = {r.block: r.weight_count for r in table.rows} if table is not None else {}
    fig, ax = plt.subplots(figsize=(8, 0.35 * max(len(names), 1) + 1.4))
    try:
        for k, name in enumerate(names):
            ax.barh(k, counts.get(name, 1), color=colors[bits[name]] if name in bits else "lightgrey")
            ax.text(0, k, f" {name}: {bits[name]} bits" if name in bits else f" {name}: fixed", va="center",
                    fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("weights in block" if counts else "block")
        ax.legend(handles=[Patch(color=c, label=k) for k, c in legend.items()], fontsize=7, loc="lower right")
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return str(path)
