"""Shared helpers of the benchmark scripts: machine description, interleaved step timing, result writing."""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn as nn

import fxqat

__all__ = ["machine", "time_steps", "write_results", "read_results", "RESULTS_DIR", "torchao_config", "torchao_rtn", "torchao_qat_prepare",
           "torchao_qat_convert", "PRESET", "fxqat_prepare", "AUTOBITS_ARMS", "uniform_config", "arm_rows", "cost_rows", "allocation_rows",
           "SCALE_SIZES", "scale_llama", "mem_available_gb"]


def mem_available_gb() -> float:
    """The kernel's MemAvailable in GB (inf where /proc/meminfo is absent): the memory guard of the scale arms."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return float("inf")


def machine() -> Dict[str, object]:
    """What the numbers were measured on."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


def time_steps(steps: Dict[str, Callable[[], None]], warmup: int = 3, rounds: int = 10) -> Dict[str, float]:
    """Median seconds per call of each step function, measured interleaved (round-robin) so that background load
    affects every variant alike."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            sync()  # on a GPU, time the kernels, not their launch
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


#: where benchmark results are committed
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def read_results(stem: str) -> Dict[str, object]:
    """The payload of ``benchmarks/results/<stem>.json`` (to merge new rows into an earlier run)."""
    with open(os.path.join(RESULTS_DIR, f"{stem}.json")) as f:
        return json.load(f)


def write_results(stem: str, payload: Dict[str, object], markdown: str) -> None:
    """Write ``benchmarks/results/<stem>.json`` and ``<stem>.md``."""
    out = RESULTS_DIR
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(payload, f, indent=2)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(markdown)


# ------------------------------------------------------------------------------------------------- LLM settings
#: fxqat's preset of each LLM benchmark setting (docs/llm_benchmark.md)
PRESET = {"8da4w": "8da4w", "int4": "int4_weight_only", "int3": "int3_weight_only", "int2": "int2_weight_only"}


def fxqat_prepare(fp: nn.Module, setting: str, x0: torch.Tensor, hybrid: bool) -> nn.Module:
    """fxqat's QAT model of an LLM setting (its preset; block replacement with ``hybrid``), calibrated on ``x0``."""
    cfg = fxqat.QATConfig.preset(PRESET[setting])
    if hybrid:
        cfg = cfg.with_(hybrid=fxqat.HybridConfig())
    qm = fxqat.prepare_qat(fp, (x0,), cfg)
    fxqat.calibrate(qm, [x0])
    return qm


# ------------------------------------------------------------------------------------------------- torchao (LLM)
def torchao_config(setting: str):
    """torchao's base config of an LLM setting (per-group 32, symmetric weights; asymmetric per-token activations)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, MappingType, PerGroup

    dtype = {"8da4w": torch.int4, "int4": torch.int4, "int3": torch.int3, "int2": torch.int2}[setting]
    if setting == "8da4w":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=PerGroup(32),
                                                     weight_mapping_type=MappingType.SYMMETRIC,
                                                     act_mapping_type=MappingType.ASYMMETRIC)
    return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerGroup(32), mapping_type=MappingType.SYMMETRIC)


def not_lm_head(module: nn.Module, fqn: str) -> bool:
    """torchao filter: every nn.Linear but lm_head (fxqat's presets keep the last layer in FP too)."""
    return isinstance(module, nn.Linear) and not fqn.endswith("lm_head")


def torchao_rtn(model: nn.Module, setting: str) -> nn.Module:
    """torchao round-to-nearest PTQ of a copy of ``model``."""
    from torchao.quantization import quantize_

    m = copy.deepcopy(model).eval()
    quantize_(m, torchao_config(setting), filter_fn=not_lm_head)
    return m


def torchao_qat_prepare(model: nn.Module, setting: str) -> nn.Module:
    """A copy of ``model`` with torchao's QAT fake quantizers (``QATConfig(base, step="prepare")``)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig as AOQATConfig

    m = copy.deepcopy(model)
    quantize_(m, AOQATConfig(torchao_config(setting), step="prepare"), filter_fn=not_lm_head)
    return m


def torchao_qat_convert(model: nn.Module, setting: str) -> nn.Module:
    """torchao's ``step="convert"``, in place; returns the model in eval mode."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig as AOQATConfig

    quantize_(model, AOQATConfig(torchao_config(setting), step="convert"), filter_fn=not_lm_head)
    return model.eval()


# ------------------------------------------------------------------------------------- mixed precision (autobits)
#: the arms of autobits.py and autobits_llm.py: uniform bits, then the three sensitivity estimators
AUTOBITS_ARMS = ("uniform", "paths", "fisher", "hessian")


def uniform_config(table: fxqat.SensitivityTable, budget: float, base: fxqat.QATConfig, choices,
                   activations: bool = True):
    """The uniform arm: every allocatable layer at the largest choice within ``budget`` (activations too, unless
    ``activations=False``: weight-only configs), and its allocation record."""
    b = max(c for c in choices if c <= budget)
    n = table.total_weight_count
    cfg = base.with_(w_bits=b, a_bits=b) if activations else base.with_(w_bits=b)
    return cfg, {"bits": {r.block: b for r in table.rows if r.weight_count},
                                            "avg_bits": float(b), "used_bits": b * n, "predicted_loss": None}


def arm_rows(table: Dict, digits: int) -> List[str]:
    """Markdown rows ``| budget | arm cells |`` of a result table (mean ± half-range, bits used)."""
    rows = ["| avg bits (budget) | uniform | paths | Fisher | Hessian |", "|---|---|---|---|---|"]
    for budget, arms in table.items():
        cells = ["–" if arms.get(a) is None else f"{arms[a]['mean']:.{digits}f} ± {arms[a]['spread']:.{digits}f} "
                 f"({arms[a]['avg_bits']:.2f} b)" for a in AUTOBITS_ARMS]
        rows.append(f"| {budget} | " + " | ".join(cells) + " |")
    return rows


def cost_rows(estimate_cost: Dict, unit: str) -> List[str]:
    """The estimate-cost table, costs in ``unit`` (e.g. "training-step") equivalents."""
    return [f"| estimate | CPU s | {unit} equivalents | wall s |", "|---|---:|---:|---:|"] + [f"| {m} | {c['cpu_s']:.1f} | {c['step_equiv']:.1f} | {c['wall_s']:.1f} |" for m, c in estimate_cost.items()]


def allocation_rows(res: Dict) -> List[str]:
    """The allocations table (bits per block of every budget and arm)."""
    blocks = [r["block"] for r in res["sensitivity"]["paths"]["rows"] if r["weight_count"]]
    rows = ["| budget / arm | " + " | ".join(blocks) + " | avg | predicted ΔL |", "|---|" + "---|" * (len(blocks) + 2)]
    for key, a in res["allocations"].items():
        pl = "–" if a["predicted_loss"] is None else f"{a['predicted_loss']:.3g}"
        rows.append(f"| {key} | " + " | ".join(str(a["bits"].get(b, "")) for b in blocks)
                    + f" | {a['avg_bits']:.2f} | {pl} |")
    return rows


# ------------------------------------------------------------------------------------- Llama shapes (scale rows)
#: Llama-shaped configurations of the scale rows (vocabulary 32000, untied embeddings; 1.1B is Llama-3.2-1B's shape)
#: with their parameter counts; ``"llm"`` is the LLM benchmark's char-Llama (vocabulary 65)
SCALE_SIZES: Dict[str, Dict[str, int]] = {
    "llm": dict(params=804_224),
    "0.4B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=4, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=32000, params=374_360_064),
    "1.1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=32000, params=1_104_218_112),
}


def scale_llama(size: str, dtype: torch.dtype = torch.float32, max_positions: int = 512, seed: int = 0) -> nn.Module:
    """A random-weight ``LlamaForCausalLM`` of a :data:`SCALE_SIZES` shape in ``dtype`` (``"llm"``: the char-Llama)."""
    import transformers

    from fxqat.models.hf import char_llama

    if size == "llm":
        return char_llama(65, seed=seed).to(dtype)
    shape = {k: v for k, v in SCALE_SIZES[size].items() if k != "params"}
    cfg = transformers.LlamaConfig(max_position_embeddings=max_positions, use_cache=False, tie_word_embeddings=False,
                                   **shape)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).to(dtype)
