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
import copy
import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from fxqat.errors import UsageError

__all__ = ["main", "build_parser", "parse_bits", "UsageError"]

log = logging.getLogger("fxqat.cli")
_REPO = Path(__file__).resolve().parent.parent


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxqat", description="Quantization-aware training as a torch.fx pass.")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and the result table")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser("demo", help="FP model, then W2A2 QAT: plain LSQ vs LSQ+KD vs LSQ+block replacement")
    d.add_argument("--quick", action="store_true", help="small budget for CI (about 1-2 minutes)")
    d.add_argument("--data-dir", default=None, help="folder with cifar10_jpeg.npz or cifar-10-batches-py")
    d.add_argument("--data", choices=["auto", "cifar10", "digits"], default="auto")
    d.add_argument("--bits", type=parse_bits, default=(2, 2), help="W/A bits of the three arms (default 2/2)")
    d.add_argument("--steps", type=int, default=None, help="QAT steps per arm")
    d.add_argument("--fp-steps", type=int, default=None, help="FP pre-training steps (cached)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="runs/demo", help="folder for demo.json and demo.png")
    d.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: QAT's many small ops run faster on one thread of a "
                        "2-core CPU, and it stays fast when the machine is shared)")
    d.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)

    t = sub.add_parser("train", help="FP pre-training (cached) then QAT of one model; resumable; DDP under torchrun")
    t.add_argument("--model", default="resnet20", help="fxqat model (resnet20, cnn, mlp...) or torchvision name")
    t.add_argument("--data", default="cifar10", help="cifar10, mnist or digits")
    t.add_argument("--data-dir", default=None, help="data folder (default: $FXQAT_DATA, then ../shared/data)")
    t.add_argument("--method", default="lsq", help="quantizer method (fxqat.available_methods()) or 'fp'")
    t.add_argument("--bits", type=parse_bits, default=(4, 4), help="W/A, e.g. 4/4")
    t.add_argument("--first-last", type=int, default=8, help="bits of the first/last layer (0 = keep FP)")
    t.add_argument("--hybrid", action=argparse.BooleanOptionalAction, default=False, help="block replacement")
    t.add_argument("--paths", type=_paths, default="all", help="hybrid paths per step: all or k")
    t.add_argument("--kd", action="store_true", help="CE + KD from the FP model (no hybrid paths)")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--steps", type=int, default=None, help="total QAT steps (overrides --epochs)")
    t.add_argument("--lr", type=float, default=0.01)
    t.add_argument("--quant-lr", type=float, default=None, help="lr of quantizer parameters (default --lr)")
    t.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    t.add_argument("--weight-decay", type=float, default=5e-4)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--fp-epochs", type=int, default=1, help="FP pre-training epochs (cached by model/data/seed)")
    t.add_argument("--fp-steps", type=int, default=None, help="FP pre-training steps (0 = start QAT from random)")
    t.add_argument("--fp-lr", type=float, default=0.1)
    t.add_argument("--fp-ckpt", default=None, help="start from this FP state_dict instead of pre-training")
    t.add_argument("--train-subset", type=int, default=None, help="use the first N training examples")
    t.add_argument("--test-subset", type=int, default=None, help="evaluate on the first N test examples")
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
    t.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    t.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)

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

    ab = sub.add_parser("autobits", help="mixed precision: FP model (cached) -> block sensitivity -> bits per block "
                                         "for a memory budget -> QAT")
    ab.add_argument("--model", default="resnet20", help="fxqat model (resnet20, cnn, mlp...) or torchvision name")
    ab.add_argument("--data", default="cifar10", help="cifar10, mnist or digits")
    ab.add_argument("--data-dir", default=None, help="data folder (default: $FXQAT_DATA, then ../shared/data)")
    ab.add_argument("--avg-bits", type=float, default=None, help="budget: average bits per allocated weight")
    ab.add_argument("--max-bytes", type=float, default=None, help="budget: bytes of the allocated weights")
    ab.add_argument("--choices", type=_bit_list, default=(2, 3, 4, 8), help="candidate bits, e.g. 2,3,4,8")
    ab.add_argument("--sensitivity", choices=["paths", "fisher", "hessian"], default="paths",
                    help="estimator: loss differences of the block-replacement paths, or the Fisher / Hessian "
                         "baselines")
    ab.add_argument("--sens-batches", type=int, default=8, help="training batches the sensitivity averages over")
    ab.add_argument("--probes", type=int, default=1, help="Hutchinson probes per batch (--sensitivity hessian)")
    ab.add_argument("--method", default="lsq", help="quantizer method of the QAT")
    ab.add_argument("--first-last", type=int, default=8, help="bits of the first/last layer (0 = FP); not allocated")
    ab.add_argument("--weight-only", action="store_true", help="quantize weights only (default: each layer's input "
                                                                 "activation gets its block's bits too)")
    ab.add_argument("--hybrid", action=argparse.BooleanOptionalAction, default=False,
                    help="train the QAT model with block replacement")
    ab.add_argument("--fp-epochs", type=int, default=1, help="FP pre-training epochs (cached)")
    ab.add_argument("--fp-steps", type=int, default=None, help="FP pre-training steps (0 = start from random)")
    ab.add_argument("--fp-lr", type=float, default=0.1)
    ab.add_argument("--epochs", type=int, default=1)
    ab.add_argument("--steps", type=int, default=None, help="QAT steps (overrides --epochs)")
    ab.add_argument("--lr", type=float, default=0.01)
    ab.add_argument("--batch-size", type=int, default=128)
    ab.add_argument("--seed", type=int, default=0)
    ab.add_argument("--train-subset", type=int, default=None)
    ab.add_argument("--test-subset", type=int, default=None)
    ab.add_argument("--out", default="runs/autobits", help="run folder")
    ab.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ab.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)

    b = sub.add_parser("bench", help="run benchmarks/step_time.py and benchmarks/hybrid_cost.py")
    b.add_argument("--quick", action="store_true", help="smoke-run budget (passed to each script)")
    b.add_argument("args", nargs=argparse.REMAINDER, help="after --: passed to each benchmark script")
    return p


# ------------------------------------------------------------------------------------------------------ train
def _datasets(name: str, data_dir: Optional[str], train_subset=None, test_subset=None):
    from fxqat import data

    if data_dir is not None and not Path(data_dir).expanduser().exists():
        raise UsageError(f"--data-dir {data_dir}: no such folder. Point it to the folder holding the data files.")
    if name not in data.DATASETS:
        raise UsageError(f"--data {name!r}: unknown dataset; known datasets: {sorted(data.DATASETS)}.")
    tr, te = data.load(name, data_dir, train=True), data.load(name, data_dir, train=False)
    return (tr.subset(train_subset) if train_subset else tr), (te.subset(test_subset) if test_subset else te)


def _model(name: str, num_classes: int, in_shape):
    from fxqat.models import get_model

    try:
        return get_model(name, num_classes=num_classes, in_shape=in_shape)
    except ValueError as e:
        raise UsageError(str(e)) from e
    except TypeError as e:  # torchvision model that does not take our arguments
        raise UsageError(f"--model {name!r} cannot be built for {num_classes} classes: {e}") from e


def _load_fp(model, path: str, trusted: bool = False) -> None:
    from fxqat.training.checkpoint import load_checkpoint

    ck = load_checkpoint(path, trusted=trusted)
    state = ck.get("model", ck)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UsageError(f"--fp-ckpt {path} does not fit the model: {e}") from e


def cmd_train(a: argparse.Namespace) -> int:
    import torch

    import fxqat
    from fxqat import data
    from fxqat.training import distributed as ddp
    from fxqat.training.checkpoint import atomic_save, atomic_write_text
    from fxqat.training.loop import TrainConfig, fit
    from fxqat.training.recipes import train_fp, train_qat
    from fxqat.validate import did_you_mean

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
    tr, te = _datasets(a.data, a.data_dir, a.train_subset, a.test_subset)
    if a.ddp_timeout is not None and not a.ddp_timeout > 0:
        raise UsageError(f"--ddp-timeout {a.ddp_timeout}: give a positive number of seconds (e.g. 600).")
    if a.fsdp and a.method == "fp":
        raise UsageError("--fsdp shards a prepared QAT model; use DDP (no --fsdp) for --method fp.")
    rank, world = ddp.init_distributed(a.ddp_timeout)
    torch.manual_seed(a.seed)  # the initial weights are part of what --seed fixes
    model = _model(a.model, tr.num_classes, tr.input_shape)
    loader = data.BatchLoader(tr, a.batch_size, train=True, seed=a.seed)
    test = data.BatchLoader(te, 512, train=False, rank=0, world_size=1)
    if ddp.is_main():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(run, indent=1, default=str), out / "run.json")
    cfg = TrainConfig(epochs=a.epochs, steps=a.steps, lr=a.lr, quant_lr=a.quant_lr, optimizer=a.optimizer,
                      weight_decay=a.weight_decay, seed=a.seed, progress=a.progress, nonfinite=a.nonfinite,
                      max_nonfinite=a.max_nonfinite, checkpoint_every=a.checkpoint_every)
    info = {"model": a.model, "data": a.data, "data_source": tr.source, "world_size": world}
    if a.method == "fp":
        hist = fit(model, loader, cfg, test_loader=test, out_dir=out, resume=a.resume, desc="fp",
                   run_info=info, stop_after=a.stop_after, trusted=a.trust_checkpoint)
        final_model = model
    else:
        if a.fp_ckpt:
            _load_fp(model, a.fp_ckpt, a.trust_checkpoint)
        elif a.fp_steps != 0:
            fp_cfg = TrainConfig(epochs=a.fp_epochs, steps=a.fp_steps, lr=a.fp_lr, seed=a.seed, progress=a.progress)
            key = {"model": a.model, "data": a.data, "batch_size": a.batch_size, "n_train": len(tr),
                   "source": tr.source, "world_size": world}
            _, fp_info = train_fp(model, loader, fp_cfg, key=key, test_loader=test)
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
        hist = train_qat(qm, loader, cfg, test_loader=test, out_dir=out, resume=a.resume, teacher=teacher,
                         desc=f"{a.method} W{w}A{b}{' hybrid' if a.hybrid else ''}", run_info=info,
                         stop_after=a.stop_after, trusted=a.trust_checkpoint, fsdp=a.fsdp)
        final_model = qm
    if a.fsdp and hist["status"] == "complete":  # gathering the sharded state is a collective: every rank
        from fxqat.training.fsdp import full_state_dict
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


# ------------------------------------------------------------------------------------------------------ inspect
def _default_shape(name: str) -> Tuple[int, ...]:
    from fxqat.models import MODELS

    if name.startswith("resnet") and name in MODELS:
        return (3, 32, 32)
    if name in MODELS:
        return (1, 28, 28)
    return (3, 224, 224)


def cmd_inspect(a: argparse.Namespace) -> int:
    import torch

    import fxqat

    from fxqat.models import MODELS

    if a.model.startswith("hf:"):  # a tiny transformers model of that type, random weights
        from fxqat.models.hf import tiny_hf_model

        try:
            model, x = tiny_hf_model(a.model[3:])
        except ValueError as e:
            raise UsageError(str(e)) from e
        shape = tuple(x.shape[1:])
    else:
        try:
            shape = tuple(int(s) for s in a.input_shape.split(",")) if a.input_shape else _default_shape(a.model)
        except ValueError as e:
            raise UsageError(f"--input-shape {a.input_shape!r}: write C,H,W, e.g. 3,32,32") from e
        model = _model(a.model, 10 if a.model in MODELS else 1000, shape)
        x = torch.randn(1, *shape)
    model = model.eval()
    find_blocks = getattr(fxqat, "find_blocks", None)
    if find_blocks is not None:
        blocks = find_blocks(model, (x,))
        print(f"{a.model}: {len(blocks)} blocks (input {shape})")
        print(f"{'#':>3}  {'block':<20} {'nodes':>5}  {'entry':<24} {'exit':<24} modules")
        for k, blk in enumerate(blocks):
            mods = list(getattr(blk, "modules", []))
            shown = ", ".join(mods[:4]) + (f", ... (+{len(mods) - 4})" if len(mods) > 4 else "")
            print(f"{k:>3}  {str(blk.name):<20} {len(blk.nodes):>5}  {str(blk.entry):<24} {str(blk.exit):<24} {shown}")
    else:
        blocks = []
        log.warning("fxqat.find_blocks is not available in this version; blocks not shown")
    w, b = a.bits
    qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(w_bits=w, a_bits=b))
    print("\ncapture: graph regions are traced by torch.fx, eager regions run as written")
    print(fxqat.capture_report(qm).to_markdown())
    qs = fxqat.named_quantizers(qm)
    print(f"\n{len(qs)} quantizers (W{w}A{b}, first/last layer 8 bits)")
    print(f"{'quantizer':<40} {'kind':<7} {'bits':>4}  method")
    for name, q in qs.items():
        print(f"{name:<40} {q.kind:<7} {q.bits:>4}  {getattr(q, 'method', '?')}")
    if a.health or a.checkpoint:
        _print_health(qm, a.checkpoint, a.trust_checkpoint)
    if a.png:
        from fxqat.training.report import plot_blocks

        plot_blocks(a.model, blocks, a.png)
        print(f"\npartition written to {a.png}")
    return 0


def _print_health(qm, checkpoint: Optional[str], trusted: bool) -> None:
    from fxqat.training.checkpoint import load_checkpoint
    from fxqat.training.health import format_health, quantizer_health, rows_with_problems

    if checkpoint:
        ck = load_checkpoint(checkpoint, trusted=trusted)
        try:
            qm.load_state_dict(ck.get("model", ck))
        except RuntimeError as e:
            raise UsageError(f"--checkpoint {checkpoint} does not fit {type(qm).__name__} as inspect builds it "
                             f"(same model, --bits and --input-shape as the run?): {e}") from e
    rows = quantizer_health(qm)
    bad = rows_with_problems(rows)
    print(f"\nquantizer health{f' of {checkpoint}' if checkpoint else ''}: {len(rows) - len(bad)} ok, "
          f"{len(bad)} not ({', '.join(sorted({r['status'] for r in bad})) or 'none'})")
    print(format_health(rows))


# ------------------------------------------------------------------------------------------------------ autobits
def cmd_autobits(a: argparse.Namespace) -> int:
    from fxqat import data
    from fxqat.training.autobits import AutobitsConfig, run_autobits

    if a.avg_bits is None and a.max_bytes is None:
        raise UsageError("autobits needs a budget: --avg-bits B (bits per weight) or --max-bytes N.")
    if a.data_dir is not None and not Path(a.data_dir).expanduser().exists():
        raise UsageError(f"--data-dir {a.data_dir}: no such folder. Point it to the folder holding the data files.")
    if a.data not in data.DATASETS:
        raise UsageError(f"--data {a.data!r}: unknown dataset; known datasets: {sorted(data.DATASETS)}.")
    _model(a.model, 10, (3, 32, 32) if a.data == "cifar10" else (1, 28, 28))  # unknown model: a usage error
    cfg = AutobitsConfig(
        model=a.model, data=a.data, data_dir=a.data_dir, avg_bits=a.avg_bits, max_bytes=a.max_bytes,
        choices=a.choices, method=a.sensitivity, sens_batches=a.sens_batches, probes=a.probes, quant_method=a.method,
        first_last=a.first_last or None, weight_only=a.weight_only, hybrid=a.hybrid, fp_steps=a.fp_steps,
        fp_epochs=a.fp_epochs, fp_lr=a.fp_lr, steps=a.steps, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size,
        seed=a.seed, train_subset=a.train_subset, test_subset=a.test_subset, out=a.out, progress=a.progress)
    run_autobits(cfg, echo=lambda line: print(line, flush=True))
    return 0


# ------------------------------------------------------------------------------------------------------ bench
def cmd_bench(a: argparse.Namespace) -> int:
    scripts = [_REPO / "benchmarks" / n for n in ("step_time.py", "hybrid_cost.py")]
    present = [s for s in scripts if s.is_file()]
    for s in scripts:
        if not s.is_file():
            log.warning("fxqat bench: %s not found; skipped", s)
    if not present:
        raise UsageError(f"no benchmark scripts found under {_REPO / 'benchmarks'} (run from a source checkout).")
    rc = 0
    for s in present:
        print(f"== {s.name}", flush=True)
        extra = (["--quick"] if a.quick else []) + [x for x in a.args if x != "--"]
        rc = max(rc, subprocess.call([sys.executable, str(s), *extra]))
    return rc


def cmd_demo(a: argparse.Namespace) -> int:
    from fxqat.training.demo import run_demo

    run_demo(quick=a.quick, data_dir=a.data_dir, data=a.data, bits=a.bits, steps=a.steps, fp_steps=a.fp_steps,
             seed=a.seed, out=a.out, progress=a.progress, echo=lambda line: print(line, flush=True))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``fxqat`` command; returns the exit status (2 for bad input)."""
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO, format="%(message)s")
    if getattr(a, "threads", None):
        import torch

        torch.set_num_threads(a.threads)
    from fxqat.training.checkpoint import CheckpointError
    from fxqat.training.distributed import PeerLost

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
