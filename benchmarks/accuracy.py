"""CIFAR-10 reproduction benchmark: plain LSQ vs LSQ + distillation vs LSQ + block replacement (issue #7).

Three arms on the same FP checkpoint, seeds, batches and number of steps, at W4A4, W3A3 and W2A2:

* ``lsq``: plain QAT (cross-entropy);
* ``lsq_kd``: cross-entropy + KD from the FP model's logits alone (HybridConfig()'s kd_weight and temperature):
  the gain of distillation without the mixed-precision paths;
* ``lsq_br``: block replacement, ``HybridConfig()`` (all paths, frozen partner).

Profiles (``--profile``):

* ``smoke``: a few steps, to check the script runs;
* ``short``: what fits in about an hour on 2 shared CPU cores (the run committed from the development machine);
* ``cpu``: the "few hours on 2 cores" budget (FP 30 epochs, 3 epochs of QAT per arm);
* ``gpu``: the papers' schedule (FP 200 epochs, QAT 90 epochs per arm) for a machine with a GPU.

Data: the JPEG-compressed CIFAR-10 of ``../shared/data`` (accuracies compare methods with each other, not with
published CIFAR-10 numbers). Writes ``benchmarks/results/accuracy_<profile>.{json,md}`` (mean ± spread over seeds).

Run: ``python benchmarks/accuracy.py --profile short``
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Tuple

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import machine, write_results  # noqa: E402

import fxqat  # noqa: E402
from fxqat import data as fdata  # noqa: E402
from fxqat.models import get_model  # noqa: E402
from fxqat.training.loop import TrainConfig  # noqa: E402
from fxqat.training.recipes import train_fp, train_qat  # noqa: E402

log = logging.getLogger("accuracy")


@dataclass(frozen=True)
class Profile:
    fp_steps: int              # FP pre-training steps (cached by fxqat.training.recipes.train_fp)
    fp_lr: float               # FP SGD lr (cosine to 0)
    qat_steps: int             # steps of every QAT arm
    qat_lr: float              # QAT SGD lr (cosine to 0), weights and quantizer step sizes
    bits: Tuple[int, ...]      # W=A bit-widths
    seeds: Tuple[int, ...]     # QAT seeds (the FP checkpoint is shared)
    batch_size: int = 128
    test_subset: int = 10000   # test images evaluated
    device: str = "cpu"


PROFILES = {
    "smoke": Profile(fp_steps=20, fp_lr=0.1, qat_steps=3, qat_lr=0.01, bits=(2,), seeds=(0,), test_subset=500),
    "short": Profile(fp_steps=1200, fp_lr=0.1, qat_steps=120, qat_lr=0.01, bits=(4, 3, 2), seeds=(0, 1),
                     test_subset=5000),
    "cpu": Profile(fp_steps=390 * 30, fp_lr=0.1, qat_steps=390 * 3, qat_lr=0.01, bits=(4, 3, 2), seeds=(0, 1)),
    "gpu": Profile(fp_steps=390 * 200, fp_lr=0.1, qat_steps=390 * 90, qat_lr=0.01, bits=(4, 3, 2), seeds=(0, 1, 2),
                   device="cuda"),
}
ARMS = ("lsq", "lsq_kd", "lsq_br")


def _summary(profile: Profile, name: str, runs: List[Dict], fp_top1: float, source: str, t_start: float) -> Dict:
    table: Dict[str, Dict[str, Dict[str, float]]] = {}
    for bits in profile.bits:
        for arm in ARMS:
            vals = [r["top1"] for r in runs if r["bits"] == bits and r["arm"] == arm]
            if vals:
                table.setdefault(f"W{bits}A{bits}", {})[arm] = {
                    "mean": statistics.mean(vals), "spread": (max(vals) - min(vals)) / 2, "n": len(vals)}
    return {"profile": name, "settings": asdict(profile), "machine": machine(), "data": source, "fp_top1": fp_top1,
            "runs": runs, "table": table, "total_time_s": time.perf_counter() - t_start,
            "complete": len(runs) == len(profile.bits) * len(profile.seeds) * len(ARMS)}


def run(profile: Profile, name: str) -> Dict:
    t_start = time.perf_counter()
    tr = fdata.cifar10(train=True)
    te = fdata.cifar10(train=False).subset(profile.test_subset)
    loader = fdata.BatchLoader(tr, profile.batch_size, train=True, seed=0, rank=0, world_size=1)
    test = fdata.BatchLoader(te, 500, train=False, rank=0, world_size=1)
    torch.manual_seed(0)
    fp = get_model("resnet20", 10)
    fp_cfg = TrainConfig(steps=profile.fp_steps, lr=profile.fp_lr, seed=0, plot=False, warmup_steps=100)
    key = {"model": "resnet20", "data": "cifar10", "batch_size": profile.batch_size, "source": tr.source,
           "n_test": len(te)}
    fp, fp_info = train_fp(fp, loader, fp_cfg, key=key, test_loader=test, desc="FP")
    log.info("FP top-1 %.2f%% (%s)", fp_info["top1"], "cached" if fp_info["cached"] else "trained")
    hc = fxqat.HybridConfig()
    x0 = tr[0][0].unsqueeze(0).repeat(2, 1, 1, 1)
    runs: List[Dict] = []
    for bits in profile.bits:
        for seed in profile.seeds:
            qcfg = TrainConfig(steps=profile.qat_steps, lr=profile.qat_lr, seed=seed, plot=False)
            for arm in ARMS:
                cfg = fxqat.QATConfig(w_bits=bits, a_bits=bits, method="lsq", hybrid=hc if arm == "lsq_br" else None)
                teacher, tcfg = None, qcfg
                if arm == "lsq_kd":
                    teacher = copy.deepcopy(fp).eval().requires_grad_(False)
                    tcfg = replace(qcfg, kd_weight=hc.kd_weight, temperature=hc.temperature)
                # same batches and augmentation for every arm of this seed
                loader = fdata.BatchLoader(tr, profile.batch_size, train=True, seed=seed, rank=0, world_size=1)
                qm = fxqat.prepare_qat(copy.deepcopy(fp), (x0,), cfg)
                t0 = time.perf_counter()
                hist = train_qat(qm, loader, tcfg, test_loader=test, teacher=teacher, desc=f"{arm} W{bits}A{bits} s{seed}")
                top1 = hist["final"]["test_top1"]
                runs.append({"arm": arm, "bits": bits, "seed": seed, "top1": top1,
                             "time_s": time.perf_counter() - t0})
                log.info("%s W%dA%d seed %d: top-1 %.2f%%", arm, bits, bits, seed, top1)
            res = _summary(profile, name, runs, fp_info["top1"], tr.source, t_start)
            write_results(f"accuracy_{name}", res, markdown(res))  # partial results survive an interrupted run
    return _summary(profile, name, runs, fp_info["top1"], tr.source, t_start)


def markdown(res: Dict) -> str:
    s = res["settings"]
    lines = [f"# CIFAR-10 ResNet-20: LSQ vs LSQ + KD vs LSQ + block replacement ({res['profile']} profile)", "",
             f"Data: {res['data']} (JPEG-compressed CIFAR-10; {s['test_subset']} test images). Machine: "
             f"{res['machine']['cpu']}, {res['machine']['cores']} cores, torch {res['machine']['torch']}.",
             f"FP ResNet-20 after {s['fp_steps']} steps: **{res['fp_top1']:.2f}%**. Each arm: {s['qat_steps']} QAT "
             f"steps from that checkpoint, batch {s['batch_size']}, seeds {list(s['seeds'])} (same batches per seed).",
             "", "| bits | LSQ | LSQ + KD (FP logits only) | LSQ + block replacement | BR − LSQ | BR − KD |",
             "|---|---|---|---|---|---|"]
    for bits, arms in res["table"].items():
        if len(arms) < len(ARMS):
            continue
        cell = {a: f"{v['mean']:.2f} ± {v['spread']:.2f}" for a, v in arms.items()}
        d1 = arms["lsq_br"]["mean"] - arms["lsq"]["mean"]
        d2 = arms["lsq_br"]["mean"] - arms["lsq_kd"]["mean"]
        lines.append(f"| {bits} | {cell['lsq']} | {cell['lsq_kd']} | {cell['lsq_br']} | {d1:+.2f} | {d2:+.2f} |")
    lines += ["", "mean ± half-range over seeds, top-1 %.", f"Total time: {res['total_time_s'] / 60:.0f} min."
              + ("" if res.get("complete") else " **Incomplete run**: only the rows above finished.")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="short")
    ap.add_argument("--qat-steps", type=int, default=None, help="override the profile's QAT steps per arm")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for ResNet-20 on CPU)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if not fdata.data_available("cifar10"):
        sys.exit("CIFAR-10 not found: put cifar10_jpeg.npz in ../shared/data or set FXQAT_DATA (see fxqat.data).")
    prof = PROFILES[args.profile]
    if args.qat_steps:
        prof = replace(prof, qat_steps=args.qat_steps)
    res = run(prof, args.profile)
    md = markdown(res)
    write_results(f"accuracy_{args.profile}", res, md)
    print(md)


if __name__ == "__main__":
    main()
