"""``fxqat train``: FP pre-training (cached) then QAT of one model; resumable; DDP under torchrun.

Example (shell)::

    fxqat train --model mlp --data digits --method lsq --bits 4/4 --steps 20 --out runs/mlp_w4a4
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
from pathlib import Path

import torch

import fxqat
from fxqat import data
from fxqat.commands.common import build_model, load_datasets, load_fp_weights
from fxqat.errors import UsageError
from fxqat.training import distributed as ddp
from fxqat.training import loop, recipes
from fxqat.training.checkpoint import atomic_save, atomic_write_text
from fxqat.training.fsdp import full_state_dict
from fxqat.validate import did_you_mean

__all__ = ["cmd_train"]

log = logging.getLogger("fxqat.cli")


def cmd_train(a: argparse.Namespace) -> int:
    """Run ``fxqat train`` with the parsed flags; returns the exit status."""
    out = Path(a.out)
    run = {k: v for k, v in vars(a).items()
           if k not in ("resume", "stop_after", "progress", "quiet", "command", "threads", "trust_checkpoint",
                        "nonfinite", "max_nonfinite", "checkpoint_every", "ddp_timeout")}
    if a.resume and (out / "run.json").exists():
        old = json.loads((out / "run.json").read_text())
        diff = [k for k in ("model", "data", "method", "bits", "hybrid", "paths", "kd", "batch_size", "seed")
                if json.dumps(old.get(k)) != json.dumps(run.get(k))]
        if diff:
            raise UsageError(f"--resume: {out} was started with different {diff}; use the same flags or a new --out.")
    if a.method != "fp" and a.method not in fxqat.available_methods():
        choices = ["fp", *fxqat.available_methods()]
        raise UsageError(f"--method {a.method!r}: choose 'fp' or one of {sorted(fxqat.available_methods())}."
                         f"{did_you_mean(a.method, choices)}")
    tr, te = load_datasets(a.data, a.data_dir, a.train_subset, a.test_subset)
    if a.ddp_timeout is not None and not a.ddp_timeout > 0:
        raise UsageError(f"--ddp-timeout {a.ddp_timeout}: give a positive number of seconds (e.g. 600).")
    if a.fsdp and a.method == "fp":
        raise UsageError("--fsdp shards a prepared QAT model; use DDP (no --fsdp) for --method fp.")
    rank, world = ddp.init_distributed(a.ddp_timeout)
    torch.manual_seed(a.seed)  # the initial weights are part of what --seed fixes
    model = build_model(a.model, tr.num_classes, tr.input_shape)
    loader = data.BatchLoader(tr, a.batch_size, train=True, seed=a.seed)
    test = data.BatchLoader(te, 512, train=False, rank=0, world_size=1)
    if ddp.is_main():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(run, indent=1, default=str), out / "run.json")
    cfg = loop.TrainConfig(epochs=a.epochs, steps=a.steps, lr=a.lr, quant_lr=a.quant_lr, optimizer=a.optimizer,
                      weight_decay=a.weight_decay, seed=a.seed, progress=a.progress, nonfinite=a.nonfinite,
                      max_nonfinite=a.max_nonfinite, checkpoint_every=a.checkpoint_every)
    info = {"model": a.model, "data": a.data, "data_source": tr.source, "world_size": world}
    if a.method == "fp":
        hist = loop.fit(model, loader, cfg, test_loader=test, out_dir=out, resume=a.resume, desc="fp",
                   run_info=info, stop_after=a.stop_after, trusted=a.trust_checkpoint)
        final_model = model
    else:
        if a.fp_ckpt:
            load_fp_weights(model, a.fp_ckpt, a.trust_checkpoint)
        elif a.fp_steps != 0:
            fp_cfg = loop.TrainConfig(epochs=a.fp_epochs, steps=a.fp_steps, lr=a.fp_lr, seed=a.seed,
                                      progress=a.progress)
            key = {"model": a.model, "data": a.data, "batch_size": a.batch_size, "n_train": len(tr),
                   "source": tr.source, "world_size": world}
            _, fp_info = recipes.train_fp(model, loader, fp_cfg, key=key, test_loader=test)
            info["fp_top1"] = fp_info["top1"]
            log.info("FP model: top-1 %.2f%% (%s)", fp_info["top1"], "cached" if fp_info["cached"] else "trained")
        w, b = a.bits
        hybrid = fxqat.HybridConfig(paths=a.paths, seed=a.seed) if a.hybrid else None
        qcfg = fxqat.QATConfig(w_bits=w, a_bits=b, method=a.method, first_last=a.first_last or None, hybrid=hybrid)
        teacher = None
        if a.kd:
            teacher = copy.deepcopy(model).eval().requires_grad_(False)
            hc = fxqat.HybridConfig()
            cfg = dataclasses.replace(cfg, kd_weight=hc.kd_weight, temperature=hc.temperature)
        x0 = tr[0][0].unsqueeze(0).repeat(2, 1, 1, 1)
        qm = fxqat.prepare_qat(model, (x0,), qcfg)
        hist = recipes.train_qat(qm, loader, cfg, test_loader=test, out_dir=out, resume=a.resume, teacher=teacher,
                         desc=f"{a.method} W{w}A{b}{' hybrid' if a.hybrid else ''}", run_info=info,
                         stop_after=a.stop_after, trusted=a.trust_checkpoint, fsdp=a.fsdp)
        final_model = qm
    if a.fsdp and hist["status"] == "complete":  # gathering the sharded state is a collective: every rank
        final_state = full_state_dict(final_model, rank0_only=True)
    if ddp.is_main() and hist["status"] == "complete":
        state = final_state if a.fsdp else final_model.state_dict()
        atomic_save({"model": state, "run": run, "final": hist["final"]}, out / "model.pt")
        f = hist["final"]
        what = "FP" if a.method == "fp" else \
            f"{a.method} W{a.bits[0]}A{a.bits[1]}{' +KD' if a.kd else ''}{' +hybrid' if a.hybrid else ''}"
        print(f"{a.model} {a.data} {what}: "
              f"top-1 {f['test_top1']:.2f}%  steps {f['step']}  time {f['time_s']:.1f}s  -> {out}")
    elif hist["status"] == "diverged":
        ddp.cleanup()
        raise FloatingPointError(hist["error"])
    elif ddp.is_main():
        print(f"stopped at step {hist['steps'][-1]['step'] if hist['steps'] else 0}; continue with --resume")
    ddp.cleanup()
    return 0
