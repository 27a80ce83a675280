"""Language-model training recipe: AdamW with decay on matrices only, linear warm-up then cosine, clipping,
seeded batches from a :class:`~fxqat.text_data.CharCorpus`, and a cached FP pre-training of the benchmark Llama.

The loop takes a ``loss_fn(model, x, y) -> loss`` so the same recipe trains the FP model, a prepared QAT model,
a distillation arm and a block-replacement (hybrid) model; only ``params`` (what the optimiser updates) differ.

Example:
    >>> import torch.nn as nn
    >>> from fxqat.text_data import CharCorpus
    >>> corpus = CharCorpus("to be or not to be " * 50)
    >>> model = nn.Sequential(nn.Embedding(corpus.vocab_size, 8), nn.Linear(8, corpus.vocab_size))
    >>> r = LMRecipe(steps=20, lr=1e-2, warmup=2, batch_size=4, context=8)
    >>> val = list(corpus.batches("val", 2, 4, 8, seed=1))
    >>> before = evaluate_lm(model, val)
    >>> hist = train_lm(model, corpus, r, seed=0, progress=False)
    >>> evaluate_lm(model, val) < before
    True
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from fxqat.quantizers.control import quantizer_parameters
from fxqat.training.losses import distillation_loss, hybrid_loss, logits_of

__all__ = ["LMRecipe", "FP_RECIPE", "FINETUNE_RECIPE", "lm_loss", "lm_optimizer", "warmup_cosine", "evaluate_lm",
           "train_lm", "quantizer_parameter_ids", "kd_lm_loss", "hybrid_lm_loss", "model_device"]

log = logging.getLogger(__name__)
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LMRecipe:
    """One language-model training schedule (defaults: the benchmark's fine-tuning recipe).

    Attributes:
        steps: optimiser steps.
        lr: peak learning rate; ``warmup`` linear steps to it, then cosine down to ``floor`` × lr.
        betas, weight_decay: AdamW's (decay on parameters with 2 or more dimensions only).
        clip: gradient-norm clipping (``None``: none).
        batch_size, context: batch shape ``(batch_size, context)``.
        seed_offset: batches come from ``torch.Generator().manual_seed(seed_offset + seed)``.
    """

    steps: int = 250
    lr: float = 1e-4
    betas: Tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.1
    warmup: int = 10
    floor: float = 0.1
    clip: Optional[float] = 1.0
    batch_size: int = 32
    context: int = 128
    seed_offset: int = 10000


#: the benchmark's FP pre-training (1500 steps at 1e-3, 100 warm-up steps, batch seed 0)
FP_RECIPE = LMRecipe(steps=1500, lr=1e-3, warmup=100, seed_offset=0)
#: the benchmark's fine-tuning arms (250 steps at 1e-4, 10 warm-up steps, batch seed 10000 + seed)
FINETUNE_RECIPE = LMRecipe()


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model(x)`` (a tensor or a ``ModelOutput`` with ``.logits``)."""
    logits = logits_of(model(x))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def kd_lm_loss(teacher: nn.Module) -> LossFn:
    """A ``loss_fn`` for :func:`train_lm`: next-token cross-entropy + KD to a frozen ``teacher``'s logits
    (:func:`~fxqat.training.losses.distillation_loss` with ``HybridConfig()``'s weights: the "LSQ + KD" arm).

    The teacher is put in eval mode and its parameters frozen (pass a copy if it must stay trainable).
    """
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = logits_of(teacher(x))
        s = logits_of(model(x))
        return distillation_loss(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), y.reshape(-1))[0]

    return loss


def hybrid_lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A ``loss_fn`` for :func:`train_lm` on a block-replacement model: :func:`~fxqat.training.losses.hybrid_loss`."""
    return hybrid_loss(model(x), y)[0]


def quantizer_parameter_ids(model: nn.Module) -> set:
    """``id``s of :func:`fxqat.quantizers.control.quantizer_parameters` (the parameters ``lm_optimizer`` keeps out of
    weight decay)."""
    return {id(p) for p in quantizer_parameters(model).values()}


def lm_optimizer(params: Iterable[nn.Parameter], recipe: LMRecipe, no_decay: Iterable[int] = ()) -> torch.optim.AdamW:
    """AdamW with weight decay on parameters of 2+ dimensions, none on vectors and scalars (norms) nor on the
    parameters whose ``id`` is in ``no_decay`` (quantizer scales: per-group scales are matrices too)."""
    params = [p for p in params if p.requires_grad]
    skip = set(no_decay)
    decay = [p for p in params if p.dim() >= 2 and id(p) not in skip]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay},
              {"params": [p for p in params if not (p.dim() >= 2 and id(p) not in skip)], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=recipe.lr, betas=recipe.betas)


def warmup_cosine(step: int, recipe: LMRecipe) -> float:
    """Learning-rate multiplier at ``step`` (0-based): linear warm-up, then cosine from 1 to ``recipe.floor``.

    Example:
        >>> r = LMRecipe(steps=110, warmup=10)
        >>> warmup_cosine(0, r), warmup_cosine(9, r), round(warmup_cosine(109, r), 3)
        (0.1, 1.0, 0.1)
    """
    if step < recipe.warmup:
        return (step + 1) / recipe.warmup
    span = max(1, recipe.steps - recipe.warmup - 1)
    progress = min(1.0, (step - recipe.warmup) / span)
    return recipe.floor + (1.0 - recipe.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without parameters): where batches go."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def evaluate_lm(model: nn.Module, batches: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean cross-entropy over ``batches`` in eval mode (the model's mode is restored)."""
    was = model.training
    model.eval()
    try:
        dev = model_device(model)
        return float(sum(lm_loss(model, x.to(dev), y.to(dev)).item() for x, y in batches) / len(batches))
    finally:
        model.train(was)


def train_lm(model: nn.Module, corpus, recipe: LMRecipe, seed: int = 0, *, loss_fn: LossFn = lm_loss,
             params: Optional[Iterable[nn.Parameter]] = None, eval_batches=None, eval_every: int = 0,
             progress: bool = True, desc: str = "lm", max_time_s: Optional[float] = None) -> Dict[str, List]:
    """Train ``model`` with ``recipe`` on ``corpus`` and return the history.

    Args:
        loss_fn: ``(model, x, y) -> scalar loss``; default :func:`lm_loss`.
        params: what the optimiser updates (default: all trainable parameters of ``model``).
        eval_batches, eval_every: validation loss every ``eval_every`` steps (and after the last one).
        max_time_s: stop early after this much wall time (compute-matched arms); the schedule stays the same.

    Returns:
        ``{"loss": [...], "eval": [(step, val_loss), ...], "step_s": [...], "steps": n_done, "time_s": total}``.
    """
    model.train()
    opt = lm_optimizer(model.parameters() if params is None else params, recipe, quantizer_parameter_ids(model))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, recipe))
    trained = [p for g in opt.param_groups for p in g["params"]]
    gen = torch.Generator().manual_seed(recipe.seed_offset + seed)
    dev = model_device(model)
    hist: Dict[str, List] = {"loss": [], "eval": [], "step_s": []}
    t_start = time.perf_counter()
    bar = tqdm(range(recipe.steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        x, y = corpus.batch("train", recipe.batch_size, recipe.context, gen)  # drawn on the CPU: same on any device
        x, y = x.to(dev), y.to(dev)
        t0 = time.perf_counter()
        loss = loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.clip is not None:
            torch.nn.utils.clip_grad_norm_(trained, recipe.clip)
        opt.step()
        sched.step()
        hist["step_s"].append(time.perf_counter() - t0)
        hist["loss"].append(float(loss.detach()))
        bar.set_postfix(loss=f"{hist['loss'][-1]:.3f}")
        last = step == recipe.steps - 1
        out_of_time = max_time_s is not None and time.perf_counter() - t_start >= max_time_s
        if eval_batches is not None and eval_every and ((step + 1) % eval_every == 0 or last or out_of_time):
            hist["eval"].append((step + 1, evaluate_lm(model, eval_batches)))
        if out_of_time:
            log.info("fxqat: %s stopped after %d steps (time budget %.1f s)", desc, step + 1, max_time_s)
            break
    hist["steps"] = len(hist["loss"])
    hist["time_s"] = time.perf_counter() - t_start
    hist["recipe"] = asdict(recipe)
    return hist
