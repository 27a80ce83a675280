"""Which of a graph region's captured graphs runs a call: one graph per call structure, tried in turn.

A graph region is traced for the call it received on the example inputs: a ``None`` attention mask (transformers'
eager mode) or a tensor (its ``torch.compile`` path, a padded batch), a prompt of many tokens or one decoding step
(sdpa's ``is_causal = q_length > 1 and ...``). Such calls run different code, so they need different graphs. A region
keeps its own graph and the :class:`Variant` graphs captured later for other calls
(:mod:`fxqat.capture.recapture`), all over the same modules, parameters and quantizers; :func:`run_variants` runs a
call with the first graph whose binding takes it (:meth:`~fxqat.capture.binding.Binding.match`) and whose guards
hold (a guard that fails raises :class:`~fxqat.capture.example_tracer.GuardFailure` before the graph has changed
anything outside it: :mod:`fxqat.capture.guards`), trying the graph of the previous call first. A call that no graph
takes is captured as a new variant, if the region can (``region.fxqat_recapture``) and has fewer than
:data:`MAX_VARIANTS`; otherwise it is refused with the first graph's reason.

Example:
    >>> import torch
    >>> from fxqat.capture.region import trace_region
    >>> region = trace_region(torch.nn.Linear(2, 2), (torch.ones(1, 2),), {}, "fc")
    >>> bool(torch.equal(run_variants(region, (torch.ones(1, 2),), {}), region(torch.ones(1, 2))))
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch.fx as fx

from fxqat.capture.binding import Binding
from fxqat.capture.example_tracer import GuardFailure

__all__ = ["Variant", "run_variants", "disable_variants", "MAX_VARIANTS"]

#: the most graphs a region captures besides its own; a call needing one more is refused
MAX_VARIANTS = 8


@dataclasses.dataclass(frozen=True)
class Variant:
    """Another captured graph of a region, for calls of another structure.

    Attributes:
        binding: how such a call maps onto the graph's inputs.
        graph: the graph; its targets are the region's own modules, parameters and quantizers.
        fn: the graph's code, a function of ``(region, *flat inputs)``.
    """

    binding: Binding
    graph: fx.Graph
    fn: Callable[..., Any]

    def __deepcopy__(self, memo: Dict[int, Any]) -> "Variant":
        return self  # immutable: its code reads the modules of the region it is called with


def run_variants(region: Any, args: Tuple, kwargs: Dict[str, Any]) -> Any:
    """Run ``region`` (a :class:`~fxqat.capture.region.GraphRegion`) on a call with the first of its graphs that
    takes it (module docstring).

    Raises:
        ValueError: no graph takes the call and no new one may be captured (a :class:`GuardFailure` when a guard
            refused it).
    """
    variants: List[Variant] = region.fxqat_variants
    last = region.fxqat_last
    error: Optional[Exception] = None
    for i in [last] + [k for k in range(-1, len(variants)) if k != last]:
        binding = region.fxqat_binding if i < 0 else variants[i].binding
        flat, why = binding.match(args, kwargs, region.fxqat_region)
        if flat is None:
            error = error or ValueError(why)
            continue
        try:
            out = region.flat_forward(*flat) if i < 0 else variants[i].fn(region, *flat)
        except GuardFailure as exc:
            if not exc.retryable:
                raise
            error = exc
            continue
        if i != last:
            region.fxqat_last = i
        return out
    recapture = region.fxqat_recapture
    if recapture is None or len(variants) >= MAX_VARIANTS:
        raise error if error is not None else ValueError(f"module {region.fxqat_region!r} has no graph for this call")
    variant = recapture(region, args, kwargs)
    variants.append(variant)
    region.fxqat_last = len(variants) - 1
    return variant.fn(region, *variant.binding.flatten(args, kwargs, region.fxqat_region))


def disable_variants(region: Any) -> None:
    """Drop ``region``'s other graphs and stop it from capturing new ones (its own graph was changed after capture,
    e.g. by a recording tap for block replacement, which another graph would not have)."""
    region.fxqat_recapture = None
    region.fxqat_variants = []
    region.fxqat_last = -1
