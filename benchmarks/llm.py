"""LLM QAT benchmark on Tiny Shakespeare: fxqat's methods beside torchao's QAT on one character-level Llama.

Protocol: ``../shared/docs/llm_benchmark.md`` (model, FP pre-training, fine-tuning recipe, evaluation, torchao calls).
Per seed and setting, every arm starts from the same cached FP checkpoint and sees the same batches:

* ``control``      FP fine-tune, no quantizers (separates extra training from QAT recovery)
* ``rtn``          torchao RTN post-training quantization of the FP checkpoint (and of the control, for recovery)
* ``ptq``          fxqat's quantizers calibrated on one batch and converted, no training (its MSE step-size init)
* ``torchao_qat``  torchao ``quantize_(QATConfig(base, step="prepare"))`` → train → ``step="convert"``
* ``lsq``          fxqat ``QATConfig.preset(...)`` (LSQ weights; per-token dynamic activations for 8da4w)
* ``lsq_kd``       the same + KD to the frozen FP model's logits
* ``br``           the same + block replacement (frozen FP partner, one block per decoder layer)
* ``kd_matched``   ``lsq_kd`` given the wall time of ``br`` (more steps, same schedule shape)

Every arm is evaluated on its converted (deployable) model: torchao's converted model, ``fxqat.convert``'s.
Recovery = 1 − (QAT − control) / (RTN(control) − control), per seed.

Usage::

    python benchmarks/llm.py                       # the committed run (benchmarks/results/llm.{md,json,png})
    python benchmarks/llm.py --seeds 1 --part      # one seed's part (run seeds in parallel processes) ...
    python benchmarks/llm.py --report              # ... then merge the parts into llm.{md,json,png}
    python benchmarks/llm.py --quick               # smoke profile (< 3 min), writes to runs/llm_quick/
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    fxqat_prepare,
    machine,
    time_steps,
    torchao_qat_convert,
    torchao_qat_prepare,
    torchao_rtn,
)

import fxqat  # noqa: E402
from fxqat.text_data import tiny_shakespeare  # noqa: E402
from fxqat.training.lm import (  # noqa: E402
    FINETUNE_RECIPE,
    FP_RECIPE,
    LMRecipe,
    evaluate_lm,
    hybrid_lm_loss,
    kd_lm_loss,
    lm_loss,
    train_lm,
)
from fxqat.training.recipes import pretrained_char_llama  # noqa: E402
from fxqat.training.step import TrainStep  # noqa: E402

log = logging.getLogger("llm")
RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = ("8da4w", "int4", "int3", "int2")
ARMS = ("control", "rtn", "ptq", "torchao_qat", "lsq", "lsq_kd", "br", "kd_matched")


# ------------------------------------------------------------------------------------------------- profiles
def profile(quick: bool) -> Dict[str, Any]:
    """Model sizes, recipes and evaluation sizes of the full run (the protocol) or of the smoke profile."""
    if not quick:
        return {"model": {}, "fp": FP_RECIPE, "ft": FINETUNE_RECIPE, "n_val": 64, "n_curve": 4, "curve_every": 50}
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=32)
    fp = LMRecipe(steps=300, lr=3e-3, warmup=20, batch_size=8, context=32, seed_offset=0)
    ft = LMRecipe(steps=6, lr=1e-4, warmup=2, batch_size=8, context=32)
    return {"model": small, "fp": fp, "ft": ft, "n_val": 4, "n_curve": 2, "curve_every": 3}


# ------------------------------------------------------------------------------------------------- fxqat
kd_loss_fn = kd_lm_loss
br_loss = hybrid_lm_loss


# ------------------------------------------------------------------------------------------------- one seed
class Runner:
    """Runs the arms of one seed; every arm's record is saved as soon as it exists (``save``)."""

    def __init__(self, prof: Dict[str, Any], seed: int, progress: bool, save: Callable[[], None],
                 device: str = "cpu") -> None:
        self.prof, self.seed, self.progress, self.save = prof, seed, progress, save
        self.corpus = tiny_shakespeare()
        ft = prof["ft"]
        self.val = list(self.corpus.batches("val", prof["n_val"], ft.batch_size, ft.context, 1337))
        self.curve = self.val[: prof["n_curve"]]
        self.fp, self.fp_info = pretrained_char_llama(self.corpus, prof["fp"], model_overrides=prof["model"],
                                                      progress=progress)
        self.fp = self.fp.to(device).eval()  # batches follow the model's device (train_lm, evaluate_lm)
        gen = torch.Generator().manual_seed(ft.seed_offset + seed)
        self.x0, _ = self.corpus.batch("train", ft.batch_size, ft.context, gen)  # the first training batch
        self.x0 = self.x0.to(device)
        self.records: Dict[str, Dict[str, Any]] = {}
        self.control: Optional[nn.Module] = None

    def _train(self, model, desc, recipe=None, **kw) -> Dict[str, Any]:
        recipe = recipe or self.prof["ft"]
        hist = train_lm(model, self.corpus, recipe, self.seed, eval_batches=self.curve,
                        eval_every=self.prof["curve_every"], progress=self.progress, desc=desc, **kw)
        return {"steps": hist["steps"], "time_s": hist["time_s"], "step_s": statistics.median(hist["step_s"]),
                "curve": hist["eval"], "train_loss_last": hist["loss"][-1]}

    def _record(self, key: str, rec: Dict[str, Any]) -> None:
        rec["ppl"] = math.exp(rec["val_loss"])
        self.records[key] = rec
        log.info("seed %d %-22s val %.4f  (%.0f s)", self.seed, key, rec["val_loss"], rec.get("time_s", 0.0))
        self.save()

    def run_control(self) -> None:
        model = copy.deepcopy(self.fp)
        rec = self._train(model, "control")
        rec["val_loss"] = evaluate_lm(model, self.val)
        self.control = model.eval()
        self._record("control", rec)
        self._record("fp", {"val_loss": evaluate_lm(self.fp, self.val), "steps": 0})

    def run_setting(self, setting: str, arms) -> None:
        s = f"{setting}/"
        if "rtn" in arms:
            self._record(s + "rtn", {"val_loss": evaluate_lm(torchao_rtn(self.fp, setting), self.val), "steps": 0})
            self._record(s + "rtn_control", {"val_loss": evaluate_lm(torchao_rtn(self.control, setting), self.val),
                                             "steps": 0})
        if "ptq" in arms:
            qm = fxqat_prepare(self.fp, setting, self.x0, hybrid=False)
            self._record(s + "ptq", {"val_loss": evaluate_lm(fxqat.convert(qm), self.val), "steps": 0})
        if "torchao_qat" in arms:
            m = torchao_qat_prepare(self.fp, setting)
            rec = self._train(m, f"{setting} torchao")
            rec["val_loss_fakequant"] = evaluate_lm(m, self.val)
            rec["val_loss"] = evaluate_lm(torchao_qat_convert(m, setting), self.val)
            self._record(s + "torchao_qat", rec)
        if "lsq" in arms:
            self._fxqat_arm(setting, "lsq", hybrid=False, loss_fn=lm_loss)
        kd_time = None
        if "lsq_kd" in arms:
            kd_time = self._fxqat_arm(setting, "lsq_kd", hybrid=False, loss_fn=kd_loss_fn(copy.deepcopy(self.fp)))
        br_time = None
        if "br" in arms:
            br_time = self._fxqat_arm(setting, "br", hybrid=True, loss_fn=br_loss)
        if "kd_matched" in arms and kd_time and br_time:
            ft = self.prof["ft"]
            steps = max(ft.steps, round(ft.steps * br_time / kd_time))
            recipe = LMRecipe(**{**ft.__dict__, "steps": steps})
            self._fxqat_arm(setting, "kd_matched", hybrid=False, loss_fn=kd_loss_fn(copy.deepcopy(self.fp)),
                            recipe=recipe)

    def _fxqat_arm(self, setting, arm, hybrid, loss_fn, recipe=None) -> float:
        qm = fxqat_prepare(self.fp, setting, self.x0, hybrid)
        rec = self._train(qm, f"{setting} {arm}", recipe=recipe, loss_fn=loss_fn,
                          params=fxqat.trainable_parameters(qm))
        rec["val_loss"] = evaluate_lm(fxqat.convert(qm), self.val)  # the fake-quantized values, baked in
        self._record(f"{setting}/{arm}", rec)
        return rec["time_s"]


def step_ratios(prof: Dict[str, Any], settings, rounds: int) -> Dict[str, Dict[str, float]]:
    """Interleaved median step time of FP, torchao QAT, fxqat LSQ and fxqat BR per setting (one process, one run)."""
    corpus = tiny_shakespeare()
    fp, _ = pretrained_char_llama(corpus, prof["fp"], model_overrides=prof["model"], progress=False)
    ft = prof["ft"]
    x, y = corpus.batch("train", ft.batch_size, ft.context, torch.Generator().manual_seed(7))
    out: Dict[str, Dict[str, float]] = {}
    for setting in settings:
        models = {"fp": copy.deepcopy(fp), "torchao_qat": torchao_qat_prepare(fp, setting),
                  "fxqat_lsq": fxqat_prepare(fp, setting, x, hybrid=False),
                  "fxqat_br": fxqat_prepare(fp, setting, x, hybrid=True)}
        steps = {}
        for name, m in models.items():
            m.train()
            run = TrainStep(torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-6))
            loss_fn = br_loss if name == "fxqat_br" else lm_loss
            steps[name] = lambda m=m, run=run, loss_fn=loss_fn: run(0, lambda: (loss_fn(m, x, y), None))
        med = time_steps(steps, warmup=2, rounds=rounds)
        out[setting] = {k: v / med["fp"] for k, v in med.items()} | {"fp_step_s": med["fp"]}
        log.info("step ratios %s: %s", setting, out[setting])
    return out


# ------------------------------------------------------------------------------------------------- report
def aggregate(parts: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per setting and arm: the value of each seed, mean and sample standard deviation, recovery per seed."""
    seeds = [p["seed"] for p in parts]
    keys = sorted({k for p in parts for k in p["records"]})
    table: Dict[str, Any] = {}
    for key in keys:
        vals = [p["records"][key]["val_loss"] for p in parts if key in p["records"]]
        row = {"val_loss": vals, "mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
               "ppl_mean": statistics.fmean(math.exp(v) for v in vals)}
        times = [p["records"][key].get("time_s") for p in parts if key in p["records"]]
        if all(t is not None for t in times):
            row["time_s"] = statistics.fmean(times)
            row["steps"] = [p["records"][key]["steps"] for p in parts if key in p["records"]]
        if "/" in key:
            setting, arm = key.split("/")
            rec = []
            for p in parts:
                r = p["records"]
                if key in r and "control" in r and f"{setting}/rtn_control" in r:
                    gap = r[f"{setting}/rtn_control"]["val_loss"] - r["control"]["val_loss"]
                    rec.append(1.0 - (r[key]["val_loss"] - r["control"]["val_loss"]) / gap if gap > 0 else float("nan"))
            if rec:
                row["recovery"] = rec
                row["recovery_mean"] = statistics.fmean(rec)
        table[key] = row
    return {"seeds": seeds, "table": table}


def markdown(payload: Dict[str, Any]) -> str:
    agg, ratios = payload["aggregate"]["table"], payload.get("step_ratios", {})
    fp = payload["fp"]
    lines = [
        "# LLM QAT benchmark: Tiny Shakespeare, character-level Llama (804,224 parameters)", "",
        f"Machine: {payload['machine']['cpu']}, {payload['machine']['cores']} cores, torch "
        f"{payload['machine']['torch']}, torch threads per process {payload['threads']}; torchao {payload['torchao']}."
        f" Produced by `{payload['command']}`; wall time {payload['wall_min']:.1f} min.", "",
        f"FP checkpoint: {fp['steps']} steps, validation loss **{fp['val_loss']:.4f}** (perplexity "
        f"{math.exp(fp['val_loss']):.3f}); fine-tuning: {payload['ft']['steps']} steps per arm "
        f"(lr {payload['ft']['lr']}), seeds {payload['aggregate']['seeds']}. Validation: {payload['n_val']} fixed "
        f"batches of {payload['ft']['batch_size']}×{payload['ft']['context']}, evaluated on each arm's converted model. lm_head and the embedding stay in FP in every "
        "arm (torchao via `filter_fn`, fxqat presets by default).", "",
        "Recovery = 1 − (QAT − control) / (RTN(control) − control), per seed, where control is the FP fine-tune of the "
        "same seed. `kd_matched` is LSQ+KD given block replacement's wall time (more steps, so it can beat the "
        "250-step control: recovery above 100%). Wall times were taken while other jobs shared the machine; the "
        "step-time ratios at the end are interleaved measurements in one process.", "",
    ]
    lines += summary(payload)
    c = agg.get("control")
    for setting in payload["settings"]:
        lines += [f"## {setting}", "", "| arm | val loss per seed | mean ± sd | perplexity | recovery | steps | wall s "
                  "| step / FP step |", "|---|---|---|---|---|---|---|---|"]
        rows = [("fp (no fine-tune)", agg.get("fp")), ("control (FP fine-tune)", c)]
        rows += [(arm, agg.get(f"{setting}/{arm}")) for arm in ("rtn", "rtn_control", "ptq", "torchao_qat", "lsq",
                                                                 "lsq_kd", "br", "kd_matched")]
        ratio_key = {"torchao_qat": "torchao_qat", "lsq": "fxqat_lsq", "lsq_kd": None, "br": "fxqat_br"}
        for name, row in rows:
            if row is None:
                continue
            per_seed = ", ".join(f"{v:.4f}" for v in row["val_loss"])
            rec = f"{100 * row['recovery_mean']:.0f}% ({', '.join(f'{100 * r:.0f}' for r in row['recovery'])})" \
                if "recovery_mean" in row else ""
            rk = ratio_key.get(name)
            ratio = f"{ratios[setting][rk]:.2f}" if rk and setting in ratios else ""
            steps = "/".join(str(s) for s in sorted(set(row.get("steps", [])))) if row.get("steps") else ""
            wall = f"{row['time_s']:.0f}" if row.get("time_s") else ""
            lines.append(f"| {name} | {per_seed} | {row['mean']:.4f} ± {row['sd']:.4f} | {row['ppl_mean']:.3f} | "
                         f"{rec} | {steps} | {wall} | {ratio} |")
        lines.append("")
    if ratios:
        lines += ["## Step time (interleaved, one process, median of rounds)", "",
                  "| setting | FP step s | torchao QAT | fxqat LSQ | fxqat BR |", "|---|---|---|---|---|"]
        for s, r in ratios.items():
            lines.append(f"| {s} | {r['fp_step_s']:.3f} | {r['torchao_qat']:.2f}× | {r['fxqat_lsq']:.2f}× | "
                         f"{r['fxqat_br']:.2f}× |")
        lines.append("")
    lines += payload.get("findings", [])
    return "\n".join(lines) + "\n"


FXQAT_ARMS = ("lsq", "lsq_kd", "br", "kd_matched")


def summary(payload: Dict[str, Any]) -> List[str]:
    """Headline table (mean validation loss per arm and setting) and the findings, computed from the records."""
    agg, parts = payload["aggregate"]["table"], payload["parts"]
    arms = ("rtn", "ptq", "torchao_qat") + FXQAT_ARMS
    lines = ["## Summary (mean validation loss over seeds; recovery of the PTQ gap in brackets)", "",
             "| setting | control | " + " | ".join(arms) + " |", "|---|---|" + "---|" * len(arms)]
    findings = []
    for setting in payload["settings"]:
        cells = []
        for arm in arms:
            row = agg.get(f"{setting}/{arm}")
            if row is None:
                cells.append("")
                continue
            rec = f" ({100 * row['recovery_mean']:.0f}%)" if "recovery_mean" in row and arm != "rtn" else ""
            cells.append(f"{row['mean']:.4f}{rec}")
        lines.append(f"| {setting} | {agg['control']['mean']:.4f} | " + " | ".join(cells) + " |")
        done = [a for a in FXQAT_ARMS if f"{setting}/{a}" in agg]
        ao = agg.get(f"{setting}/torchao_qat")
        if done and ao:
            best = min(done, key=lambda a: agg[f"{setting}/{a}"]["mean"])
            b = agg[f"{setting}/{best}"]
            findings.append(
                f"- {setting}: fxqat's best arm `{best}` {b['mean']:.4f} ± {b['sd']:.4f} (recovery "
                f"{100 * b.get('recovery_mean', float('nan')):.0f}%) vs torchao QAT {ao['mean']:.4f} ± {ao['sd']:.4f} "
                f"(recovery {100 * ao.get('recovery_mean', float('nan')):.0f}%); plain LSQ "
                f"{agg[f'{setting}/lsq']['mean']:.4f}." if f"{setting}/lsq" in agg else "")
        if all(f"{setting}/{a}" in agg for a in ("br", "lsq_kd", "kd_matched")):
            def diffs(a, b):
                return [p["records"][f"{setting}/{a}"]["val_loss"] - p["records"][f"{setting}/{b}"]["val_loss"]
                        for p in parts if f"{setting}/{a}" in p["records"] and f"{setting}/{b}" in p["records"]]
            d_kd, d_m = diffs("br", "lsq_kd"), diffs("br", "kd_matched")
            findings.append(
                f"- {setting}: block replacement − KD (same steps) = {', '.join(f'{d:+.4f}' for d in d_kd)} per seed; "
                f"block replacement − KD with block replacement's wall time = {', '.join(f'{d:+.4f}' for d in d_m)} "
                "(negative: block replacement better).")
    return lines + ["", "Findings (computed from the records above):", ""] + [f for f in findings if f] + [""]


def plot(payload: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = payload["settings"]
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.6), squeeze=False)
    part = payload["parts"][0]
    for ax, setting in zip(axes[0], settings):
        for key, rec in part["records"].items():
            if (key == "control" or key.startswith(setting + "/")) and rec.get("curve"):
                steps, vals = zip(*rec["curve"])
                ax.plot(steps, vals, label=key.split("/")[-1])
        rtn = part["records"].get(f"{setting}/rtn")
        if rtn:
            ax.axhline(rtn["val_loss"], ls=":", c="grey", label="rtn (PTQ, all validation batches)")
        ax.set_title(f"{setting} (seed {part['seed']})")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel(f"validation loss ({payload['n_curve']} batches)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- main
def default_out(quick: bool) -> Path:
    """The committed results folder for the full run; ``runs/llm_quick`` for the smoke profile."""
    return Path("runs/llm_quick") if quick else RESULTS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke profile: tiny model, a few steps per arm")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--out", default=None, help="result folder (default benchmarks/results, --quick: runs/llm_quick)")
    ap.add_argument("--part", action="store_true", help="write only llm_part_seed<N>.json (merge with --report)")
    ap.add_argument("--report", action="store_true", help="merge the parts in --out into llm.{md,json,png}")
    ap.add_argument("--ratios", action="store_true", help="only the interleaved step-time ratios (llm_ratios.json)")
    ap.add_argument("--rounds", type=int, default=10, help="rounds of the interleaved step timing")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="where the arms train (the FP pre-training runs on the CPU)")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("fxqat").setLevel(logging.WARNING)  # one capture line per eager module and arm otherwise
    torch.set_num_threads(args.threads)
    prof = profile(args.quick)
    out = Path(args.out) if args.out else default_out(args.quick)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.ratios:
        (out / "llm_ratios.json").write_text(json.dumps(step_ratios(prof, args.settings, args.rounds), indent=2))
        return 0
    if not args.report:
        for seed in args.seeds:
            part_path = out / f"llm_part_seed{seed}.json"
            part: Dict[str, Any] = {"seed": seed, "records": {}, "settings": args.settings}

            def save(part=part, part_path=part_path):
                part_path.write_text(json.dumps(part, indent=1))

            runner = Runner(prof, seed, args.progress, save, device=args.device)
            part["records"] = runner.records
            part["fp"] = runner.fp_info
            runner.run_control()
            for setting in args.settings:
                runner.run_setting(setting, args.arms)
            part["wall_s"] = time.perf_counter() - t0
            save()
        if args.part:
            return 0
    return write_report(out, args, prof, t0)


def write_report(out: Path, args, prof, t0: float) -> int:
    import torchao

    parts = [json.loads(p.read_text()) for p in sorted(out.glob("llm_part_seed*.json"))]
    parts = [p for p in parts if p["seed"] in args.seeds]
    if not parts:
        log.error("no parts in %s", out)
        return 1
    ratios_path = out / "llm_ratios.json"
    if not ratios_path.exists():
        ratios_path.write_text(json.dumps(step_ratios(prof, args.settings, args.rounds), indent=2))
    settings = [s for s in SETTINGS if any(k.startswith(s + "/") for p in parts for k in p["records"])]
    payload = {
        "machine": machine(), "threads": args.threads, "torchao": torchao.__version__, "quick": args.quick,
        "command": "python benchmarks/llm.py" + (" --quick" if args.quick else ""), "settings": settings,
        "fp": parts[0]["fp"], "ft": prof["ft"].__dict__, "n_val": prof["n_val"], "n_curve": prof["n_curve"],
        "parts": parts,
        "wall_min": max(p.get("wall_s", 0.0) for p in parts) / 60.0 + (time.perf_counter() - t0) / 60.0,
        "aggregate": aggregate(parts), "step_ratios": json.loads(ratios_path.read_text()),
    }
    stem = "llm"
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    (out / f"{stem}.md").write_text(markdown(payload))
    plot(payload, out / f"{stem}.png")
    log.info("wrote %s", out / f"{stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
