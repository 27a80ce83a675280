"""Training recipes on top of :func:`fxqat.training.loop.fit`: cached FP pre-training and QAT from it.

Example:
    >>> fp_cache_dir().name
    'ckpt'
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch.nn as nn

from fxqat.data import cache_dir
from fxqat.models.hf import CHAR_LLAMA, char_llama
from fxqat.quantizers.control import trainable_parameters
from fxqat.training import distributed as ddp
from fxqat.training.checkpoint import CheckpointError, atomic_save, load_checkpoint
from fxqat.training.lm import FP_RECIPE, LMRecipe, evaluate_lm, train_lm
from fxqat.training.loop import TrainConfig, calibrate, evaluate, fit

__all__ = ["fp_cache_dir", "train_fp", "train_qat", "pretrained_char_llama", "char_llama_cache_path"]

log = logging.getLogger(__name__)


def fp_cache_dir() -> Path:
    """Where :func:`train_fp` keeps its checkpoints: ``<fxqat cache>/ckpt`` (``$FXQAT_CACHE`` or ~/.cache/fxqat)."""
    return cache_dir() / "ckpt"


def train_fp(model: nn.Module, train_loader, cfg: TrainConfig, *, key: Dict[str, Any], test_loader=None,
             cache: bool = True, desc: str = "fp") -> Tuple[nn.Module, Dict[str, Any]]:
    """Full-precision training with a cached result: the same ``key`` + ``cfg`` loads instead of training again.

    Args:
        model: freshly built model (its state is replaced by the cached or trained weights).
        key: what identifies the run besides ``cfg`` (model and data names, batch size...); part of the file name.
        cache: read and write ``fp_cache_dir()``; a corrupt cache file is reported and retrained.

    Returns:
        ``(model, info)`` with info ``{"top1", "path", "cached", "time_s"}``.
    """

    ident = {**key, **asdict(cfg)}
    for k in ("progress", "plot", "nonfinite", "max_nonfinite", "checkpoint_every"):  # do not change the result
        ident.pop(k, None)
    digest = hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:10]
    name = "-".join(str(key.get(k, "x")) for k in ("model", "data"))
    path = fp_cache_dir() / f"{name}-e{cfg.epochs}-st{cfg.steps or 0}-s{cfg.seed}-{digest}.pt"
    if cache and path.exists():
        try:
            ck = load_checkpoint(path, required=("model", "top1"))
            model.load_state_dict(ck["model"])
            log.info("fxqat: FP checkpoint loaded from cache %s (top-1 %.2f%%)", path, ck["top1"])
            return model, {"top1": ck["top1"], "path": str(path), "cached": True, "time_s": ck.get("time_s", 0.0)}
        except (CheckpointError, RuntimeError) as e:
            log.warning("fxqat: ignoring FP cache %s (%s); training again", path, e)
    hist = fit(model, train_loader, cfg, test_loader=test_loader, desc=desc)
    top1 = hist["final"]["test_top1"]
    if top1 is None and test_loader is not None:
        top1 = evaluate(model, test_loader)
    if cache and ddp.is_main():
        atomic_save({"model": model.state_dict(), "top1": top1, "key": ident, "time_s": hist["final"]["time_s"],
                     "steps": hist["steps"]}, path)
    return model, {"top1": top1, "path": str(path), "cached": False, "time_s": hist["final"]["time_s"]}


def train_qat(qm: nn.Module, train_loader, cfg: TrainConfig, *, test_loader=None, out_dir=None,
              resume: bool = False, teacher: Optional[nn.Module] = None, desc: str = "qat",
              run_info: Optional[Dict[str, Any]] = None, stop_after: Optional[int] = None,
              trusted: bool = False, fsdp: bool = False) -> Dict[str, Any]:
    """QAT of a prepared model: calibrate the quantizers on the first training batch, then :func:`fit` over
    ``fxqat.trainable_parameters(qm)`` (the FP partner of a hybrid model stays frozen).

    Works for plain outputs, ``teacher`` distillation and hybrid outputs alike (see :func:`compute_loss`). With
    ``fsdp`` the calibrated model is sharded with FSDP2 (see :func:`fit`).
    """
    train_loader.set_epoch(0)
    x0, _ = next(iter(train_loader))
    calibrate(qm, x0)
    params = list(trainable_parameters(qm))
    return fit(qm, train_loader, cfg, test_loader=test_loader, out_dir=out_dir, resume=resume, teacher=teacher,
               params=params, desc=desc, run_info=run_info, stop_after=stop_after, trusted=trusted, fsdp=fsdp)


def char_llama_cache_path(corpus, recipe: LMRecipe = FP_RECIPE, *, seed: int = 0,
                          model_overrides: Optional[Dict[str, Any]] = None) -> Path:
    """Where :func:`pretrained_char_llama` caches the FP model of these arguments (whether or not it exists yet)."""
    sizes = {**CHAR_LLAMA, **(model_overrides or {})}
    ident = {"model": sizes, "vocab": corpus.vocab_size, "n_train": len(corpus.splits["train"]), "seed": seed,
             "recipe": asdict(recipe)}
    digest = hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return fp_cache_dir() / f"char_llama-st{recipe.steps}-s{seed}-{digest}.pt"


def pretrained_char_llama(corpus, recipe: LMRecipe = FP_RECIPE, *, seed: int = 0, cache: bool = True,
                          progress: bool = True, n_val: int = 64, val_seed: int = 1337,
                          model_overrides: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, Dict]:
    """The LLM benchmark's FP model: :func:`~fxqat.models.hf.char_llama` pre-trained with ``recipe`` on ``corpus``,
    cached under ``fp_cache_dir()`` (keyed by the recipe, the model sizes and the corpus size).

    Returns:
        ``(model, info)`` with info ``{"val_loss", "path", "cached", "time_s", "steps"}``; ``val_loss`` is the mean over
        ``n_val`` validation batches from ``val_seed``.
    """
    path = char_llama_cache_path(corpus, recipe, seed=seed, model_overrides=model_overrides)
    model = char_llama(corpus.vocab_size, seed=seed, **(model_overrides or {}))
    if cache and path.exists():
        try:
            ck = load_checkpoint(path, required=("model", "val_loss"))
            model.load_state_dict(ck["model"])
            log.info("fxqat: FP char-Llama loaded from %s (val loss %.4f)", path, ck["val_loss"])
            return model, {"val_loss": ck["val_loss"], "path": str(path), "cached": True, "time_s": ck["time_s"],
                           "steps": recipe.steps}
        except (CheckpointError, RuntimeError, KeyError) as e:
            log.warning("fxqat: ignoring FP cache %s (%s); training again", path, e)
    hist = train_lm(model, corpus, recipe, seed=0, progress=progress, desc="fp pre-train")
    val = evaluate_lm(model, list(corpus.batches("val", n_val, recipe.batch_size, recipe.context, val_seed)))
    if cache and ddp.is_main():
        atomic_save({"model": model.state_dict(), "val_loss": val, "time_s": hist["time_s"]}, path)
    return model, {"val_loss": val, "path": str(path), "cached": False, "time_s": hist["time_s"],
                   "steps": recipe.steps}
