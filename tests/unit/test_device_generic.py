"""No code path of fxqat assumes the CPU (issue 24 item 5), checked without a GPU:

* every custom operator fxqat registers (``torch.library``) has a device-generic kernel (CompositeExplicitAutograd or
  CompositeImplicitAutograd) and a Meta (fake) kernel, not a CPU-only one;
* a prepared model moved to the ``"meta"`` device runs a training forward and backward with every quantizer method
  and with block replacement: a tensor created on the CPU inside a training path would fail there as it fails on CUDA
  ("expected all tensors to be on the same device");
* the training-path packages never call ``.cpu()`` or create tensors on a hard-coded ``"cpu"`` device.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

import fxqat
from fxqat.config import HybridConfig
from fxqat.method_registry import available_methods
from fxqat.models.small import MLP, SmallCNN

PKG = Path(fxqat.__file__).resolve().parent
#: packages whose code runs in prepare / calibrate / training steps (export, checkpointing and reports may use the CPU)
TRAINING_PATHS = ("quantizers", "passes", "capture", "graph", "layer_registry.py", "api.py", "optim.py")


def modules_registering_ops():
    for path in sorted(PKG.rglob("*.py")):
        if "torch.library" in path.read_text():
            yield "fxqat." + ".".join(path.relative_to(PKG).with_suffix("").parts)


def test_custom_ops_have_device_generic_kernels():
    mods = list(modules_registering_ops())
    assert mods, "no module registers a torch.library operator: update this test"
    for mod in mods:
        importlib.import_module(mod)
    ops = [op for op in torch._C._dispatch_get_all_op_names() if op.startswith("fxqat::")]
    assert len(ops) >= len(mods)
    for op in ops:
        has = {k: torch._C._dispatch_has_kernel_for_dispatch_key(op, k)
               for k in ("CompositeExplicitAutograd", "CompositeImplicitAutograd", "Meta", "CPU")}
        assert has["CompositeExplicitAutograd"] or has["CompositeImplicitAutograd"], (op, has)
        assert has["Meta"] or has["CompositeImplicitAutograd"], (op, has)
        assert not has["CPU"], f"{op} has a CPU-only kernel; register it for every device (or as a composite)"


def meta_step(qm: torch.nn.Module, x: torch.Tensor) -> None:
    """One training forward + backward of ``qm`` on the meta device; every gradient lands there too."""
    qm = qm.to("meta").train()
    out = qm(x.to("meta"))
    parts = [out.lp, *out.paths, out.fp] if hasattr(out, "lp") else [out]
    loss = sum(p.float().sum() for p in parts if p.requires_grad)
    loss.backward()
    grads = [p.grad for p in qm.parameters() if p.grad is not None]
    assert grads and all(g.device.type == "meta" for g in grads)


@pytest.mark.parametrize("method", [m for m in available_methods() if m not in ("dynamic", "grad", "gguf")])
def test_every_weight_and_activation_method_trains_on_meta(method):
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16)
    qm = fxqat.prepare_qat(SmallCNN(), (x,), fxqat.QATConfig(w_bits=4, a_bits=4, method=method))
    fxqat.calibrate(qm, [x])
    meta_step(qm, x)


@pytest.mark.parametrize("preset", ["8da4w", "int4_weight_only", "gguf_q4_0"])
def test_llm_presets_train_on_meta(preset):
    """Per-group weights, dynamic per-token activations (8da4w) and gguf's blocks."""
    if preset not in fxqat.config.PRESETS:
        pytest.skip(f"no preset {preset}")
    torch.manual_seed(0)
    x = torch.randn(4, 1, 32, 32)
    qm = fxqat.prepare_qat(MLP(in_shape=(1, 32, 32)), (x,), fxqat.QATConfig.preset(preset, first_last_layers=()))
    fxqat.calibrate(qm, [x])
    meta_step(qm, x)


def test_block_replacement_trains_on_meta():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16)
    qm = fxqat.prepare_qat(SmallCNN(), (x,), fxqat.QATConfig(w_bits=4, a_bits=4, hybrid=HybridConfig(paths=1)))
    fxqat.calibrate(qm, [x])
    qm.train()(x)  # the first step reads its step counter from the buffer once (a host read, fine on CUDA)
    meta_step(qm, x)


def test_training_paths_never_move_to_the_cpu():
    pattern = re.compile(r"\.cpu\(\)|device\s*=\s*['\"]cpu['\"]|torch\.device\(['\"]cpu['\"]\)")
    hits = []
    for entry in TRAINING_PATHS:
        root = PKG / entry
        for path in sorted(root.rglob("*.py") if root.is_dir() else [root]):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line.split("#")[0]):
                    hits.append(f"{path.relative_to(PKG)}:{i}: {line.strip()}")
    assert not hits, "CPU-only code in a training path:\n" + "\n".join(hits)
