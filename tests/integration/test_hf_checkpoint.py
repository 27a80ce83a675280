"""Hugging Face checkpoints (issue #26): ``fxqat.export.save_pretrained`` -> ``from_pretrained`` without fxqat.

Bounds. The checkpoint holds torchao ``IntxUnpackedToInt8Tensor`` weights built from fxqat's codes and scales
(``to_torchao``, itself checked bit-exact against ``fxqat.convert`` in test_torchao_handoff.py); transformers
rebuilds the same tensors from the safetensors file, so the loaded model's logits equal the converted model's with
``atol=0``. The load runs in a fresh interpreter that must never import fxqat.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from qat_helpers import lm_steps

import fxqat
from fxqat.export import ExportError, load_for_qat, save_pretrained
from fxqat.export.gguf import weight_quantizers
from fxqat.quantizers.gguf import gguf_step

transformers = pytest.importorskip("transformers", reason="transformers is not installed: pip install -e '.[hf]'")
pytest.importorskip("torchao", reason="torchao is not installed: pip install -e '.[export]'")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

VOCAB = 48

LOAD = textwrap.dedent("""
    import sys, torch, transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
    ids = torch.load(sys.argv[2])
    with torch.no_grad():
        logits = model(ids).logits
    weight = model.model.layers[0].mlp.down_proj.weight
    assert "fxqat" not in sys.modules, "the checkpoint needed fxqat"
    torch.save({"logits": logits, "weight_type": type(weight).__name__}, sys.argv[3])
""")


def trained(preset, steps=3):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    x = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(1))
    return lm_steps(fxqat.prepare_qat(model, (x,), fxqat.QATConfig.preset(preset)), x, VOCAB, steps), x


@pytest.mark.parametrize("preset", ["int4_weight_only", "8da4w", "gguf_q4_0"])
def test_hf_checkpoint_loads_with_from_pretrained_alone(tmp_path, preset):
    qm, x = trained(preset)
    path = save_pretrained(qm, tmp_path / "ckpt")
    torch.save(x, tmp_path / "ids.pt")
    done = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "ckpt"), str(tmp_path / "ids.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["weight_type"] == "IntxUnpackedToInt8Tensor"
    with torch.no_grad():
        want = fxqat.convert(qm)(x).logits
    assert torch.equal(out["logits"], want)  # atol 0 (module docstring)
    fp_bytes = sum(p.numel() * 4 for n, p in qm.state_dict().items() if "fxqat" not in n)
    # int8 codes (1 byte a weight) + scales: the 14 quantized layers hold 70 % of this tiny model's weights
    assert path.stat().st_size < 0.6 * fp_bytes


@pytest.mark.parametrize("preset", ["int4_weight_only", "gguf_q4_0"])
def test_hf_checkpoint_reloads_into_fxqat_with_learned_steps(tmp_path, preset):
    qm, x = trained(preset)
    save_pretrained(qm, tmp_path / "ckpt")
    again = load_for_qat(tmp_path / "ckpt", (x,), fxqat.QATConfig.preset(preset))
    before, after = weight_quantizers(qm), weight_quantizers(again)
    assert set(before) == set(after) and len(after) == 14
    for name, q in before.items():
        step = q.scale.detach()
        if preset == "gguf_q4_0":  # the file keeps the fp16 step the grid uses (sign included)
            step = gguf_step(step)
        assert torch.equal(after[name].scale.detach(), step.reshape(after[name].scale.shape)), name
    with torch.no_grad():
        assert torch.equal(fxqat.convert(again.eval())(x).logits, fxqat.convert(qm)(x).logits)
    again.train()
    loss = again(x).logits.float().pow(2).mean()
    loss.backward()
    grads = [q.scale.grad for q in after.values()]
    assert all(g is not None and bool(torch.isfinite(g).all()) and bool((g != 0).any()) for g in grads)


def test_hf_checkpoint_refuses_a_model_without_hugging_face_config(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(32, 32))
    qm = fxqat.prepare_qat(net, (torch.randn(2, 32),), fxqat.QATConfig.preset("int4_weight_only", first_last_layers=()))
    with pytest.raises(ExportError, match="Sequential has no Hugging Face config"):
        save_pretrained(qm, tmp_path / "ckpt")
