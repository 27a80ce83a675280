"""Mixed precision on the LLM benchmark's tiny Llama (issue #17): uniform bits vs path / Fisher / Hessian allocations.

The character-level Llama of ``benchmarks/llm.py`` (pre-trained on Tiny Shakespeare with its FP recipe, cached under
``~/.cache/fxqat/ckpt``), weight-only per-group-32 LSQ (the ``int4_weight_only`` preset with its bits changed;
embedding and lm_head in FP, outside the budget), at an average of 3 and 2.5 bits per allocated weight:

* ``uniform``: every block at the largest uniform bit-width within the budget (3; 2 for 2.5 bits);
* ``paths`` / ``fisher`` / ``hessian``: bits per block among 2, 3, 4 and 8 from ``fxqat.sensitivity`` with that
  method, the blocks being the attention and the MLP of every decoder layer (``HybridConfig(cuts="residual")``),
  allocated by ``fxqat.allocate_bits`` (exact knapsack).

Every arm fine-tunes the same FP checkpoint with the same recipe, steps and batches per seed (AdamW, the LLM
benchmark's fine-tuning schedule shortened to ``--steps``), and is evaluated on the converted model over fixed
validation batches. Each estimate's cost is reported in CPU seconds and in training-step equivalents (CPU time of one
LSQ fine-tuning step measured in the same run).

Run: ``OMP_NUM_THREADS=1 python benchmarks/autobits_llm.py`` (writes ``results/autobits_llm.{json,md}``);
``--quick`` (a 30-step FP model, 3 steps per arm) writes ``autobits_llm_quick.*``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import statistics
import sys
import time
from typing import Dict, List, Tuple

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import AUTOBITS_ARMS as ARMS  # noqa: E402
from _common import allocation_rows, arm_rows, cost_rows, machine, uniform_config, write_results  # noqa: E402

import fxqat  # noqa: E402
from fxqat.text_data import tiny_shakespeare  # noqa: E402
from fxqat.training.lm import FINETUNE_RECIPE, FP_RECIPE, evaluate_lm, lm_loss, train_lm  # noqa: E402
from fxqat.training.recipes import pretrained_char_llama  # noqa: E402
from fxqat.training.step import TrainStep  # noqa: E402

log = logging.getLogger("autobits_llm")
CHOICES = (2, 3, 4, 8)
BUDGETS = (3.0, 2.5)


def _step_cpu_s(fp, cfg: fxqat.QATConfig, x, y, rounds: int = 5) -> float:
    """Median CPU seconds of one LSQ fine-tuning step (the unit of an estimate's cost)."""
    qm = fxqat.prepare_qat(fp, (x,), cfg)
    fxqat.calibrate(qm, [x])
    qm.train()
    run = TrainStep(torch.optim.AdamW(fxqat.trainable_parameters(qm), lr=1e-6))
    times = []
    for i in range(rounds + 2):
        t = time.process_time()
        run(i + 1, lambda: (lm_loss(qm, x, y), None))
        if i >= 2:
            times.append(time.process_time() - t)
    return statistics.median(times)


def run(quick: bool, steps: int, seeds: Tuple[int, ...], sens_batches: int, n_val: int) -> Dict:
    t0 = time.perf_counter()
    corpus = tiny_shakespeare()
    fp_recipe = dataclasses.replace(FP_RECIPE, steps=30, warmup=5) if quick else FP_RECIPE
    fp, fp_info = pretrained_char_llama(corpus, fp_recipe)
    fp.eval()
    ft = dataclasses.replace(FINETUNE_RECIPE, steps=steps, warmup=min(FINETUNE_RECIPE.warmup, steps // 4))
    val = list(corpus.batches("val", n_val, ft.batch_size, ft.context, 1337))
    gen = torch.Generator().manual_seed(7919)
    batches = [corpus.batch("train", ft.batch_size, ft.context, gen) for _ in range(sens_batches)]
    x0, y0 = batches[0]
    base = fxqat.QATConfig.preset("int4_weight_only")
    step_s = _step_cpu_s(fp, base.with_(w_bits=3), x0, y0)
    est, configs, allocs = {}, {}, {}
    for method in ARMS[1:]:
        # attention and MLP of each decoder layer as blocks of their own (8 blocks instead of 4)
        probe = fxqat.prepare_qat(fp, (x0[:1],), base.with_(hybrid=fxqat.HybridConfig(cuts="residual")))
        c0, w0 = time.process_time(), time.perf_counter()
        table = fxqat.sensitivity(probe, batches, bits=CHOICES, method=method, progress=True)
        cpu = time.process_time() - c0
        est[method] = {"table": table, "cpu_s": cpu, "wall_s": time.perf_counter() - w0, "step_equiv": cpu / step_s}
        log.info("%s sensitivity: %.1f CPU s = %.1f fine-tuning steps", method, cpu, cpu / step_s)
    for budget in BUDGETS:
        configs[(budget, "uniform")], allocs[(budget, "uniform")] = uniform_config(
            est["paths"]["table"], budget, base, CHOICES, activations=False)
        for method in ARMS[1:]:
            cfg, alloc = fxqat.allocate_bits(est[method]["table"], avg_bits=budget, choices=CHOICES, base_config=base)
            configs[(budget, method)] = cfg
            allocs[(budget, method)] = {"bits": dict(alloc.bits), "avg_bits": alloc.avg_bits,
                                        "used_bits": alloc.used_bits, "predicted_loss": alloc.predicted_loss}
    runs: List[Dict] = []
    res: Dict = {}
    for budget in BUDGETS:
        for seed in seeds:
            for arm in ARMS:
                qm = fxqat.prepare_qat(fp, (x0,), configs[(budget, arm)])
                fxqat.calibrate(qm, [x0])
                hist = train_lm(qm, corpus, ft, seed, params=fxqat.trainable_parameters(qm),
                                desc=f"{arm} {budget} bits s{seed}")
                loss = evaluate_lm(fxqat.convert(qm), val)
                runs.append({"arm": arm, "budget": budget, "seed": seed, "val_loss": loss, "ppl": math.exp(loss),
                             "avg_bits": allocs[(budget, arm)]["avg_bits"], "time_s": hist["time_s"]})
                log.info("%s at %.1f bits, seed %d: val loss %.4f", arm, budget, seed, loss)
            res = summary(quick, steps, seeds, sens_batches, n_val, fp_info, est, allocs, runs, step_s, t0)
            write_results(stem(quick), res, markdown(res))  # partial results survive an interrupted run
    return res


def summary(quick, steps, seeds, sens_batches, n_val, fp_info, est, allocs, runs, step_s, t0) -> Dict:
    table: Dict[str, Dict[str, Dict]] = {}
    for budget in BUDGETS:
        for arm in ARMS:
            vals = [r["val_loss"] for r in runs if r["budget"] == budget and r["arm"] == arm]
            if vals:
                table.setdefault(str(budget), {})[arm] = {
                    "mean": statistics.mean(vals), "spread": (max(vals) - min(vals)) / 2, "n": len(vals),
                    "avg_bits": allocs[(budget, arm)]["avg_bits"]}
    return {"quick": quick, "steps": steps, "seeds": list(seeds), "sens_batches": sens_batches, "n_val": n_val,
            "machine": machine(), "fp_val_loss": fp_info["val_loss"], "fp_steps": fp_info["steps"],
            "step_cpu_s": step_s, "estimate_cost": {m: {k: v for k, v in e.items() if k != "table"}
                                                    for m, e in est.items()},
            "sensitivity": {m: e["table"].to_dict() for m, e in est.items()},
            "allocations": {f"{b}/{a}": v for (b, a), v in allocs.items()}, "runs": runs, "table": table,
            "total_wall_s": time.perf_counter() - t0,
            "complete": len(runs) == len(BUDGETS) * len(seeds) * len(ARMS)}


def stem(quick: bool) -> str:
    return "autobits_llm_quick" if quick else "autobits_llm"


def markdown(res: Dict) -> str:
    m = res["machine"]
    lines = ["# Mixed precision on the tiny Llama (Tiny Shakespeare): uniform vs path / Fisher / Hessian sensitivity",
             "", f"Machine: {m['cpu']}, {m['cores']} cores (shared), torch {m['torch']}, 1 thread. FP char Llama after "
             f"{res['fp_steps']} steps: validation loss **{res['fp_val_loss']:.4f}**. Every arm: {res['steps']} "
             f"weight-only per-group-32 LSQ fine-tuning steps (AdamW, batch 32 x 128), seeds {res['seeds']}, "
             f"validation loss of the converted model over {res['n_val']} fixed batches; bits per block (the "
             f"attention and the MLP of each decoder layer) among {list(CHOICES)}, embedding and lm_head in FP (outside the budget). Sensitivities from "
             f"{res['sens_batches']} training batches.", ""]
    lines += arm_rows(res["table"], 4)
    lines += ["", "Validation loss (lower is better), mean ± half-range over seeds; in brackets the average bits per "
              "allocated weight the arm used (uniform at a 2.5-bit budget: 2 bits everywhere).", "",
              "## Cost of each estimate", "",
              f"One LSQ fine-tuning step: {res['step_cpu_s']:.2f} CPU s.", ""]
    lines += cost_rows(res["estimate_cost"], "fine-tuning-step")
    lines += ["", "## Allocations (bits per block)", ""] + allocation_rows(res)
    lines += ["", f"Total: {res['total_wall_s'] / 60:.0f} min wall (shared machine)."
              + ("" if res["complete"] else " **Incomplete run**: only the rows above finished.")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="30-step FP model, 3 steps per arm, one seed")
    ap.add_argument("--steps", type=int, default=150, help="fine-tuning steps per arm")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    if args.quick:
        res = run(True, 3, (0,), 1, 2)
    else:
        res = run(False, args.steps, (0, 1), 4, 32)
    write_results(stem(args.quick), res, markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
