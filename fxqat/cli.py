"""The ``fxqat`` command: ``demo``, ``train``, ``autobits``, ``inspect``, ``bench`` (also ``python -m fxqat``).

Examples (shell)::

    fxqat demo --quick                                   # ~2 min: FP ResNet-20, then three W2A2 arms
    fxqat train --model resnet20 --data cifar10 --method lsq --bits 4/4 --hybrid --epochs 30 --out runs/r20_w4a4
    fxqat train ... --out runs/r20_w4a4 --resume         # continue an interrupted run
    fxqat autobits --model resnet20 --data cifar10 --avg-bits 3 --steps 500 --out runs/r20_3bits  # mixed precision
    torchrun --nproc_per_node 2 -m fxqat train ...       # DDP (gloo on CPU), rank 0 writes
    fxqat inspect resnet18 --png blocks.png
    fxqat bench

Bad input (unknown model or dataset, missing data folder, corrupt checkpoint, malformed flags) prints one
``fxqat: error: ...`` line that says what to do and exits with status 2; a diverged run or a lost DDP peer (another
process of the same torchrun job died or stopped answering) prints one such line and exits with status 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence, Tuple

import torch

from fxqat.commands import cmd_autobits, cmd_bench, cmd_demo, cmd_inspect, cmd_train
from fxqat.errors import UsageError
from fxqat.training.checkpoint import CheckpointError
from fxqat.training.distributed import PeerLost

__all__ = ["main", "build_parser", "parse_bits", "UsageError"]

def parse_bits(text: str) -> Tuple[int, int]:
    """``"4/4"`` -> ``(4, 4)``; ``"4"`` -> ``(4, 4)``."""
    parts = text.split("/")
    try:
        w, a = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, 0)
    except ValueError:
        w = a = 0
    if not (1 <= w <= 16 and 1 <= a <= 16):
        raise argparse.ArgumentTypeError(f"--bits {text!r}: write W/A with integers 1..16, e.g. --bits 4/4")
    return w, a


def _paths(text: str):
    if text == "all":
        return "all"
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"--paths {text!r}: use 'all' or a positive integer k")


def _bit_list(text: str) -> Tuple[int, ...]:
    try:
        bits = tuple(sorted({int(t) for t in text.split(",") if t.strip()}))
    except ValueError:
        bits = ()
    if not bits or not all(1 <= b <= 16 for b in bits):
        raise argparse.ArgumentTypeError(f"--choices {text!r}: write bit-widths 1..16 separated by commas, "
                                         "e.g. 2,3,4,8")
    return bits


def _run_flags() -> argparse.ArgumentParser:
    """The flags ``train`` and ``autobits`` share (an argparse parent: one definition, one help text each)."""
    r = argparse.ArgumentParser(add_help=False)
    r.add_argument("--model", default="resnet20", help="fxqat model (resnet20, cnn, mlp...) or torchvision name")
    r.add_argument("--data", default="cifar10", help="cifar10, mnist or digits")
    r.add_argument("--data-dir", default=None, help="data folder (default: $FXQAT_DATA, then ../shared/data)")
    r.add_argument("--method", default="lsq",
                   help="quantizer method of the QAT (fxqat.available_methods()); train also takes 'fp' (no QAT)")
    r.add_argument("--first-last", type=int, default=8,
                   help="bits of the first/last layer (0 = keep FP); autobits does not allocate them")
    r.add_argument("--hybrid", action=argparse.BooleanOptionalAction, default=False,
                   help="train the QAT model with block replacement")
    r.add_argument("--epochs", type=int, default=1)
    r.add_argument("--steps", type=int, default=None, help="total QAT steps (overrides --epochs)")
    r.add_argument("--lr", type=float, default=0.01)
    r.add_argument("--batch-size", type=int, default=128)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--fp-epochs", type=int, default=1, help="FP pre-training epochs (cached by model/data/seed)")
    r.add_argument("--fp-steps", type=int, default=None, help="FP pre-training steps (0 = start QAT from random)")
    r.add_argument("--fp-lr", type=float, default=0.1)
    r.add_argument("--train-subset", type=int, default=None, help="use the first N training examples")
    r.add_argument("--test-subset", type=int, default=None, help="evaluate on the first N test examples")
    r.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    return r


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fxqat`` command and its subcommands."""
    p = argparse.ArgumentParser(prog="fxqat", description="Quantization-aware training as a torch.fx pass.")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and the result table")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser("demo", help="FP model, then W2A2 QAT: plain LSQ vs LSQ+KD vs LSQ+block "
                       "replacement vs LSQ+KD given block replacement's time")
    d.add_argument("--quick", action="store_true", help="small budget for CI (about 1-2 minutes)")
    d.add_argument("--data-dir", default=None, help="folder with cifar10_jpeg.npz or cifar-10-batches-py")
    d.add_argument("--data", choices=["auto", "cifar10", "digits"], default="auto")
    d.add_argument("--bits", type=parse_bits, default=(2, 2), help="W/A bits of the arms (default 2/2)")
    d.add_argument("--steps", type=int, default=None,
                   help="QAT steps per arm (the compute-matched KD arm: scaled by the time ratio)")
    d.add_argument("--fp-steps", type=int, default=None, help="FP pre-training steps (cached)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="runs/demo", help="folder for demo.json and demo.png")
    d.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: QAT's many small ops run faster on one thread of a "
                        "2-core CPU, and it stays fast when the machine is shared)")
    d.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)

    run = _run_flags()
    t = sub.add_parser("train", parents=[run],
                       help="FP pre-training (cached) then QAT of one model; resumable; DDP under torchrun")
    t.add_argument("--bits", type=parse_bits, default=(4, 4), help="W/A, e.g. 4/4")
    t.add_argument("--paths", type=_paths, default="all", help="hybrid paths per step: all or k")
    t.add_argument("--kd", action="store_true", help="CE + KD from the FP model (no hybrid paths)")
    t.add_argument("--quant-lr", type=float, default=None, help="lr of quantizer parameters (default --lr)")
    t.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    t.add_argument("--weight-decay", type=float, default=5e-4)
    t.add_argument("--fp-ckpt", default=None, help="start from this FP state_dict instead of pre-training")
    t.add_argument("--out", required=True, help="run folder: checkpoint.pt, metrics.json, curves.png, model.pt")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--stop-after", type=int, default=None, help="stop after N steps of this call (resumable)")
    t.add_argument("--trust-checkpoint", action="store_true",
                   help="allow arbitrary unpickling of --resume/--fp-ckpt files (only for files you trust: it can run "
                        "code); fxqat's own checkpoints never need it")
    t.add_argument("--nonfinite", choices=["skip", "stop", "raise"], default="skip",
                   help="a step with a non-finite loss/gradient: skip it (no update, counted), stop, or raise")
    t.add_argument("--max-nonfinite", type=int, default=5, help="stop after N consecutive non-finite steps")
    t.add_argument("--checkpoint-every", type=int, default=None,
                   help="also write checkpoint.pt every N steps (default: at epoch ends and the last step)")
    t.add_argument("--ddp-timeout", type=float, default=None, metavar="SECONDS",
                   help="under torchrun: how long a process waits for the others (rendezvous, each collective) before "
                        "the run stops with an error instead of hanging (default 600)")
    t.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the prepared model with FSDP2 instead of DDP; checkpoints are sharded "
                        "DCP folders OUT/dcp/step-* (docs/fsdp.md)")

    i = sub.add_parser("inspect", help="blocks and quantizers of a model (table), optionally the partition PNG")
    i.add_argument("model", help="a model name, or hf:<model_type> for a tiny transformers model (e.g. hf:llama)")
    i.add_argument("--input-shape", default=None, help="C,H,W of one input (default: from the model family)")
    i.add_argument("--bits", type=parse_bits, default=(4, 4))
    i.add_argument("--png", default=None, help="write the block partition as a PNG")
    i.add_argument("--health", action="store_true",
                   help="also show each quantizer's scale range and status (ok, collapsed, exploded, non-finite)")
    i.add_argument("--checkpoint", default=None,
                   help="load this model.pt/checkpoint.pt of the same model first (implies --health)")
    i.add_argument("--trust-checkpoint", action="store_true", help="allow arbitrary unpickling of --checkpoint")

    ab = sub.add_parser("autobits", parents=[run],
                        help="mixed precision: FP model (cached) -> block sensitivity -> bits per block for a memory "
                             "budget -> QAT")
    ab.add_argument("--avg-bits", type=float, default=None, help="budget: average bits per allocated weight")
    ab.add_argument("--max-bytes", type=float, default=None, help="budget: bytes of the allocated weights")
    ab.add_argument("--choices", type=_bit_list, default=(2, 3, 4, 8), help="candidate bits, e.g. 2,3,4,8")
    ab.add_argument("--sensitivity", choices=["paths", "fisher", "hessian"], default="paths",
                    help="estimator: loss differences of the block-replacement paths, or the Fisher / Hessian "
                         "baselines")
    ab.add_argument("--sens-batches", type=int, default=8, help="training batches the sensitivity averages over")
    ab.add_argument("--probes", type=int, default=1, help="Hutchinson probes per batch (--sensitivity hessian)")
    ab.add_argument("--weight-only", action="store_true", help="quantize weights only (default: each layer's input "
                                                                 "activation gets its block's bits too)")
    ab.add_argument("--out", default="runs/autobits", help="run folder")

    b = sub.add_parser("bench", help="run benchmarks/step_time.py and benchmarks/hybrid_cost.py")
    b.add_argument("--quick", action="store_true", help="smoke-run budget (passed to each script)")
    b.add_argument("args", nargs=argparse.REMAINDER, help="after --: passed to each benchmark script")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``fxqat`` command; returns the exit status (2 for bad input)."""
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO, format="%(message)s")
    if getattr(a, "threads", None):
        torch.set_num_threads(a.threads)
    try:
        return {"demo": cmd_demo, "train": cmd_train, "inspect": cmd_inspect, "bench": cmd_bench,
                "autobits": cmd_autobits}[a.command](a)
    except (UsageError, FileNotFoundError, CheckpointError) as e:
        print(f"fxqat: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # validation errors of configs and models say what to write instead
        print(f"fxqat: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # diverged training: not bad input, but no traceback either
        print(f"fxqat: error: {e}", file=sys.stderr)
        return 1
    except PeerLost as e:  # another DDP process died or hangs; no cleanup: it would wait for the lost peer
        print(f"fxqat: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fxqat: interrupted (the last checkpoint is intact; continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
