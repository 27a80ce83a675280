"""Training-step time of QAT variants relative to the FP step, measured in one run (issue #2).

Variants (each a full SGD step: forward, loss, backward, optimizer step):

* ``fp``: the float model;
* ``fxqat_lsq``: fxqat LSQ W4A4 (default ``impl="function"``, eager);
* ``fxqat_lsq_fused``: fxqat LSQ W4A4 with torch's fused learnable fake-quant kernels (eager);
* ``torch_ao``: torch.ao ``prepare_qat_fx`` with its default QAT qconfig (8-bit, observers + fake-quant);
* ``fp_compiled`` / ``fxqat_lsq_compiled``: the same under ``torch.compile`` (``--no-compile`` skips them);
* ``brevitas``: ``brevitas.graph.quantize`` with ``--brevitas`` (needs Brevitas; see ``_brevitas``).

Run: ``python benchmarks/step_time.py [--quick] [--no-compile] [--models resnet20] [--out STEM]``; writes
``benchmarks/results/step_time.{json,md}`` (or ``STEM``). ``--methods`` times one row per quantizer method instead
(``step_time_methods``), ``--methods --compile-methods`` the same under ``torch.compile``
(``step_time_methods_compiled``). ``--llm`` times the LLM benchmark's character-level Llama (random weights: step
time does not depend on them; batch 32 x 128 tokens, AdamW): per-group-32 int4 weight-only and 8da4w QAT, fxqat
(LSQ) beside torchao's QAT (``quantize_(QATConfig(base, step="prepare"))``), eager and compiled, each relative to
the FP step of the same mode (``step_time_llm``).
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
import warnings

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import (  # noqa: E402 (the LLM benchmark's preparation of both arms)
    fxqat_prepare,
    machine,
    time_steps,
    torchao_qat_prepare,
    write_results,
)

import fxqat  # noqa: E402
from fxqat.method_registry import get_method  # noqa: E402
from fxqat.models import get_model  # noqa: E402
from fxqat.models.hf import char_llama  # noqa: E402
from fxqat.training.lm import lm_loss  # noqa: E402

log = logging.getLogger("step_time")


def _step_fn(model, x, y, compiled=False):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    fwd = torch.compile(model) if compiled else model

    def step():
        opt.zero_grad(set_to_none=True)
        out = fwd(x)
        F.cross_entropy(out, y).backward()
        opt.step()

    return step


def _torch_ao(model, x):
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping("x86"), (x,))


def _brevitas(model, x):
    """Brevitas' graph-mode quantization (opt-in with --brevitas: on this machine brevitas 0.13.4's
    ``quantize`` on a traced ResNet-20 did not finish within 10 minutes, so it is not part of the default run)."""
    try:
        from brevitas.graph.quantize import quantize
    except Exception:  # noqa: BLE001 - not installed or incompatible
        log.warning("brevitas is not installed: pip install brevitas")
        return None
    try:
        return quantize(torch.fx.symbolic_trace(copy.deepcopy(model).eval())).train()
    except Exception as exc:  # noqa: BLE001
        log.warning("brevitas.graph.quantize failed: %s", exc)
        return None


def bench_methods(model, x, y, rounds, compiled=False):
    """One row per quantizer method (W4A4): QAT step / FP step, and relative to LSQ's (issue #4); ``compiled``: every
    variant (FP included) under ``torch.compile``, quantizers initialised eagerly first."""
    # every method that quantizes per-tensor weights and activations ('grad' is for gradients, 'dynamic' per token)
    methods = [m for m in fxqat.available_methods()
               if "per_tensor" in getattr(get_method(m), "granularities", ("per_tensor",)) and m != "grad"]
    steps = {"fp": _step_fn(copy.deepcopy(model), x, y, compiled=compiled)}
    for m in methods:
        qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(w_bits=4, a_bits=4, method=m))
        if compiled:
            with torch.no_grad():
                qm.train()(x)
        steps[m] = _step_fn(qm, x, y, compiled=compiled)
    t = time_steps(steps, warmup=2, rounds=rounds)
    over = t["lsq"] - t["fp"]
    return {k: {"seconds": v, "ratio_to_fp": v / t["fp"], "ratio_to_lsq": v / t["lsq"],
                "overhead_ratio_to_lsq": (v - t["fp"]) / over if over > 0 else float("nan")} for k, v in t.items()}


def bench_llm(rounds: int, batch: int = 32, context: int = 128, settings=("int4", "8da4w"), device: str = "cpu"):
    """Step time of FP, torchao QAT and fxqat LSQ on the tiny Llama, eager and compiled, per setting."""
    torch.manual_seed(0)
    fp = char_llama()
    x = torch.randint(0, 65, (batch, context))
    y = torch.randint(0, 65, (batch, context))
    fp, x, y = fp.to(device), x.to(device), y.to(device)
    out = {}
    for setting in settings:
        models = {"fp": copy.deepcopy(fp), "torchao_qat": torchao_qat_prepare(fp, setting),
                  "fxqat_lsq": fxqat_prepare(fp, setting, x, hybrid=False)}
        steps = {}
        for name, m in models.items():
            m.train()
            for compiled in (False, True):
                opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-6)
                fwd = torch.compile(m) if compiled else m

                def step(fwd=fwd, opt=opt):
                    loss = lm_loss(fwd, x, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

                steps[name + ("_compiled" if compiled else "")] = step
        t = time_steps(steps, warmup=3, rounds=rounds)
        out[setting] = {k: {"seconds": v, "ratio_to_fp": v / t["fp_compiled" if k.endswith("_compiled") else "fp"]}
                        for k, v in t.items()}
        log.info("llm %s: %s", setting, {k: round(v["ratio_to_fp"], 3) for k, v in out[setting].items()})
    return out


def llm_markdown(res, rounds: int, threads: int, batch: int, context: int) -> str:
    m = machine()
    lines = ["# Training-step time on the tiny Llama (LLM benchmark model): QAT / FP step, eager and compiled", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {threads} thread(s); batch {batch} x {context} "
             f"tokens, AdamW; median of {rounds} interleaved rounds; compiled rows relative to the compiled FP step.",
             "", "| setting | variant | eager s/step | eager / FP | compiled s/step | compiled / FP |",
             "|---|---|---|---|---|---|"]
    for setting, r in res.items():
        for k in ("fp", "torchao_qat", "fxqat_lsq"):
            e, c = r[k], r[k + "_compiled"]
            lines.append(f"| {setting} | {k} | {e['seconds']:.3f} | {e['ratio_to_fp']:.2f}x | {c['seconds']:.3f} | "
                         f"{c['ratio_to_fp']:.2f}x |")
    return "\n".join(lines) + "\n"


def bench_model(name, model, x, y, compile_=True, rounds=10, brevitas=False):
    cfg = fxqat.QATConfig(w_bits=4, a_bits=4)
    cfg_fused = cfg.with_(w_options={"impl": "fused"}, a_options={"impl": "fused"})
    variants = {"fp": model}
    variants["fxqat_lsq"] = fxqat.prepare_qat(model, (x,), cfg)
    variants["fxqat_lsq_fused"] = fxqat.prepare_qat(model, (x,), cfg_fused)
    variants["torch_ao"] = _torch_ao(model, x)
    brev = _brevitas(model, x) if brevitas else None
    if brev is not None:
        variants["brevitas"] = brev
    steps = {k: _step_fn(copy.deepcopy(m) if k == "fp" else m, x, y) for k, m in variants.items()}
    if compile_:
        steps["fp_compiled"] = _step_fn(copy.deepcopy(model), x, y, compiled=True)
        cq = fxqat.prepare_qat(model, (x,), cfg)
        with torch.no_grad():
            cq.train()(x)  # quantizers initialise on their first tensor: do it eagerly, outside the compiled graph
        steps["fxqat_lsq_compiled"] = _step_fn(cq, x, y, compiled=True)
    t = time_steps(steps, warmup=3, rounds=rounds)
    res = {k: {"seconds": v} for k, v in t.items()}
    for k, v in res.items():
        base = t["fp_compiled"] if k.endswith("compiled") else t["fp"]
        v["ratio_to_fp"] = v["seconds"] / base
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small batches and few rounds (smoke run)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--methods", action="store_true", help="only the per-method table on ResNet-20 (step_time_methods)")
    ap.add_argument("--compile-methods", action="store_true", help="with --methods: every variant under torch.compile")
    ap.add_argument("--llm", action="store_true", help="only the tiny-Llama int4 / 8da4w table (step_time_llm)")
    ap.add_argument("--brevitas", action="store_true", help="also time brevitas.graph.quantize (needs brevitas)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--device", default="cpu", help="with --llm: where the models run (e.g. cuda)")
    ap.add_argument("--models", default="resnet20,resnet18", help="comma-separated subset of resnet20,resnet18")
    ap.add_argument("--out", default=None, help="result file stem (default step_time, step_time_quick with --quick)")
    ap.add_argument("--no-prepare-time", action="store_true", help="skip the prepare_qat wall-time rows")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b20, b18, hw18 = (16, 4, 64) if args.quick else (128, 32, 112)
    rounds = 3 if args.quick else args.rounds
    if args.llm:
        shape = (8, 32) if args.quick else (32, 128)
        res = bench_llm(rounds, *shape, device=args.device)
        md = llm_markdown(res, rounds, args.threads, *shape)
        write_results(args.out or ("step_time_llm" + ("_quick" if args.quick else "")),
                      {"machine": machine(), "results": res}, md)
        print(md)
        return
    if args.methods:
        res = bench_methods(get_model("resnet20", 10), torch.randn(b20, 3, 32, 32), torch.randint(0, 10, (b20,)), rounds,
                            compiled=args.compile_methods)
        mode = "torch.compile (each variant relative to the compiled FP step)" if args.compile_methods else "eager"
        md = "\n".join([f"# Step time per quantizer method: ResNet-20, batch {b20}, W4A4, {mode}, CPU", "",
                        f"Machine: {machine()['cpu']}, {machine()['cores']} cores, torch {machine()['torch']}, "
                        f"{args.threads} thread(s); median of {rounds} interleaved rounds.", "",
                        "| method | s/step | / FP step | / LSQ step | overhead (step − FP) / LSQ's |",
                        "|---|---|---|---|---|"]
                       + [f"| {k} | {v['seconds']:.3f} | {v['ratio_to_fp']:.2f}x | {v['ratio_to_lsq']:.2f}x | "
                          f"{v['overhead_ratio_to_lsq']:.2f}x |" for k, v in sorted(res.items(), key=lambda kv: kv[1]['seconds'])]
                       ) + "\n"
        stem = args.out or ("step_time_methods" + ("_compiled" if args.compile_methods else ""))
        write_results(stem, {"machine": machine(), "batch": b20, "compiled": args.compile_methods, "results": res}, md)
        print(md)
        return
    cases = {
        "resnet20_b%d_32px" % b20: (get_model("resnet20", 10), torch.randn(b20, 3, 32, 32), torch.randint(0, 10, (b20,))),
        "resnet18_b%d_%dpx" % (b18, hw18): (torchvision.models.resnet18(num_classes=10),
                                           torch.randn(b18, 3, hw18, hw18), torch.randint(0, 10, (b18,))),
    }
    wanted = set(args.models.split(","))
    cases = {k: v for k, v in cases.items() if k.split("_")[0] in wanted}
    results = {}
    for name, (model, x, y) in cases.items():
        log.info("timing %s ...", name)
        results[name] = bench_model(name, model, x, y, compile_=not args.no_compile, rounds=rounds,
                                    brevitas=args.brevitas)
    prep = {}
    for name, kw, hw in () if args.no_prepare_time else (("resnet50", {}, 224), ("vit_b_16", {}, 224)):
        m = getattr(torchvision.models, name)(**kw)
        x = torch.randn(1, 3, hw, hw)
        t0 = time.perf_counter()
        fxqat.prepare_qat(m, (x,))
        prep[name] = time.perf_counter() - t0
    payload = {"machine": machine(), "step_time": results, "prepare_qat_seconds": prep,
               "note": "median of interleaved rounds; ratios are QAT step / FP step of the same run "
                       "(compiled variants relative to the compiled FP step)"}
    lines = ["# Training-step time: QAT / FP (CPU)", "", f"Machine: {payload['machine']['cpu']}, "
             f"{payload['machine']['cores']} cores, torch {payload['machine']['torch']}.", "",
             "| model | variant | s/step | ratio to FP |", "|---|---|---|---|"]
    for name, res in results.items():
        for k, v in res.items():
            lines.append(f"| {name} | {k} | {v['seconds']:.3f} | {v['ratio_to_fp']:.2f}x |")
    lines += ["", "| model | prepare_qat wall time (s) |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in prep.items()]
    md = "\n".join(lines) + "\n"
    write_results(args.out or ("step_time" + ("_quick" if args.quick else "")), payload, md)
    print(md)


if __name__ == "__main__":
    main()
