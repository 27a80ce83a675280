"""``fxqat autobits``: FP model (cached) -> block sensitivity -> bits per block for a memory budget -> QAT.

Example (shell)::

    fxqat autobits --model resnet20 --data cifar10 --avg-bits 3 --steps 500 --out runs/r20_3bits
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fxqat import data
from fxqat.commands.common import build_model
from fxqat.errors import UsageError
from fxqat.training.autobits import AutobitsConfig, run_autobits

__all__ = ["cmd_autobits"]


def cmd_autobits(a: argparse.Namespace) -> int:
    """Run ``fxqat autobits`` with the parsed flags; returns 0."""
    if a.avg_bits is None and a.max_bytes is None:
        raise UsageError("autobits needs a budget: --avg-bits B (bits per weight) or --max-bytes N.")
    if a.data_dir is not None and not Path(a.data_dir).expanduser().exists():
        raise UsageError(f"--data-dir {a.data_dir}: no such folder. Point it to the folder holding the data files.")
    if a.data not in data.DATASETS:
        raise UsageError(f"--data {a.data!r}: unknown dataset; known datasets: {sorted(data.DATASETS)}.")
    build_model(a.model, 10, (3, 32, 32) if a.data == "cifar10" else (1, 28, 28))  # unknown model: a usage error
    cfg = AutobitsConfig(
        model=a.model, data=a.data, data_dir=a.data_dir, avg_bits=a.avg_bits, max_bytes=a.max_bytes,
        choices=a.choices, method=a.sensitivity, sens_batches=a.sens_batches, probes=a.probes, quant_method=a.method,
        first_last=a.first_last or None, weight_only=a.weight_only, hybrid=a.hybrid, fp_steps=a.fp_steps,
        fp_epochs=a.fp_epochs, fp_lr=a.fp_lr, steps=a.steps, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size,
        seed=a.seed, train_subset=a.train_subset, test_subset=a.test_subset, out=a.out, progress=a.progress)
    run_autobits(cfg, echo=lambda line: print(line, flush=True))
    return 0
