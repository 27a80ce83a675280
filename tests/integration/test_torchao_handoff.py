"""Hand-off to torchao (issue #15): fxqat's learned scales in torchao ``IntxUnpackedToInt8Tensor`` weights.

Bounds. The handed-off model computes exactly what ``fxqat.convert(qm)`` computes, so logits are compared with
``atol=0``: its weight codes are ``round(Q_w(W)/s)`` with fxqat's own scale ``s`` and ``dequantize()`` gives back
``k·s``, the same float product LSQ computes; torchao's int8 per-token activation quantization is the formula fxqat's
``"dynamic"`` quantizer implements operation by operation; ``F.linear`` then sees the same tensors. With
``scale_dtype=torch.bfloat16`` each weight moves by at most 2^-8 relative (bfloat16 keeps 8 significant bits, so
round-to-nearest is off by at most half of its eps = 2^-7).

Also here: per-group parameters in the Q/DQ export paths (the per-channel flag used to be reported as True for
per-group weights, and the paths then failed inside torch with a shape error).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from qat_helpers import trained

import fxqat
from fxqat.export import ExportError, quant_points, to_onnx, to_pt2e, to_torch_ao, to_torchao, torchao_configs

torchao = pytest.importorskip("torchao", reason="torchao is not installed: pip install -e '.[export]'")
from torchao.quantization import IntxUnpackedToInt8Tensor, quantize_  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


def _weight_quantizers(qm):
    """Layer name -> its weight quantizer, in a graph-root model (quantizer ``fxqat_quant.w_<layer>``)."""
    return {n.rpartition(".w_")[2]: q for n, q in fxqat.named_quantizers(qm).items() if q.kind == "weight"}


@pytest.mark.parametrize("preset", ["8da4w", "int4_weight_only", "int3_weight_only", "int2_weight_only"])
def test_graph_model_equals_convert_and_keeps_fxqat_codes(preset):
    net, x = _mlp(), torch.randn(16, 64)
    qm = trained(net, x, preset)
    bits = fxqat.QATConfig.preset(preset).w_bits
    tm = to_torchao(qm)
    xs = torch.randn(32, 64) * 3
    with torch.no_grad():
        assert torch.equal(tm(xs), fxqat.convert(qm)(xs))  # exact: same codes, scales and activation formula
    assert not any(isinstance(m, fxqat.Quantizer) for m in tm.modules())
    wqs = _weight_quantizers(qm)
    for layer in ("0", "2"):
        t = tm.get_parameter(f"{layer}.weight")
        assert type(t) is IntxUnpackedToInt8Tensor and t.block_size == (1, 32)
        assert t.target_dtype == getattr(torch, f"int{bits}")
        assert t.activation_quantization == ("int8_asym_per_token" if preset == "8da4w" else None)
        codes = t.qdata.reshape(t.shape[0], -1, 32)
        assert int(codes.min()) >= -(2 ** (bits - 1)) and int(codes.max()) <= 2 ** (bits - 1) - 1
        per_group = torch.tensor([len(torch.unique(g)) for g in codes.reshape(-1, 32)])
        assert int(per_group.max()) <= 2**bits
        q = wqs[layer]  # the learned scale itself, not one torchao recomputed
        assert torch.equal(t.scale.reshape(-1), q.scale.detach().abs().reshape(-1))
        with torch.no_grad():
            assert torch.equal(t.dequantize(), q(qm.get_parameter(f"{layer}.weight")))
    assert type(tm.get_parameter("4.weight")) is nn.Parameter  # the last layer stays FP under the presets


def test_scales_are_fxqat_not_torchao_recomputed():
    net, x = _mlp(), torch.randn(16, 64)
    qm = trained(net, x, "8da4w", steps=5)
    tm, configs = to_torchao(qm), torchao_configs(qm)
    assert sorted(configs) == ["0", "2"]
    for layer, cfg in configs.items():
        ref = copy.deepcopy(net.get_submodule(layer))
        quantize_(ref, cfg)  # torchao's own PTQ of the latent weight, same scheme
        ours, theirs = tm.get_parameter(f"{layer}.weight"), ref.weight
        assert type(ours) is type(theirs)
        for attr in ("block_size", "target_dtype", "activation_quantization", "dtype", "shape"):
            assert getattr(ours, attr) == getattr(theirs, attr), attr
        assert ours.scale.shape == theirs.scale.shape and ours.zero_point.dtype == theirs.zero_point.dtype
        assert not torch.allclose(ours.scale, theirs.scale, rtol=1e-3)  # learned LSQ scales, not absmax/7.5


def test_bfloat16_scales_move_weights_by_at_most_2e_minus_8():
    net, x = _mlp(), torch.randn(16, 64)
    qm = trained(net, x, "8da4w")
    exact, rounded = to_torchao(qm), to_torchao(qm, scale_dtype=torch.bfloat16)
    for layer in ("0", "2"):
        a, b = exact.get_parameter(f"{layer}.weight"), rounded.get_parameter(f"{layer}.weight")
        assert b.scale.dtype == torch.bfloat16 and torch.equal(a.qdata, b.qdata)  # codes stay fxqat's
        wa, wb = a.dequantize(), b.dequantize()
        assert bool(((wa - wb).abs() <= wa.abs() * torch.finfo(torch.bfloat16).eps / 2).all())
        assert float(((wa - wb).abs() / wa.abs().clamp(min=1e-30)).max()) > 2.0**-10  # the rounding is real


def test_hf_llama_handoff_is_the_users_model_again():
    pytest.importorskip("transformers", reason="transformers is not installed: pip install -e '.[hf]'")
    from transformers import LlamaForCausalLM

    from fxqat.models.hf import char_llama

    fp = char_llama(65, num_hidden_layers=2).eval()
    x = torch.randint(0, 65, (2, 32), generator=torch.Generator().manual_seed(0))
    qm = trained(fp, x, "8da4w", steps=2)
    tm = to_torchao(qm)
    with torch.no_grad():
        assert torch.equal(tm(x).logits, fxqat.convert(qm)(x).logits)  # exact (module docstring)
        assert torch.equal(tm(x).logits, qm(x).logits)
    assert type(tm) is LlamaForCausalLM and not hasattr(tm, "fxqat_capture")
    assert type(tm.model.layers[0]) is type(fp.model.layers[0])  # graph regions rebuilt into the user's modules
    assert tm.model.layers[0].hidden_size == fp.model.layers[0].hidden_size
    assert not any(isinstance(m, (fxqat.Quantizer, torch.fx.GraphModule)) for m in tm.modules())
    assert set(tm.state_dict()) == set(fp.state_dict())
    kinds = {n: type(p).__name__ for n, p in tm.named_parameters() if n.endswith("proj.weight")}
    assert len(kinds) == 14 and set(kinds.values()) == {"IntxUnpackedToInt8Tensor"}  # 7 linears per layer
    assert type(tm.lm_head.weight) is nn.Parameter
    assert len(torchao_configs(qm)) == 14


def test_layers_without_a_torchao_form_are_named():
    x = torch.randn(8, 64)
    static = fxqat.QATConfig(w_bits=4, a_bits=8, w_granularity="per_group", group_size=32, first_last=None)
    qm = fxqat.prepare_qat(_mlp(), (x,), static)
    qm(x)
    with pytest.raises(ExportError, match="input quantizer.*to_pt2e"):
        to_torchao(qm.eval())
    per_tensor = fxqat.QATConfig.preset("int4_weight_only", w_granularity="per_tensor", group_size=None)
    qm = fxqat.prepare_qat(_mlp(), (x,), per_tensor)
    qm(x)
    with pytest.raises(ExportError, match="per_tensor weights"):
        to_torchao(qm.eval())
    conv = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 6 * 6, 4))
    xc = torch.randn(2, 3, 8, 8)
    qm = fxqat.prepare_qat(conv, (xc,), fxqat.QATConfig.preset("int4_weight_only", group_size=27))
    qm(xc)
    with pytest.raises(ExportError, match="not a linear layer"):
        to_torchao(qm.eval())


# ------------------------------------------------------------------ per-group parameters in the Q/DQ paths
def test_per_group_params_are_not_per_channel_and_fake_quant_matches():
    x = torch.randn(8, 64)
    qm = trained(_mlp(), x, "int4_weight_only")
    points = [p for p in quant_points(qm).values() if p.kind == "weight"]
    assert len(points) == 2
    for p in points:
        assert p.params.per_group and not p.params.per_channel and p.params.granularity == "per_group"
        assert p.params.group_size == 32 and p.params.ch_axis == 0
        q = qm.get_submodule(p.quantizer)
        w = qm.get_parameter(p.source)
        assert p.params.scale.numel() == w.numel() // 32
        with torch.no_grad():
            assert torch.equal(p.params.fake_quant(w), q(w))
            codes = q.integer_repr(w)
        assert codes.shape == w.shape  # per-group codes on the weight's own shape (used to broadcast wrongly)
        assert torch.equal(codes * p.params.scale.repeat_interleave(32).reshape(w.shape), q(w))
        with pytest.raises(ExportError, match="qscheme"):
            p.params.qscheme


@pytest.mark.parametrize("path", ["pt2e", "onnx", "torch_ao"])
def test_q_dq_paths_refuse_per_group_and_dynamic_with_a_pointer(path, tmp_path):
    x = torch.randn(8, 64)
    export = {"pt2e": lambda m: to_pt2e(m, (x,)), "torch_ao": lambda m: to_torch_ao(m, (x,)),
              "onnx": lambda m: to_onnx(m, (x,), tmp_path / "m.onnx")}[path]
    if path == "onnx":
        pytest.importorskip("onnx", reason="onnx is not installed: pip install -e '.[export]'")
    weight_only = trained(_mlp(), x, "int4_weight_only", steps=1)
    with pytest.raises(ExportError, match=r"per-group weights \(group_size=32.*to_torchao"):
        export(weight_only)
    dynamic = trained(_mlp(), x, "8da4w", steps=1)
    with pytest.raises(ExportError, match="dynamic.*to_torchao"):
        export(dynamic)


@pytest.mark.slow  # inductor compiles the dequantize + linear on the CPU: tens of seconds on the shared machine
def test_handoff_runs_under_torch_compile():
    net, x = _mlp(), torch.randn(16, 64)
    tm = to_torchao(trained(net, x, "8da4w", steps=1))
    xs = torch.randn(32, 64) * 3
    with torch.no_grad():
        eager, compiled = tm(xs), torch.compile(tm)(xs)
    # inductor fuses the per-token quantization and the int-weight dequantization into its own loops; it may
    # reassociate float sums (~1e-6) and so, rarely, move an activation across a rounding boundary (one int8 step
    # of one token, ~1e-2 of that token's range): 1e-3·max|y| covers both
    assert float((compiled - eager).abs().max()) <= 1e-3 * float(eager.abs().max())
