"""Block replacement settings of a :class:`fxqat.QATConfig`: :class:`HybridConfig` (BWRF, methods.md §1).

Example:
    >>> HybridConfig(paths=2, partner="shared").partner
    'shared'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence, Tuple, Union

from fxqat.validate import check_bool, check_choice, check_int, check_number, did_you_mean, name_tuple

__all__ = ["HybridConfig"]


@dataclass(frozen=True)
class HybridConfig:
    """Block replacement on a full-precision partner (BWRF, methods.md §1). Every default is fxqat's [R] choice.

    Attributes:
        paths: ``"all"`` cut points every step, or an int k of them sampled per step.
        partner: ``"frozen"`` (a frozen copy of the pre-trained model) or ``"shared"`` (the LP model's own latent
            weights without quantizers; no extra weight memory).
        mode: ``"lp_prefix"`` (LP blocks 1..i then FP blocks), ``"fp_prefix"`` (FP blocks 1..i then LP blocks) or
            ``"single"`` (the FP partner with only block i swapped for its LP block).
        kd_weight: λ_kd, weight of the distillation term KD(·, fp).
        temperature: T of the distillation softmax.
        path_weights: ``"uniform"`` (1/|S| each) or an explicit tuple of one weight per cut.
        task_weight: weight of the task loss on the backbone.
        seed: seed of the generator that samples paths.
        max_blocks: merge neighbouring blocks until at most this many remain (None = no limit).
        boundaries: module names whose outputs end a block (overrides automatic cut selection when given).
        cuts: where blocks may end. ``"residual"``: at every residual boundary the module hierarchy allows (a
            transformer block gives two blocks: attention and MLP); ``"layers"``: one block per layer of the model's
            layer stack (an element of a ``ModuleList``/``Sequential``: one block per transformer block);
            ``"auto"`` (default): ``"residual"`` for models whose root traces, ``"layers"`` for eager-root models
            (Hugging Face), where ``"residual"`` also cuts inside each layer that is a graph region, at the residual
            adds (attention, MLP); a layer that runs eagerly keeps one block (a warning names it).
        shared_suffix_grad: with ``partner="shared"`` only: ``False`` (default) runs the FP suffix of each path on
            detached views of the latent weights (same storage, no copy), so a loss on path i reaches LP blocks
            ``<= i`` only, as with a frozen partner; ``True`` lets it also train the weights of the blocks after i
            through their FP use (the earlier behaviour, kept as an option).

    Example:
        >>> HybridConfig(paths=2).paths
        2
    """

    paths: Union[Literal["all"], int] = "all"
    partner: Literal["frozen", "shared"] = "frozen"
    mode: Literal["lp_prefix", "fp_prefix", "single"] = "lp_prefix"
    kd_weight: float = 1.0
    temperature: float = 1.0
    path_weights: Union[Literal["uniform"], Tuple[float, ...]] = "uniform"
    task_weight: float = 1.0
    seed: int = 0
    max_blocks: Optional[int] = None
    boundaries: Tuple[str, ...] = ()
    shared_suffix_grad: bool = False
    cuts: Literal["auto", "layers", "residual"] = "auto"

    def __post_init__(self) -> None:
        check_choice("HybridConfig", "cuts", self.cuts, ("auto", "layers", "residual"))
        if self.paths != "all":
            if isinstance(self.paths, str):
                raise ValueError(f"HybridConfig.paths={self.paths!r}: use 'all' or a positive int k of paths per step."
                                 f"{did_you_mean(self.paths, ['all'])}")
            check_int("HybridConfig", "paths", self.paths, lo=1)
        check_choice("HybridConfig", "partner", self.partner, ("frozen", "shared"))
        check_choice("HybridConfig", "mode", self.mode, ("lp_prefix", "fp_prefix", "single"))
        check_number("HybridConfig", "kd_weight", self.kd_weight, lo=0.0)
        check_number("HybridConfig", "temperature", self.temperature, lo=0.0, lo_open=True)
        check_number("HybridConfig", "task_weight", self.task_weight, lo=0.0)
        check_int("HybridConfig", "seed", self.seed, lo=-(2**63), hi=2**64 - 1)
        check_int("HybridConfig", "max_blocks", self.max_blocks, lo=2, allow_none=True)
        check_bool("HybridConfig", "shared_suffix_grad", self.shared_suffix_grad)
        object.__setattr__(self, "boundaries", name_tuple("HybridConfig", "boundaries", self.boundaries))
        if self.path_weights != "uniform":
            object.__setattr__(self, "path_weights", _path_weights(self.path_weights))
        if self.shared_suffix_grad and self.partner != "shared":
            raise ValueError(
                f"HybridConfig.shared_suffix_grad=True needs partner='shared' (got partner={self.partner!r}): a frozen "
                "partner has no trainable weights; drop shared_suffix_grad or write partner='shared'."
            )


def _path_weights(value: Any) -> Tuple[float, ...]:
    if isinstance(value, str):
        raise ValueError(f"HybridConfig.path_weights={value!r}: use 'uniform' or one weight per path, e.g. (1.0, 2.0)."
                         f"{did_you_mean(value, ['uniform'])}")
    if not isinstance(value, Sequence):
        raise TypeError(f"HybridConfig.path_weights={value!r}: use 'uniform' or a tuple of one weight per path.")
    out = tuple(check_number("HybridConfig", f"path_weights[{i}]", w, lo=0.0) for i, w in enumerate(value))
    if not out or not any(w > 0 for w in out):
        raise ValueError(f"HybridConfig.path_weights={value!r}: give at least one positive weight (or 'uniform').")
    return out
