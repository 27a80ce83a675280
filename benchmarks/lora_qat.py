"""QAT + LoRA (issue 27): memory and step time against full QAT and FP LoRA, and accuracy on the LLM benchmark.

LoRA here is fxqat's protocol module (``base_layer`` + ``lora_A``/``lora_B`` + ``scaling``, the math of PEFT's
``lora.Linear``, rank 8, alpha 16, on every linear layer of the decoder blocks; ``lm_head`` stays FP), so that the
measurement does not depend on PEFT's wrapper classes (tests/integration/test_lora.py covers PEFT itself).

Arms:

* ``fp_lora``       LoRA in FP (base frozen); for accuracy then merged and quantized by torchao RTN (int4/int2, g32)
* ``lora_base``     fxqat ``QATConfig.lora="base"``: Q(W) x + s·B·A·x (torchtune's QAT + LoRA)
* ``lora_merged``   fxqat ``QATConfig.lora="merged"``: Q(W + s·B·A) x, deployed exactly by merge + convert
* ``full_qat``      fxqat preset QAT of every weight (the LLM benchmark's ``lsq`` arm)

Usage::

    python benchmarks/lora_qat.py memory --sizes llm 0.4B --dtypes fp32 bf16     # one subprocess per arm
    python benchmarks/lora_qat.py accuracy --seed 0 --steps 250                  # one seed's part
    python benchmarks/lora_qat.py report                                          # lora_qat.{md,json}
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import PRESET, SCALE_SIZES, machine, mem_available_gb, scale_llama, torchao_rtn  # noqa: E402

import fxqat  # noqa: E402
from fxqat.capture.lora import effective_weight, lora_parts, named_lora_layers  # noqa: E402
from fxqat.training.lm import LMRecipe  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = Path(__file__).resolve().parent.parent / "runs" / "lora_qat"
ARMS = ("fp_lora", "lora_base", "lora_merged", "full_qat")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: glibc malloc without mmap for large blocks and without trimming: a freed weight-sized temporary is reused instead of
#: handed back to the kernel, whose fresh pages are zeroed and faulted in again on the next allocation
HEAP_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 8, 16
LORA_LR = 1e-3  # LoRA factors (and, in the QAT arms, step sizes); full QAT keeps the benchmark's 1e-4
QUICK_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=32)
QUICK_FP = LMRecipe(steps=300, lr=3e-3, warmup=20, batch_size=8, context=32, seed_offset=0)  # llm.py --quick


class LoRALinear(nn.Module):
    """``base(x) + lora_B(lora_A(x)) · alpha/r``: PEFT's LoRA (A Kaiming-uniform, B zero), fxqat's protocol."""

    def __init__(self, base: nn.Linear, r: int = RANK, alpha: float = ALPHA):
        super().__init__()
        self.base_layer, self.scaling = base, alpha / r
        self.lora_A = nn.Linear(base.in_features, r, bias=False, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling


def add_lora(model: nn.Module, seed: int = 0) -> nn.Module:
    """Freeze ``model`` and wrap every target linear layer in :class:`LoRALinear` (in place)."""
    torch.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, m in list(model.named_modules()):
        for cname, child in list(m.named_children()):
            if cname in TARGETS and type(child) is nn.Linear:
                setattr(m, cname, LoRALinear(child))
    return model


@torch.no_grad()
def merged_fp(model: nn.Module) -> nn.Module:
    """An FP copy with every LoRALinear replaced by its base layer holding W + s·B·A."""
    out = copy.deepcopy(model)
    for name, m in list(named_lora_layers(out)):
        parts = lora_parts(m)
        parts.base.weight.data = effective_weight(parts)
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent), child, parts.base)
    return out


def prepared(model: nn.Module, arm: str, setting: str, x0: torch.Tensor) -> nn.Module:
    """The model of a training arm (LoRA wrapped already for the LoRA arms)."""
    if arm == "fp_lora":
        return model
    cfg = fxqat.QATConfig.preset(PRESET[setting])
    if arm in ("lora_base", "lora_merged"):
        cfg = cfg.with_(lora=arm.split("_")[1])
    qm = fxqat.prepare_qat(model, (x0,), cfg, inplace=True)  # callers pass a model of its own: no second copy
    fxqat.calibrate(qm, [x0])
    return qm


# --------------------------------------------------------------------------------------------------- memory
def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def memory_arm(size: str, dtype: str, arm: str, seq: int, batch: int) -> Dict[str, Any]:
    """One arm in this process: build, prepare, three optimiser steps (the last two timed); peak RSS."""
    from fxqat.training.lm import lm_loss

    torch.set_num_threads(int(os.environ.get("LORA_QAT_THREADS", "1")))
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[dtype])  # built in its dtype: no float32 copy inflates a bf16 arm's peak memory
    try:
        model = scale_llama(size, DTYPES[dtype], max(seq, 128))
    finally:
        torch.set_default_dtype(default)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    x, y = ids[:, :-1], ids[:, 1:]
    rec: Dict[str, Any] = {"params": sum(p.numel() for p in model.parameters()), "rss_model_gb": peak_rss_gb()}
    if arm != "full_qat":
        add_lora(model)
    model = prepared(model, arm, "int4", x)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    rec["trainable"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step() -> Tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        lm_loss(model, x, y).backward()
        opt.step()
        return time.perf_counter() - t, time.process_time() - c

    times = [step() for _ in range(3)]
    rec["step_s"] = statistics.median(t for t, _ in times[1:])
    rec["step_cpu_s"] = statistics.median(c for _, c in times[1:])  # the comparable figure on a shared machine
    rec["step_first_s"], rec["threads"] = times[0][0], torch.get_num_threads()
    rec["peak_rss_gb"] = peak_rss_gb()
    return rec


def needed_gb(size: str, dtype: str, arm: str) -> float:
    """What an arm needs available before it starts: weights, plus gradients and AdamW moments for full QAT."""
    n = SCALE_SIZES[size]["params"] if size in SCALE_SIZES else 1e6
    b = 4 if dtype == "fp32" else 2
    per = b * (4 if arm == "full_qat" else 1.3)
    return n * per / 1e9 + 1.5


def run_memory(args) -> Dict[str, Any]:
    out_path = RESULTS / "lora_qat_memory.json"
    rows = json.loads(out_path.read_text()) if out_path.exists() else {}
    for size in args.sizes:
        for dtype in args.dtypes:
            for arm in args.arms:
                key = f"{size}/{dtype}/{arm}" + (f"@{args.seq}" if size != "llm" and args.seq != 256 else "") + \
                    ("+heap" if args.malloc == "heap" else "")
                need, avail = needed_gb(size, dtype, arm), mem_available_gb()
                if avail < need:
                    rows[key] = {"skipped": f"needs ~{need:.1f} GB available, {avail:.1f} GB were"}
                    print(key, rows[key], flush=True)
                    continue
                seq, batch = (128, 8) if size == "llm" else (args.seq, 1)
                cmd = [sys.executable, __file__, "_arm", size, dtype, arm, str(seq), str(batch)]
                t = time.time()
                env = {**os.environ, **(HEAP_MALLOC if args.malloc == "heap" else {})}
                res = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
                rows[key] = json.loads(line[-1]) if res.returncode == 0 and line else {
                    "failed": (res.stderr.strip().splitlines() or ["?"])[-1][:300]}
                rows[key].update(seq=seq, batch=batch, wall_s=round(time.time() - t, 1), malloc=args.malloc)
                print(key, rows[key], flush=True)
                out_path.write_text(json.dumps(rows, indent=2))
    return rows


def layer_arm(arm: str, tokens: int, reps: int = 4) -> Dict[str, Any]:
    """One 2048 -> 8192 linear layer (0.4B/1.1B's gate/up shape) with rank-8 LoRA, fp32, one thread: CPU seconds of
    forward + backward (the input needs its gradient, as inside a model), median of all but the first."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base, head = nn.Linear(2048, 8192, bias=False), nn.Linear(8192, 8, bias=False)
    for p in (*base.parameters(), *head.parameters()):
        p.requires_grad_(False)
    model = nn.Sequential(LoRALinear(base), head)
    x = torch.randn(1, tokens, 2048, requires_grad=True)
    if arm != "fp_lora":  # the last layer stays FP (first/last policy of the presets); only the LoRA layer is quantized
        model = fxqat.prepare_qat(model, (x,), fxqat.QATConfig.preset("int4_weight_only").with_(lora=arm.split("_")[1]),
                                  inplace=True)
    model.train()
    times = []
    for _ in range(reps):
        c = time.process_time()
        model(x).square().mean().backward()
        times.append(time.process_time() - c)
    return {"cpu_s": statistics.median(times[1:]), "all_cpu_s": times}


def run_layer(args) -> Dict[str, Any]:
    out_path = RESULTS / "lora_qat_layer.json"
    rows = json.loads(out_path.read_text()) if out_path.exists() else {}
    for malloc in args.malloc:
        for tokens in args.tokens:
            for arm in ("fp_lora", "lora_base", "lora_merged"):
                env = {**os.environ, **(HEAP_MALLOC if malloc == "heap" else {})}
                res = subprocess.run([sys.executable, __file__, "_layer", arm, str(tokens)], capture_output=True,
                                     text=True, env=env)
                line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
                key = f"{malloc}/{tokens}/{arm}"
                rows[key] = json.loads(line[-1]) if res.returncode == 0 and line else {
                    "failed": (res.stderr.strip().splitlines() or ["?"])[-1][:300]}
                print(key, rows[key], flush=True)
                out_path.write_text(json.dumps(rows, indent=2))
    return rows


# --------------------------------------------------------------------------------------------------- accuracy
def run_accuracy(args) -> Dict[str, Any]:
    from fxqat.text_data import tiny_shakespeare
    from fxqat.training.lm import FINETUNE_RECIPE, evaluate_lm, kd_lm_loss, lm_loss, train_lm
    from fxqat.training.recipes import pretrained_char_llama

    torch.set_num_threads(1)
    corpus = tiny_shakespeare()
    if args.quick:  # llm.py's smoke profile model (2 layers, hidden 32), pre-trained 300 steps: a reduced proxy
        fp, info = pretrained_char_llama(corpus, QUICK_FP, progress=False, model_overrides=QUICK_MODEL)
        bs, ctx = QUICK_FP.batch_size, QUICK_FP.context
    else:
        fp, info = pretrained_char_llama(corpus, progress=False)
        bs, ctx = 32, 128
    val = list(corpus.batches("val", args.n_val, bs, ctx, 1337))
    x0 = next(corpus.batches("train", 1, bs, ctx, 10000 + args.seed))[0]
    part_path = RESULTS / f"lora_qat_acc{'_quick' if args.quick else ''}_s{args.seed}.json"
    part = json.loads(part_path.read_text()) if part_path.exists() else {}
    part["fp_val_loss"] = evaluate_lm(fp, val)

    def train(model, arm, kd):
        lr = 1e-4 if arm == "full_qat" else LORA_LR
        recipe = FINETUNE_RECIPE.__class__(**{**FINETUNE_RECIPE.__dict__, "steps": args.steps, "lr": lr,
                                              "batch_size": bs, "context": ctx})
        loss = kd_lm_loss(copy.deepcopy(fp)) if kd else lm_loss
        t = time.time()
        hist = train_lm(model, corpus, recipe, args.seed, loss_fn=loss, params=fxqat.trainable_parameters(model),
                        progress=False, desc=arm)
        return {"time_s": round(time.time() - t, 1), "step_s": statistics.median(hist["step_s"]),
                "train_loss_last": hist["loss"][-1]}

    if "fp_lora" in args.arms and "fp_lora" not in part:
        model = add_lora(copy.deepcopy(fp), seed=args.seed)
        rec = train(model, "fp_lora", False)
        merged = merged_fp(model)
        rec["val_loss_fp"] = evaluate_lm(merged, val)
        for setting in args.settings:
            rec[f"val_loss_rtn_{setting}"] = evaluate_lm(torchao_rtn(merged, setting), val)
        part["fp_lora"] = rec
        part_path.write_text(json.dumps(part, indent=2))
        print("fp_lora", rec, flush=True)
    for setting in args.settings:
        for arm in [a for a in args.arms if a != "fp_lora"]:
            for kd in args.kd:
                key = f"{setting}/{arm}" + ("_kd" if kd else "")
                if key in part:
                    continue
                base = copy.deepcopy(fp)
                model = prepared(add_lora(base, seed=args.seed) if arm != "full_qat" else base, arm, setting, x0)
                rec = train(model, arm, kd)
                rec["val_loss"] = evaluate_lm(fxqat.convert(model), val)  # merged (LoRA) and converted: deployed
                part[key] = rec
                part_path.write_text(json.dumps(part, indent=2))
                print(key, rec, flush=True)
    return part


# --------------------------------------------------------------------------------------------------- exports
def run_exports(args) -> Dict[str, Any]:
    """Every export path on a merged PEFT LoRA model (tiny char-Llama, 2 training steps): ExecuTorch (8da4w),
    GGUF (gguf_q4_0), HF checkpoint (int4 weight-only), against ``fxqat.convert``'s logits."""
    import tempfile

    import peft

    from fxqat.export import save_pretrained, to_executorch, to_gguf
    from fxqat.export.executorch import load_executorch
    from fxqat.export.gguf_vocab import GGUFVocab
    from fxqat.models.hf import char_llama
    from fxqat.text_data import tiny_shakespeare

    torch.set_num_threads(1)
    ids = torch.randint(0, 65, (1, 16), generator=torch.Generator().manual_seed(0))

    def trained(preset):
        m = char_llama(65, seed=0, **QUICK_MODEL)
        torch.manual_seed(1)
        pm = peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                    init_lora_weights=False))
        qm = fxqat.prepare_qat(pm, (ids,), fxqat.QATConfig.preset(preset))
        opt = torch.optim.AdamW(fxqat.trainable_parameters(qm), lr=1e-2)
        for _ in range(2):
            opt.zero_grad()
            qm(ids).logits.square().mean().backward()
            opt.step()
        qm.eval()
        with torch.no_grad():
            return fxqat.merge_lora(qm), fxqat.convert(qm)(ids).logits

    d, res = tempfile.mkdtemp(), {}
    merged, ref = trained("8da4w")
    out = load_executorch(to_executorch(merged, (ids,), os.path.join(d, "m.pte")))(ids)[0]
    res["executorch_8da4w"] = {"max_abs_vs_convert": float((out - ref).abs().max()), "ref_absmax": float(ref.abs().max())}
    merged, _ = trained("gguf_q4_0")
    types = to_gguf(merged, os.path.join(d, "m.gguf"), GGUFVocab.from_chars(tiny_shakespeare().chars))
    res["gguf_q4_0"] = {"q4_0_tensors": sum(v == "Q4_0" for v in types.values())}
    import transformers

    merged, ref = trained("int4_weight_only")
    save_pretrained(merged, os.path.join(d, "hf"))
    with torch.no_grad():
        got = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(d, "hf"))(ids).logits
    res["hf_checkpoint_int4"] = {"max_abs_vs_convert": float((got - ref).abs().max())}
    (RESULTS / "lora_qat_exports.json").write_text(json.dumps(res, indent=2))
    return res


# --------------------------------------------------------------------------------------------------- report
def fmt(v: Optional[float], spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


SIZE_ORDER, DTYPE_ORDER = ("llm", "0.4B", "1.1B"), ("fp32", "bf16")


def _parse_key(key: str):
    """``size/dtype/arm[@seq][+heap]`` -> (size, dtype, arm, '@seq' or '', '+heap' or '')."""
    size, dtype, arm = key.split("/")
    arm, plus, variant = arm.partition("+")
    arm, at, seq = arm.partition("@")
    return size, dtype, arm, at + seq, plus + variant


def _row_order(key: str):
    size, dtype, arm, seq, variant = _parse_key(key)
    return (SIZE_ORDER.index(size) if size in SIZE_ORDER else 9, variant, seq, DTYPE_ORDER.index(dtype)
            if dtype in DTYPE_ORDER else 9, ARMS.index(arm) if arm in ARMS else 9)


def scale_full_qat_reference(dtype: str) -> Optional[Dict[str, Any]]:
    """benchmarks/scale.py's 1.1B fxqat 8da4w row of ``dtype`` (full QAT), where this benchmark did not run its own."""
    path = RESULTS / "scale.json"
    rows = json.loads(path.read_text()).get("rows", {}) if path.exists() else {}
    r = rows.get(f"1.1B/{dtype}/fxqat", {}) if isinstance(rows, dict) else {}
    return r if "rss_peak_gb" in r else None


def memory_lines(mem: Dict[str, Any]) -> List[str]:
    """The memory and step-time section of the report, with the issue's two targets at 1.1B."""
    lines = ["## Memory and step time", "",
             "Peak RSS of the whole process (model build and the ~1.1 GB of imported libraries included) and step time "
             "(forward, backward, AdamW step; median of steps 2-3) of each arm, each in its own subprocess at one torch "
             "thread, one arm after the other. int4 weight-only per-group 32; LoRA rank 8 on every decoder linear "
             "layer (q/k/v/o/gate/up/down; `lm_head` FP in every arm, as in the presets). `llm` is the LLM benchmark's "
             "0.8M char-Llama (batch 8 x 128); 0.4B and 1.1B are benchmarks/scale.py's Llama shapes with random "
             "weights (batch 1 x 256 tokens, as scale.py), built directly in their dtype.", "",
             "Step time is the process's CPU seconds (one thread): the machine was shared (load average 5-12 on 2 "
             "cores), so wall time (`step_s` in the JSON) is not comparable between arms; CPU seconds still carry the "
             "memory-bandwidth contention of the other jobs (+-20 % between repeats of one arm). `heap malloc` rows: "
             "see the one-layer table below.", "",
             "| size | dtype | arm | trainable | peak RSS GB | x full QAT | step CPU s | x FP LoRA | x full QAT |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for key in sorted(mem, key=_row_order):
        r = mem[key]
        size, dtype, arm, seq, variant = _parse_key(key)
        full = mem.get(f"{size}/{dtype}/full_qat{seq}{variant}", {})
        fpl = mem.get(f"{size}/{dtype}/fp_lora{seq}{variant}", {})
        if seq:
            size = f"{size} (1 x {seq[1:]})"
        if variant:
            size = f"{size} heap malloc"
        if "peak_rss_gb" not in r:
            lines.append(f"| {size} | {dtype} | {arm} | | {r.get('skipped') or r.get('failed')} | | | | |")
            continue
        step = r.get("step_cpu_s", r["step_s"])
        rm = r["peak_rss_gb"] / full["peak_rss_gb"] if "peak_rss_gb" in full else None
        rs = step / fpl["step_cpu_s"] if "step_cpu_s" in fpl else None
        rf = step / full["step_cpu_s"] if "step_cpu_s" in full else None
        lines.append(f"| {size} | {dtype} | {arm} | {r['trainable']:,} | {r['peak_rss_gb']:.2f} | {fmt(rm)} | "
                     f"{step:.2f} | {fmt(rs)} | {fmt(rf)} |")
    notes = [f"* `{k}`: {r['note']}" for k, r in sorted(mem.items(), key=lambda kv: _row_order(kv[0])) if r.get("note")]
    lines += ["", "Notes:", "", *notes] if notes else []
    lines += ["", "### Targets at 1.1B", ""]
    for dtype in DTYPE_ORDER:
        ref = scale_full_qat_reference(dtype)
        full = mem.get(f"1.1B/{dtype}/full_qat", {})
        fpl = mem.get(f"1.1B/{dtype}/fp_lora", {})
        src = "this benchmark's full_qat row"
        if "peak_rss_gb" not in full and ref is not None:
            full, src = {"peak_rss_gb": ref["rss_peak_gb"], "step_cpu_s": ref["step_cpu_s"]}, \
                f"scale.json's 1.1B {dtype} fxqat 8da4w row: full QAT, same shapes, 1 x 256 tokens, one thread"
        for arm in ("lora_merged", "lora_base"):
            r = mem.get(f"1.1B/{dtype}/{arm}", {})
            if "peak_rss_gb" not in r:
                continue
            mem_txt = (f"peak {r['peak_rss_gb']:.2f} GB = **{r['peak_rss_gb'] / full['peak_rss_gb']:.2f}x** full "
                       f"QAT's {full['peak_rss_gb']:.2f} GB ({src}; target <= 0.5x)") if "peak_rss_gb" in full \
                else "full QAT not measured"
            step_txt = (f"step **{r['step_cpu_s'] / fpl['step_cpu_s']:.2f}x** FP LoRA's ({r['step_cpu_s']:.1f} vs "
                        f"{fpl['step_cpu_s']:.1f} CPU s; target <= 1.5x)") if "step_cpu_s" in fpl else "FP LoRA not measured"
            if "step_cpu_s" in full:
                step_txt += f", {r['step_cpu_s'] / full['step_cpu_s']:.2f}x full QAT's"
            lines.append(f"* {dtype} `{arm}`: {mem_txt}; {step_txt}.")
    return lines


def layer_lines(rows: Dict[str, Any]) -> List[str]:
    """The one-layer step-time table (``layer``): where the merged mode's time goes."""
    if not rows:
        return []
    lines = ["", "### One layer: where the step time goes (`python benchmarks/lora_qat.py layer`)", "",
             "A 2048 -> 8192 linear layer (the 0.4B/1.1B gate/up shape) with rank-8 LoRA, fp32, one thread, forward + "
             "backward (input gradient included, as inside a model), CPU seconds, median of 3 after a warm-up. "
             "`heap`: glibc keeps freed memory for reuse (`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1e11`) instead of "
             "handing each freed weight-sized temporary back to the kernel, which zeroes and faults in fresh pages on "
             "the next allocation.", "",
             "| malloc | tokens | FP LoRA | base | merged | base x FP LoRA | merged x FP LoRA |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    combos = sorted({tuple(k.split("/")[:2]) for k in rows}, key=lambda c: (c[0] != "default", int(c[1])))
    for malloc, tokens in combos:
        got = [rows.get(f"{malloc}/{tokens}/{arm}", {}).get("cpu_s") for arm in ("fp_lora", "lora_base", "lora_merged")]
        if got[0] is None:
            continue
        lines.append(f"| {malloc} | {tokens} | {fmt(got[0], '.3f')} | {fmt(got[1], '.3f')} | {fmt(got[2], '.3f')} | "
                     f"{fmt(got[1] and got[1] / got[0])} | {fmt(got[2] and got[2] / got[0])} |")
    return lines


def accuracy_lines(parts: Dict[int, Dict[str, Any]]) -> List[str]:
    """The accuracy table of one protocol's per-seed parts (rows present in any seed; each row lists its seeds)."""
    seeds = sorted(parts)
    settings = sorted({k.split("/")[0] for p in parts.values() for k in p if "/" in k} |
                      {k.rsplit("_", 1)[1] for p in parts.values() for k in p.get("fp_lora", {})
                       if k.startswith("val_loss_rtn_")}, reverse=True)
    lines = [f"Seeds {seeds}; FP model val loss {statistics.mean(p['fp_val_loss'] for p in parts.values()):.4f}. "
             "Every arm trains the same number of steps from the cached FP checkpoint and is evaluated after "
             "merging and converting (what is deployed); `fp_lora` is merged in FP and then quantized by torchao "
             "RTN. A row with fewer seeds than the header was still running when this report was written.", "",
             "| setting | arm | KD | val loss | per seed |", "|---|---|---|---:|---|"]
    for setting in settings:
        got = [(sd, p["fp_lora"][f"val_loss_rtn_{setting}"]) for sd, p in sorted(parts.items())
               if f"val_loss_rtn_{setting}" in p.get("fp_lora", {})]
        rows = [("fp_lora + RTN", "no", got)]
        for arm in ARMS[1:]:
            for kd in ("", "_kd"):
                got = [(sd, p[f"{setting}/{arm}{kd}"]["val_loss"]) for sd, p in sorted(parts.items())
                       if f"{setting}/{arm}{kd}" in p]
                rows.append((arm, "yes" if kd else "no", got))
        for arm, kd, got in rows:
            if got:
                lines.append(f"| {setting} | {arm} | {kd} | {statistics.mean(v for _, v in got):.4f} | "
                             f"{', '.join(f's{sd} {v:.4f}' for sd, v in got)} |")
    return lines


def report(args) -> int:
    mem = json.loads((RESULTS / "lora_qat_memory.json").read_text()) if (RESULTS / "lora_qat_memory.json").exists() \
        else {}
    acc = {kind: {int(p.stem.split("_s")[-1]): json.loads(p.read_text())
                  for p in sorted(RESULTS.glob(f"lora_qat_acc{kind}_s*.json"))} for kind in ("", "_quick")}
    parts = acc[""] or acc["_quick"]
    lines = ["# QAT + LoRA (issue 27)", "",
             f"Machine: {machine()['cpu']}, {machine()['cores']} cores, torch {torch.__version__}, CPU only; other "
             "jobs were running on the machine at the same time (timings are indicative, memory is per process).", ""]
    lines += memory_lines(mem)
    layer_path = RESULTS / "lora_qat_layer.json"
    lines += layer_lines(json.loads(layer_path.read_text()) if layer_path.exists() else {})
    lines += ["", "## Accuracy (validation loss of the deployed model, mean over seeds)", ""]
    if acc[""]:
        lines += ["### The LLM benchmark's protocol (`accuracy --seed 0|1`: 250 steps, 16 validation batches of "
                  "32 x 128)", ""] + accuracy_lines(acc[""])
    if acc["_quick"]:
        lines += ["", "### Reduced proxy (`accuracy --quick --steps 100 --n-val 8`)", "",
                  "llm.py's smoke-profile char-Llama (2 layers, hidden 32; FP pre-trained 300 steps, batch 8 x 32), "
                  "100 fine-tuning steps per arm, 8 validation batches of 8 x 32: run while the benchmark's FP "
                  "checkpoint (FP_RECIPE, 1500 steps, ~15 CPU-minutes) could not be trained on the shared machine.",
                  ""] + accuracy_lines(acc["_quick"])
    exp_path = RESULTS / "lora_qat_exports.json"
    exports = json.loads(exp_path.read_text()) if exp_path.exists() else {}
    if exports:
        lines += ["", "## Export of the merged model (`python benchmarks/lora_qat.py exports`)", "",
                  "A PEFT LoRA char-Llama (r=4 on q/v/down_proj), prepared with lora='merged', 2 steps, "
                  "`fxqat.merge_lora`, then each export path; compared with `fxqat.convert(qm)`'s logits.", "",
                  "| path | result |", "|---|---|"]
        lines += [f"| {k} | {json.dumps(v)} |" for k, v in exports.items()]
    payload = {"machine": machine(), "memory": mem, "layer": json.loads(layer_path.read_text()) if layer_path.exists()
               else {}, "exports": exports, "accuracy": {str(k): v for k, v in parts.items()},
               "rank": RANK, "alpha": ALPHA, "targets": TARGETS, "lora_lr": LORA_LR}
    (RESULTS / "lora_qat.json").write_text(json.dumps(payload, indent=2))
    (RESULTS / "lora_qat.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_layer":
        print(json.dumps(layer_arm(argv[1], int(argv[2]))), flush=True)
        return 0
    if argv and argv[0] == "_arm":
        size, dtype, arm, seq, batch = argv[1:6]
        print(json.dumps(memory_arm(size, dtype, arm, int(seq), int(batch))), flush=True)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--sizes", nargs="+", default=["llm", "0.4B", "1.1B"])
    m.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    m.add_argument("--arms", nargs="+", default=list(ARMS))
    m.add_argument("--seq", type=int, default=256)
    m.add_argument("--malloc", choices=["default", "heap"], default="default",
                   help="heap: glibc keeps freed memory for reuse (HEAP_MALLOC), rows keyed '+heap'")
    a = sub.add_parser("accuracy")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--steps", type=int, default=250)
    a.add_argument("--n-val", type=int, default=16)
    a.add_argument("--settings", nargs="+", default=["int4", "int2"])
    a.add_argument("--arms", nargs="+", default=list(ARMS))
    a.add_argument("--kd", nargs="+", type=int, default=[0, 1])
    a.add_argument("--quick", action="store_true", help="llm.py's smoke-profile model instead of the benchmark's")
    lay = sub.add_parser("layer")
    lay.add_argument("--tokens", nargs="+", type=int, default=[256, 2048])
    lay.add_argument("--malloc", nargs="+", choices=["default", "heap"], default=["default", "heap"])
    sub.add_parser("report")
    sub.add_parser("exports")
    args = ap.parse_args(argv)
    if args.cmd == "memory":
        run_memory(args)
    elif args.cmd == "accuracy":
        run_accuracy(args)
    elif args.cmd == "exports":
        run_exports(args)
    elif args.cmd == "layer":
        run_layer(args)
    return report(args)


if __name__ == "__main__":
    sys.exit(main())
