"""The training loop of image models: FP pre-training (cached), QAT (plain, distillation, hybrid outputs), evaluation.

One :func:`fit` serves every case. It is the thin loop :func:`~fxqat.training.run_loop.run_loop` with fit's hooks
(loss, records, epoch ends) over the pieces :func:`fxqat.training.lm.train_lm` uses too: the step
(:class:`~fxqat.training.step.TrainStep`: forward, loss, backward, non-finite guard, clipping, optimizer and
scheduler step), the checkpointer (:class:`~fxqat.training.checkpointer.Checkpointer`) and the optimizer builder
(:func:`~fxqat.training.optimizer.build_optimizer`). The loss depends on what the model returns:

* a ``fxqat.HybridOutput`` (train mode of a block-replacement model): ``fxqat.hybrid_loss(out, y)``;
* a tensor with a ``teacher``: ``CE + kd_weight * KD(out, teacher(x))`` where
  ``KD(a, f) = T^2 KL(softmax(f/T) || softmax(a/T))`` (the same term as the hybrid loss, methods.md §1);
* a tensor: cross-entropy.

With an ``out_dir`` the loop writes, from rank 0 only and always through a temporary file + rename:
``checkpoint.pt`` (model, optimizer, scheduler, RNG states, position, history) at every epoch end and at the last
step, ``metrics.json`` (``status`` "running" until the run is complete, one record per epoch, the loss of every
step) and ``curves.png``. ``resume=True`` continues from ``checkpoint.pt``: the data order and augmentation are
functions of (seed, epoch, batch), so the next loss is the one an uninterrupted run would have seen.

Under ``torchrun`` (see :mod:`fxqat.training.distributed`) the model is wrapped in DDP and each process reads its
shard of every epoch; evaluation runs on rank 0. With ``fsdp=True`` the model is sharded with FSDP2 instead
(:func:`fxqat.training.fsdp.shard_prepared`, after calibration), every rank evaluates, and the checkpoints are
sharded DCP folders ``out_dir/dcp/step-*`` (:mod:`fxqat.training.dcp`) instead of ``checkpoint.pt``.

Example:
    >>> import torch
    >>> from fxqat import data
    >>> from fxqat.models import get_model
    >>> tr, te = data.digits(train=True), data.digits(train=False)
    >>> m = get_model("mlp", in_shape=(1, 8, 8))
    >>> h = fit(m, data.BatchLoader(tr, 64), TrainConfig(epochs=2, lr=0.05, progress=False),
    ...         test_loader=data.BatchLoader(te, 256, train=False))
    >>> h["final"]["test_top1"] > 50
    True
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from fxqat.config import HybridConfig
from fxqat.hybrid_output import HybridOutput
from fxqat.quantizers.control import calibrate as calibrate_quantizers
from fxqat.training import distributed as ddp
from fxqat.training.checkpoint import seed_rng
from fxqat.training.checkpointer import Checkpointer
from fxqat.training.fsdp import shard_prepared
from fxqat.training.health import NonFiniteGuard
from fxqat.training.losses import distillation_loss, hybrid_loss, kd_loss
from fxqat.training.optimizer import OptimizerSpec, build_optimizer
from fxqat.training.optimizer import param_groups as build_groups
from fxqat.training.report import plot_run
from fxqat.training.run_loop import Position, RunHooks, record_nonfinite, run_loop
from fxqat.training.step import StepOutcome, TrainStep

__all__ = ["TrainConfig", "fit", "evaluate", "kd_loss", "compute_loss", "param_groups", "optimizer_spec", "lr_schedule",
           "calibrate"]

log = logging.getLogger(__name__)
NONFINITE_POLICIES = ("skip", "stop", "raise")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one run (every field is a CLI flag of ``fxqat train``).

    Attributes:
        epochs: passes over the training set (ignored when ``steps`` is given).
        steps: total optimizer steps (None = ``epochs * len(loader)``).
        lr: learning rate of the weights; ``quant_lr``: of quantizer parameters (None = ``lr``).
        optimizer: ``"sgd"`` (momentum, Nesterov) or ``"adam"``.
        weight_decay: on weights; ``quant_weight_decay`` on quantizer parameters.
        schedule: ``"cosine"`` (to 0 over the run, after ``warmup_steps`` linear warm-up) or ``"constant"``.
        kd_weight, temperature: the distillation term used with a ``teacher`` (same meaning as in HybridConfig).
        grad_clip: max gradient norm (None = no clipping).
        seed: seeds Python's, NumPy's and torch's global generators at the start of a fresh run.
        progress: tqdm bar (None = only when stderr is a TTY).
        plot: write ``curves.png`` at the end.
        nonfinite: what a step with a non-finite loss or gradient does: ``"skip"`` (no update: parameters, buffers
            and optimizer state stay as before the step; the step is counted in ``history["nonfinite_steps"]``),
            ``"stop"`` (end the run, status ``"diverged"``, last good checkpoint kept) or ``"raise"``
            (``FloatingPointError``).
        max_nonfinite: with ``"skip"``, this many consecutive non-finite steps stop the run as ``"stop"`` does.
        checkpoint_every: also write ``checkpoint.pt`` every this many steps (None = at epoch ends and the last step).
    """

    epochs: int = 1
    steps: Optional[int] = None
    lr: float = 0.1
    quant_lr: Optional[float] = None
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    quant_weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    kd_weight: float = 1.0
    temperature: float = 1.0
    grad_clip: Optional[float] = None
    seed: int = 0
    progress: Optional[bool] = None
    plot: bool = True
    nonfinite: str = "skip"
    max_nonfinite: int = 5
    checkpoint_every: Optional[int] = None

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"TrainConfig.optimizer={self.optimizer!r}: use 'sgd' or 'adam'.")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"TrainConfig.schedule={self.schedule!r}: use 'cosine' or 'constant'.")
        if self.steps is not None and self.steps < 1 or self.epochs < 1:
            raise ValueError("TrainConfig: epochs and steps must be >= 1.")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"TrainConfig.nonfinite={self.nonfinite!r}: use one of {NONFINITE_POLICIES}.")
        if isinstance(self.max_nonfinite, bool) or not isinstance(self.max_nonfinite, int) or self.max_nonfinite < 1:
            raise ValueError(f"TrainConfig.max_nonfinite={self.max_nonfinite!r}: use an integer >= 1 (e.g. 5).")
        if self.checkpoint_every is not None and (not isinstance(self.checkpoint_every, int)
                                                  or self.checkpoint_every < 1):
            raise ValueError(f"TrainConfig.checkpoint_every={self.checkpoint_every!r}: use None or an integer >= 1.")


def compute_loss(out: Any, y: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None, kd_weight: float = 1.0,
                 temperature: float = 1.0) -> Tuple[torch.Tensor, Dict[str, float], torch.Tensor]:
    """``(total loss, logged parts, LP logits)`` for a model output (see the module docstring)."""
    if isinstance(out, HybridOutput):
        total, parts = hybrid_loss(out, y)
        return total, {k: float(v.detach() if torch.is_tensor(v) else v) for k, v in parts.items()}, out.lp
    if teacher_logits is None:
        return F.cross_entropy(out, y), {}, out
    # the core's backbone term, so the KD arm matches the hybrid loss exactly
    total, parts = distillation_loss(out, teacher_logits, y, HybridConfig(kd_weight=kd_weight, temperature=temperature))
    return total, {k: float(v) for k, v in parts.items()}, out


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable) -> float:
    """Top-1 accuracy (%) of ``model`` in eval mode over ``loader`` (train/eval mode restored afterwards)."""
    model = ddp.unwrap(model)
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        out = model(x)
        logits = out.lp if hasattr(out, "lp") else out
        correct += int((logits.argmax(1) == y).sum())
        total += int(y.numel())
    model.train(was_training)
    return 100.0 * correct / max(total, 1)


@torch.no_grad()
def calibrate(model: nn.Module, x: torch.Tensor) -> None:
    """Initialise lazily initialised quantizers before the optimizer exists (``fxqat.calibrate`` on one batch: eval
    mode, no grad, BatchNorm statistics untouched)."""
    calibrate_quantizers(model, [x])


def optimizer_spec(cfg: TrainConfig) -> OptimizerSpec:
    """The :class:`~fxqat.training.optimizer.OptimizerSpec` of ``cfg`` (weight decay on every weight).

    Example:
        >>> optimizer_spec(TrainConfig(optimizer="adam", lr=0.01)).kind
        'adam'
    """
    return OptimizerSpec(cfg.optimizer, lr=cfg.lr, quant_lr=cfg.quant_lr, weight_decay=cfg.weight_decay,
                         quant_weight_decay=cfg.quant_weight_decay, momentum=cfg.momentum)


def param_groups(model: nn.Module, cfg: TrainConfig, params: Optional[Iterable] = None) -> List[Dict[str, Any]]:
    """Two groups: quantizer parameters (``quant_lr``, ``quant_weight_decay``) and all other trainable ones
    (:func:`fxqat.training.optimizer.param_groups` of :func:`optimizer_spec`)."""
    return build_groups(model, optimizer_spec(cfg), params)


def lr_schedule(optimizer, cfg: TrainConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``cfg.warmup_steps`` linear warm-up steps, then cosine to 0 at step ``total`` (or constant).

    Example:
        >>> p = nn.Parameter(torch.zeros(1)); opt = torch.optim.SGD([p], lr=0.1)
        >>> s = lr_schedule(opt, TrainConfig(lr=0.1, warmup_steps=2), total=10)
        >>> [round(s.lr_lambdas[0](t), 3) for t in (0, 1, 6, 10)]
        [0.5, 1.0, 0.5, 0.0]
    """

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _progress(cfg: TrainConfig, total: int, initial: int, desc: str):
    show = sys.stderr.isatty() if cfg.progress is None else cfg.progress
    return tqdm(total=total, initial=initial, desc=desc, disable=not (show and ddp.is_main()), leave=False,
                dynamic_ncols=True)


def _fresh_acc() -> Dict[str, Any]:
    return {"loss": 0.0, "correct": 0, "n": 0}


class _FitRun(RunHooks):
    """The hooks of :func:`fit`: CE / KD / hybrid loss, per-step records, epoch records and checkpoints."""

    def __init__(self, net, model, cfg: TrainConfig, desc: str, teacher, test_loader, hist: Dict[str, Any],
                 ckpt: Checkpointer, guard: NonFiniteGuard, bar, per_epoch: int, stop_at: int, fsdp: bool,
                 acc: Dict[str, Any], elapsed: float) -> None:
        self.net, self.model, self.cfg, self.desc, self.teacher = net, model, cfg, desc, teacher
        self.test_loader, self.hist, self.ckpt, self.guard, self.bar = test_loader, hist, ckpt, guard, bar
        self.per_epoch, self.stop_at, self.fsdp, self.acc, self.elapsed = per_epoch, stop_at, fsdp, acc, elapsed
        self.t0 = time.perf_counter()

    def time_s(self) -> float:
        return self.elapsed + time.perf_counter() - self.t0

    def forward(self, batch):
        x, y = batch
        t_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                t_logits = self.teacher(x)
        o = self.net(x)
        loss, parts, logits = compute_loss(o, y, t_logits, self.cfg.kd_weight, self.cfg.temperature)
        return loss, (o, parts, logits)

    def after_step(self, batch, outcome: StepOutcome, pos: Position) -> bool:
        hist = self.hist
        if outcome.verdict != "ok":
            if not record_nonfinite(hist, outcome, pos, self.guard.message + self.ckpt.kept()):
                return False
            self.bar.update(1)
            return True
        _, y = batch
        o, parts, logits = outcome.aux
        lv = outcome.loss
        self.acc["loss"] += lv * len(y)
        self.acc["n"] += len(y)
        self.acc["correct"] += int((logits.detach().argmax(1) == y).sum())
        rec = {"step": pos.step, "loss": lv, **parts}
        if isinstance(o, HybridOutput) or self.teacher is not None:
            rec["ce"] = float(F.cross_entropy(logits.detach(), y))
        hist["steps"].append(rec)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{lv:.3f}", epoch=pos.epoch)
        if pos.step >= self.stop_at:
            return True
        every = self.cfg.checkpoint_every
        return not (every and pos.step % every == 0 and pos.batch < self.per_epoch and not self.save(pos))

    def end_epoch(self, partial: bool, pos: Position) -> None:
        acc = self.acc
        rec = {"epoch": pos.epoch, "step": pos.step, "partial": partial,
               "lr": self.ckpt.optimizer.param_groups[0]["lr"], "train_loss": acc["loss"] / max(acc["n"], 1),
               "train_top1": 100.0 * acc["correct"] / max(acc["n"], 1), "time_s": self.time_s()}
        if self.test_loader is not None and (ddp.is_main() or self.fsdp):  # a sharded forward is a collective
            rec["test_top1"] = evaluate(self.model, self.test_loader)
        ddp.barrier()
        self.hist["epochs"].append(rec)
        log.info("fxqat %s: epoch %d step %d loss %.4f train %.2f%% test %s", self.desc, pos.epoch, pos.step,
                 rec["train_loss"], rec["train_top1"], f"{rec['test_top1']:.2f}%" if "test_top1" in rec else "-")
        if not partial:
            self.acc = _fresh_acc()

    def after_epoch(self, pos: Position) -> bool:
        self.save(pos)
        return self.hist["status"] == "running"

    def save(self, pos: Position) -> bool:
        """Checkpoint at ``pos``; a state with non-finite parameters is refused and ends the run (diverged)."""
        where = {**pos.to_dict(), "acc": dict(self.acc), "elapsed": self.time_s()}
        if self.ckpt.save(where, self.hist):
            return True
        self.hist["status"], self.hist["error"] = "diverged", (
            f"fit({self.desc}): parameters are non-finite at step {pos.step}; stopped without saving them."
            f"{self.ckpt.kept()}")
        return False


def fit(model: nn.Module, train_loader, cfg: TrainConfig, *, test_loader=None, out_dir=None, resume: bool = False,
        teacher: Optional[nn.Module] = None, params: Optional[Iterable] = None, desc: str = "train",
        run_info: Optional[Dict[str, Any]] = None, stop_after: Optional[int] = None,
        find_unused_parameters: Optional[bool] = None, trusted: bool = False, fsdp: bool = False) -> Dict[str, Any]:
    """Train ``model`` in place; returns the history (``epochs``, ``steps``, ``final``) also written to metrics.json.

    Args:
        model: any module; its output may be a tensor or a ``fxqat.HybridOutput``.
        train_loader: a :class:`fxqat.data.BatchLoader` (or anything with ``set_epoch(epoch, start_batch)``).
        cfg: optimisation settings.
        test_loader: evaluated after every epoch and at the end (rank 0).
        out_dir: where checkpoint.pt, metrics.json and curves.png go (None = nothing written).
        resume: continue from ``out_dir/checkpoint.pt`` when it exists.
        teacher: a frozen FP model for CE + KD (ignored when the output is a HybridOutput).
        params: the parameters to optimise (default: every one with ``requires_grad``).
        run_info: extra JSON-able facts stored in metrics.json (model, data, bits...).
        stop_after: stop (checkpoint written, status "interrupted") after this many steps of this call, as if the
            run had been killed; the schedule still spans the whole run, so ``resume`` continues it exactly.
        find_unused_parameters: passed to DDP (None = only for hybrid models, whose sampled paths can leave some
            blocks without gradient).
        trusted: load the resume checkpoint with arbitrary unpickling (only for files you trust; fxqat's own
            checkpoints never need it).
        fsdp: shard a prepared, calibrated model with FSDP2 (every rank of a process group) instead of wrapping it
            in DDP; ``params`` are taken by name after sharding; checkpoints and ``resume`` use ``out_dir/dcp``.

    Returns:
        The history; ``status`` is ``"complete"``, ``"interrupted"`` (``stop_after``) or ``"diverged"`` (non-finite
        steps under ``cfg.nonfinite``, see :class:`TrainConfig`; ``history["error"]`` says where). Skipped
        non-finite steps are listed in ``history["nonfinite_steps"]``.

    Raises:
        CheckpointError: ``resume`` with a corrupt checkpoint.
        FloatingPointError: a non-finite step with ``cfg.nonfinite == "raise"``.
    """
    per_epoch = len(train_loader)
    if per_epoch == 0:
        raise ValueError("fit: the training loader yields no batch (dataset smaller than one batch?).")
    total = cfg.steps or cfg.epochs * per_epoch
    if fsdp:
        names = {id(p): n for n, p in model.named_parameters()}
        chosen = None if params is None else [names[id(p)] for p in params]
        with ddp.peer_guard(lambda: f"fit({desc}): shard_prepared", lambda: ""):
            shard_prepared(model)
        params = None if chosen is None else [model.get_parameter(n) for n in chosen]
    opt = build_optimizer(model, optimizer_spec(cfg), params)
    sched = lr_schedule(opt, cfg, total)
    hist: Dict[str, Any] = {"status": "running", "run": run_info or {}, "config": asdict(cfg), "epochs": [],
                            "steps": [], "nonfinite_steps": []}
    pos, acc, elapsed = Position(), _fresh_acc(), 0.0
    ckpt = Checkpointer(out_dir, model, opt, sched, fsdp=fsdp, trusted=trusted)
    ck = ckpt.load() if resume else None
    if ck is not None:
        pos = Position(*(ck["pos"][k] for k in ("step", "epoch", "batch")))
        acc, elapsed = ck["pos"]["acc"], ck["pos"]["elapsed"]
        hist = ck["history"]
        hist["status"] = "running"
        hist.setdefault("nonfinite_steps", [])
        hist["epochs"] = [e for e in hist["epochs"] if not e.get("partial")]
        log.info("fxqat: resumed %s at step %d (epoch %d, batch %d)", ckpt.path, pos.step, pos.epoch, pos.batch)
    else:
        if resume:
            log.warning("fxqat: --resume given but %s does not exist; starting a fresh run", ckpt.path)
        seed_rng(cfg.seed)
    if find_unused_parameters is None:
        find_unused_parameters = getattr(model, "fxqat_hybrid", None) is not None

    def where() -> str:
        return f"fit({desc}) at step {pos.step + 1}"

    with ddp.peer_guard(where, ckpt.advice):
        net = model if fsdp else ddp.wrap_ddp(model, find_unused_parameters=find_unused_parameters)
    stop_at = min(total, pos.step + stop_after) if stop_after else total
    if teacher is not None:
        teacher.eval()
    model.train()
    bar = _progress(cfg, total, pos.step, desc)
    guard = NonFiniteGuard(model, cfg.nonfinite, cfg.max_nonfinite, desc)
    step = TrainStep(opt, sched, clip=cfg.grad_clip or None, guard=guard)
    run = _FitRun(net, model, cfg, desc, teacher, test_loader, hist, ckpt, guard, bar, per_epoch, stop_at, fsdp,
                  acc, elapsed)
    with ddp.peer_guard(where, ckpt.advice):
        run_loop(step, train_loader, pos, stop_at, run)
    bar.close()
    if hist["status"] == "diverged":
        log.error("%s", hist["error"])
        ckpt.write_metrics(hist)
        return hist
    if pos.step < total:
        hist["status"] = "interrupted"
        ckpt.write_metrics(hist)
        return hist
    hist["status"] = "complete"
    last = hist["epochs"][-1] if hist["epochs"] else {}
    hist["final"] = {"step": pos.step, "test_top1": last.get("test_top1"), "train_loss": last.get("train_loss"),
                     "time_s": run.time_s()}
    if ckpt.out is not None and ddp.is_main() and cfg.plot:
        plot_run(hist, ckpt.out / "curves.png", title=desc)
    ckpt.write_metrics(hist)
    return hist
