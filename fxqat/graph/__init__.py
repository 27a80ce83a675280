"""Graph analysis for fxqat: a networkx view of fx graphs, dominators, and the block partition.

Example:
    >>> from torch import fx, nn
    >>> from fxqat.graph import partition
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    >>> [(b.name, b.exit) for b in partition(gm)]
    [('stem', '_1'), ('head', '_2')]
"""

from fxqat.graph.blocks import META_KEY, Block, partition, summary_table
from fxqat.graph.dominance import cut_nodes, immediate_dominators, sink_dominators, source_postdominators
from fxqat.graph.modinfo import block_params, default_is_quantized, module_class, node_stack
from fxqat.graph.nxview import SINK, SOURCE, dead_nodes, free_nodes, path_nodes, to_networkx
from fxqat.graph.plot import plot_partition
from fxqat.graph.split import prefix_module, suffix_module

__all__ = [
    "Block",
    "partition",
    "summary_table",
    "default_is_quantized",
    "block_params",
    "node_stack",
    "module_class",
    "META_KEY",
    "prefix_module",
    "suffix_module",
    "plot_partition",
    "to_networkx",
    "path_nodes",
    "free_nodes",
    "dead_nodes",
    "SOURCE",
    "SINK",
    "cut_nodes",
    "immediate_dominators",
    "sink_dominators",
    "source_postdominators",
]
