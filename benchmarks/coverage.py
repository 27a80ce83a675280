"""Capture coverage: fxqat's one-liner beside torchao's eager QAT on the Hugging Face zoo and a set of timm models.

Per model, in one run: does it prepare, does one training step run (finite loss, weights move), how many of its
weight layers get a weight fake-quantizer (weight layers counted by fxqat's registry: Linear, Conv, ConvTranspose,
GPT-2's Conv1D), the prepare time, and fxqat's capture share (weight layers inside graph regions). Coverage is also
counted over **parameters**: every parameter the FP model's forward feeds into a matmul-like op as a weight
(``fxqat.capture.param_quant.record_param_uses``: linear, matmul/bmm/einsum, grouped expert matmuls, convolutions;
embedding lookups not counted), its elements quantized by each tool, with mixture-of-experts expert tensors and
routers counted separately (routers are FP by fxqat's default). torchao:
``quantize_(m, QATConfig(Int8DynamicActivationIntxWeightConfig(int4, PerAxis(0)), step="prepare"))``, per-axis so
that no layer is skipped for a width that is not a multiple of a group size.

Then, on the LLM benchmark's char Llama (batch 8×128): the QAT step as a ratio to the FP step (fxqat LSQ and torchao,
interleaved), and block replacement's step beside (a) its analytical minimum, LP fwd+bwd + FP fwd + Σ_i (FP suffix
after block i, fwd+bwd), with each block's share of the FP cost taken as its share of weight-layer parameters, and
(b) the naive alternative that recomputes every path from the input (measured: one LP model with the quantizers of
blocks > i switched off, fwd+bwd per path).

Usage::

    python benchmarks/coverage.py            # writes benchmarks/results/coverage.{json,md}
    python benchmarks/coverage.py --quick    # a few models, fewer rounds (smoke)
    python benchmarks/coverage.py --markdown # rewrites coverage.md from coverage.json (no run)
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import machine, read_results, time_steps, write_results  # noqa: E402

import fxqat  # noqa: E402
from fxqat.capture.param_quant import record_param_uses  # noqa: E402
from fxqat.layer_registry import is_weight_layer  # noqa: E402
from fxqat.models import hf_zoo  # noqa: E402  (the HF zoo the tests and the CLI use)
from fxqat.training.losses import hybrid_loss, logits_of  # noqa: E402

log = logging.getLogger("coverage")
TIMM = {  # name -> create_model kwargs and input size
    "resnet18": ({}, 64), "mobilenetv3_small_050": ({}, 64), "efficientnet_b0": ({}, 64),
    "convnext_atto": ({}, 64), "regnetx_002": ({}, 64), "ghostnet_050": ({}, 64), "lcnet_050": ({}, 64),
    "edgenext_xx_small": ({}, 64), "mobileone_s0": ({}, 64), "dpn68": ({}, 64),
    "vit_tiny_patch16_224": ({"img_size": 64}, 64), "deit_tiny_patch16_224": ({"img_size": 64}, 64),
    "nf_regnet_b0": ({}, 64), "levit_128s": ({}, 224),
}


def _weight_layers(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if is_weight_layer(m))


def weight_params(model: nn.Module, args: Tuple, kwargs: Dict) -> Dict[str, Dict[str, Any]]:
    """Every parameter the FP forward reads as a weight of a matmul-like op (embedding lookups excluded):
    name -> {numel, expert (a 3-D MoE expert tensor), router}."""
    uses = record_param_uses(model, args, kwargs)
    params = dict(model.named_parameters())
    return {n: {"numel": params[n].numel(), "expert": params[n].dim() == 3 and ".experts." in n, "router": u.router}
            for n, u in uses.items() if set(u.ops) != {"embedding"}}


def param_cover(weights: Dict[str, Dict[str, Any]], quantized: set) -> Dict[str, Any]:
    """Counts and element shares of ``weights`` that are in ``quantized`` (all, experts, routers)."""
    def share(pick):
        names = [n for n, w in weights.items() if pick(w)]
        total = sum(weights[n]["numel"] for n in names)
        done = [n for n in names if n in quantized]
        return {"n": len(names), "quantized": len(done), "numel": total,
                "numel_quantized": sum(weights[n]["numel"] for n in done)}
    return {"all": share(lambda w: True), "experts": share(lambda w: w["expert"]),
            "routers": share(lambda w: w["router"])}

def _train_step(model: nn.Module, args: Tuple, kwargs: Dict) -> bool:
    """One SGD step on a generic loss; True when the loss is finite and some trainable weight moved."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    out = model(*args, **kwargs)
    if isinstance(out, fxqat.HybridOutput):
        out = out.lp
    loss = logits_of(out).float().pow(2).mean()
    loss.backward()
    torch.optim.SGD(params, lr=1e-2).step()
    moved = any(not torch.equal(b, p.detach()) for b, p in zip(before, params))
    return bool(torch.isfinite(loss)) and moved


def _fxqat(model, args, kwargs) -> Dict[str, Any]:
    t0 = time.perf_counter()
    qm = fxqat.prepare_qat(model, args, fxqat.QATConfig(w_bits=4, a_bits=8), example_kwargs=kwargs)
    prep = time.perf_counter() - t0
    # no eval-mode calibration: these models have random weights and unfitted BN statistics, so eval-mode activations
    # are not the training ones (mobileone_s0's grow ~20x through 113 blocks and every later 8-bit activation then
    # rounds to 0). The first training forward initialises the quantizers, as torchao's arm does.
    n_wq = sum(q.kind == "weight" for q in fxqat.named_quantizers(qm).values())
    # a weight computed from a parameter (nf_regnet's standardised conv weight) is read at its layer: <layer>.weight
    targets = {q.weight_target or f"{q.weight_layer}.weight" for q in fxqat.named_quantizers(qm).values()
               if q.kind == "weight" and (q.weight_target or q.weight_layer)}
    rep = fxqat.capture_report(qm)
    share = rep.graph_share if rep is not None else 1.0
    return {"prepared": True, "trained": _train_step(qm, args, kwargs), "weight_quantizers": n_wq,
            "prepare_s": prep, "graph_share": share, "quantized_params": sorted(targets),
            "unquantized": [list(x) for x in rep.unquantized]}


def _torchao(model, args, kwargs) -> Dict[str, Any]:
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerAxis, quantize_
    from torchao.quantization.qat import QATConfig as AOQATConfig

    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    base = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerAxis(0))
    quantize_(m, AOQATConfig(base, step="prepare"))
    prep = time.perf_counter() - t0
    fq = [n for n, mod in m.named_modules() if type(mod).__name__.startswith("FakeQuantized") and hasattr(mod, "weight")]
    return {"prepared": True, "trained": _train_step(m, args, kwargs), "weight_quantizers": len(fq), "prepare_s": prep,
            "quantized_params": sorted(f"{n}.weight" for n in fq)}


def _guard(fn: Callable, *a) -> Dict[str, Any]:
    try:
        return fn(*a)
    except Exception as e:  # a model that fails is a result of the benchmark, not its crash
        log.info("%s failed: %s", fn.__name__, traceback.format_exception_only(type(e), e)[-1].strip())
        return {"prepared": False, "trained": False, "weight_quantizers": 0, "error": f"{type(e).__name__}: {e}"[:200]}


def zoo_models(quick: bool) -> List[Tuple[str, Callable[[], Tuple[nn.Module, Tuple, Dict]]]]:
    out = [(f"hf:{name}", (lambda name=name: hf_zoo.build(name, dropout=False))) for name in hf_zoo.ZOO]
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None:
        for name, (kw, size) in TIMM.items():
            def build(name=name, kw=kw, size=size):
                torch.manual_seed(0)
                return timm.create_model(name, pretrained=False, **kw), (torch.randn(2, 3, size, size),), {}
            out.append((f"timm:{name}", build))
    return out[:4] + out[-2:] if quick else out


def coverage(quick: bool) -> List[Dict[str, Any]]:
    from tqdm.auto import tqdm

    rows = []
    for name, build in tqdm(zoo_models(quick), desc="models"):
        torch.manual_seed(0)
        model, args, kwargs = build()
        row = {"model": name, "weight_layers": _weight_layers(model)}
        weights = weight_params(model, args, kwargs)
        row["fxqat"] = _guard(_fxqat, model, args, kwargs)
        row["torchao"] = _guard(_torchao, model, args, kwargs)
        canon = {id(p): n for n, p in model.named_parameters()}  # a tied weight counts under its first name
        alias = {n: canon[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
        for tool in ("fxqat", "torchao"):
            done = {alias.get(n, n) for n in row[tool].get("quantized_params", ())}
            row[tool]["params"] = param_cover(weights, done)
        log.info("%s: fxqat %s/%d, torchao %s/%d", name, row["fxqat"]["weight_quantizers"], row["weight_layers"],
                 row["torchao"]["weight_quantizers"], row["weight_layers"])
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------- step times
def _step(model: nn.Module, x, y, loss_fn) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-6)

    def run():
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return run


def _ce(out, y):
    logits = logits_of(out)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def llama_steps(rounds: int) -> Dict[str, Any]:
    """Step-time ratios on the LLM benchmark's char Llama, batch 8×128 (see the module docstring)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerGroup, quantize_
    from torchao.quantization.qat import QATConfig as AOQATConfig

    from fxqat.models.hf import char_llama

    torch.manual_seed(0)
    fp = char_llama()
    x = torch.randint(0, 65, (8, 128), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 65, (8, 128), generator=torch.Generator().manual_seed(2))
    cfg = fxqat.QATConfig.preset("8da4w")
    lp = fxqat.prepare_qat(fp, (x,), cfg)
    br = fxqat.prepare_qat(fp, (x,), cfg.with_(hybrid=fxqat.HybridConfig()))
    fxqat.calibrate(lp, [x])
    fxqat.calibrate(br, [x])
    ao = copy.deepcopy(fp)
    quantize_(ao, AOQATConfig(Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                                    weight_granularity=PerGroup(32)), step="prepare"),
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and not fqn.endswith("lm_head"))
    fp_train = copy.deepcopy(fp).train()
    fp_eval = copy.deepcopy(fp).eval()

    def fp_fwd():
        with torch.no_grad():
            fp_eval(x)

    blocks = fxqat.find_blocks(fp, (x,), cfg.with_(hybrid=fxqat.HybridConfig()))
    layer_params = []
    for b in blocks:
        mods = [fp.get_submodule(n) for n in b.modules] if hasattr(b, "modules") else []
        layer_params.append(sum(m.weight.numel() for m in mods if is_weight_layer(m)))
    total = max(1, sum(layer_params))
    suffix_share = [sum(layer_params[i + 1:]) / total for i in range(len(blocks) - 1)]
    # naive: every path recomputed from the input (quantizers of blocks after i off), fwd+bwd each
    naive_models = []
    for i in range(len(blocks) - 1):
        m = copy.deepcopy(lp).train()
        late = {n for b in blocks[i + 1:] for n in getattr(b, "modules", ())}
        for qname, q in fxqat.named_quantizers(m).items():
            if any(qname == n or qname.startswith(n + ".") for n in late):
                q.enable_fake_quant(False)
        naive_models.append(m)
    naive_steps = [_step(m, x, y, _ce) for m in naive_models]

    def naive():
        for s in naive_steps:
            s()

    steps = {"fp": _step(fp_train, x, y, _ce), "fxqat_lsq": _step(lp.train(), x, y, _ce),
             "torchao_qat": _step(ao.train(), x, y, _ce), "fxqat_br": _step(br.train(), x, y,
                                                                            lambda o, t: hybrid_loss(o, t)[0]),
             "fp_fwd": fp_fwd, "naive_paths": naive}
    med = time_steps(steps, warmup=2, rounds=rounds)
    analytical = med["fxqat_lsq"] + med["fp_fwd"] + sum(suffix_share) * med["fp"]
    naive_total = med["naive_paths"] + med["fxqat_lsq"] + med["fp_fwd"]  # the paths plus the LP backbone and FP
    return {"median_s": med, "blocks": [b.name for b in blocks], "suffix_share": suffix_share,
            "ratio_to_fp": {k: med[k] / med["fp"] for k in ("fxqat_lsq", "torchao_qat", "fxqat_br")},
            "br_over_analytical": med["fxqat_br"] / analytical, "analytical_s": analytical,
            "naive_s": naive_total, "naive_over_br": naive_total / med["fxqat_br"]}


# ----------------------------------------------------------------------------------------------- report
def markdown(payload: Dict[str, Any]) -> str:
    rows, st = payload["rows"], payload["llama"]
    mach = payload["machine"]
    tot = sum(r["weight_layers"] for r in rows)
    fxq = sum(min(r["fxqat"]["weight_quantizers"], r["weight_layers"]) for r in rows)
    ao = sum(min(r["torchao"]["weight_quantizers"], r["weight_layers"]) for r in rows)
    ftr = sum(r["fxqat"]["trained"] for r in rows)
    atr = sum(r["torchao"]["trained"] for r in rows)
    lines = [
        "# Capture coverage: fxqat vs torchao QAT", "",
        f"Machine: {mach['cpu']}, {mach['cores']} cores, torch {mach['torch']}, {mach['torch_threads']} thread(s); "
        f"produced by `{payload['command']}` in {payload['wall_s'] / 60:.1f} min."
        + (f" {payload['note']}" if payload.get("note") else ""), "",
        f"**Trained**: fxqat {ftr}/{len(rows)}, torchao {atr}/{len(rows)}. **Weight layers with a weight "
        f"fake-quantizer**: fxqat {fxq}/{tot}, torchao {ao}/{tot} (weight layers counted by fxqat's registry: "
        "Linear, Conv*, ConvTranspose*, GPT-2 Conv1D; torchao's QAT swaps nn.Linear only).", "",
        "| model | weight layers | fxqat quantized | fxqat trains | fxqat prepare s | graph share | torchao quantized "
        "| torchao trains | torchao prepare s |", "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f, a = r["fxqat"], r["torchao"]
        lines.append(
            f"| {r['model']} | {r['weight_layers']} | {f['weight_quantizers']} | {'yes' if f['trained'] else 'no'} | "
            f"{f.get('prepare_s', float('nan')):.2f} | {100 * f.get('graph_share', 0):.0f}% | "
            f"{a['weight_quantizers']} | {'yes' if a['trained'] else 'no'} | {a.get('prepare_s', float('nan')):.2f} |")
    lines += decoder_share_markdown(rows)
    lines += param_markdown(rows)
    errs = [(r["model"], k, r[k]["error"]) for r in rows for k in ("fxqat", "torchao") if r[k].get("error")]
    if errs:
        lines += ["", "Failures:", ""] + [f"- {m} ({k}): `{e}`" for m, k, e in errs]
    med, rt = st["median_s"], st["ratio_to_fp"]
    lines += [
        "", "## Char Llama (804k parameters, batch 8×128): step time, interleaved medians", "",
        f"FP step {med['fp'] * 1e3:.1f} ms. QAT step / FP step: fxqat 8da4w LSQ **{rt['fxqat_lsq']:.2f}×**, torchao "
        f"8da4w QAT **{rt['torchao_qat']:.2f}×**; block replacement {rt['fxqat_br']:.2f}×.", "",
        f"Block replacement ({len(st['blocks'])} blocks, {len(st['suffix_share'])} paths): {med['fxqat_br'] * 1e3:.1f} ms"
        f" = **{st['br_over_analytical']:.2f}×** its analytical minimum ({st['analytical_s'] * 1e3:.1f} ms: LP fwd+bwd "
        f"+ FP fwd + Σ suffix fwd+bwd) and **{st['naive_over_br']:.2f}×** faster than recomputing every path from "
        f"the input ({st['naive_s'] * 1e3:.1f} ms).", "",
    ]
    return "\n".join(lines) + "\n"


#: issue 24's targets for the graph share of weight layers on the decoder LMs of the zoo (1.0 for these, else 0.9)
SHARE_TARGETS = {"hf:llama": 1.0, "hf:llama_tied": 1.0, "hf:mistral": 1.0, "hf:qwen2": 1.0}
DECODERS = ("hf:llama", "hf:llama_tied", "hf:mistral", "hf:qwen2", "hf:gpt2", "hf:gpt_neox", "hf:opt", "hf:phi3",
            "hf:mixtral", "hf:qwen3_moe", "hf:qwen2_moe")


def decoder_share_markdown(rows: List[Dict[str, Any]]) -> List[str]:
    """The graph share of weight layers on each decoder LM beside its target (every decoder layer's attention and MLP
    and the LM head in graph regions: 100%)."""
    got = [(r["model"], r["fxqat"].get("graph_share", 0.0)) for r in rows if r["model"] in DECODERS]
    if not got:
        return []
    cells = ", ".join(f"{m[3:]} {100 * s:.0f}% ({'met' if s >= SHARE_TARGETS.get(m, 0.9) else 'MISSED'})"
                      for m, s in got)
    return ["", f"**Graph share on the decoder LMs** (target 100% for Llama/Qwen2/Mistral, >= 90% elsewhere): {cells}."]


def _pct(c: Dict[str, Any]) -> str:
    return f"{100 * c['numel_quantized'] / c['numel']:.1f}%" if c["numel"] else "–"


def param_markdown(rows: List[Dict[str, Any]]) -> List[str]:
    """The coverage table over weight parameters (see the module docstring)."""
    tot = {t: {k: sum(r[t]["params"]["all"][k] for r in rows) for k in ("n", "quantized", "numel", "numel_quantized")}
           for t in ("fxqat", "torchao")}
    out = [
        "", "## Coverage over weight parameters", "",
        "Weight parameters: every parameter the FP forward feeds into a matmul-like op as a weight (linear, "
        "matmul/bmm/einsum, grouped expert matmuls, convolutions; embedding lookups not counted), found by "
        "`fxqat.capture.param_quant.record_param_uses`. Share = quantized elements / weight elements. Routers "
        "(MoE gates whose product chooses experts) are FP by fxqat's default (`QATConfig.quantize_router`).", "",
        f"**All models**: fxqat {tot['fxqat']['quantized']}/{tot['fxqat']['n']} weight parameters "
        f"({_pct(tot['fxqat'])} of weight elements), torchao {tot['torchao']['quantized']}/{tot['torchao']['n']} "
        f"({_pct(tot['torchao'])}).", "",
        "| model | weight params | elements | fxqat params | fxqat elements | torchao params | torchao elements | "
        "MoE expert tensors (fxqat / torchao) | routers (fxqat / torchao) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f, a = r["fxqat"]["params"], r["torchao"]["params"]
        ex = (f"{f['experts']['quantized']}/{f['experts']['n']} / {a['experts']['quantized']}/{a['experts']['n']}"
              if f["experts"]["n"] else "–")
        ro = (f"{f['routers']['quantized']}/{f['routers']['n']} / {a['routers']['quantized']}/{a['routers']['n']}"
              if f["routers"]["n"] else "–")
        out.append(f"| {r['model']} | {f['all']['n']} | {f['all']['numel']} | {f['all']['quantized']} | "
                   f"{_pct(f['all'])} | {a['all']['quantized']} | {_pct(a['all'])} | {ex} | {ro} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", default="", help="a sentence for the report (e.g. other jobs running alongside)")
    ap.add_argument("--markdown", action="store_true", help="rewrite coverage.md from coverage.json, run nothing")
    args = ap.parse_args(argv)
    if args.markdown:
        payload = read_results("coverage")
        write_results("coverage", payload, markdown(payload))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("fxqat").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = coverage(args.quick)
    llama = llama_steps(3 if args.quick else args.rounds)
    payload = {"machine": machine(), "command": "python benchmarks/coverage.py" + (" --quick" if args.quick else ""),
               "rows": rows, "llama": llama, "wall_s": time.perf_counter() - t0, "note": args.note}
    md = markdown(payload)
    if args.quick:
        print(md)
    else:
        write_results("coverage", payload, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
