"""The training loop: FP pre-training (cached), QAT (plain, distillation, hybrid outputs), evaluation.

One :func:`fit` serves every case. The loss depends on what the model returns:

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
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from fxqat.config import HybridConfig
from fxqat.hybrid_output import HybridOutput
from fxqat.quantizers.control import calibrate as calibrate_quantizers
from fxqat.quantizers.control import quantizer_parameters
from fxqat.training import distributed as ddp
from fxqat.training.checkpoint import (
    CheckpointError,
    atomic_save,
    atomic_write_text,
    load_checkpoint,
    rng_state,
    seed_rng,
    set_rng_state,
    to_json,
)
from fxqat.training.dcp import latest_sharded, load_sharded, save_sharded
from fxqat.training.fsdp import shard_prepared
from fxqat.training.health import NonFiniteGuard
from fxqat.training.losses import distillation_loss, hybrid_loss, kd_loss
from fxqat.training.report import plot_run

__all__ = ["TrainConfig", "fit", "evaluate", "kd_loss", "compute_loss", "param_groups", "calibrate"]

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


def param_groups(model: nn.Module, cfg: TrainConfig, params: Optional[Iterable] = None) -> List[Dict[str, Any]]:
    """Two groups: quantizer parameters (``quant_lr``, ``quant_weight_decay``) and all other trainable ones."""
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    params = list(params)
    if params and isinstance(params[0], dict):  # already param groups
        return params
    qids = {id(p) for p in quantizer_parameters(model).values()}
    weights = [p for p in params if id(p) not in qids]
    quant = [p for p in params if id(p) in qids]
    groups = [{"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "weights"}]
    if quant:
        groups.append({"params": quant, "lr": cfg.quant_lr if cfg.quant_lr is not None else cfg.lr,
                       "weight_decay": cfg.quant_weight_decay, "name": "quantizers"})
    return groups


def _optimizer(groups, cfg: TrainConfig, total: int):
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    else:
        opt = torch.optim.Adam(groups, lr=cfg.lr)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _progress(cfg: TrainConfig, total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if cfg.progress is None else cfg.progress
    return tqdm(total=total, initial=initial, desc=desc, disable=not (show and ddp.is_main()), leave=False,
                dynamic_ncols=True)


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
    out = Path(out_dir) if out_dir is not None else None
    main = ddp.is_main()
    if fsdp:
        names = {id(p): n for n, p in model.named_parameters()}
        chosen = None if params is None else [names[id(p)] for p in params]
        with ddp.peer_guard(lambda: f"fit({desc}): shard_prepared", lambda: ""):
            shard_prepared(model)
        params = None if chosen is None else [model.get_parameter(n) for n in chosen]
    opt, sched = _optimizer(param_groups(model, cfg, params), cfg, total)
    hist: Dict[str, Any] = {"status": "running", "run": run_info or {}, "config": asdict(cfg), "epochs": [],
                            "steps": [], "nonfinite_steps": []}
    step, epoch, batch, acc, elapsed = 0, 0, 0, {"loss": 0.0, "correct": 0, "n": 0}, 0.0
    ckpt_path = (out / "dcp" if fsdp else out / "checkpoint.pt") if out is not None else None
    if fsdp and resume and ckpt_path is not None and latest_sharded(ckpt_path) is not None:
        ck = load_sharded(ckpt_path, model, opt)  # model, optimizer and RNG; the plain rest is ck
        sched.load_state_dict(ck["scheduler"])
    elif not fsdp and resume and ckpt_path is not None and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path, required=("model", "optimizer", "scheduler", "rng", "pos", "history"),
                             trusted=trusted)
        try:
            ddp.unwrap(model).load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {ckpt_path} does not match this model/optimizer: {e}") from e
        set_rng_state(ck["rng"])
    else:
        ck = None
    if ck is not None:
        step, epoch, batch, acc, elapsed = (ck["pos"][k] for k in ("step", "epoch", "batch", "acc", "elapsed"))
        hist = ck["history"]
        hist["status"] = "running"
        hist.setdefault("nonfinite_steps", [])
        hist["epochs"] = [e for e in hist["epochs"] if not e.get("partial")]
        log.info("fxqat: resumed %s at step %d (epoch %d, batch %d)", ckpt_path, step, epoch, batch)
    elif resume:
        log.warning("fxqat: --resume given but %s does not exist; starting a fresh run", ckpt_path)
        seed_rng(cfg.seed)
    else:
        seed_rng(cfg.seed)
    if find_unused_parameters is None:
        find_unused_parameters = getattr(model, "fxqat_hybrid", None) is not None
    last_saved: Optional[int] = step if step else None  # the step of the newest complete checkpoint.pt

    def where() -> str:
        return f"fit({desc}) at step {step + 1}"

    def advice() -> str:
        """What is on disk after a lost peer, and how to continue (the end of the PeerLost message)."""
        if out is None:
            return ""
        if not main:
            saved = f"{'every' if fsdp else 'rank 0 writes each'} checkpoint atomically, so the newest one is complete"
        elif last_saved is None:
            saved = f"no checkpoint was completed yet ({ckpt_path} does not exist)"
        else:
            saved = f"{ckpt_path} (step {last_saved}) is complete"
        return f"{saved}: relaunch the same command with --resume"

    with ddp.peer_guard(where, advice):
        net = model if fsdp else ddp.wrap_ddp(model, find_unused_parameters=find_unused_parameters)
    stop_at = min(total, step + stop_after) if stop_after else total
    if teacher is not None:
        teacher.eval()
    model.train()
    bar = _progress(cfg, total, step, desc)
    t0 = time.perf_counter()

    def end_epoch(partial: bool) -> None:
        nonlocal acc
        rec = {"epoch": epoch, "step": step, "partial": partial, "lr": opt.param_groups[0]["lr"],
               "train_loss": acc["loss"] / max(acc["n"], 1), "train_top1": 100.0 * acc["correct"] / max(acc["n"], 1),
               "time_s": elapsed + time.perf_counter() - t0}
        if test_loader is not None and (main or fsdp):  # a sharded forward is a collective
            rec["test_top1"] = evaluate(model, test_loader)
        ddp.barrier()
        hist["epochs"].append(rec)
        log.info("fxqat %s: epoch %d step %d loss %.4f train %.2f%% test %s", desc, epoch, step, rec["train_loss"],
                 rec["train_top1"], f"{rec['test_top1']:.2f}%" if "test_top1" in rec else "-")

    trainable = [p for g in opt.param_groups for p in g["params"]]
    guard = NonFiniteGuard(model, cfg.nonfinite, cfg.max_nonfinite, desc)

    def kept() -> str:
        """What a diverged run leaves on disk (the end of its error message)."""
        if out is None or not main:
            return ""
        if last_saved is None:
            return f" No checkpoint was written before ({ckpt_path} does not exist)."
        return f" The last good checkpoint, {ckpt_path} (step {last_saved}), is kept; --resume continues from it."

    def save() -> bool:
        """Write checkpoint.pt + metrics.json (rank 0); refuse a state with non-finite parameters."""
        nonlocal last_saved
        if out is None or not (main or fsdp):
            return True
        finite = all(bool(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all()) for p in trainable)
        if fsdp:
            finite = ddp.all_ranks(finite)
        if not finite:
            hist["status"], hist["error"] = "diverged", (
                f"fit({desc}): parameters are non-finite at step {step}; stopped without saving them.{kept()}")
            return False
        pos = {"step": step, "epoch": epoch, "batch": batch, "acc": dict(acc),
               "elapsed": elapsed + time.perf_counter() - t0}
        if fsdp:
            save_sharded(ckpt_path, model, opt, step=step,
                         extra={"scheduler": sched.state_dict(), "pos": pos, "history": hist})
        else:
            atomic_save({"model": ddp.unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "rng": rng_state(), "pos": pos, "history": hist}, ckpt_path)
        last_saved = step
        if main:
            atomic_write_text(to_json(hist), out / "metrics.json")
        return True

    with ddp.peer_guard(where, advice):
        while step < stop_at and hist["status"] == "running":
            train_loader.set_epoch(epoch, batch)
            for x, y in train_loader:
                t_logits = None
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(x)
                guard.before_step()
                o = net(x)
                loss, parts, logits = compute_loss(o, y, t_logits, cfg.kd_weight, cfg.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                lv = float(loss.detach())
                verdict = guard.check(step + 1, lv, trainable)
                if verdict == "ok":
                    if cfg.grad_clip:
                        nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                    opt.step()
                sched.step()
                step, batch = step + 1, batch + 1
                if verdict != "ok":
                    hist["nonfinite_steps"].append(step)
                    if verdict == "stop":
                        hist["status"], hist["error"] = "diverged", guard.message + kept()
                        break
                    bar.update(1)
                    if step >= stop_at:
                        break
                    continue
                acc["loss"] += lv * len(y)
                acc["n"] += len(y)
                acc["correct"] += int((logits.detach().argmax(1) == y).sum())
                rec = {"step": step, "loss": lv, **parts}
                if isinstance(o, HybridOutput) or teacher is not None:
                    rec["ce"] = float(F.cross_entropy(logits.detach(), y))
                hist["steps"].append(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{lv:.3f}", epoch=epoch)
                if step >= stop_at:
                    break
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and batch < per_epoch and not save():
                    break
            if hist["status"] != "running":
                break
            finished_epoch = batch >= per_epoch
            end_epoch(partial=not finished_epoch)
            if finished_epoch:
                epoch, batch, acc = epoch + 1, 0, {"loss": 0.0, "correct": 0, "n": 0}
            save()
    bar.close()
    if hist["status"] == "diverged":
        log.error("%s", hist["error"])
        if out is not None and main:
            atomic_write_text(to_json(hist), out / "metrics.json")
        return hist
    if step < total:
        hist["status"] = "interrupted"
        if out is not None and main:
            atomic_write_text(to_json(hist), out / "metrics.json")
        return hist
    hist["status"] = "complete"
    last = hist["epochs"][-1] if hist["epochs"] else {}
    hist["final"] = {"step": step, "test_top1": last.get("test_top1"), "train_loss": last.get("train_loss"),
                     "time_s": elapsed + time.perf_counter() - t0}
    if out is not None and main:
        if cfg.plot:
            plot_run(hist, out / "curves.png", title=desc)
        atomic_write_text(to_json(hist), out / "metrics.json")
    return hist
