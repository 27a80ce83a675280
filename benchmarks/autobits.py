"""Mixed-precision benchmark (issue #17): ResNet-20 on CIFAR-10 at an average of 3 and 2.5 bits per weight.

Arms, each trained with the same QAT budget (steps, batches, seeds) from the same FP checkpoint:

* ``uniform``: every allocatable layer at the largest uniform bit-width within the budget (3 bits; 2 bits for 2.5,
  which then uses less memory than the others);
* ``paths``: bits per block from the path sensitivity of block replacement (``fxqat.sensitivity(method="paths")``);
* ``fisher``: from the squared-gradient (empirical Fisher) estimate;
* ``hessian``: from the HAWQ-v2 Hutchinson trace estimate;

all allocated by ``fxqat.allocate_bits`` (exact knapsack) among 2, 3, 4 and 8 bits, weights and the input activation
of each layer at its block's bits; the first conv and the classifier stay at 8 bits (the first/last policy) and are
outside the budget. Each estimate's cost is reported in CPU seconds and in training-step equivalents (its CPU time over
the CPU time of one W3A3 LSQ training step measured in the same run); CPU time, because the machine is shared.

Profiles (``--profile``): ``smoke`` (seconds, checks the script), ``short`` (the committed run: about 25 CPU-minutes on
one thread), ``cpu`` (FP 30 epochs, QAT one epoch per arm).

Data: the JPEG-compressed CIFAR-10 of ``../shared/data`` (methods compare with each other, not with published
numbers). Writes ``benchmarks/results/autobits.{json,md,png}`` for the short profile, ``autobits_<profile>.*`` for
the others (mean ± half-range over seeds).

Run: ``OMP_NUM_THREADS=1 python benchmarks/autobits.py --profile short``
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import (  # noqa: E402
    AUTOBITS_ARMS,
    allocation_rows,
    arm_rows,
    cost_rows,
    machine,
    uniform_config,
    write_results,
)

import fxqat  # noqa: E402
from fxqat import data as fdata  # noqa: E402
from fxqat.models import get_model  # noqa: E402
from fxqat.training.loop import TrainConfig  # noqa: E402
from fxqat.training.recipes import train_fp, train_qat  # noqa: E402
from fxqat.training.step import TrainStep  # noqa: E402

log = logging.getLogger("autobits")
ARMS = AUTOBITS_ARMS
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass(frozen=True)
class Profile:
    fp_steps: int                    # FP pre-training steps (cached by fxqat.training.recipes.train_fp)
    qat_steps: int                   # QAT steps of every arm
    budgets: Tuple[float, ...]       # average bits per allocated weight
    seeds: Tuple[int, ...]           # QAT seeds (the FP checkpoint and the sensitivity batches are shared)
    sens_batches: int = 4            # training batches every estimate averages over
    probes: int = 1                  # Hutchinson probes per block and batch
    choices: Tuple[int, ...] = (2, 3, 4, 8)
    fp_lr: float = 0.1
    qat_lr: float = 0.01
    batch_size: int = 128
    test_subset: int = 10000


PROFILES = {
    "smoke": Profile(fp_steps=20, qat_steps=3, budgets=(3.0, 2.5), seeds=(0,), sens_batches=1, test_subset=256),
    "short": Profile(fp_steps=600, qat_steps=70, budgets=(3.0, 2.5), seeds=(0, 1), test_subset=3000),
    "cpu": Profile(fp_steps=390 * 30, qat_steps=390, budgets=(3.0, 2.5), seeds=(0, 1), sens_batches=16, probes=2),
}


def _cpu_step_time(model, x, y, cfg: fxqat.QATConfig, rounds: int = 5) -> float:
    """Median CPU seconds of one QAT training step (the unit of an estimate's cost)."""
    qm = fxqat.prepare_qat(copy.deepcopy(model), (x[:2],), cfg).train()
    run = TrainStep(torch.optim.SGD(fxqat.trainable_parameters(qm), lr=1e-3, momentum=0.9))
    times = []
    for i in range(rounds + 2):
        t = time.process_time()
        run(i + 1, lambda: (F.cross_entropy(qm(x), y), None))
        if i >= 2:
            times.append(time.process_time() - t)
    return statistics.median(times)


def _estimates(fp, tr, prof: Profile, base: fxqat.QATConfig, step_s: float) -> Dict[str, Dict]:
    loader = fdata.BatchLoader(tr, prof.batch_size, train=True, seed=7919, rank=0, world_size=1)
    batches = [b for _, b in zip(range(prof.sens_batches), loader)]
    x0 = batches[0][0][:2]
    out = {}
    for method in ARMS[1:]:
        probe = fxqat.prepare_qat(copy.deepcopy(fp), (x0,), base.with_(hybrid=fxqat.HybridConfig()))
        c0, w0 = time.process_time(), time.perf_counter()
        table = fxqat.sensitivity(probe, batches, bits=prof.choices, method=method, probes=prof.probes)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        out[method] = {"table": table, "cpu_s": cpu, "wall_s": wall, "step_equiv": cpu / step_s}
        log.info("%s sensitivity: %.1f CPU s = %.1f training steps", method, cpu, cpu / step_s)
    return out


def _summary(prof, name, runs, fp_top1, source, est, allocs, step_s, t0) -> Dict:
    table: Dict[str, Dict[str, Dict]] = {}
    for budget in prof.budgets:
        for arm in ARMS:
            vals = [r["top1"] for r in runs if r["budget"] == budget and r["arm"] == arm]
            if vals:
                table.setdefault(str(budget), {})[arm] = {
                    "mean": statistics.mean(vals), "spread": (max(vals) - min(vals)) / 2, "n": len(vals),
                    "avg_bits": allocs[(budget, arm)]["avg_bits"]}
    cost = {m: {k: v for k, v in e.items() if k != "table"} for m, e in est.items()}
    return {"profile": name, "settings": asdict(prof), "machine": machine(), "data": source, "fp_top1": fp_top1,
            "qat_step_cpu_s": step_s, "estimate_cost": cost,
            "sensitivity": {m: e["table"].to_dict() for m, e in est.items()},
            "allocations": {f"{b}/{a}": v for (b, a), v in allocs.items()}, "runs": runs, "table": table,
            "total_cpu_s": time.process_time(), "total_wall_s": time.perf_counter() - t0,
            "complete": len(runs) == len(prof.budgets) * len(prof.seeds) * len(ARMS)}


def run(prof: Profile, name: str) -> Dict:
    t0 = time.perf_counter()
    tr = fdata.cifar10(train=True)
    te = fdata.cifar10(train=False).subset(prof.test_subset)
    test = fdata.BatchLoader(te, 500, train=False, rank=0, world_size=1)
    torch.manual_seed(0)
    fp = get_model("resnet20", 10)
    fp_cfg = TrainConfig(steps=prof.fp_steps, lr=prof.fp_lr, seed=0, plot=False,
                         warmup_steps=min(100, prof.fp_steps // 4))
    key = {"model": "resnet20", "data": "cifar10", "batch_size": prof.batch_size, "source": tr.source,
           "n_test": len(te)}
    loader = fdata.BatchLoader(tr, prof.batch_size, train=True, seed=0, rank=0, world_size=1)
    fp, fp_info = train_fp(fp, loader, fp_cfg, key=key, test_loader=test, desc="FP")
    log.info("FP top-1 %.2f%% (%s)", fp_info["top1"], "cached" if fp_info["cached"] else "trained")
    base = fxqat.QATConfig(w_bits=4, a_bits=4, method="lsq")
    x, y = next(iter(loader))
    step_s = _cpu_step_time(fp, x, y, base.with_(w_bits=3, a_bits=3))
    est = _estimates(fp, tr, prof, base, step_s)
    allocs: Dict[Tuple[float, str], Dict] = {}
    configs: Dict[Tuple[float, str], fxqat.QATConfig] = {}
    for budget in prof.budgets:
        configs[(budget, "uniform")], allocs[(budget, "uniform")] = uniform_config(est["paths"]["table"], budget,
                                                                                    base, prof.choices)
        for method in ARMS[1:]:
            cfg, alloc = fxqat.allocate_bits(est[method]["table"], avg_bits=budget, choices=prof.choices,
                                             base_config=base)
            configs[(budget, method)] = cfg
            allocs[(budget, method)] = {"bits": dict(alloc.bits), "avg_bits": alloc.avg_bits,
                                        "used_bits": alloc.used_bits, "predicted_loss": alloc.predicted_loss}
    runs: List[Dict] = []
    x0 = x[:2]
    for budget in prof.budgets:
        for seed in prof.seeds:
            qcfg = TrainConfig(steps=prof.qat_steps, lr=prof.qat_lr, seed=seed, plot=False)
            for arm in ARMS:
                loader = fdata.BatchLoader(tr, prof.batch_size, train=True, seed=seed, rank=0, world_size=1)
                qm = fxqat.prepare_qat(copy.deepcopy(fp), (x0,), configs[(budget, arm)])
                c0, w0 = time.process_time(), time.perf_counter()
                hist = train_qat(qm, loader, qcfg, test_loader=test, desc=f"{arm} {budget} bits s{seed}")
                runs.append({"arm": arm, "budget": budget, "seed": seed, "top1": hist["final"]["test_top1"],
                             "avg_bits": allocs[(budget, arm)]["avg_bits"], "cpu_s": time.process_time() - c0,
                             "wall_s": time.perf_counter() - w0})
                log.info("%s at %.1f bits, seed %d: top-1 %.2f%%", arm, budget, seed, runs[-1]["top1"])
            res = _summary(prof, name, runs, fp_info["top1"], tr.source, est, allocs, step_s, t0)
            write_results(stem(name), res, markdown(res))  # partial results survive an interrupted run
    res = _summary(prof, name, runs, fp_info["top1"], tr.source, est, allocs, step_s, t0)
    pareto(res, os.path.join(RESULTS, f"{stem(name)}.png"))
    return res


def stem(profile: str) -> str:
    """Result file name: ``autobits`` for the committed short profile, ``autobits_<profile>`` otherwise."""
    return "autobits" if profile == "short" else f"autobits_{profile}"


def markdown(res: Dict) -> str:
    s = res["settings"]
    lines = [f"# Mixed precision on CIFAR-10 ResNet-20: uniform vs path / Fisher / Hessian sensitivity "
             f"({res['profile']} profile)", "",
             f"Data: {res['data']} (JPEG-compressed CIFAR-10; {s['test_subset']} test images). Machine: "
             f"{res['machine']['cpu']}, {res['machine']['cores']} cores (shared), torch {res['machine']['torch']}, "
             f"{res['machine']['torch_threads']} thread.",
             f"FP ResNet-20 after {s['fp_steps']} steps: **{res['fp_top1']:.2f}%**. Every arm: {s['qat_steps']} LSQ QAT "
             f"steps from that checkpoint, batch {s['batch_size']}, lr {s['qat_lr']} (cosine), seeds {list(s['seeds'])} "
             f"(same batches per seed). Bits per block among {list(s['choices'])} for the weights and the input "
             "activation of each layer; first conv and classifier at 8 bits, outside the budget. Sensitivities from "
             f"{s['sens_batches']} training batches of {s['batch_size']}"
             f" ({s['probes']} Hutchinson probe(s) per block and batch).", ""]
    lines += arm_rows(res["table"], 2)
    lines += ["", "Top-1 %, mean ± half-range over seeds; in brackets the average bits per allocated weight the arm "
              "used (uniform at a 2.5-bit budget: 2 bits everywhere).", "",
              "## Cost of each estimate", "",
              f"One W3A3 LSQ training step (batch {s['batch_size']}): {res['qat_step_cpu_s']:.2f} CPU s.", ""]
    lines += cost_rows(res["estimate_cost"], "training-step")
    lines += ["", "## Allocations (bits per block)", ""] + allocation_rows(res)
    lines += ["", f"Total: {res['total_cpu_s'] / 60:.0f} CPU min, {res['total_wall_s'] / 60:.0f} min wall (shared machine)."
              + ("" if res.get("complete") else " **Incomplete run**: only the rows above finished.")]
    return "\n".join(lines) + "\n"


def pareto(res: Dict, path: str) -> str:
    """Top-1 against average bits per weight, one series per arm (mean and half-range over seeds)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, arm in enumerate(ARMS):
        pts = sorted((v[arm]["avg_bits"], v[arm]["mean"], v[arm]["spread"]) for v in res["table"].values() if arm in v)
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="os^v"[k],
                        capsize=3, label=arm, color=f"C{k}", lw=1)
    ax.axhline(res["fp_top1"], ls="--", color="grey", lw=0.8)
    ax.text(ax.get_xlim()[0], res["fp_top1"], " FP", va="bottom", color="grey", fontsize=8)
    ax.set_xlabel("average bits per allocated weight")
    ax.set_ylabel("CIFAR-10 top-1 (%)")
    ax.set_title(f"ResNet-20 mixed precision, {res['settings']['qat_steps']} QAT steps ({res['profile']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="short")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for ResNet-20 on CPU)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if not fdata.data_available("cifar10"):
        sys.exit("CIFAR-10 not found: put cifar10_jpeg.npz in ../shared/data or set FXQAT_DATA (see fxqat.data).")
    res = run(PROFILES[args.profile], args.profile)
    md = markdown(res)
    write_results(stem(args.profile), res, md)
    print(md)


if __name__ == "__main__":
    main()
