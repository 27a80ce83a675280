"""Cost of block replacement: the generated hybrid graph vs plain QAT, the analytical minimum and a naive wrapper.

For each model (ResNet-20 at batch 128 / 32 px, torchvision resnet18 at batch 32 / 112 px by default), in one run:

* ``fp``: the FP training step; ``qat``: plain LSQ W2A2 QAT step;
* ``hybrid_all``: block replacement with every path; ``hybrid_k2``: 2 sampled paths per step;
* ``naive_all``: a wrapper that, for each path, recomputes the LP prefix from the input and then runs the FP suffix
  (what a hand-written two-model wrapper does without sharing the prefix);
* ``analytical_min``: LP fwd+bwd (= the plain QAT step) + FP partner fwd (no grad) + Σ_i FP suffix_i fwd+bwd,
  each term measured on its own in the same run.

Peak memory (growth of the max RSS of a fresh process over its size before 3 steps of one variant) is measured in subprocesses.
Run: ``python benchmarks/hybrid_cost.py [--quick]``; writes ``benchmarks/results/hybrid_cost.{json,md}``.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import machine, time_steps, write_results  # noqa: E402

import fxqat  # noqa: E402
from fxqat.graph.subgraph import extract, view  # noqa: E402
from fxqat.models import get_model  # noqa: E402

log = logging.getLogger("hybrid_cost")
VARIANTS = ("fp", "qat", "hybrid_all", "hybrid_k2", "naive_all")


def _case(name, quick):
    torch.manual_seed(0)
    if name == "resnet20":
        b = 16 if quick else 128
        return get_model("resnet20", 10), torch.randn(b, 3, 32, 32), torch.randint(0, 10, (b,))
    b, hw = (4, 64) if quick else (32, 112)
    return torchvision.models.resnet18(num_classes=10), torch.randn(b, 3, hw, hw), torch.randint(0, 10, (b,))


def _cfg(paths="all"):
    hybrid = None if paths is None else fxqat.HybridConfig(paths=paths)
    return fxqat.QATConfig(w_bits=2, a_bits=2, hybrid=hybrid)


def _train_step(model, x, y, loss_fn):
    opt = torch.optim.SGD(list(fxqat.trainable_parameters(model)), lr=1e-3, momentum=0.9)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def _hybrid_loss(out, y):
    return fxqat.hybrid_loss(out, y)[0]


def _naive_step(hm, x, y):
    """Per path: recompute the LP prefix from x, then the FP suffix (no sharing of the prefix)."""
    lp_graph = hm.graph
    cuts = sorted((n.meta["fxqat.cut"], n.name) for n in lp_graph.nodes if "fxqat.cut" in n.meta)
    prefixes = [view(hm, extract(lp_graph, None, [name]), f"Prefix{i}") for i, name in cuts]
    suffixes = [hm._views[f"fp_suffix{i}"] for i, _ in cuts]
    opt = torch.optim.SGD(list(fxqat.trainable_parameters(hm)), lr=1e-3, momentum=0.9)
    hm.train()

    def step():
        opt.zero_grad(set_to_none=True)
        lp = hm._views["lp_cuts"](x)[0]
        with torch.no_grad():
            fp = hm._views["fp"](x)
        paths = [suf(pre(x)) for pre, suf in zip(prefixes, suffixes)]
        out = fxqat.HybridOutput(lp, paths, fp, tuple(range(len(paths))), hm.fxqat_hybrid)
        fxqat.hybrid_loss(out, y)[0].backward()
        opt.step()

    return step


def _components(hm, x, y):
    """Timed pieces of the analytical minimum: FP fwd (no grad) and each FP suffix fwd+bwd."""
    hm.train()
    with torch.no_grad():
        cuts = hm._views["lp_cuts"](x)[1:]
    pieces = {"fp_fwd": lambda: _no_grad(hm._views["fp"], x)}
    for i, h in enumerate(cuts):
        suf = hm._views[f"fp_suffix{i}"]
        h = h.detach()

        def run(suf=suf, h=h):
            hi = h.clone().requires_grad_()
            F.cross_entropy(suf(hi), y).backward()

        pieces[f"suffix{i}"] = run
    return pieces


def _no_grad(fn, x):
    with torch.no_grad():
        fn(x)


def build_steps(name, quick):
    model, x, y = _case(name, quick)
    steps = {"fp": _train_step(model, x, y, F.cross_entropy)}
    steps["qat"] = _train_step(fxqat.prepare_qat(model, (x,), _cfg(None)), x, y, F.cross_entropy)
    hm = fxqat.prepare_qat(model, (x,), _cfg("all"))
    steps["hybrid_all"] = _train_step(hm, x, y, _hybrid_loss)
    steps["hybrid_k2"] = _train_step(fxqat.prepare_qat(model, (x,), _cfg(2)), x, y, _hybrid_loss)
    steps["naive_all"] = _naive_step(fxqat.prepare_qat(model, (x,), _cfg("all")), x, y)
    return steps, _components(fxqat.prepare_qat(model, (x,), _cfg("all")), x, y)


def peak_rss(name, variant, quick):
    """Peak RSS growth (MiB) of a fresh process while it runs 3 steps of one variant (after building the models)."""
    code = (
        "import sys, os, resource; sys.path.insert(0, 'benchmarks'); import hybrid_cost as h; "
        f"s, _ = h.build_steps({name!r}, {quick}); f = s[{variant!r}]; "
        "base = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20; "
        "[f() for _ in range(3)]; "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--models", default="resnet20,resnet18")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    rounds = 2 if args.quick else args.rounds
    results = {}
    for name in args.models.split(","):
        log.info("timing %s ...", name)
        steps, pieces = build_steps(name, args.quick)
        t = time_steps({**steps, **pieces}, warmup=2, rounds=rounds)
        minimum = t["qat"] + t["fp_fwd"] + sum(v for k, v in t.items() if k.startswith("suffix"))
        res = {k: {"seconds": t[k], "ratio_to_fp": t[k] / t["fp"], "ratio_to_min": t[k] / minimum} for k in steps}
        res["analytical_min"] = {"seconds": minimum, "ratio_to_fp": minimum / t["fp"], "ratio_to_min": 1.0}
        res["speedup_vs_naive"] = t["naive_all"] / t["hybrid_all"]
        if not args.no_memory:
            for k in VARIANTS:
                res[k]["peak_rss_mib"] = peak_rss(name, k, args.quick)
        results[name] = res
    payload = {"machine": machine(), "results": results, "quick": args.quick,
               "note": "median of interleaved rounds in one process; peak RSS from one fresh process per variant"}
    lines = ["# Block replacement cost (CPU)", "", f"Machine: {payload['machine']['cpu']}, "
             f"{payload['machine']['cores']} cores, torch {payload['machine']['torch']}."
             + (" Quick (smoke) sizes." if args.quick else ""), "",
             "| model | variant | s/step | / FP step | / analytical min | peak RSS growth MiB |", "|---|---|---|---|---|---|"]
    for name, res in results.items():
        for k, v in res.items():
            if isinstance(v, dict):
                lines.append(f"| {name} | {k} | {v['seconds']:.3f} | {v['ratio_to_fp']:.2f}x | "
                             f"{v['ratio_to_min']:.2f}x | " + (f"{v['peak_rss_mib']:.0f}" if "peak_rss_mib" in v else "–") + " |")
        lines.append(f"| {name} | hybrid_all speed-up over naive_all | | | {res['speedup_vs_naive']:.2f}x | |")
    md = "\n".join(lines) + "\n"
    write_results("hybrid_cost" + ("_quick" if args.quick else ""), payload, md)
    print(md)


if __name__ == "__main__":
    main()
