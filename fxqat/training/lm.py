"""Language-model training recipe: AdamW with decay on matrices only, linear warm-up then cosine, clipping,
seeded batches from a :class:`~fxqat.text_data.CharCorpus`, and a cached FP pre-training of the benchmark Llama.

The loop takes a ``loss_fn(model, x, y) -> loss`` so the same recipe trains the FP model, a prepared QAT model,
a distillation arm and a block-replacement (hybrid) model; only ``params`` (what the optimiser updates) differ.
:func:`train_lm` runs on the same step, loop, checkpointer and optimizer builder as :func:`fxqat.training.loop.fit`:
it resumes exactly (``out_dir``, ``resume``) and skips non-finite steps (``nonfinite``).

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
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from fxqat.quantizers.control import quantizer_parameters
from fxqat.training.checkpointer import Checkpointer
from fxqat.training.health import NonFiniteGuard
from fxqat.training.losses import distillation_loss, hybrid_loss, logits_of
from fxqat.training.optimizer import OptimizerSpec, build_optimizer
from fxqat.training.run_loop import Position, RunHooks, record_nonfinite, run_loop
from fxqat.training.step import StepOutcome, TrainStep

__all__ = ["LMRecipe", "FP_RECIPE", "FINETUNE_RECIPE", "lm_loss", "lm_optimizer", "lm_optimizer_spec", "warmup_cosine",
           "evaluate_lm", "train_lm", "quantizer_parameter_ids", "kd_lm_loss", "hybrid_lm_loss", "model_device"]

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


def lm_optimizer_spec(recipe: LMRecipe) -> OptimizerSpec:
    """The recipe's optimizer: AdamW, weight decay on weights of 2+ dimensions only, none on quantizer parameters.

    Example:
        >>> s = lm_optimizer_spec(FINETUNE_RECIPE)
        >>> s.kind, s.lr, s.weight_decay, s.decay_vectors
        ('adamw', 0.0001, 0.1, False)
    """
    return OptimizerSpec("adamw", lr=recipe.lr, weight_decay=recipe.weight_decay, betas=recipe.betas,
                         decay_vectors=False)


def lm_optimizer(params: Iterable[nn.Parameter], recipe: LMRecipe, no_decay: Iterable[int] = ()) -> torch.optim.AdamW:
    """AdamW with weight decay on parameters of 2+ dimensions, none on vectors and scalars (norms) nor on the
    parameters whose ``id`` is in ``no_decay`` (quantizer scales: per-group scales are matrices too):
    :func:`fxqat.training.optimizer.build_optimizer` of :func:`lm_optimizer_spec`."""
    return build_optimizer(None, lm_optimizer_spec(recipe), [p for p in params if p.requires_grad],
                           quantizer_ids=no_decay)


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


class _LMBatches:
    """The run's seeded batch stream as one epoch of ``recipe.steps`` batches, drawn on the CPU (the same on any
    device) and moved to ``device``; a resumed run restores the generator's state instead of redrawing."""

    def __init__(self, corpus, recipe: LMRecipe, seed: int, device: torch.device) -> None:
        self.corpus, self.recipe, self.device = corpus, recipe, device
        self.generator = torch.Generator().manual_seed(recipe.seed_offset + seed)
        self.start = 0

    def __len__(self) -> int:
        return self.recipe.steps

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.start = start

    def __iter__(self):
        r = self.recipe
        for _ in range(self.start, r.steps):
            x, y = self.corpus.batch("train", r.batch_size, r.context, self.generator)
            yield x.to(self.device), y.to(self.device)


class _LMRun(RunHooks):
    """The hooks of :func:`train_lm`: the loss function, per-step records, validation, time budget, checkpoints."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, hist: Dict[str, Any], ckpt: Checkpointer,
                 guard: NonFiniteGuard, batches: _LMBatches, bar, stop_at: int, eval_batches, eval_every: int,
                 max_time_s: Optional[float], checkpoint_every: Optional[int], desc: str, elapsed: float) -> None:
        self.model, self.loss_fn, self.hist, self.ckpt, self.guard = model, loss_fn, hist, ckpt, guard
        self.batches, self.bar, self.stop_at, self.desc = batches, bar, stop_at, desc
        self.eval_batches, self.eval_every, self.max_time_s = eval_batches, eval_every, max_time_s
        self.checkpoint_every, self.elapsed = checkpoint_every, elapsed
        self.t0 = time.perf_counter()

    def time_s(self) -> float:
        return self.elapsed + time.perf_counter() - self.t0

    def forward(self, batch):
        x, y = batch
        return self.loss_fn(self.model, x, y), None

    def after_step(self, batch, outcome: StepOutcome, pos: Position) -> bool:
        hist = self.hist
        hist["step_s"].append(outcome.time_s)
        hist["loss"].append(outcome.loss)
        if not record_nonfinite(hist, outcome, pos, self.guard.message + self.ckpt.kept()):
            return False
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{outcome.loss:.3f}")
        last = pos.step == self.batches.recipe.steps
        out_of_time = self.max_time_s is not None and time.perf_counter() - self.t0 >= self.max_time_s
        if self.eval_batches is not None and self.eval_every and (pos.step % self.eval_every == 0 or last
                                                                  or out_of_time):
            hist["eval"].append((pos.step, evaluate_lm(self.model, self.eval_batches)))
        if out_of_time:
            log.info("fxqat: %s stopped after %d steps (time budget %.1f s)", self.desc, pos.step, self.max_time_s)
            return False
        every = self.checkpoint_every
        return not (every and pos.step % every == 0 and pos.step < self.stop_at and not self.save(pos))

    def after_epoch(self, pos: Position) -> bool:
        return self.save(pos)

    def save(self, pos: Position) -> bool:
        """Checkpoint at ``pos`` with the batch generator's state; non-finite parameters end the run (diverged)."""
        where = {**pos.to_dict(), "elapsed": self.time_s()}
        if self.ckpt.save(where, self.hist, extra={"generator": self.batches.generator.get_state()}):
            return True
        self.hist["status"], self.hist["error"] = "diverged", (
            f"train_lm({self.desc}): parameters are non-finite at step {pos.step}; stopped without saving them."
            f"{self.ckpt.kept()}")
        return False


def train_lm(model: nn.Module, corpus, recipe: LMRecipe, seed: int = 0, *, loss_fn: LossFn = lm_loss,
             params: Optional[Iterable[nn.Parameter]] = None, eval_batches=None, eval_every: int = 0,
             progress: bool = True, desc: str = "lm", max_time_s: Optional[float] = None, out_dir=None,
             resume: bool = False, stop_after: Optional[int] = None, checkpoint_every: Optional[int] = None,
             nonfinite: str = "skip", max_nonfinite: int = 5, trusted: bool = False) -> Dict[str, Any]:
    """Train ``model`` with ``recipe`` on ``corpus`` and return the history.

    The same step (:class:`~fxqat.training.step.TrainStep`), loop (:func:`~fxqat.training.run_loop.run_loop`) and
    checkpoints (:class:`~fxqat.training.checkpointer.Checkpointer`) as :func:`fxqat.training.loop.fit`.

    Args:
        loss_fn: ``(model, x, y) -> scalar loss``; default :func:`lm_loss`.
        params: what the optimiser updates (default: all trainable parameters of ``model``).
        eval_batches, eval_every: validation loss every ``eval_every`` steps (and after the last one).
        max_time_s: stop early after this much wall time (compute-matched arms); the schedule stays the same.
        out_dir: where ``checkpoint.pt`` and ``metrics.json`` go (None: nothing written): at the end, at
            ``stop_after`` and every ``checkpoint_every`` steps.
        resume: continue from ``out_dir/checkpoint.pt`` when it exists (the batches, the schedule and the optimizer
            state continue exactly: the final loss is the one of an uninterrupted run).
        stop_after: stop (checkpoint written, status ``"interrupted"``) after this many steps of this call.
        nonfinite, max_nonfinite: what a step with a non-finite loss or gradient does (``"skip"``: no update,
            ``"stop"``, ``"raise"``), as ``TrainConfig``'s fields of the same names.
        trusted: load the resume checkpoint with arbitrary unpickling (only for files you trust).

    Returns:
        ``{"loss": [...], "eval": [(step, val_loss), ...], "step_s": [...], "steps": n_done, "time_s": total,
        "status": ..., "nonfinite_steps": [...]}``; ``status`` is ``"complete"``, ``"interrupted"`` or
        ``"diverged"`` (``"error"`` says where).

    Raises:
        FloatingPointError: a non-finite step with ``nonfinite="raise"``.
    """
    model.train()
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    opt = build_optimizer(model, lm_optimizer_spec(recipe), params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, recipe))
    batches = _LMBatches(corpus, recipe, seed, model_device(model))
    hist: Dict[str, Any] = {"loss": [], "eval": [], "step_s": [], "nonfinite_steps": [], "status": "running"}
    pos, elapsed = Position(), 0.0
    ckpt = Checkpointer(out_dir, model, opt, sched, trusted=trusted)
    ck = ckpt.load() if resume else None
    if ck is not None:
        pos = Position(**{k: ck["pos"][k] for k in ("step", "epoch", "batch")})
        elapsed, hist = ck["pos"]["elapsed"], ck["history"]
        hist["status"] = "running"
        batches.generator.set_state(ck["generator"])
        log.info("fxqat: %s resumed %s at step %d", desc, ckpt.path, pos.step)
    elif resume:
        log.warning("fxqat: resume given but %s does not exist; starting a fresh run", ckpt.path)
    stop_at = min(recipe.steps, pos.step + stop_after) if stop_after else recipe.steps
    guard = NonFiniteGuard(model, nonfinite, max_nonfinite, desc)
    bar = tqdm(total=recipe.steps, initial=pos.step, desc=desc, disable=not progress, leave=False)
    run = _LMRun(model, loss_fn, hist, ckpt, guard, batches, bar, stop_at, eval_batches, eval_every, max_time_s,
                 checkpoint_every, desc, elapsed)
    run_loop(TrainStep(opt, sched, clip=recipe.clip, guard=guard), batches, pos, stop_at, run)
    bar.close()
    if hist["status"] == "diverged":
        log.error("%s", hist["error"])
    elif pos.step < stop_at or pos.step == recipe.steps:
        hist["status"] = "complete"  # the last step, or the time budget
    else:
        hist["status"] = "interrupted"
    hist["steps"] = len(hist["loss"])
    hist["time_s"] = run.time_s()
    hist["recipe"] = asdict(recipe)
    ckpt.write_metrics(hist)
    return hist
