"""``fxqat demo`` (the main job: FP model, then W2A2 LSQ vs LSQ+KD vs LSQ+block replacement) and ``fxqat bench``.

Example (shell)::

    fxqat demo --quick
    fxqat bench --quick
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

from fxqat.errors import UsageError
from fxqat.training.demo import run_demo

__all__ = ["cmd_demo", "cmd_bench", "REPO"]

log = logging.getLogger("fxqat.cli")
REPO = Path(__file__).resolve().parent.parent.parent  # a source checkout: benchmarks/ lives here


def cmd_demo(a: argparse.Namespace) -> int:
    """Run ``fxqat demo`` with the parsed flags; returns 0."""
    run_demo(quick=a.quick, data_dir=a.data_dir, data=a.data, bits=a.bits, steps=a.steps, fp_steps=a.fp_steps,
             seed=a.seed, out=a.out, progress=a.progress, echo=lambda line: print(line, flush=True))
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    """Run the step-time and hybrid-cost benchmark scripts of a source checkout; returns the worst exit status."""
    scripts = [REPO / "benchmarks" / n for n in ("step_time.py", "hybrid_cost.py")]
    present = [s for s in scripts if s.is_file()]
    for s in scripts:
        if not s.is_file():
            log.warning("fxqat bench: %s not found; skipped", s)
    if not present:
        raise UsageError(f"no benchmark scripts found under {REPO / 'benchmarks'} (run from a source checkout).")
    rc = 0
    for s in present:
        print(f"== {s.name}", flush=True)
        extra = (["--quick"] if a.quick else []) + [x for x in a.args if x != "--"]
        rc = max(rc, subprocess.call([sys.executable, str(s), *extra]))
    return rc
