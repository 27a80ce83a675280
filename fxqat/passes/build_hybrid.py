"""build_hybrid: one module carrying the LP backbone, the FP partner and the mixed-precision paths (methods.md §1).

With ``QATConfig(hybrid=HybridConfig(...))`` the prepared model is a :class:`HybridGraphModule`. Its graph (what
``qm.code`` prints, what ``convert`` keeps) is the LP network. In train mode a call returns
``HybridOutput(lp, paths, fp)``:

* ``lp_prefix`` (default): the LP backbone runs once and returns its cut activations h_1..h_{n-1}; path i is the FP
  partner's blocks i+1..n applied to h_i. The LP prefix is never recomputed: paths *branch off* the backbone.
* ``fp_prefix``: the partner runs once (no grad) returning its cut activations f_i; path i is LP blocks i+1..n on f_i.
* ``single``: path k is the partner with only block k replaced by LP block k (input f_{k-1}, FP blocks after it).

``fp`` is the partner's output (no grad). ``partner="frozen"`` keeps a frozen copy (``requires_grad=False``, always in
eval mode, under ``fxqat_partner``); ``partner="shared"`` runs the LP latent weights without quantizers (no extra
weight memory; BatchNorm running statistics are not updated by FP passes; the FP suffixes read the weights detached,
so a path-i loss trains blocks <= i only, unless ``HybridConfig.shared_suffix_grad=True``). With ``paths=k``, k paths
are sampled per step from a generator seeded by ``(seed, step)``: identical on every DDP rank and after a resume;
unselected paths are not executed. In eval mode the call returns the LP output only
(:meth:`HybridGraphModule.lp_forward`, the generated code). Both modes go through ``nn.Module.__call__``, so forward
hooks and pre-hooks registered on the prepared model run in both. Under ``torch.compile`` prefer ``paths="all"``: each
sampled set of paths is a different graph (one recompilation per set).

Example:
    >>> import torch, torch.nn as nn, fxqat
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> qm = fxqat.prepare_qat(net, (torch.randn(2, 4),), fxqat.QATConfig(hybrid=fxqat.HybridConfig()))
    >>> out = qm(torch.randn(2, 4))
    >>> len(out.paths), out.lp.shape
    (2, torch.Size([2, 3]))
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.fx as fx
from torch import nn

from fxqat.config import HybridConfig, QATConfig
from fxqat.graph.blocks import partition
from fxqat.graph.subgraph import OUTPUT, extract, view
from fxqat.hybrid_output import HybridOutput, select_paths
from fxqat.passes.annotate import is_weight_layer_node
from fxqat.path_losses import PathLossAverages
from fxqat.trace import adopt_hierarchy

__all__ = ["HybridOutput", "HybridGraphModule", "mark_cuts", "build_hybrid", "CUT"]

log = logging.getLogger(__name__)
CUT = "fxqat.cut"  # node.meta key: index i of the cut that ends block i


def mark_cuts(gm: fx.GraphModule, config: QATConfig) -> fx.Graph:
    """Partition the annotated FP graph, write ``meta["fxqat.cut"]`` on block exits, return a copy of the FP graph."""
    h = config.hybrid
    blocks = partition(gm, is_weight_layer_node, max_blocks=h.max_blocks, boundaries=h.boundaries,
                       cuts="layers" if h.cuts == "layers" else "residual")
    if len(blocks) < 2:
        raise ValueError(
            f"block replacement needs at least 2 blocks, but {type(gm).__name__} has {len(blocks)}: its graph has no "
            "node that every input-to-output path passes through between two quantized layers. Use plain QAT "
            "(hybrid=None) for this model."
        )
    names = {n.name: n for n in gm.graph.nodes}
    for b in blocks[:-1]:
        names[b.exit].meta[CUT] = b.index
    gm.meta["fxqat.blocks"] = blocks
    return copy.deepcopy(gm.graph)


def _cut_names(graph: fx.Graph) -> List[str]:
    cuts = sorted((n.meta[CUT], n.name) for n in graph.nodes if CUT in n.meta)
    return [name for _, name in cuts]


@contextlib.contextmanager
def _frozen_bn_stats(modules: Iterator[nn.Module]) -> Iterator[None]:
    """Keep BatchNorm running statistics unchanged while FP paths run through shared (LP) modules."""
    saved = []
    for m in modules:
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training:
            saved.append((m, m.momentum, m.num_batches_tracked.clone()))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, nbt in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(nbt)


class HybridGraphModule(fx.GraphModule):
    """The LP GraphModule plus the FP partner and the path sub-graphs (see the module docstring)."""

    def __init__(
        self, lp: fx.GraphModule, fp_graph: fx.Graph, hybrid: HybridConfig, partner: Optional[nn.Module] = None
    ) -> None:
        super().__init__(lp, lp.graph, type(lp).__name__)
        adopt_hierarchy(self, lp)
        self.meta.update(lp.meta)
        self.fxqat_hybrid = hybrid
        self._fp_graph = fp_graph
        if not hasattr(self, "fxqat_step"):
            self.register_buffer("fxqat_step", torch.zeros((), dtype=torch.long))
        self._step: Optional[int] = None
        self.register_load_state_dict_post_hook(lambda mod, _keys: setattr(mod, "_step", None))
        lp_cuts, fp_cuts = _cut_names(self.graph), _cut_names(fp_graph)
        assert len(lp_cuts) == len(fp_cuts), (lp_cuts, fp_cuts)
        self.n_blocks = len(lp_cuts) + 1
        if hybrid.partner == "frozen":
            if partner is None:
                partner = copy.deepcopy(fx.GraphModule(self, fp_graph, "Partner"))
            for p in partner.parameters():
                p.requires_grad_(False)
            self.fxqat_partner = partner.eval()
        else:
            self.fxqat_partner = None
        self.rebuild_views()
        #: running averages of the path losses, updated by fxqat.hybrid_loss (read by fxqat.running_sensitivity)
        self.fxqat_path_losses = PathLossAverages(self.n_paths)
        if hybrid.path_weights != "uniform" and len(hybrid.path_weights) != self.n_paths:
            raise ValueError(
                f"HybridConfig.path_weights has {len(hybrid.path_weights)} entries but this model has "
                f"{self.n_paths} paths (mode {hybrid.mode!r}); give one weight per path or 'uniform'."
            )

    def rebuild_views(self) -> None:
        """(Re)build the sub-graph views the train-mode forward runs, from the LP graph and the FP graph (call it
        after editing either graph, as :func:`fxqat.training.fsdp.shard_prepared` does)."""
        hybrid = self.fxqat_hybrid
        fp_root: nn.Module = self.fxqat_partner if self.fxqat_partner is not None else self
        fp_graph = self._fp_graph
        lp_cuts, fp_cuts = _cut_names(self.graph), _cut_names(fp_graph)
        self._views: Dict[str, fx.GraphModule] = {}
        v = self._views
        v["lp_cuts"] = view(self, extract(self.graph, None, [OUTPUT, *lp_cuts]), "Backbone")
        v["fp"] = view(fp_root, extract(fp_graph, None, [OUTPUT]), "FP")
        v["fp_cuts"] = view(fp_root, extract(fp_graph, None, [OUTPUT, *fp_cuts]), "FPCuts")
        for i, (lc, fc) in enumerate(zip(lp_cuts, fp_cuts)):
            v[f"fp_suffix{i}"] = view(fp_root, extract(fp_graph, [fc], [OUTPUT]), f"FPSuffix{i}")
            v[f"lp_suffix{i}"] = view(self, extract(self.graph, [lc], [OUTPUT]), f"LPSuffix{i}")
        for k in range(self.n_blocks):
            ins = None if k == 0 else [lp_cuts[k - 1]]
            outs = [OUTPUT] if k == self.n_blocks - 1 else [lp_cuts[k]]
            v[f"lp_block{k}"] = view(self, extract(self.graph, ins, outs), f"LPBlock{k}")
        # views only run in train mode; their own root-level `training` flag is fixed accordingly
        for name, gmv in v.items():
            frozen_fp = hybrid.partner == "frozen" and name.startswith("fp")
            object.__setattr__(gmv, "training", not frozen_fp)
        self.train(self.training)  # view() sets the shared modules' mode to its root's: restore the partner's eval

    def __deepcopy__(self, memo: Dict[int, Any]) -> "HybridGraphModule":
        base = fx.GraphModule(self, copy.deepcopy(self.graph), type(self).__name__)
        adopt_hierarchy(base, self)
        base = copy.deepcopy(base, memo)
        new = HybridGraphModule(base, copy.deepcopy(self._fp_graph), self.fxqat_hybrid, base.fxqat_partner)
        new.train(self.training)
        return new

    @property
    def fp_graph(self) -> fx.Graph:
        """The FP partner's graph (with ``fxqat.cut`` marks) that the ``fp*`` views are extracted from."""
        return self._fp_graph

    # ------------------------------------------------------------------------------------------------ paths
    @property
    def n_paths(self) -> int:
        return self.n_blocks if self.fxqat_hybrid.mode == "single" else self.n_blocks - 1

    def select_paths(self, step: int) -> List[int]:
        """The path ids run at ``step`` (see :func:`fxqat.hybrid_output.select_paths`)."""
        return select_paths(self.fxqat_hybrid, self.n_paths, step)

    @property
    def step(self) -> int:
        """The step counter: how many train-mode calls were made (it decides the sampled paths of the next one)."""
        return int(self.fxqat_step) if self._step is None else self._step

    @step.setter
    def step(self, value: int) -> None:
        self.fxqat_step.fill_(int(value))
        self._step = int(value)

    def train(self, mode: bool = True) -> "HybridGraphModule":
        super().train(mode)
        if getattr(self, "fxqat_partner", None) is not None:
            self.fxqat_partner.eval()  # the frozen partner always uses its running statistics
        return self

    def _fp_context(self):
        if self.fxqat_hybrid.partner == "shared":
            return _frozen_bn_stats(self.modules())
        return contextlib.nullcontext()

    def recompile(self):
        """Recompiles the LP graph as :meth:`lp_forward`; ``forward`` stays the train/eval dispatch below.

        ``GraphModule.recompile`` writes the generated code as ``forward`` on the instance's own class; it is moved
        to ``lp_forward`` so that ``nn.Module.__call__`` (and with it forward hooks and pre-hooks) runs
        :meth:`forward` in both modes.
        """
        result = super().recompile()
        cls = type(self)
        if cls is not HybridGraphModule and "forward" in vars(cls):
            cls.lp_forward = cls.forward
            del cls.forward
        return result

    def _fp_suffix(self, i: int, h: Any) -> Any:
        """FP blocks after cut i on ``h``; with a shared partner, on detached latent weights unless configured."""
        suffix = self._views[f"fp_suffix{i}"]
        with self._fp_context():
            if self.fxqat_hybrid.partner != "shared" or self.fxqat_hybrid.shared_suffix_grad:
                return suffix(h)
            params = {name: p.detach() for name, p in suffix.named_parameters()}  # same storage: no copy
            return torch.func.functional_call(suffix, params, (h,), strict=False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Eval mode: the LP output (:meth:`lp_forward`). Train mode: a :class:`HybridOutput` (module docstring)."""
        if not self.training:
            return self.lp_forward(*args, **kwargs)
        h = self.fxqat_hybrid
        if self._step is None:  # Python mirror of the fxqat_step buffer: no tensor read in the traced forward
            self._step = int(self.fxqat_step)
        ids = self.select_paths(self._step)
        self._step += 1
        self.fxqat_step.fill_(self._step)
        v = self._views
        paths: List[Any] = []
        if h.mode == "lp_prefix":
            lp, *cuts = v["lp_cuts"](*args, **kwargs)
            with torch.no_grad(), self._fp_context():
                fp = v["fp"](*args, **kwargs)
            paths = [self._fp_suffix(i, cuts[i]) for i in ids]
        else:
            lp = v["lp_cuts"](*args, **kwargs)[0]
            with torch.no_grad(), self._fp_context():
                fp, *fcuts = v["fp_cuts"](*args, **kwargs)
            if h.mode == "fp_prefix":
                paths = [v[f"lp_suffix{i}"](fcuts[i]) for i in ids]
            else:
                for k in ids:
                    hk = v[f"lp_block{k}"](*(args if k == 0 else (fcuts[k - 1],)), **(kwargs if k == 0 else {}))
                    if k < self.n_blocks - 1:
                        hk = self._fp_suffix(k, hk)
                    paths.append(hk)
        return HybridOutput(lp=lp, paths=paths, fp=fp, path_ids=tuple(ids), config=h,
                            stats=self.fxqat_path_losses if h.mode == "lp_prefix" else None)


def build_hybrid(gm: fx.GraphModule, fp_graph: fx.Graph, hybrid: HybridConfig) -> HybridGraphModule:
    """Wrap the quantized ``gm`` (cuts marked by :func:`mark_cuts`) into a :class:`HybridGraphModule`."""
    hm = HybridGraphModule(gm, fp_graph, hybrid)
    log.info("fxqat: hybrid graph with %d blocks, %d paths (mode=%s, partner=%s)", hm.n_blocks, hm.n_paths,
             hybrid.mode, hybrid.partner)
    return hm
