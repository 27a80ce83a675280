"""GPU check (issue 24 item 5): fxqat's training paths on a CUDA device, in under 8 minutes.

Three parts, each a subprocess with its own time limit (the budget is split 2.5 : 1.5 : 4 minutes):

1. ``llm.py --quick --device cuda --seeds 0``: the LLM benchmark's smoke profile (every arm: FP control, torchao RTN
   and QAT, fxqat PTQ / LSQ / LSQ+KD / BR / compute-matched KD) trained and evaluated on the GPU (its FP pre-training,
   300 steps of a tiny model, runs on the CPU and is cached).
2. ``step_time.py --llm --quick --device cuda``: the compiled step-time comparison (FP, torchao QAT, fxqat LSQ on the
   char-Llama, eager and ``torch.compile``, int4 and 8da4w), CUDA-synchronised interleaved timing.
3. ``scale.py --sizes 1.1B --device cuda``: the 1.1B scale row (fp32 and bf16; FP, torchao 8da4w, fxqat 8da4w, BR)
   with the GPU's peak allocated memory.

Results go to ``benchmarks/results/gpu/`` and a summary to ``benchmarks/results/gpu_check.{md,json}``. On a machine
without CUDA the script says so and exits with status 2 (nothing is written).

Usage::

    python benchmarks/gpu_check.py                 # all three parts
    python benchmarks/gpu_check.py --parts scale   # one part
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
#: part -> (command line after the interpreter, time limit in seconds)
PARTS: Dict[str, tuple] = {
    "llm_quick": (["llm.py", "--quick", "--device", "cuda", "--seeds", "0", "--no-progress", "--out",
                   str(RESULTS / "gpu" / "llm_quick")], 150),
    "step_time_compiled": (["step_time.py", "--llm", "--quick", "--device", "cuda", "--out", "gpu/step_time_llm"],
                           90),
    "scale_1.1B": (["scale.py", "--sizes", "1.1B", "--device", "cuda", "--wait", "0", "--out",
                    str(RESULTS / "gpu"), "--note", "GPU run."], 240),
}


def run_part(name: str) -> Dict[str, object]:
    args, limit = PARTS[name]
    cmd = [sys.executable, str(HERE / args[0]), *args[1:]]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=HERE.parent)
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
    except subprocess.TimeoutExpired:
        status, tail = f"timed out after {limit} s", []
    return {"command": " ".join(["python", *[str(a) for a in args]]), "status": status,
            "wall_s": round(time.perf_counter() - t0, 1), "tail": tail}


def markdown(payload: Dict[str, object]) -> str:
    lines = ["# GPU check (issue 24 item 5)", "", f"Device: {payload['machine']['device']}; torch "
             f"{payload['machine']['torch']}.", "", "| part | status | wall s | command |", "|---|---|---|---|"]
    for name, r in payload["parts"].items():
        lines.append(f"| {name} | {r['status']} | {r['wall_s']} | `{r['command']}` |")
    lines += ["", "Detailed results: `benchmarks/results/gpu/` (llm_quick/, step_time_llm.md, scale.md).", ""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False, torch "
              f"{torch.__version__}); run it on a machine with an NVIDIA GPU and a CUDA build of torch. Nothing was "
              "run or written.", file=sys.stderr)
        return 2
    (RESULTS / "gpu").mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), "parts": {}}
    for name in args.parts:
        payload["parts"][name] = run_part(name)
        print(f"{name}: {payload['parts'][name]['status']} ({payload['parts'][name]['wall_s']} s)", flush=True)
    (RESULTS / "gpu_check.json").write_text(json.dumps(payload, indent=2))
    (RESULTS / "gpu_check.md").write_text(markdown(payload))
    return 0 if all(r["status"] == "ok" for r in payload["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
