"""The mixed-precision autopilot behind ``fxqat autobits``: FP model -> sensitivity -> bit allocation -> QAT.

1. the FP model: cached FP pre-training (:func:`fxqat.training.recipes.train_fp`, the same cache as ``fxqat train``);
2. per-block sensitivity at the candidate bit-widths (:func:`fxqat.sensitivity`) on a copy prepared with block
   replacement, from ``sens_batches`` training batches;
3. the exact allocation for the budget (:func:`fxqat.allocate_bits`);
4. QAT of the FP model with the allocated config (:func:`fxqat.training.recipes.train_qat`).

Written to ``out``: ``sensitivity.{json,md,png}``, ``allocation.{json,md}``, ``bits.png`` (the block partition
coloured by bits), the QAT run's ``checkpoint.pt`` / ``metrics.json`` / ``curves.png``, ``model.pt`` and
``autobits.json`` (the summary).

Example:
    >>> import tempfile
    >>> cfg = AutobitsConfig(model="mlp", data="digits", avg_bits=3, fp_steps=0, steps=2, sens_batches=1,
    ...                      batch_size=32, test_subset=64, out=tempfile.mkdtemp(), progress=False)
    >>> res = run_autobits(cfg, cache=False)
    >>> res["allocation"]["avg_bits"] <= 3, sorted(res["allocation"]["bits"].values())
    (True, [3])
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from fxqat.api import find_blocks, prepare_fp_graph, prepare_qat
from fxqat.config import HybridConfig, QATConfig
from fxqat.data import BatchLoader, load
from fxqat.mixed.allocate import allocate_bits
from fxqat.mixed.plot import plot_allocation
from fxqat.mixed.sensitivity import sensitivity
from fxqat.models import get_model
from fxqat.trace import TraceFailure
from fxqat.training.checkpoint import atomic_save, atomic_write_text
from fxqat.training.loop import TrainConfig
from fxqat.training.recipes import train_fp, train_qat

__all__ = ["AutobitsConfig", "run_autobits"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutobitsConfig:
    """One autopilot run (every field is a flag of ``fxqat autobits``).

    Attributes:
        model, data, data_dir: what to train (``fxqat.models.get_model`` name, ``fxqat.data`` dataset, folder).
        avg_bits, max_bytes: the weight-memory budget (bits per allocated weight, or bytes; at least one).
        choices: candidate bit-widths per block.
        method: sensitivity estimator, ``"paths"``, ``"fisher"`` or ``"hessian"``.
        sens_batches: training batches the sensitivity averages over; probes: Hutchinson probes (hessian).
        quant_method: quantizer method of the QAT (``"lsq"``, ...).
        first_last: bits of the first and last layer (None = FP); they are not allocated.
        weight_only: quantize weights only (otherwise each layer's input activation gets its block's bits).
        hybrid: train the QAT model with block replacement (``HybridConfig()``).
        fp_steps, fp_epochs, fp_lr: FP pre-training (cached; ``fp_steps=0``: start QAT from random weights).
        steps, epochs, lr, batch_size, seed: QAT schedule.
        train_subset, test_subset: first N examples only.
        out: run folder.
        progress: tqdm bars (None: when stderr is a terminal).
    """

    model: str = "resnet20"
    data: str = "cifar10"
    data_dir: Optional[str] = None
    avg_bits: Optional[float] = 3.0
    max_bytes: Optional[float] = None
    choices: Tuple[int, ...] = (2, 3, 4, 8)
    method: str = "paths"
    sens_batches: int = 8
    probes: int = 1
    quant_method: str = "lsq"
    first_last: Optional[int] = 8
    weight_only: bool = False
    hybrid: bool = False
    fp_steps: Optional[int] = None
    fp_epochs: int = 1
    fp_lr: float = 0.1
    steps: Optional[int] = None
    epochs: int = 1
    lr: float = 0.01
    batch_size: int = 128
    seed: int = 0
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    out: str = "runs/autobits"
    progress: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.avg_bits is None and self.max_bytes is None:
            raise ValueError("AutobitsConfig: give a budget, avg_bits=... or max_bytes=....")
        if self.sens_batches < 1:
            raise ValueError(f"AutobitsConfig.sens_batches={self.sens_batches}: use at least 1 batch.")
        object.__setattr__(self, "choices", tuple(sorted(set(self.choices))))

    def base_config(self) -> QATConfig:
        """The QATConfig the allocation's overrides are added to."""
        b = max(self.choices)
        return QATConfig(w_bits=b, a_bits=None if self.weight_only else b, method=self.quant_method,
                         first_last=self.first_last, hybrid=HybridConfig(seed=self.seed) if self.hybrid else None)


def _write(path: Path, text: str) -> None:
    atomic_write_text(text, path)


def run_autobits(cfg: AutobitsConfig, echo: Callable[[str], None] = log.info, cache: bool = True) -> Dict[str, Any]:
    """Run the four stages of the module docstring; returns the summary also written to ``out/autobits.json``.

    Args:
        cfg: the run.
        echo: where one-line progress messages go (the CLI prints them).
        cache: use the FP checkpoint cache (:func:`~fxqat.training.recipes.fp_cache_dir`).
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tr, te = load(cfg.data, cfg.data_dir, train=True), load(cfg.data, cfg.data_dir, train=False)
    tr = tr.subset(cfg.train_subset) if cfg.train_subset else tr
    te = te.subset(cfg.test_subset) if cfg.test_subset else te
    torch.manual_seed(cfg.seed)
    model = get_model(cfg.model, num_classes=tr.num_classes, in_shape=tr.input_shape)
    loader = BatchLoader(tr, cfg.batch_size, train=True, seed=cfg.seed, rank=0, world_size=1)
    test = BatchLoader(te, 512, train=False, rank=0, world_size=1)
    summary: Dict[str, Any] = {"settings": asdict(cfg), "data_source": tr.source}
    t0 = time.perf_counter()
    if cfg.fp_steps != 0:  # 1. FP model (the cache key of `fxqat train`)
        fp_cfg = TrainConfig(epochs=cfg.fp_epochs, steps=cfg.fp_steps, lr=cfg.fp_lr, seed=cfg.seed,
                             progress=cfg.progress, plot=False)
        key = {"model": cfg.model, "data": cfg.data, "batch_size": cfg.batch_size, "n_train": len(tr),
               "source": tr.source, "world_size": 1}
        _, fp_info = train_fp(model, loader, fp_cfg, key=key, test_loader=test, cache=cache)
        summary["fp_top1"] = fp_info["top1"]
        echo(f"FP {cfg.model}: top-1 {fp_info['top1']:.2f}% ({'cached' if fp_info['cached'] else 'trained'})")
    x0 = tr[0][0].unsqueeze(0).repeat(2, *([1] * tr[0][0].dim()))
    base = cfg.base_config()
    # 2. sensitivity, on a copy with block replacement (its paths), from seeded training batches
    probe = prepare_qat(copy.deepcopy(model), (x0,), base.with_(hybrid=HybridConfig()))
    sens_loader = BatchLoader(tr, cfg.batch_size, train=True, seed=cfg.seed + 7919, rank=0, world_size=1)
    batches = [b for _, b in zip(range(cfg.sens_batches), sens_loader)]
    table = sensitivity(probe, batches, bits=cfg.choices, method=cfg.method, probes=cfg.probes, seed=cfg.seed,
                        progress=bool(cfg.progress))
    del probe
    _write(out / "sensitivity.json", table.to_json())
    _write(out / "sensitivity.md", table.to_markdown() + "\n")
    table.plot(out / "sensitivity.png", title=f"{cfg.model}: block sensitivity ({cfg.method})")
    echo(f"sensitivity ({cfg.method}, {table.n_batches} batches): {table.time_s:.1f} s -> {out / 'sensitivity.md'}")
    # 3. allocation
    qcfg, alloc = allocate_bits(table, avg_bits=cfg.avg_bits, max_bytes=cfg.max_bytes, choices=cfg.choices,
                                base_config=base, activations=not cfg.weight_only)
    _write(out / "allocation.json", json.dumps(alloc.to_dict(), indent=1))
    _write(out / "allocation.md", alloc.to_markdown() + "\n")
    try:
        gm = prepare_fp_graph(model, (x0,))
        blocks = find_blocks(model, (x0,), base)
        plot_allocation(alloc, out / "bits.png", gm=gm, blocks=blocks, choices=cfg.choices,
                        title=f"{cfg.model}: {alloc.avg_bits:.2f} bits per weight ({cfg.method} sensitivity)")
    except TraceFailure:  # eager root: one bar per block
        plot_allocation(alloc, out / "bits.png", table=table, choices=cfg.choices)
    echo("bits per block: " + ", ".join(f"{b}={k}" for b, k in alloc.bits) +
         f" ({alloc.avg_bits:.3f} bits per weight, {alloc.weight_bytes:g} bytes) -> {out / 'bits.png'}")
    # 4. QAT with the allocated config
    qm = prepare_qat(model, (x0,), qcfg)
    tcfg = TrainConfig(epochs=cfg.epochs, steps=cfg.steps, lr=cfg.lr, seed=cfg.seed, progress=cfg.progress)
    hist = train_qat(qm, loader, tcfg, test_loader=test, out_dir=out, desc=f"qat {alloc.avg_bits:.2f} bits",
                     run_info={"model": cfg.model, "data": cfg.data, "allocation": alloc.to_dict()})
    atomic_save({"model": qm.state_dict(), "allocation": alloc.to_dict(), "final": hist["final"]}, out / "model.pt")
    summary.update({"sensitivity": table.to_dict(), "allocation": alloc.to_dict(), "final": hist["final"],
                    "time_s": time.perf_counter() - t0})
    _write(out / "autobits.json", json.dumps(summary, indent=1, default=str))
    f = hist["final"]
    echo(f"{cfg.model} {cfg.data} {alloc.avg_bits:.2f} bits/weight ({cfg.method}): top-1 {f['test_top1']:.2f}% "
         f"after {f['step']} QAT steps -> {out}")
    return summary
