"""Graph passes of the pipeline, one concept a file: normalize, annotate, insert_quant, build_hybrid (sub-graph views
between cut nodes are in :mod:`fxqat.graph.subgraph`)."""

from fxqat.passes.annotate import LayerQuant, annotate
from fxqat.passes.build_hybrid import HybridGraphModule, HybridOutput, build_hybrid, mark_cuts
from fxqat.passes.insert_quant import OpaqueWeightQuant, insert_quant
from fxqat.passes.normalize import normalize

__all__ = [
    "normalize", "annotate", "LayerQuant", "insert_quant", "OpaqueWeightQuant", "mark_cuts",
    "build_hybrid", "HybridGraphModule", "HybridOutput",
]
