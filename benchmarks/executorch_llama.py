"""The LLM benchmark's char-Llama, QAT-trained with the 8da4w preset, deployed as an ExecuTorch (XNNPACK) program.

Steps: FP pre-training on Tiny Shakespeare (cached, ``--fp-steps``), 8da4w QAT from it (``--qat-steps``, the
benchmark's fine-tuning recipe otherwise), then ``fxqat.export.to_executorch`` (torchao hand-off with bfloat16 scales,
``torch.export``, XNNPACK lowering) and the FP model's own XNNPACK ``.pte``. On ``--batches`` validation batches of
shape ``(--batch, --context)`` it compares the ``.pte`` run by ExecuTorch's Python runtime with the fake-quantized
QAT model (eval mode) and with the torchao model it was lowered from: max / mean |Δ logit|, next-token (argmax)
agreement, validation loss; and the size of both ``.pte`` files.

Run: ``python benchmarks/executorch_llama.py [--fp-steps 300 --qat-steps 100]``; writes
``benchmarks/results/executorch_llama.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import machine, write_results  # noqa: E402

import fxqat  # noqa: E402
from fxqat.export import load_executorch, to_executorch, to_torchao  # noqa: E402
from fxqat.text_data import tiny_shakespeare  # noqa: E402
from fxqat.training.lm import FINETUNE_RECIPE, LMRecipe, evaluate_lm, train_lm  # noqa: E402
from fxqat.training.recipes import pretrained_char_llama  # noqa: E402

log = logging.getLogger("executorch_llama")


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def compare(batches, reference, candidate):
    """max / mean |Δ logit|, argmax agreement and the candidate's loss, over ``batches``."""
    diffs, agree, n, loss = [], 0, 0, 0.0
    for x, y in batches:
        a, b = _logits(reference(x)), _logits(candidate(x))
        diffs.append((a - b).abs())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += a.shape[0] * a.shape[1]
        loss += float(F.cross_entropy(b.reshape(-1, b.shape[-1]), y.reshape(-1)))
    d = torch.cat([t.reshape(-1) for t in diffs])
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "agreement": agree / n,
            "loss": loss / len(batches)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp-steps", type=int, default=300)
    ap.add_argument("--qat-steps", type=int, default=100)
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=128)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    corpus = tiny_shakespeare()
    t0 = time.perf_counter()
    fp_recipe = LMRecipe(steps=args.fp_steps, lr=1e-3, warmup=max(1, args.fp_steps // 15), seed_offset=0)
    fp, info = pretrained_char_llama(corpus, fp_recipe, progress=False)
    fp = fp.eval()
    t_fp = time.perf_counter() - t0
    val = list(corpus.batches("val", args.batches, args.batch, args.context, seed=1337))
    x0 = val[0][0]
    qm = fxqat.prepare_qat(fp, (x0,), fxqat.QATConfig.preset("8da4w"))
    t0 = time.perf_counter()
    hist = train_lm(qm, corpus, dataclasses.replace(FINETUNE_RECIPE, steps=args.qat_steps), progress=False)
    t_qat = time.perf_counter() - t0
    qm.eval()
    t0 = time.perf_counter()
    tm = to_torchao(qm)
    tb = to_torchao(qm, scale_dtype=torch.bfloat16)
    t_handoff = time.perf_counter() - t0
    out = tempfile.mkdtemp()
    t0 = time.perf_counter()
    q_path = to_executorch(qm, (x0,), os.path.join(out, "char_llama_8da4w.pte"))
    t_q = time.perf_counter() - t0
    t0 = time.perf_counter()
    fp_path = to_executorch(fp, (x0,), os.path.join(out, "char_llama_fp32.pte"))
    t_f = time.perf_counter() - t0
    q_run, fp_run = load_executorch(q_path), load_executorch(fp_path)
    t0 = time.perf_counter()
    rows = {
        "torchao (fp32 scales) vs fake-quant": compare(val, qm, tm),
        "torchao (bf16 scales) vs fake-quant": compare(val, qm, tb),
        "8da4w .pte vs torchao (bf16 scales)": compare(val, tb, lambda x: q_run(x)[0]),
        "8da4w .pte vs fake-quant": compare(val, qm, lambda x: q_run(x)[0]),
        "FP .pte vs FP": compare(val, fp, lambda x: fp_run(x)[0]),
        "fake-quant vs FP": compare(val, fp, qm),
    }
    t_eval = time.perf_counter() - t0
    logit_std = float(torch.cat([_logits(qm(x)).reshape(-1) for x, _ in val]).std())
    sizes = {"8da4w": os.path.getsize(q_path), "fp32": os.path.getsize(fp_path)}
    payload = {
        "machine": machine(), "args": vars(args), "fp_val_loss": info["val_loss"],
        "qat_final_train_loss": hist["loss"][-1], "fake_quant_val_loss": evaluate_lm(qm, val),
        "fp_val_loss_here": evaluate_lm(fp, val), "logit_std": logit_std, "comparisons": rows, "pte_bytes": sizes,
        "seconds": {"fp_pretrain_or_load": t_fp, "qat": t_qat, "handoff": t_handoff, "export_lower_8da4w": t_q,
                    "export_lower_fp": t_f, "evaluate": t_eval},
    }
    md = ["# ExecuTorch (XNNPACK) deployment of the 8da4w char-Llama\n",
          f"FP pre-training {args.fp_steps} steps (val loss {info['val_loss']:.4f}), 8da4w QAT {args.qat_steps} steps; "
          f"{args.batches} validation batches of {args.batch}x{args.context}; logit std {logit_std:.3f}.\n",
          "| comparison | max abs Δ logit | mean abs Δ logit | next-token agreement | loss of the second |",
          "|---|---|---|---|---|"]
    for name, r in rows.items():
        md.append(f"| {name} | {r['max_abs']:.3g} | {r['mean_abs']:.3g} | {100 * r['agreement']:.2f} % | "
                  f"{r['loss']:.4f} |")
    md.append(f"\n`.pte` size: 8da4w {sizes['8da4w']:,} B, FP32 {sizes['fp32']:,} B "
              f"({sizes['fp32'] / sizes['8da4w']:.2f}x smaller).\n")
    md.append("Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in payload["seconds"].items()) + "\n")
    write_results("executorch_llama", payload, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
