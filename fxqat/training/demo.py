"""``fxqat demo``: an FP model on real offline data, then four low-bit QAT arms from it, compared on one table.

The arms start from the same FP checkpoint with the same seed and batches; the first three run the same number of
steps:

1. **LSQ**: plain QAT, cross-entropy;
2. **LSQ + KD**: cross-entropy + distillation from the FP model's logits alone (no hybrid paths), with the
   ``kd_weight`` and ``temperature`` of ``HybridConfig()``: isolates what the FP partner's *logits* bring;
3. **LSQ + block replacement**: ``HybridConfig()`` (BWRF, methods.md §1): task loss + KD on the LP backbone and on
   every mixed-precision path;
4. **LSQ + KD at block replacement's time**: arm 2 given the wall time arm 3 took (its steps scaled by the time
   ratio), the fair comparison: in every setting measured, KD given that compute beat block replacement
   (docs/block_replacement.md §3).

Data: CIFAR-10 (ResNet-20) from the shared JPEG npz or a torchvision folder; without either, scikit-learn's digits
(a small CNN). The FP model is cached (``~/.cache/fxqat/ckpt``), so a second run only trains the arms.

Example:
    >>> cfg = demo_config(quick=True, data="digits")
    >>> cfg.model, cfg.bits
    ('cnn', (2, 2))
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch

import fxqat
from fxqat import data as fdata
from fxqat.data import data_available
from fxqat.errors import UsageError
from fxqat.models import get_model
from fxqat.training.checkpoint import atomic_write_text
from fxqat.training.loop import TrainConfig
from fxqat.training.recipes import train_fp, train_qat
from fxqat.training.report import plot_arms

__all__ = ["DemoConfig", "demo_config", "run_demo", "format_table"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Budget of the demo (defaults: under 10 minutes on 2 CPU cores; ``quick``: about 1-2 minutes)."""

    data: str = "cifar10"  # "cifar10" or "digits"
    model: str = "resnet20"  # ResNet-20 for CIFAR-10, the small CNN for digits
    bits: Tuple[int, int] = (2, 2)  # W/A of the three arms
    fp_steps: int = 600  # FP pre-training steps (cached; about 1.5 epochs of CIFAR-10)
    fp_lr: float = 0.1  # SGD + Nesterov, cosine to 0
    qat_steps: int = 80  # steps of each arm
    qat_lr: float = 0.01  # SGD + Nesterov, cosine to 0, weights and quantizer step sizes alike
    batch_size: int = 128
    test_subset: Optional[int] = 5000  # evaluate on the first N test images (None = all 10,000)
    seed: int = 0


def demo_config(quick: bool = False, data: str = "cifar10", **overrides: Any) -> DemoConfig:
    """The demo's budget for ``data`` (``quick`` for CI); ``overrides`` replace single fields (None = keep)."""
    if data == "cifar10":
        cfg = DemoConfig("cifar10", "resnet20", fp_steps=80, qat_steps=12, batch_size=64, test_subset=500) if quick \
            else DemoConfig("cifar10", "resnet20")
    else:
        cfg = DemoConfig("digits", "cnn", fp_steps=150, qat_steps=40, batch_size=64, test_subset=None) if quick \
            else DemoConfig("digits", "cnn", fp_steps=400, qat_steps=150, batch_size=64, test_subset=None)
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def _pick_data(data: str, data_dir: Optional[str]) -> str:
    if data != "auto":
        return data
    if data_available("cifar10", data_dir):
        return "cifar10"
    log.warning("fxqat demo: CIFAR-10 not found (%s); falling back to scikit-learn digits",
                data_dir or "default search paths")
    return "digits"


def format_table(rows: Dict[str, Dict[str, Any]]) -> str:
    """The result table: one line per arm with top-1 (%) and wall time (s), and, when both arms ran, how much more
    time block replacement took than KD at equal steps (the compute-matched KD arm gets that much more).

    Example:
        >>> print(format_table({"LSQ + KD W2A2": {"top1": 60.0, "time_s": 10.0},
        ...                     "LSQ + block repl. W2A2": {"top1": 61.0, "time_s": 25.0}}))
        arm                          top-1 (%)  time (s)
        ------------------------------------------------
        LSQ + KD W2A2                    60.00      10.0
        LSQ + block repl. W2A2           61.00      25.0
        block replacement took 2.5x the KD arm's time at equal steps (compare with KD given its time)
    """
    lines = [f"{'arm':<28} {'top-1 (%)':>9} {'time (s)':>9}", "-" * 48]
    for name, r in rows.items():
        note = " (cached)" if r.get("cached") else ""
        lines.append(f"{name:<28} {r['top1']:>9.2f} {r['time_s']:>9.1f}{note}")
    kd = next((r for n, r in rows.items() if "+ KD" in n), None)
    br = next((r for n, r in rows.items() if "block repl." in n), None)
    if kd and br and kd["time_s"] > 0:
        lines.append(f"block replacement took {br['time_s'] / kd['time_s']:.1f}x the KD arm's time at equal steps "
                     "(compare with KD given its time)")
    return "\n".join(lines)


def run_demo(quick: bool = False, data_dir: Optional[str] = None, data: str = "auto", bits=None, steps=None,
             fp_steps=None, seed: int = 0, out: str = "runs/demo", progress: Optional[bool] = None,
             echo: Callable[[str], None] = log.info) -> Dict[str, Any]:
    """Run the demo; writes ``OUT/demo.json`` and ``OUT/demo.png``; returns the results.

    ``echo`` receives the header, the result table and the file names (the CLI passes ``print``).
    """
    if data_dir is not None and not Path(data_dir).expanduser().exists():
        raise UsageError(f"--data-dir {data_dir}: no such folder.")
    cfg = demo_config(quick, _pick_data(data, data_dir), bits=bits, qat_steps=steps, fp_steps=fp_steps, seed=seed)
    t_start = time.perf_counter()
    tr, te = fdata.load(cfg.data, data_dir, train=True), fdata.load(cfg.data, data_dir, train=False)
    if cfg.test_subset:
        te = te.subset(cfg.test_subset)
    loader = fdata.BatchLoader(tr, cfg.batch_size, train=True, seed=cfg.seed, rank=0, world_size=1)
    test = fdata.BatchLoader(te, 500, train=False, rank=0, world_size=1)
    w, a = cfg.bits
    echo(f"fxqat demo: {cfg.model} on {cfg.data} ({tr.source}), {len(te)} test images; FP {cfg.fp_steps} steps, "
         f"then W{w}A{a} arms of {cfg.qat_steps} steps (batch {cfg.batch_size}, seed {cfg.seed})")

    torch.manual_seed(cfg.seed)
    fp = get_model(cfg.model, num_classes=tr.num_classes, in_shape=tr.input_shape)
    fp_cfg = TrainConfig(steps=cfg.fp_steps, lr=cfg.fp_lr, seed=cfg.seed, progress=progress, plot=False,
                         warmup_steps=min(50, cfg.fp_steps // 10))
    key = {"model": cfg.model, "data": cfg.data, "batch_size": cfg.batch_size, "source": tr.source, "n_test": len(te)}
    fp, fp_info = train_fp(fp, loader, fp_cfg, key=key, test_loader=test, desc="FP")
    rows: Dict[str, Dict[str, Any]] = {"FP (32-bit)": {"top1": fp_info["top1"], "time_s": fp_info["time_s"],
                                                       "cached": fp_info["cached"], "steps": []}}
    hc = fxqat.HybridConfig(seed=cfg.seed)
    qat_cfg = TrainConfig(steps=cfg.qat_steps, lr=cfg.qat_lr, seed=cfg.seed, progress=progress, plot=False)
    x0 = tr[0][0].unsqueeze(0).repeat(2, 1, 1, 1)
    arms = [
        (f"LSQ W{w}A{a}", fxqat.QATConfig(w_bits=w, a_bits=a, method="lsq"), None),
        (f"LSQ + KD W{w}A{a}", fxqat.QATConfig(w_bits=w, a_bits=a, method="lsq"), "kd"),
        (f"LSQ + block repl. W{w}A{a}", fxqat.QATConfig(w_bits=w, a_bits=a, method="lsq", hybrid=hc), None),
    ]
    arms.append((f"LSQ + KD, BR's time W{w}A{a}", arms[1][1], "kd_matched"))
    for name, qcfg, extra in arms:
        teacher, tcfg = None, qat_cfg
        if extra in ("kd", "kd_matched"):
            teacher = copy.deepcopy(fp).eval().requires_grad_(False)
            tcfg = replace(qat_cfg, kd_weight=hc.kd_weight, temperature=hc.temperature)
        if extra == "kd_matched":  # KD given the wall time block replacement took (same schedule shape, more steps)
            ratio = rows[arms[2][0]]["time_s"] / max(rows[arms[1][0]]["time_s"], 1e-9)
            tcfg = replace(tcfg, steps=max(cfg.qat_steps, round(cfg.qat_steps * ratio)))
        qm = fxqat.prepare_qat(copy.deepcopy(fp), (x0,), qcfg)
        t0 = time.perf_counter()
        hist = train_qat(qm, loader, tcfg, test_loader=test, teacher=teacher, desc=name)
        rows[name] = {"top1": hist["final"]["test_top1"], "time_s": time.perf_counter() - t0,
                      "steps": [{"step": s["step"], "loss": s.get("ce", s["loss"])} for s in hist["steps"]]}
        log.info("fxqat demo: %s top-1 %.2f%%", name, rows[name]["top1"])
    table = format_table(rows)
    echo(table)
    outdir = Path(out)
    result = {"config": asdict(cfg), "data_source": tr.source, "quick": quick, "torch_threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "total_time_s": time.perf_counter() - t_start,
              "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
              "arms": {k: {kk: vv for kk, vv in v.items() if kk != "steps"} for k, v in rows.items()},
              "chance_top1": 100.0 / tr.num_classes}
    bad = [k for k, v in rows.items() if not math.isfinite(v["top1"])]
    if bad:
        log.warning("fxqat demo: non-finite accuracy for %s", bad)
    plot_arms({k: v for k, v in rows.items() if v["steps"]}, outdir / "demo.png",
              title=f"{cfg.model} / {cfg.data}: W{w}A{a} from FP ({cfg.qat_steps} steps per arm)",
              reference={"FP": fp_info["top1"]})
    atomic_write_text(json.dumps(result, indent=1), outdir / "demo.json")
    echo(f"total {result['total_time_s']:.0f}s; plot: {outdir / 'demo.png'}  results: {outdir / 'demo.json'}")
    return result
