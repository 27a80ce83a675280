"""insert_quant: add quantizer submodules and their call nodes where ``annotate`` asked for them.

* **Weights.** A ``"module"`` layer (``conv(x)``) becomes its functional form reading a quantized weight::

      w = self.conv.weight; wq = self.fxqat_quant.w_conv(w); y = F.conv2d(xq, wq, self.conv.bias, ...)

  so the weight stays a parameter of the original module (same name in the ``state_dict``, same ``Parameter``
  object). ``"functional"`` layers get the quantizer on their weight argument; ``"opaque"`` leaf modules are called
  through :class:`OpaqueWeightQuant`, which substitutes quantized weights with ``torch.func.functional_call`` and
  otherwise runs the module's own ``forward``.
* **Activations.** One quantizer per distinct (tensor, spec), shared by every consumer that reads it.
* **Gradients.** With ``config.grad``, an identity-forward gradient quantizer on each quantized layer's output;
  layers under the ``first_last`` policy get ``config.first_last`` bits there (and none when they stay FP).

Quantizers live under ``gm.fxqat_quant`` (``w_*``, ``a_*``, ``g_*``, ``o_*`` for opaque wrappers).

Example:
    >>> import torch, torch.nn as nn
    >>> from fxqat.config import QATConfig
    >>> from fxqat.trace import trace
    >>> from fxqat.passes.annotate import annotate
    >>> gm = insert_quant(annotate(trace(nn.Sequential(nn.Linear(3, 3))), QATConfig(first_last=4)), QATConfig())
    >>> print(gm.code.strip().splitlines()[-2])
        linear = torch._C._nn.linear(fxqat_quant_a_input_1, fxqat_quant_w_0, _0_bias);  fxqat_quant_a_input_1 = fxqat_quant_w_0 = _0_bias = None
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxqat.config import QATConfig, QuantSpec
from fxqat.method_registry import make_quantizer
from fxqat.passes.annotate import QMETA, LayerQuant

__all__ = ["insert_quant", "OpaqueWeightQuant", "QROLE", "CONTAINER"]

QROLE = "fxqat.quantizer"  # node.meta key on inserted quantizer nodes: "weight" | "act" | "grad"
CONTAINER = "fxqat_quant"

_FUNCTIONAL = {
    nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d,
    nn.ConvTranspose1d: F.conv_transpose1d, nn.ConvTranspose2d: F.conv_transpose2d,
    nn.ConvTranspose3d: F.conv_transpose3d,
}


def _safe(name: str) -> str:
    return re.sub(r"\W", "_", name) or "root"


def _tensor_at(module: nn.Module, path: str) -> torch.Tensor:
    """The tensor at ``path`` (a Parameter, or the plain tensor ``functional_call`` substituted for it)."""
    owner, _, name = path.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, name)


class OpaqueWeightQuant(nn.Module):
    """Calls a leaf module with some of its weights replaced by their quantized values.

    The wrapped module is referenced, not registered (it stays at its own place in the model, so its parameters
    keep their names); the weight quantizers are this module's children.

    Args:
        module: the leaf module (e.g. ``nn.MultiheadAttention`` or a module the tracer could not enter).
        quantizers: parameter path inside ``module`` -> quantizer.
    """

    def __init__(self, module: nn.Module, quantizers: Dict[str, nn.Module], module_path: str = "") -> None:
        super().__init__()
        self.module_path = module_path
        self.paths = list(quantizers)
        self.quant = nn.ModuleDict({_safe(p): q for p, q in quantizers.items()})
        object.__setattr__(self, "_module", module)
        self._frozen: Optional[Dict[str, torch.Tensor]] = None

    @property
    def module(self) -> nn.Module:
        return self._module

    def quantized_weights(self) -> Dict[str, torch.Tensor]:
        """Parameter path -> quantized tensor, as used in the forward pass."""
        if self._frozen is not None:
            return self._frozen
        return {p: self.quant[_safe(p)](_tensor_at(self._module, p)) for p in self.paths}

    def freeze(self) -> None:
        """Pre-compute the quantized weights (used by ``convert``)."""
        with torch.no_grad():
            self._frozen = None
            self._frozen = {p: t.detach() for p, t in self.quantized_weights().items()}

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self._module, self.quantized_weights(), args, kwargs)

    def __deepcopy__(self, memo):  # keep the reference to the (copied) wrapped module
        import copy

        qs = {p: copy.deepcopy(q, memo) for p, q in zip(self.paths, self.quant.values())}
        new = OpaqueWeightQuant(copy.deepcopy(self._module, memo), qs, self.module_path)
        memo[id(self)] = new
        new.train(self.training)
        return new


class _Namer:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        if not hasattr(gm, CONTAINER):
            gm.add_module(CONTAINER, nn.Module())
        self.container = getattr(gm, CONTAINER)

    def add(self, base: str, module: nn.Module) -> str:
        name, k = base, 1
        while hasattr(self.container, name):
            name, k = f"{base}_{k}", k + 1
        self.container.add_module(name, module)
        return f"{CONTAINER}.{name}"


def _quantizer(spec: QuantSpec, target: Optional[str], layer: Optional[str] = None) -> nn.Module:
    q = make_quantizer(spec)
    q.weight_target = target  # qualified parameter name for weight quantizers (read by TALR), else None
    q.weight_layer = layer  # qualified name of the layer (module) whose weight it quantizes, else None
    return q


def _weight_key(gm: fx.GraphModule, path: Optional[str], fallback, spec: QuantSpec) -> Tuple:
    """The weight-quantizer cache key: one quantizer per (Parameter, spec), also when two modules share it."""
    try:
        return (id(gm.get_parameter(path)), spec) if path else (fallback, spec)
    except AttributeError:  # a buffer or plain attribute
        return (path, spec)


def _weight_arg(node: fx.Node, pos) -> Tuple[Optional[fx.Node], bool]:
    if isinstance(pos, int) and pos < len(node.args):
        return node.args[pos], True
    return node.kwargs.get("weight"), False


def _rewrite_module_layer(
    gm: fx.GraphModule, node: fx.Node, namer: _Namer, spec: QuantSpec, wq_cache, prefix: str = "",
) -> fx.Node:
    mod = gm.get_submodule(node.target)
    g = gm.graph
    with g.inserting_before(node):
        key = _weight_key(gm, f"{node.target}.weight", None, spec)
        if key not in wq_cache:
            w = g.get_attr(f"{node.target}.weight")
            wq_q = _quantizer(spec, f"{node.target}.weight", prefix + str(node.target))
            qname = namer.add(f"w_{_safe(node.target)}", wq_q)
            wq_cache[key] = g.call_module(qname, (w,))
            wq_cache[key].meta[QROLE] = "weight"
        wq = wq_cache[key]
        b = g.get_attr(f"{node.target}.bias") if getattr(mod, "bias", None) is not None else None
        x = node.args[0]
        if isinstance(mod, nn.Linear):
            new = g.call_function(F.linear, (x, wq, b))
        elif type(mod) in _FUNCTIONAL or isinstance(mod, tuple(_FUNCTIONAL)):
            fn = next(f for c, f in _FUNCTIONAL.items() if isinstance(mod, c))
            if isinstance(mod, nn.modules.conv._ConvTransposeNd):
                args = (x, wq, b, mod.stride, mod.padding, mod.output_padding, mod.groups, mod.dilation)
            else:
                args = (x, wq, b, mod.stride, mod.padding, mod.dilation, mod.groups)
            new = g.call_function(fn, args)
        else:  # pragma: no cover - annotate only marks the classes above
            raise TypeError(f"cannot rewrite {type(mod).__name__} at {node.target}")
    new.meta.update({k: v for k, v in node.meta.items()})
    new.meta["fxqat.module"] = str(node.target)
    node.replace_all_uses_with(new)
    g.erase_node(node)
    return new


def insert_quant(gm: fx.GraphModule, config: QATConfig, prefix: str = "") -> fx.GraphModule:
    """Insert the quantizers ``annotate`` decided on (in place; returns ``gm``).

    ``prefix`` is the qualified name of ``gm`` inside the user's model (``"model.layers.0."`` for a graph region):
    each weight quantizer's ``weight_layer`` is the layer's qualified name in the user's model (``weight_target``
    stays relative to ``gm``, where the parameter is read).
    """
    namer = _Namer(gm)
    g = gm.graph
    layers: List[Tuple[fx.Node, LayerQuant]] = [(n, n.meta[QMETA]) for n in g.nodes if QMETA in n.meta]
    wq_cache: Dict = {}
    act_cache: Dict = {}
    outputs: List[Tuple[fx.Node, LayerQuant]] = []
    for node, lq in layers:
        # ---- activations (first argument, and the other operands of a matmul), one quantizer per (tensor, spec)
        for pos, spec in ((0, lq.act), *lq.inputs) if lq.act is not None else ():
            x = node.args[pos]
            key = (x, spec)
            if key not in act_cache:
                with g.inserting_before(node):
                    qname = namer.add(f"a_{_safe(x.name)}", _quantizer(spec, None))
                    act_cache[key] = g.call_module(qname, (x,))
                    act_cache[key].meta[QROLE] = "act"
                    act_cache[key].meta["fxqat.block"] = node.meta.get("fxqat.block")
            node.update_arg(pos, act_cache[key])
        # ---- weights
        if lq.style == "matmul":
            continue  # no weight, no gradient quantizer: not a weight layer
        if lq.style == "module":
            node = _rewrite_module_layer(gm, node, namer, lq.weights[0][1], wq_cache, prefix)
        elif lq.style == "functional":
            for pos, spec in lq.weights:
                w, positional = _weight_arg(node, pos)
                if not isinstance(w, fx.Node):
                    continue
                key = _weight_key(gm, str(w.target) if w.op == "get_attr" else None, w, spec)
                if key not in wq_cache:
                    target = str(w.target) if w.op == "get_attr" else None
                    with g.inserting_before(node):
                        wq_q = _quantizer(spec, target, prefix + lq.owner)
                        qname = namer.add(f"w_{_safe(lq.owner or node.name)}", wq_q)
                        wq_cache[key] = g.call_module(qname, (w,))
                        wq_cache[key].meta[QROLE] = "weight"
                if positional:
                    node.update_arg(pos, wq_cache[key])
                else:
                    node.update_kwarg("weight", wq_cache[key])
        else:  # opaque leaf module
            mod = gm.get_submodule(node.target)
            qs = {p: _quantizer(spec, f"{node.target}.{p}", prefix + f"{node.target}.{p}".rpartition(".")[0])
                  for p, spec in lq.weights}
            node.target = namer.add(f"o_{_safe(node.target)}", OpaqueWeightQuant(mod, qs, str(node.target)))
            node.meta["fxqat.module"] = lq.owner
        outputs.append((node, lq))
    if config.grad is not None:
        for node, lq in outputs:
            spec = config.spec_for("grad", bits=config.first_last if lq.first_last else None)
            users = list(node.users)
            with g.inserting_after(node):
                qname = namer.add(f"g_{_safe(node.meta.get('fxqat.module', node.name))}", _quantizer(spec, None))
                gq = g.call_module(qname, (node,))
                gq.meta[QROLE] = "grad"
                gq.meta["fxqat.block"] = node.meta.get("fxqat.block")
            for u in users:
                u.replace_input_with(node, gq)
    g.lint()
    gm.recompile()
    return gm
