"""The LLM benchmark's char-Llama, QAT-trained with each LLM preset, deployed where LLM users serve it.

Model: the "mini" profile of the LLM benchmark family (``benchmarks/br_controls.py --model mini``: the benchmark's
char-Llama with hidden size 64, 4 decoder layers, context 64, FP pre-training 1000 steps at 3e-3, batch 16x64;
cached under ``~/.cache/fxqat/ckpt``), 16x cheaper than the benchmark's model, which does not fit this shared 2-core
machine's time here. For each preset (``int4_weight_only``, ``8da4w``, ``gguf_q4_0``, ``gguf_q8_0``), from that FP
model, ``--qat-steps`` of the profile's fine-tuning recipe (lr 1e-4, batch 16x64), then:

* the fake-quantized model's validation loss (eval mode);
* the GGUF file (``fxqat.export.to_gguf``, non-quantized weights F16) run in llama.cpp (``llama-cpp-python``, CPU,
  one thread): validation loss, max |Δ logit| and next-token agreement against the fake-quantized model, file size;
* the Hugging Face checkpoint (``fxqat.export.save_pretrained``) loaded with ``from_pretrained``: the same figures,
  ``model.safetensors`` size (``gguf_q8_0`` has no torchao int8 form: codes −127..127, not the int8 range);
* llama.cpp decode speed (tokens/s, one token at a time, one thread, best of 3) of the FP GGUF (F32 and F16) and the quantized
  ones;
* the ExecuTorch programs (``fxqat.export.to_executorch``, XNNPACK) of the FP model (float32) and the 8da4w model,
  exported for one row of ``--context`` tokens (a fixed shape, no KV cache): validation loss (each batch run row by
  row), max |Δ logit| and agreement against the fake-quantized (FP: the FP) model, ``.pte`` size, and tokens/s: one
  program run per decoded token (the whole window recomputed, as a cache-less program decodes), one XNNPACK thread,
  best of 3. ``int4_weight_only`` has no ExecuTorch row: XNNPACK runs int4 weights only with dynamically quantized
  int8 activations, and ``to_executorch`` refuses weight-only layers (its message is recorded).

Run: ``python benchmarks/deploy_llm.py [--qat-steps 100 --batches 16]``; writes
``benchmarks/results/deploy_llm.{json,md}``. ``--executorch-only`` computes just the ExecuTorch rows (export and
lowering take minutes per program on this machine) and merges them into the existing JSON and markdown.
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
import transformers
from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count, _unsafe_reset_threadpool

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import machine, read_results, write_results  # noqa: E402

import fxqat  # noqa: E402
from fxqat.export import ExportError, GGUFVocab, load_executorch, save_pretrained, to_executorch, to_gguf  # noqa: E402
from fxqat.export.gguf_runtime import llama_cpp_decode_speed, llama_cpp_logits  # noqa: E402
from fxqat.text_data import tiny_shakespeare  # noqa: E402
from fxqat.training.lm import LMRecipe, evaluate_lm, train_lm  # noqa: E402
from fxqat.training.recipes import pretrained_char_llama  # noqa: E402

log = logging.getLogger("deploy_llm")
PRESETS = ("int4_weight_only", "8da4w", "gguf_q4_0", "gguf_q8_0")
#: the LLM family's "mini" profile (benchmarks/br_controls.py: MINI_MODEL and its recipes)
MINI_MODEL = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
MINI_FP = LMRecipe(steps=1000, lr=3e-3, warmup=50, batch_size=16, context=64, seed_offset=0)
MINI_FT = LMRecipe(steps=250, lr=1e-4, warmup=10, batch_size=16, context=64)


@torch.no_grad()
def versus(batches, reference, logits_of):
    """max |Δ logit|, next-token agreement and loss of ``logits_of(x)`` against ``reference`` on ``batches``."""
    worst, agree, n, loss = 0.0, 0, 0, 0.0
    for x, y in batches:
        a, b = reference(x).logits.float(), logits_of(x).float()
        worst = max(worst, float((a - b).abs().max()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += a.shape[0] * a.shape[1]
        loss += float(F.cross_entropy(b.reshape(-1, b.shape[-1]), y.reshape(-1)))
    return {"max_abs": worst, "agreement": agree / n, "loss": loss / len(batches)}


def best_speed(path: str, n_tokens: int, rounds: int = 3) -> float:
    """The best of ``rounds`` llama.cpp decode speeds (the first load of a process is slower; other jobs share the
    machine)."""
    return max(llama_cpp_decode_speed(path, n_tokens) for _ in range(rounds))


def executorch_speed(run, x: torch.Tensor, n_tokens: int, rounds: int = 3) -> float:
    """Tokens/s of a fixed-shape ExecuTorch program decoding ``n_tokens`` tokens, one program run on the window ``x``
    per token (the best of ``rounds``, after one warm-up run)."""
    run(x)
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n_tokens):
            run(x)
        best = max(best, n_tokens / (time.perf_counter() - t0))
    return best


def executorch_rows(models, val, out: str, n_tokens: int):
    """Per model of ``models`` (name -> (model, reference)): its XNNPACK ``.pte`` for one row of the validation
    context, the program's loss and Δ against ``reference`` on ``val`` (run row by row), size, tokens/s and export
    seconds; or the reason ``to_executorch`` refused the model."""
    _unsafe_reset_threadpool(1)
    x1 = val[0][0][:1]
    rows = {}
    for name, (model, reference) in models.items():
        t0 = time.perf_counter()
        try:
            path = to_executorch(model, (x1,), os.path.join(out, f"{name}.pte"))
        except ExportError as exc:
            rows[name] = {"refused": str(exc)}
            log.info("ExecuTorch %s: refused: %s", name, exc)
            continue
        seconds = time.perf_counter() - t0
        run = load_executorch(path)
        row = versus(val, reference, lambda x, r=run: torch.cat([r(t[None])[0] for t in x]))
        row.update(pte_bytes=os.path.getsize(path), export_lower_seconds=seconds,
                   tokens_per_s=executorch_speed(run, x1, n_tokens), threads=_threadpool_get_thread_count())
        rows[name] = row
        log.info("ExecuTorch %s: %s", name, row)
    return rows


def trained(fp, corpus, x0, preset: str, steps: int):
    """``fp`` prepared with ``preset`` and QAT-trained ``steps`` steps of the mini fine-tuning recipe, in eval mode,
    with the seconds it took."""
    t0 = time.perf_counter()
    qm = fxqat.prepare_qat(fp, (x0,), fxqat.QATConfig.preset(preset))
    train_lm(qm, corpus, dataclasses.replace(MINI_FT, steps=steps), progress=False)
    return qm.eval(), time.perf_counter() - t0


def executorch_markdown(et) -> list:
    """The markdown lines of the ExecuTorch section of the payload (``et``: the ``executorch`` entry)."""
    a = et["args"]
    md = ["", "## ExecuTorch (XNNPACK)\n",
          f"Programs exported by `fxqat.export.to_executorch` for one row of {a['context']} tokens (fixed shape, no KV "
          f"cache); the 8da4w model trained {a['qat_steps']} QAT steps as above (fake-quant loss here "
          f"{et['fake_quant_loss']:.4f}). Loss, Δ and agreement: the same {a['batches']} validation batches, each run "
          "row by row, against the fake-quantized model (FP: against FP). Tokens/s: one program run on the "
          f"{a['context']}-token window per decoded token ({a['decode_tokens']} tokens, the whole window recomputed "
          "each time, as a cache-less program decodes; llama.cpp above decodes with a KV cache), one XNNPACK thread, "
          f"best of 3. Run with other jobs on the machine (load average {et['load_average']})."
          "\n",
          "| model | .pte loss | max Δ logit | agreement | .pte bytes | tokens/s | export+lowering s |",
          "|---|---|---|---|---|---|---|"]
    for name, r in et["rows"].items():
        if "refused" in r:
            md.append(f"| {name} | refused by `to_executorch` | — | — | — | — | — |")
        else:
            md.append(f"| {name} | {r['loss']:.4f} | {r['max_abs']:.3g} | {100 * r['agreement']:.2f} % | "
                      f"{r['pte_bytes']:,} | {r['tokens_per_s']:,.0f} | {r['export_lower_seconds']:.0f} |")
    for name, r in et["rows"].items():
        if "refused" in r:
            md.append(f"\n{name}: {r['refused']}")
    return md + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qat-steps", type=int, default=100)
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=63)
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--executorch-only", action="store_true",
                    help="compute only the ExecuTorch rows and merge them into the existing results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    corpus = tiny_shakespeare()
    vocab = GGUFVocab.from_chars(corpus.chars)
    fp, info = pretrained_char_llama(corpus, MINI_FP, progress=False, model_overrides=MINI_MODEL)
    fp = fp.eval()
    val = list(corpus.batches("val", args.batches, args.batch, args.context, seed=1337))
    x0 = val[0][0]
    out = tempfile.mkdtemp()
    et_args = {k: getattr(args, k) for k in ("qat_steps", "batches", "batch", "context", "decode_tokens")}
    if args.executorch_only:
        payload = read_results("deploy_llm")
        q8da4w, _ = trained(fp, corpus, x0, "8da4w", args.qat_steps)
        int4, _ = trained(fp, corpus, x0, "int4_weight_only", args.qat_steps)
        payload["executorch"] = {
            "args": et_args, "fake_quant_loss": evaluate_lm(q8da4w, val),
            "load_average": "/".join(f"{v:.1f}" for v in os.getloadavg()),
            "rows": executorch_rows({"FP (float32)": (fp, fp), "8da4w": (q8da4w, q8da4w),
                                     "int4_weight_only": (int4, int4)}, val, out, args.decode_tokens)}
        write_results("deploy_llm", payload, markdown(payload))
        print(markdown(payload))
        return
    # FP files: the model prepared with quantization off writes every weight as a float
    plain = fxqat.set_quantization(fxqat.prepare_qat(fp, (x0,), fxqat.QATConfig.preset("gguf_q8_0")), enabled=False)
    sizes, speed = {}, {}
    for ft in ("f32", "f16"):
        path = os.path.join(out, f"fp_{ft}.gguf")
        to_gguf(plain, path, vocab, float_type=ft)
        sizes[f"FP GGUF {ft.upper()}"] = os.path.getsize(path)
        speed[f"FP {ft.upper()}"] = best_speed(path, args.decode_tokens)
    fp.save_pretrained(os.path.join(out, "fp_hf"))
    sizes["FP safetensors (fp32)"] = os.path.getsize(os.path.join(out, "fp_hf", "model.safetensors"))
    fp_gguf = versus(val, fp, lambda x: llama_cpp_logits(os.path.join(out, "fp_f32.gguf"), x))
    rows, et_models = {}, {"FP (float32)": (fp, fp)}
    for preset in args.presets:
        qm, seconds = trained(fp, corpus, x0, preset, args.qat_steps)
        row = {"fake_quant_loss": evaluate_lm(qm, val), "qat_seconds": seconds}
        path = os.path.join(out, f"{preset}.gguf")
        types = to_gguf(qm, path, vocab)
        row["gguf_types"] = sorted(set(types.values()))
        row["gguf"] = versus(val, qm, lambda x, p=path: llama_cpp_logits(p, x))
        sizes[f"{preset} GGUF"] = os.path.getsize(path)
        speed[preset] = best_speed(path, args.decode_tokens)
        if preset != "gguf_q8_0":
            st = save_pretrained(qm, os.path.join(out, f"{preset}_hf"))
            hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, f"{preset}_hf")).eval()
            row["hf_checkpoint"] = versus(val, qm, lambda x, m=hf: m(x).logits)
            sizes[f"{preset} safetensors"] = os.path.getsize(st)
        if preset in ("8da4w", "int4_weight_only"):
            et_models[preset] = (qm, qm)
        rows[preset] = row
        log.info("%s: %s", preset, row)
    payload = {"machine": machine(), "args": vars(args), "fp_val_loss": evaluate_lm(fp, val), "fp_gguf": fp_gguf,
               "presets": rows, "bytes": sizes, "llama_cpp_tokens_per_s": speed,
               "note": "other jobs ran concurrently on the 2-core machine (load average 10-18): speeds are noisy"}
    payload["executorch"] = {"args": et_args, "fake_quant_loss": rows.get("8da4w", {}).get("fake_quant_loss"),
                             "load_average": "/".join(f"{v:.1f}" for v in os.getloadavg()),
                             "rows": executorch_rows(et_models, val, out, args.decode_tokens)}
    write_results("deploy_llm", payload, markdown(payload))
    print(markdown(payload))


def markdown(payload) -> str:
    """The results page of ``payload``."""
    args, rows, sizes, fp_gguf = payload["args"], payload["presets"], payload["bytes"], payload["fp_gguf"]
    speed = payload["llama_cpp_tokens_per_s"]
    md = ["# Deployed char-Llama: llama.cpp (GGUF), Hugging Face checkpoints and ExecuTorch\n",
          "FP model: the char-Llama's mini profile (hidden 64, 4 layers), 1000 pre-training steps (cached; val loss "
          f"here {payload['fp_val_loss']:.4f}); each preset: {args['qat_steps']} QAT steps (lr 1e-4, batch 16x64). "
          f"{args['batches']} validation batches of "
          f"{args['batch']}x{args['context']}. Δ and agreement are against the fake-quantized model (FP GGUF: against FP). "
          "Machine: " + str(payload["machine"]) + "; other jobs were running (load average 10-18).\n",
          "| preset | fake-quant loss | GGUF types | llama.cpp loss | llama.cpp max Δ logit | agreement | "
          "HF checkpoint loss | HF max Δ logit |",
          "|---|---|---|---|---|---|---|---|",
          f"| FP (F32 GGUF) | {payload['fp_val_loss']:.4f} | F32 | {fp_gguf['loss']:.4f} | {fp_gguf['max_abs']:.3g} | "
          f"{100 * fp_gguf['agreement']:.2f} % | — | — |"]
    for preset, r in rows.items():
        hf = r.get("hf_checkpoint")
        md.append(f"| {preset} | {r['fake_quant_loss']:.4f} | {'/'.join(r['gguf_types'])} | {r['gguf']['loss']:.4f} | "
                  f"{r['gguf']['max_abs']:.3g} | {100 * r['gguf']['agreement']:.2f} % | "
                  + (f"{hf['loss']:.4f} | {hf['max_abs']:.3g} |" if hf else "— | — |"))
    md += ["", "| file | bytes |", "|---|---|"] + [f"| {k} | {v:,} |" for k, v in sizes.items()]
    md += ["", "llama.cpp decode speed, one thread, best of 3 (tokens/s; a model this small is dominated by per-token overhead): "
           + ", ".join(f"{k} {v:,.0f}" for k, v in speed.items()) + "\n"]
    if "executorch" in payload:
        md += executorch_markdown(payload["executorch"])
    return "\n".join(md)


if __name__ == "__main__":
    main()
