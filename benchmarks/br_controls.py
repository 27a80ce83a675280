"""Block replacement against tuned, compute-matched distillation (issue 25): the controls, on the LLM benchmark's
character Llama and on CIFAR-10 ResNet-20.

Every arm is one run from the same FP checkpoint with the same batches per seed; each finished run writes one record
``benchmarks/results/br_runs/<task>_<setting>_<arm>_s<seed>.json`` at once (so an interrupted session keeps what
finished), and ``report`` merges the records into ``br_controls.{md,json}`` (block replacement vs KD) and
``br_llm_act.{md,json}`` (activation-quantized LLM regimes).

Arms are written ``kind@lr`` (``lr`` omitted: the recipe's):

* ``kd``          LSQ + KD to the frozen FP model's logits (``HybridConfig()``'s weights), no paths;
* ``br``          LSQ + block replacement (``HybridConfig(**--hybrid)``);
* ``kd_matched``  ``kd`` given block replacement's compute: its step count is the recipe's times the ratio of a BR
  step to a KD step, measured *interleaved in the same process* (BR, KD, BR, KD, ...: machine load hits both alike);
* ``kd_blocklr``  CIFAR only: ``kd`` with each block's learning rate multiplied by block replacement's measured
  gradient-norm ratio on that block (‖∇ BR loss‖ / ‖∇ KD loss‖, 4 batches, :func:`block_grad_ratios`);
* ``lsq``         plain QAT (cross-entropy); LLM only: ``control`` (FP fine-tune), ``ptq`` (fxqat's calibrated
  quantizers, no training), ``rtn`` (torchao round-to-nearest, weight-only/8da4w settings), ``torchao_qat``,
  ``torchao_kd`` (torchao's fake quantizers trained with the same KD loss as ``kd``).

Usage::

    python benchmarks/br_controls.py llm --setting int2 --seed 0 --arms kd@1e-4 kd@2e-4 kd@4e-4 br@1e-4
    python benchmarks/br_controls.py llm --setting int2 --seed 0 --arms kd_matched@2e-4   # ratio measured here
    python benchmarks/br_controls.py llm --setting int2 --seed 0 --arms br --hybrid paths=1 --tag p1
    python benchmarks/br_controls.py llm --setting int2 --ratios --hybrid paths=1   # interleaved step times only
    python benchmarks/br_controls.py cifar --seed 0 --steps 60 --arms br@0.01 kd@0.01 kd@0.016 kd_matched@0.01
    python benchmarks/br_controls.py cifar --seed 0 --steps 60 --arms kd_blocklr@0.01 kd@0.025
    python benchmarks/br_controls.py cifar --seed 0 --steps 60 --optimizer adam --arms br@0.001 kd@0.001
    python benchmarks/br_controls.py cifar --arms            # only train (and cache) the FP ResNet-20
    python benchmarks/br_controls.py llm --model mini --setting w4a4 --seed 0 --arms kd@0.001 br@0.001 kd_matched@0.001
    python benchmarks/br_controls.py report

The committed LLM records were made with ``--model mini`` (``MINI_MODEL``: the benchmark model's FP pre-training did
not fit the shared machine in those sessions); the CIFAR ones with ``--steps 60`` (4 epochs did not fit); every
record holds its exact command.
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
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, time_steps, torchao_qat_convert, torchao_qat_prepare, torchao_rtn  # noqa: E402

import fxqat  # noqa: E402
from fxqat.config import HybridConfig  # noqa: E402
from fxqat.mixed.state import hybrid_of  # noqa: E402

log = logging.getLogger("br_controls")
RESULTS = Path(__file__).resolve().parent / "results"
RUNS = RESULTS / "br_runs"
LLM_SETTINGS = ("int2", "int4", "8da4w", "w4a8", "w4a4", "w4a8kv4")
ACT_SETTINGS = ("w4a8", "w4a4", "w4a8kv4")
TORCHAO_SETTING = {"int2": "int2", "int4": "int4", "8da4w": "8da4w"}  # torchao has no static learned activations
#: LLM model profiles: the benchmark's char Llama (llm_benchmark.md) and a 16x cheaper one of the same family
#: (4 decoder layers, hidden 64, batch 16x64) for controls that do not fit the shared 2-core machine otherwise
MINI_MODEL = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)


def llm_recipes(model: str):
    """``(model overrides, FP recipe, fine-tuning recipe, validation batches)`` of an LLM profile."""
    from fxqat.training.lm import FINETUNE_RECIPE, FP_RECIPE, LMRecipe

    if model == "benchmark":
        return {}, FP_RECIPE, FINETUNE_RECIPE, 64
    fp = LMRecipe(steps=1000, lr=3e-3, warmup=50, batch_size=16, context=64, seed_offset=0)
    ft = LMRecipe(steps=250, lr=1e-4, warmup=10, batch_size=16, context=64)
    return MINI_MODEL, fp, ft, 48


# ------------------------------------------------------------------------------------------------- arms
def parse_arm(arm: str, default_lr: float) -> Tuple[str, float]:
    """``"kd@2e-4"`` -> ``("kd", 2e-4)``; ``"kd"`` -> ``("kd", default_lr)``."""
    kind, _, lr = arm.partition("@")
    return kind, float(lr) if lr else default_lr


def parse_hybrid(items: List[str]) -> Dict[str, Any]:
    """``["paths=1", "cuts=residual", "path_weights=0.5,1,1.5"]`` -> HybridConfig keyword arguments."""
    out: Dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        if key == "path_weights" and value != "uniform":
            out[key] = tuple(float(v) for v in value.split(","))
        elif key in ("paths", "max_blocks"):
            out[key] = value if value == "all" else int(value)
        elif key in ("kd_weight", "temperature", "task_weight"):
            out[key] = float(value)
        else:
            out[key] = value
    return out


def record_path(task: str, setting: str, label: str, seed: int) -> Path:
    return RUNS / f"{task}_{setting}_{label.replace('/', '-')}_s{seed}.json"


def save_record(task: str, setting: str, label: str, seed: int, rec: Dict[str, Any]) -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    rec = {"task": task, "setting": setting, "arm": label, "seed": seed, "machine": machine(),
           "command": "python benchmarks/br_controls.py " + " ".join(sys.argv[1:]), **rec}
    record_path(task, setting, label, seed).write_text(json.dumps(rec, indent=1))
    log.info("%s %s %s seed %d: %s", task, setting, label, seed,
             {k: rec[k] for k in ("val_loss", "top1", "steps", "time_s") if k in rec})


def interleaved_ratio(steps: Dict[str, Callable[[], None]], rounds: int) -> Dict[str, float]:
    """Median step time of each step function, measured round-robin in this process, and ``br / kd``."""
    med = time_steps(steps, warmup=2, rounds=rounds)
    return {**{f"{k}_step_s": v for k, v in med.items()}, "ratio": med["br"] / med["kd"], "rounds": rounds}


# ------------------------------------------------------------------------------------------------- LLM
def llm_qat_config(setting: str, hybrid: Optional[Dict[str, Any]]) -> fxqat.QATConfig:
    """fxqat's config of an LLM setting: the presets, or W4 per-group weights with static learned per-tensor LSQ
    activation step sizes (``w4a8``, ``w4a4``), plus a 4-bit KV cache (``w4a8kv4``)."""
    if setting in ("int2", "int4"):
        cfg = fxqat.QATConfig.preset(f"{setting}_weight_only")
    elif setting == "8da4w":
        cfg = fxqat.QATConfig.preset("8da4w")
    elif setting in ("w4a8", "w4a4", "w4a8kv4"):
        cfg = fxqat.QATConfig.preset("int4_weight_only", a_bits=4 if setting == "w4a4" else 8,
                                     a_granularity="per_tensor")
        if setting == "w4a8kv4":
            cfg = kv4(cfg)
    else:
        raise ValueError(f"br_controls: unknown LLM setting {setting!r}; choose one of {LLM_SETTINGS}")
    return cfg.with_(hybrid=HybridConfig(**hybrid)) if hybrid is not None else cfg


def kv4(cfg: fxqat.QATConfig) -> fxqat.QATConfig:
    """A 4-bit KV cache: ``QATConfig.kv_bits=4`` where this fxqat has it; otherwise the attention products'
    operands (query, key, value: ``quantize_matmuls``) at 4 bits through an override on the attention modules, a
    stricter setting than LLM-QAT's (the query is 4-bit too)."""
    if {"kv", "kv_bits"} & set(fxqat.QATConfig.__dataclass_fields__):  # the KV role, or its older field
        return cfg.with_(kv_bits=4)
    return cfg.with_(quantize_matmuls=True, overrides=(fxqat.Override("*.self_attn", a_bits=4),))


class LLMRunner:
    """One seed of one LLM setting; arms share the FP checkpoint, the batches and the validation set."""

    def __init__(self, setting: str, seed: int, hybrid: Dict[str, Any], steps: Optional[int], progress: bool,
                 untrained: bool = False, model: str = "benchmark"):
        from fxqat.models.hf import char_llama
        from fxqat.text_data import tiny_shakespeare
        from fxqat.training.recipes import pretrained_char_llama

        self.setting, self.seed, self.hybrid, self.progress = setting, seed, hybrid, progress
        self.corpus = tiny_shakespeare()
        sizes, fp_recipe, ft, n_val = llm_recipes(model)
        self.ft = ft if steps is None else replace(ft, steps=steps)
        self.val = list(self.corpus.batches("val", n_val, self.ft.batch_size, self.ft.context, 1337))
        self.curve = self.val[:4]
        if untrained:  # step timing only: the cost of a step does not depend on the weights
            self.fp, self.fp_info = char_llama(self.corpus.vocab_size, seed=0, **sizes), {"untrained": True}
        else:
            self.fp, self.fp_info = pretrained_char_llama(self.corpus, fp_recipe, progress=progress,
                                                          model_overrides=sizes)
        self.fp.eval()
        gen = torch.Generator().manual_seed(self.ft.seed_offset + seed)
        self.x0, self.y0 = self.corpus.batch("train", self.ft.batch_size, self.ft.context, gen)

    def prepare(self, hybrid: bool) -> nn.Module:
        qm = fxqat.prepare_qat(self.fp, (self.x0,), llm_qat_config(self.setting, self.hybrid if hybrid else None))
        fxqat.calibrate(qm, [self.x0])
        return qm

    def kd_loss(self):
        from fxqat.training.lm import kd_lm_loss

        return kd_lm_loss(copy.deepcopy(self.fp))

    def train(self, model, lr: float, loss_fn, params=None, steps: Optional[int] = None) -> Dict[str, Any]:
        from fxqat.training.lm import train_lm

        recipe = replace(self.ft, lr=lr, steps=steps or self.ft.steps)
        hist = train_lm(model, self.corpus, recipe, self.seed, loss_fn=loss_fn, params=params,
                        eval_batches=self.curve, eval_every=50, progress=self.progress, desc=f"{self.setting}")
        return {"steps": hist["steps"], "time_s": hist["time_s"], "step_s": statistics.median(hist["step_s"]),
                "curve": hist["eval"], "train_loss_last": hist["loss"][-1], "lr": lr}

    def step_ratio(self, rounds: int, lr: float) -> Dict[str, float]:
        """BR step / KD step, interleaved, with the full training step (loss, backward, clipping, AdamW)."""
        from fxqat.training.lm import hybrid_lm_loss, lm_optimizer, quantizer_parameter_ids

        steps = {}
        for name, hybrid in (("br", True), ("kd", False)):
            m = self.prepare(hybrid)
            m.train()
            params = list(fxqat.trainable_parameters(m))
            opt = lm_optimizer(params, replace(self.ft, lr=lr * 1e-3), quantizer_parameter_ids(m))
            loss_fn = hybrid_lm_loss if hybrid else self.kd_loss()

            def step(m=m, opt=opt, loss_fn=loss_fn, params=params):
                loss = loss_fn(m, self.x0, self.y0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()

            steps[name] = step
        return interleaved_ratio(steps, rounds)

    def run(self, kind: str, lr: float, ratio_rounds: int) -> Dict[str, Any]:
        from fxqat.training.lm import evaluate_lm, hybrid_lm_loss, lm_loss

        s = self.setting
        if kind == "control":
            m = copy.deepcopy(self.fp)
            rec = self.train(m, lr, lm_loss)
            return {**rec, "val_loss": evaluate_lm(m, self.val), "fp_val_loss": evaluate_lm(self.fp, self.val)}
        if kind == "rtn":
            return {"val_loss": evaluate_lm(torchao_rtn(self.fp, TORCHAO_SETTING[s]), self.val), "steps": 0}
        if kind == "ptq":
            return {"val_loss": evaluate_lm(fxqat.convert(self.prepare(False)), self.val), "steps": 0}
        if kind in ("torchao_qat", "torchao_kd"):
            if s not in TORCHAO_SETTING:
                raise SystemExit(f"br_controls: torchao's QATConfig has no {s} setting (static learned activations)")
            m = torchao_qat_prepare(self.fp, TORCHAO_SETTING[s])
            rec = self.train(m, lr, lm_loss if kind == "torchao_qat" else self.kd_loss())
            rec["val_loss_fakequant"] = evaluate_lm(m, self.val)
            return {**rec, "val_loss": evaluate_lm(torchao_qat_convert(m, TORCHAO_SETTING[s]), self.val)}
        if kind not in ("lsq", "kd", "br", "kd_matched"):
            raise SystemExit(f"br_controls: unknown LLM arm {kind!r}")
        extra: Dict[str, Any] = {}
        steps = None
        if kind == "kd_matched":
            extra["step_ratio"] = self.step_ratio(ratio_rounds, lr)
            steps = max(self.ft.steps, round(self.ft.steps * extra["step_ratio"]["ratio"]))
            extra["hybrid"] = self.hybrid
        qm = self.prepare(kind == "br")
        if kind == "br":
            extra["hybrid"] = self.hybrid
            extra["n_paths"] = hybrid_of(qm)[1].n_paths
        loss_fn = {"lsq": lm_loss, "kd": None, "kd_matched": None, "br": hybrid_lm_loss}[kind] or self.kd_loss()
        rec = self.train(qm, lr, loss_fn, params=fxqat.trainable_parameters(qm), steps=steps)
        if kind == "br":
            extra["running_sensitivity"] = running_table(qm)
        return {**rec, **extra, "val_loss": evaluate_lm(fxqat.convert(qm), self.val)}


def running_table(qm: nn.Module) -> Optional[List[Dict[str, Any]]]:
    """The per-block table of the running path losses block replacement kept while training (if this fxqat keeps
    them: ``fxqat.running_sensitivity``)."""
    fn = getattr(fxqat, "running_sensitivity", None)
    if fn is None:
        return None
    t = fn(qm)
    return [{"block": r.block, "sensitivity": r.sensitivity[0], "spread": r.spread[0]} for r in t.rows]


def llm_main(args) -> None:
    hybrid = parse_hybrid(args.hybrid)
    runner = LLMRunner(args.setting, args.seed, hybrid, args.steps, args.progress, untrained=args.ratios,
                       model=args.model)
    task = "llm" if args.model == "benchmark" else f"llm{args.model}"
    if args.ratios:
        r = runner.step_ratio(args.ratio_rounds, runner.ft.lr)
        save_record(task, args.setting, f"ratio{('_' + args.tag) if args.tag else ''}", args.seed,
                    {"step_ratio": r, "hybrid": hybrid, "n_paths": hybrid_of(runner.prepare(True))[1].n_paths})
        return
    for arm in args.arms:
        kind, lr = parse_arm(arm, runner.ft.lr)
        label = f"{kind}@{lr:g}" + (f"_{args.tag}" if args.tag else "")
        rec = runner.run(kind, lr, args.ratio_rounds)
        rec["ppl"] = math.exp(rec["val_loss"])
        rec["fp"] = runner.fp_info
        save_record(task, args.setting, label, args.seed, rec)


# ------------------------------------------------------------------------------------------------- CIFAR
def block_of(name: str, blocks) -> Optional[str]:
    """The block owning parameter ``name``: the block with the longest module name that prefixes it."""
    best, best_len = None, -1
    for b in blocks:
        for m in b.modules:
            if (name == m or name.startswith(m + ".")) and len(m) > best_len:
                best, best_len = b.name, len(m)
    return best


def block_grad_ratios(br_model: nn.Module, batches, blocks) -> Dict[str, float]:
    """Per block: ‖∇ block replacement's loss‖ / ‖∇ its backbone terms alone (the KD loss)‖ over the block's
    parameters, summed over ``batches`` (same model, same batch, same forward): the per-block step-size factor that
    block replacement gives each block under SGD, relative to KD."""
    from fxqat.training.losses import distillation_loss

    params = [(n, p) for n, p in br_model.named_parameters() if p.requires_grad]
    owner = {n: block_of(n, blocks) for n, _ in params}
    sq: Dict[str, List[float]] = {}
    br_model.train()
    for x, y in batches:
        out = br_model(x)
        for which, loss in (("br", fxqat.hybrid_loss(out, y)[0]), ("kd", distillation_loss(out.lp, out.fp, y)[0])):
            grads = torch.autograd.grad(loss, [p for _, p in params], retain_graph=which == "br", allow_unused=True)
            for (n, _), g in zip(params, grads):
                if g is not None and owner[n] is not None:
                    acc = sq.setdefault(owner[n], [0.0, 0.0])
                    acc[which == "kd"] += float(g.pow(2).sum())
    return {b: math.sqrt(v[0] / v[1]) for b, v in sq.items() if v[1] > 0}


def cifar_main(args) -> None:
    from fxqat import data as fdata
    from fxqat.models import get_model
    from fxqat.quantizers.control import quantizer_parameters
    from fxqat.training.loop import TrainConfig, calibrate, compute_loss, fit
    from fxqat.training.recipes import train_fp, train_qat

    hybrid = parse_hybrid(args.hybrid)
    tr = fdata.cifar10(train=True)
    te = fdata.cifar10(train=False).subset(5000)
    test = fdata.BatchLoader(te, 500, train=False, rank=0, world_size=1)
    loader = fdata.BatchLoader(tr, 128, train=True, seed=0, rank=0, world_size=1)
    torch.manual_seed(0)
    # the FP checkpoint of benchmarks/accuracy.py's "short" profile (same key: the same cached file)
    fp_cfg = TrainConfig(steps=1200, lr=0.1, seed=0, plot=False, warmup_steps=100)
    key = {"model": "resnet20", "data": "cifar10", "batch_size": 128, "source": tr.source, "n_test": len(te)}
    fp, fp_info = train_fp(get_model("resnet20", 10), loader, fp_cfg, key=key, test_loader=test, desc="FP")
    x0 = tr[0][0].unsqueeze(0).repeat(2, 1, 1, 1)
    base_steps = args.steps or args.epochs * len(loader)
    bits = args.bits

    def prepare(br: bool) -> nn.Module:
        cfg = fxqat.QATConfig(w_bits=bits, a_bits=bits, method="lsq", hybrid=HybridConfig(**hybrid) if br else None)
        return fxqat.prepare_qat(copy.deepcopy(fp), (x0,), cfg)

    def teacher() -> nn.Module:
        return copy.deepcopy(fp).eval().requires_grad_(False)

    def ratio(lr: float) -> Dict[str, float]:
        x, y = next(iter(fdata.BatchLoader(tr, 128, train=True, seed=99, rank=0, world_size=1)))
        steps = {}
        t = teacher()
        for name in ("br", "kd"):
            m = prepare(name == "br")
            fxqat.calibrate(m, [x])
            m.train()
            opt = torch.optim.SGD(list(fxqat.trainable_parameters(m)), lr=lr * 1e-3, momentum=0.9, nesterov=True)

            def step(m=m, opt=opt, name=name):
                out = m(x)
                tl = None
                if name == "kd":
                    with torch.no_grad():
                        tl = t(x)
                loss = compute_loss(out, y, tl)[0]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            steps[name] = step
        return interleaved_ratio(steps, args.ratio_rounds)

    setting = f"w{bits}a{bits}_{args.optimizer}_{base_steps}steps"
    if args.ratios:
        save_record("cifar", setting, f"ratio{('_' + args.tag) if args.tag else ''}", args.seed,
                    {"step_ratio": ratio(0.01), "hybrid": hybrid})
        return
    for arm in args.arms:
        kind, lr = parse_arm(arm, 0.01)
        label = f"{kind}@{lr:g}" + (f"_{args.tag}" if args.tag else "")
        extra: Dict[str, Any] = {"fp_top1": fp_info["top1"], "base_steps": base_steps, "bits": bits, "lr": lr,
                                 "optimizer": args.optimizer}
        steps = base_steps
        if kind == "kd_matched":
            extra["step_ratio"] = ratio(lr)
            steps = max(base_steps, round(base_steps * extra["step_ratio"]["ratio"]))
        if kind not in ("lsq", "kd", "br", "kd_matched", "kd_blocklr"):
            raise SystemExit(f"br_controls: unknown CIFAR arm {kind!r}")
        if kind in ("br", "kd_matched"):
            extra["hybrid"] = hybrid
        qcfg = TrainConfig(steps=steps, lr=lr, seed=args.seed, plot=False, optimizer=args.optimizer,
                           progress=args.progress)
        loader = fdata.BatchLoader(tr, 128, train=True, seed=args.seed, rank=0, world_size=1)
        qm = prepare(kind == "br")
        t0 = time.perf_counter()
        if kind == "kd_blocklr":  # KD with each block's lr scaled by BR's measured gradient ratio (4 batches)
            brm = prepare(True)
            batches = list(zip(range(4), fdata.BatchLoader(tr, 128, train=True, seed=99, rank=0, world_size=1)))
            fxqat.calibrate(brm, [batches[0][1][0]])
            loader.set_epoch(0)
            calibrate(qm, next(iter(loader))[0])  # as train_qat does
            blocks = fxqat.find_blocks(fp, (x0,))
            extra["block_ratio"] = block_grad_ratios(brm, [b for _, b in batches], blocks)
            del brm
            groups: Dict[Tuple[str, float], List[nn.Parameter]] = {}
            qids = {id(p) for p in quantizer_parameters(qm).values()}
            for n, p in qm.named_parameters():
                if p.requires_grad:
                    f = extra["block_ratio"].get(block_of(n, blocks), 1.0)
                    groups.setdefault(("q" if id(p) in qids else "w", f), []).append(p)
            pg = [{"params": ps, "lr": lr * f, "weight_decay": 0.0 if k == "q" else qcfg.weight_decay}
                  for (k, f), ps in groups.items()]
            hist = fit(qm, loader, qcfg, test_loader=test, teacher=teacher(), params=pg,
                       desc=f"{kind} W{bits}A{bits} s{args.seed}")
        else:
            hist = train_qat(qm, loader, qcfg, test_loader=test, teacher=teacher() if "kd" in kind else None,
                             desc=f"{kind} W{bits}A{bits} s{args.seed}")
        rec = {**extra, "top1": hist["final"]["test_top1"], "steps": steps, "time_s": time.perf_counter() - t0}
        if kind == "br":
            rec["running_sensitivity"] = running_table(qm)
        save_record("cifar", setting, label, args.seed, rec)


# ------------------------------------------------------------------------------------------------- report
def load_records() -> List[Dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(RUNS.glob("*.json"))]


def _by(records, task, setting) -> Dict[str, Dict[int, Dict[str, Any]]]:
    """``{arm: {seed: record}}`` of one task and setting (step-ratio-only records left out)."""
    out: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for r in records:
        if r["task"] == task and r["setting"] == setting and not r["arm"].startswith("ratio"):
            out.setdefault(r["arm"], {})[r["seed"]] = r
    return out


def arm_table(arms: Dict[str, Dict[int, Dict[str, Any]]], metric: str, lower_better: bool) -> List[str]:
    """Markdown rows: arm, value per seed, mean ± sd, steps, and for ``kd_matched`` the interleaved BR/KD step ratio
    that set its step count."""
    seeds = sorted({s for a in arms.values() for s in a})
    sign = "lower is better" if lower_better else "higher is better"
    f = ".4f" if lower_better else ".2f"  # nats / top-1 points
    head = ["| arm | " + " | ".join(f"seed {s}" for s in seeds) + f" | mean ± sd ({sign}) | steps | BR step / KD step |",
            "|---|" + "---|" * (len(seeds) + 3)]
    rows = []
    for arm in sorted(arms, key=lambda a: (a.split("@")[0] != "br", a)):
        per = arms[arm]
        vals = [per[s][metric] for s in seeds if s in per]
        cells = [f"{per[s][metric]:{f}}" if s in per else "" for s in seeds]
        sd = f"{statistics.stdev(vals):{f}}" if len(vals) > 1 else "n/a"
        steps = "/".join(sorted({str(per[s].get("steps", "")) for s in per}))
        ratio = ", ".join(f"{per[s]['step_ratio']['ratio']:.2f}" for s in seeds if s in per and "step_ratio" in per[s])
        rows.append(f"| {arm} | " + " | ".join(cells) + f" | {statistics.fmean(vals):{f}} ± {sd} | {steps} | {ratio} |")
    return head + rows


def comparison_data(arms: Dict[str, Dict[int, Dict[str, Any]]], metric: str,
                    lower_better: bool) -> List[Tuple[str, str, str, List[Tuple[int, float]]]]:
    """``(br arm, kd arm, why, [(seed, difference)])`` of every BR arm against KD at its learning rate,
    compute-matched KD at its learning rate, KD with per-block learning rates, and the best KD arm of the
    learning-rate sweep (tuned KD); signed so that positive means block replacement is better."""
    out = []
    sign = -1.0 if lower_better else 1.0
    kds = [a for a in arms if a.split("@")[0] == "kd"]
    best = (min if lower_better else max)(kds, key=lambda a: statistics.fmean(r[metric] for r in arms[a].values())) \
        if kds else None
    for br in sorted(a for a in arms if a.startswith("br@")):
        lr = br.split("@")[1]
        targets = [(f"kd@{lr}", "same lr"), (f"kd_matched@{lr}", "same lr, BR's compute"),
                   (f"kd_blocklr@{lr}", "per-block lr = BR's gradient ratio"), (best, "tuned: best KD lr")]
        done = set()
        for kd, why in targets:
            if kd is None or kd not in arms or kd in done:
                continue
            done.add(kd)
            seeds = sorted(set(arms[br]) & set(arms[kd]))
            if seeds:
                out.append((br, kd, why, [(s, sign * (arms[br][s][metric] - arms[kd][s][metric])) for s in seeds]))
    return out


def comparisons(arms: Dict[str, Dict[int, Dict[str, Any]]], metric: str, lower_better: bool) -> List[str]:
    """Markdown lines of :func:`comparison_data`."""
    f = "+.4f" if lower_better else "+.2f"
    return [f"- `{br}` vs `{kd}` ({why}): " + ", ".join(f"{v:{f}} (seed {s})" for s, v in d)
            for br, kd, why, d in comparison_data(arms, metric, lower_better)]


def plot_differences(panels: List[Tuple[str, str, List[Tuple[str, str, str, List[Tuple[int, float]]]]]],
                     path: Path) -> None:
    """One panel per (task, setting): each BR-vs-control difference per seed as a point, 0 marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in panels if p[2]]
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 1.2 + 0.45 * sum(len(p[2]) for p in panels)),
                             squeeze=False, gridspec_kw={"height_ratios": [max(1, len(p[2])) for p in panels]})
    for ax, (title, unit, comp) in zip(axes[:, 0], panels):
        for row, (br, kd, why, d) in enumerate(comp):
            ax.scatter([v for _, v in d], [row] * len(d), color="C0" if "tuned" not in why else "C1", zorder=3)
        ax.axvline(0.0, color="k", lw=0.8)
        ax.set_yticks(range(len(comp)), [f"{br} vs {kd}" for br, kd, _, _ in comp], fontsize=7)
        ax.set_title(f"{title} ({unit}; right of 0: block replacement better)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report() -> None:
    records = load_records()
    if not records:
        raise SystemExit(f"br_controls: no records in {RUNS}")
    sections: Dict[str, List[str]] = {"controls": [], "act": []}
    panels: Dict[str, list] = {"controls": [], "act": []}
    names = {"llm": "LLM benchmark char Llama, AdamW", "llmmini": "mini char Llama (MINI_MODEL), AdamW",
             "cifar": "CIFAR-10 ResNet-20 (sgd: SGD + Nesterov momentum; adam: Adam, L2 5e-4)"}
    short = {"llm": "char Llama", "llmmini": "mini char Llama", "cifar": "ResNet-20 CIFAR-10"}
    for task, metric, lower in (("llm", "val_loss", True), ("llmmini", "val_loss", True), ("cifar", "top1", False)):
        for setting in sorted({r["setting"] for r in records if r["task"] == task}):
            arms = _by(records, task, setting)
            if not arms:
                continue
            lines = [f"## {names[task]}: {setting}", ""]
            ref = next((r for a in arms.values() for r in a.values() if "fp" in r or "fp_top1" in r), None)
            if ref is not None:
                lines += [f"FP checkpoint (no fine-tuning): {ref['fp']['val_loss']:.4f} validation loss." if "fp" in ref
                          else f"FP checkpoint: {ref['fp_top1']:.2f} % top-1.", ""]
            lines += arm_table(arms, metric, lower) + [""]
            comp = comparisons(arms, metric, lower)
            panels["act" if setting in ACT_SETTINGS else "controls"].append(
                (f"{short[task]}: {setting}", "nats" if lower else "top-1 points", comparison_data(arms, metric, lower)))
            if comp:
                lines += ["Block replacement minus KD per seed (positive: block replacement better):", ""] + comp + [""]
            sections["act" if setting in ACT_SETTINGS else "controls"] += lines
    cost = [r for r in records if "step_ratio" in r]
    if cost:
        sections["controls"] += [
            "## Step cost: block replacement step / KD step (interleaved in one process, median of rounds)", "",
            "| model | setting | HybridConfig | paths | BR step s | KD step s | ratio | measured by |",
            "|---|---|---|---|---|---|---|---|"]
        for r in sorted(cost, key=lambda r: (r["task"], r["setting"], json.dumps(r.get("hybrid", {})), r["arm"])):
            sr = r["step_ratio"]
            hyb = ", ".join(f"{k}={v}" for k, v in (r.get("hybrid") or {}).items()) or "default"
            sections["controls"].append(
                f"| {r['task']} | {r['setting']} | {hyb} | {r.get('n_paths', '')} | {sr['br_step_s']:.3f} | "
                f"{sr['kd_step_s']:.3f} | {sr['ratio']:.2f} | {r['arm']} s{r['seed']} |")
        sections["controls"].append("")
    m = machine()
    head = [f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, 1 torch thread per run; up to 8 other "
            "processes shared the 2 cores, so wall times are not comparable across runs; the BR/KD step ratios are "
            "interleaved measurements (BR, KD, BR, KD, ...) in one process. Each record in "
            "`benchmarks/results/br_runs/` holds the exact command that made it. Tables produced by "
            "`python benchmarks/br_controls.py report`.", ""]
    docs = {
        "br_controls": ["# Block replacement vs tuned, compute-matched KD", ""] + head + sections["controls"],
        "br_llm_act": ["# Activation-quantized LLM regimes: block replacement vs KD", ""] + head + sections["act"],
    }
    for stem, lines in docs.items():
        key = "act" if stem == "br_llm_act" else "controls"
        if any(p[2] for p in panels[key]):
            plot_differences(panels[key], RESULTS / f"{stem}.png")
            lines += [f"![per-seed differences]({stem}.png)", "",
                      f"*`{stem}.png`: every per-seed difference listed above, one point per seed (orange: against "
                      "the best KD learning rate).*"]
        sel = [r for r in records if (r["setting"] in ACT_SETTINGS) == (stem == "br_llm_act")]
        (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
        (RESULTS / f"{stem}.json").write_text(json.dumps({"records": sel}, indent=1))
        log.info("wrote %s", RESULTS / f"{stem}.md")


# ------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="task", required=True)
    for name in ("llm", "cifar"):
        p = sub.add_parser(name)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--arms", nargs="*", default=["br", "kd", "kd_matched"],
                       help="arms to run; none: only build (and cache) the FP checkpoint")
        p.add_argument("--hybrid", nargs="*", default=[], help="HybridConfig fields key=value for the br arm")
        p.add_argument("--tag", default="", help="suffix of the arm label (e.g. the hybrid option)")
        p.add_argument("--ratio-rounds", type=int, default=16)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False)
        if name == "llm":
            p.add_argument("--setting", default="int2", choices=LLM_SETTINGS)
            p.add_argument("--model", default="benchmark", choices=("benchmark", "mini"),
                           help="the benchmark's char Llama or the 16x cheaper mini profile (MINI_MODEL)")
            p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: the recipe's 250)")
        p.add_argument("--ratios", action="store_true", help="only measure the interleaved BR/KD step ratio")
        if name == "cifar":
            p.add_argument("--epochs", type=int, default=2)
            p.add_argument("--steps", type=int, default=None,
                           help="QAT steps per arm (default: --epochs); 120 = accuracy.py's short profile")
            p.add_argument("--bits", type=int, default=2)
            p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    sub.add_parser("report")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("fxqat").setLevel(logging.WARNING)
    if args.task == "report":
        report()
        return 0
    torch.set_num_threads(args.threads)
    (llm_main if args.task == "llm" else cifar_main)(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
