"""GGUF export for llama.cpp (issue #26): the gguf presets' grid is llama.cpp's, and the file holds fxqat's weights.

Bounds. Write -> read -> dequantize is compared with ``atol=0``: a Q4_0/Q8_0 block dequantizes to ``fp16(d)·k`` in
float32, exactly the product the ``gguf`` quantizer's forward computes (an fp16 value times a small integer is exact
in float32); F16/F32 tensors are compared with the converted weight rounded the same way. At initialisation the gguf
quantizer's step *is* llama.cpp's (``m/−8``, ``max|x|/127``) and its codes follow llama.cpp's float32 arithmetic, so
its packed blocks equal the bytes of the gguf package's port of llama.cpp's quantizer (bit-exact with
``ggml-quants.c`` per that package).

The llama.cpp runtime test runs the file in llama.cpp (``llama-cpp-python``) and the fake-quantized model on the
same token ids. They differ by more than float rounding because llama.cpp's CPU kernels quantize each activation row
to Q8_0 blocks before a Q4_0/Q8_0 product (int8 dot products); the bounds below are about 10x the differences
measured on this model (see benchmarks/results/deploy_llm.md), and the next-token agreement must be near-total.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from qat_helpers import lm_steps

import fxqat
from fxqat.export import ExportError, GGUFVocab, to_gguf
from fxqat.export.gguf import pack_blocks, weight_quantizers

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed: pip install -e '.[export]'")
transformers = pytest.importorskip("transformers", reason="transformers is not installed: pip install -e '.[hf]'")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

VOCAB = 48
CHARS = [chr(ord("0") + i) for i in range(VOCAB)]
ARCHS = {
    "llama": lambda **kw: transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)),
    "mistral": lambda **kw: transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=None, **kw)),
    "qwen2": lambda **kw: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw)),
}


def tiny(arch="llama", seed=0, **kw):
    torch.manual_seed(seed)
    sizes = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    return ARCHS[arch](**{**sizes, **kw}).eval()


def qat(model, preset, steps=3, **cfg):
    """Prepare with ``preset`` and train a few steps, so the steps are learned (not llama.cpp's initial ones)."""
    x = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(1))
    return lm_steps(fxqat.prepare_qat(model, (x,), fxqat.QATConfig.preset(preset, **cfg)), x, VOCAB, steps)


def read(path):
    """GGUF tensor name -> (type name, float32 array dequantized by gguf's own code, in PyTorch's [out, in] shape)."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(n) for n in reversed(t.shape))
        out[t.name] = (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape))
    return out


def rope_rows(w, n_head):
    """HF's rotary layout (halves) -> llama.cpp's (pairs), written independently of the exporter."""
    out = torch.empty_like(w)
    per = w.shape[0] // n_head
    for h in range(n_head):
        for i in range(per // 2):
            out[h * per + 2 * i] = w[h * per + i]
            out[h * per + 2 * i + 1] = w[h * per + per // 2 + i]
    return out


def expected(converted, name, arch, cfg):
    w = converted[name].float()
    if arch in ("llama", "mistral") and name.endswith(("q_proj.weight", "k_proj.weight")):
        w = rope_rows(w, cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads)
    return w


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf):
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    _, _, i, rest = hf.split(".", 3)
    mod, _, kind = rest.rpartition(".")
    return f"blk.{i}.{GGUF_NAMES[mod]}.{kind}"


@pytest.mark.parametrize("arch,preset,fmt", [("llama", "gguf_q4_0", "Q4_0"), ("llama", "gguf_q8_0", "Q8_0"),
                                             ("mistral", "gguf_q4_0", "Q4_0"), ("qwen2", "gguf_q8_0", "Q8_0")])
def test_gguf_write_read_dequantize_equals_converted_weights(tmp_path, arch, preset, fmt):
    model = tiny(arch)
    qm = qat(model, preset)
    converted = {k: v for k, v in fxqat.convert(qm).state_dict().items() if "fxqat" not in k}
    path = tmp_path / "m.gguf"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact export warns about nothing
        types = to_gguf(qm, path, GGUFVocab.from_chars(CHARS))
    back = read(path)
    assert set(back) == set(types) == {gguf_name(k) for k in converted}
    n_quantized = 0
    for hf, w in converted.items():
        kind, values = back[gguf_name(hf)]
        want = expected(converted, hf, arch, model.config)
        if hf.endswith("_proj.weight"):
            assert kind == fmt
            n_quantized += 1
            np.testing.assert_array_equal(values, want.numpy())  # atol 0: the file is the fake-quantized weight
        elif w.dim() == 2:  # embeddings, lm_head: F16 (not quantized by the preset)
            assert kind == "F16"
            np.testing.assert_array_equal(values, want.half().float().numpy())
        else:  # norms and biases
            assert kind == "F32"
            np.testing.assert_array_equal(values, want.numpy())
    assert n_quantized == 7 * model.config.num_hidden_layers
    fields = gguf.GGUFReader(path).fields
    gguf_arch = "qwen2" if arch == "qwen2" else "llama"
    assert fields["general.architecture"].contents() == gguf_arch
    assert fields[f"{gguf_arch}.block_count"].contents() == 2
    assert fields[f"{gguf_arch}.attention.head_count_kv"].contents() == 2
    assert fields[f"{gguf_arch}.rope.dimension_count"].contents() == 16
    assert fields["general.file_type"].contents() == (2 if fmt == "Q4_0" else 7)
    assert len(fields["tokenizer.ggml.merges"].contents()) >= 1
    assert len(fields["tokenizer.ggml.tokens"].contents()) == VOCAB


@pytest.mark.parametrize("preset,qtype", [("gguf_q4_0", "Q4_0"), ("gguf_q8_0", "Q8_0")])
def test_gguf_codes_equal_llama_cpp_where_the_step_is_llama_cpps(preset, qtype):
    """Blocks whose learned step equals llama.cpp's own choice get llama.cpp's bytes (step and codes); the others
    keep fxqat's codes for their own step."""
    torch.manual_seed(0)
    w = torch.randn(32, 256) * torch.logspace(-3, 1, 32)[:, None]  # rows from 1e-3 to 10 in magnitude
    q = fxqat.quantizers.make_quantizer(fxqat.QATConfig.preset(preset).spec_for("weight"))
    q(w)
    ref = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[qtype])
    k, d16 = q.block_codes(w)
    assert np.array_equal(pack_blocks(k, d16, qtype, 32), ref)  # initialised at llama.cpp's step: every block
    with torch.no_grad():  # move every other block's step: a learned step
        q.scale[::2] *= 1.1
    k, d16 = q.block_codes(w)
    mine = pack_blocks(k, d16, qtype, 32).reshape(-1, ref.shape[1] // 8)
    theirs = ref.reshape(mine.shape)
    assert np.array_equal(mine[1::2], theirs[1::2])
    assert not np.array_equal(mine[::2], theirs[::2])
    with torch.no_grad():
        y = q(w).reshape(-1, 32)
    dq = gguf.quants.dequantize(mine.reshape(32, -1), gguf.GGMLQuantizationType[qtype]).reshape(-1, 32)
    np.testing.assert_array_equal(dq, y.numpy())


def test_gguf_q4_0_grid_is_llama_cpps_formula():
    """value = d16·(q − 8), q = clamp(trunc(x/d + 8.5), 0, 15): ties round up, −8 is on the side of the block's
    element of largest magnitude (a negative d when that element is positive)."""
    q = fxqat.quantizers.make_quantizer(fxqat.QATConfig.preset("gguf_q4_0").spec_for("weight"))
    x = torch.tensor([[8.0, 0.5, -0.5, 1.5, -7.5, 7.49, 3.0, -3.0] + [0.0] * 24])
    y = q(x).detach()
    assert float(q.scale.detach()) == -1.0  # 8 / -8
    # x/d = -x: trunc(-x + 8.5) - 8 -> codes; value = -1 * code
    assert y[0, :8].tolist() == [8.0, 0.0, -1.0, 1.0, -7.0, 7.0, 3.0, -3.0]


def test_gguf_int4_preset_exports_with_fp16_steps_and_warns(tmp_path):
    qm = qat(tiny(), "int4_weight_only", steps=1)
    with pytest.warns(UserWarning, match="not fp16 values"):
        types = to_gguf(qm, tmp_path / "m.gguf", GGUFVocab.from_chars(CHARS))
    assert types["blk.0.ffn_down.weight"] == "Q4_0"
    converted = fxqat.convert(qm).state_dict()
    kind, values = read(tmp_path / "m.gguf")["blk.0.ffn_down.weight"]
    w = converted["model.layers.0.mlp.down_proj.weight"]
    step = float(weight_quantizers(qm)["model.layers.0.mlp.down_proj.weight"].scale.detach().abs().max())
    assert 0 < float((torch.from_numpy(values) - w).abs().max()) <= 8 * step * 2.0**-11  # fp16: 11-bit significand


def test_gguf_unaligned_weight_written_f16_with_a_warning_naming_it(tmp_path):
    model = tiny(intermediate_size=80)  # down_proj reads 80 inputs: no block of 32 fits
    qm = qat(model, "gguf_q8_0", steps=1, overrides=(fxqat.Override("*down_proj", skip=True),))
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.mlp\.down_proj\.weight \(reduction dimension 80\)"):
        types = to_gguf(qm, tmp_path / "m.gguf", GGUFVocab.from_chars(CHARS))
    assert types["blk.1.ffn_down.weight"] == "F16" and types["blk.1.ffn_up.weight"] == "Q8_0"


def test_gguf_unsupported_architecture_is_refused_naming_it(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=4, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    qm = fxqat.prepare_qat(model, (torch.randint(0, VOCAB, (1, 8)),), fxqat.QATConfig.preset("gguf_q8_0"))
    with pytest.raises(ExportError, match="model_type 'gpt2' is not supported"):
        to_gguf(qm, tmp_path / "m.gguf", GGUFVocab.from_chars(CHARS))
    assert not (tmp_path / "m.gguf").exists()


def test_gguf_vocabulary_of_the_wrong_size_is_refused(tmp_path):
    qm = qat(tiny(), "gguf_q8_0", steps=0)
    with pytest.raises(ExportError, match="vocabulary has 10 tokens, the model 48"):
        to_gguf(qm, tmp_path / "m.gguf", GGUFVocab.from_chars(CHARS[:10]))


@pytest.mark.slow  # prepares and trains a tiny Llama, then llama.cpp evaluates 4 x 48 tokens (about 30 s)
@pytest.mark.parametrize("preset", ["gguf_q4_0", "gguf_q8_0"])
def test_gguf_llama_cpp_runtime_parity(tmp_path, preset):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (it builds llama.cpp from source, ~10 min on 2 "
                            "cores): pip install -e '.[llamacpp]'")
    from fxqat.export.gguf_runtime import llama_cpp_logits

    qm = qat(tiny(num_hidden_layers=2), preset, steps=5)
    path = tmp_path / "m.gguf"
    to_gguf(qm, path, GGUFVocab.from_chars(CHARS), float_type="f32")
    ids = torch.randint(0, VOCAB, (4, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = qm(ids).logits.float()
    got = llama_cpp_logits(path, ids)
    assert llama_cpp is not None and got.shape == ref.shape
    diff = float((got - ref).abs().max())
    agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    # llama.cpp's Q8_0 activations: measured on this random model (logits' std ~0.15) max |diff| 0.0044 (Q4_0) and
    # 0.0041 (Q8_0), next-token agreement 99.5-100 % (near-ties of an untrained model); bounds ~10x / a few ties
    assert diff < 0.05, diff
    assert agree >= 0.95, agree
