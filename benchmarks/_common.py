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

__all__ = ["machine", "time_steps", "write_results", "torchao_config", "torchao_rtn", "torchao_qat_prepare",
           "torchao_qat_convert"]


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
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def write_results(stem: str, payload: Dict[str, object], markdown: str) -> None:
    """Write ``benchmarks/results/<stem>.json`` and ``<stem>.md``."""
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(payload, f, indent=2)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(markdown)


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
