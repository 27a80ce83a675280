"""ExecuTorch deployment (issue #16 part 4): 8da4w models as XNNPACK ``.pte`` programs, run by ExecuTorch's runtime.

Bounds. ``to_executorch`` lowers ``to_torchao(qm, scale_dtype=torch.bfloat16)``: XNNPACK stores 4-bit groupwise
scales in bfloat16 and quantizes activations per token with the same asymmetric int8 formula, then accumulates
integer products exactly; so the program equals that torchao model up to float summation order (``1e-5·max|y|``
here; measured ~3e-7), except where a float difference moves a value across a rounding boundary of the next int8
activation quantizer (rare; one code, 1/255 of that token's range). Against the fake-quantized QAT model the only other difference is the bfloat16 rounding of
each scale, at most 2^-8 relative per weight (half bfloat16's eps): for one linear layer on the same quantized input
``|Δy| ≤ 2^-8 · Σ|x̂||ŵ|`` (plus the float slack above). Through several layers the rounding can also move an
activation across a rounding boundary of the next layer's quantizer, so the multi-layer checks compare next-token
agreement and a logit margin, with the reason at each assert.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
from qat_helpers import trained

import fxqat
from fxqat.export import ExportError, load_executorch, to_executorch, to_torchao

pytest.importorskip("torchao", reason="torchao is not installed: pip install -e '.[export]'")
pytest.importorskip("executorch", reason="the ExecuTorch runtime is not installed: pip install -e '.[executorch]'")

pytestmark = pytest.mark.filterwarnings("ignore")
BF16_U = torch.finfo(torch.bfloat16).eps / 2  # 2^-8: bfloat16 round-to-nearest, relative


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 16)).eval()


@pytest.fixture(scope="module")
def mlp_program(tmp_path_factory):
    """An 8da4w MLP, briefly trained, and its ``.pte`` (lowered once for the tests that read it)."""
    net, x = _mlp(), torch.randn(8, 128)
    qm = trained(net, x, "8da4w")
    return net, x, qm, to_executorch(qm, (x,), tmp_path_factory.mktemp("et") / "q.pte")


def test_executorch_8da4w_mlp_equals_its_torchao_model(mlp_program):
    net, x, qm, path = mlp_program
    run = load_executorch(path)
    xs = torch.randn(8, 128) * 2
    y = run(xs)[0]
    with torch.no_grad():
        ref = to_torchao(qm, scale_dtype=torch.bfloat16)(xs)
        fq = qm(xs)
    assert float((y - ref).abs().max()) <= 1e-5 * float(ref.abs().max())  # float summation order only
    assert float((y - fq).abs().max()) <= 0.05 * float(fq.abs().max())  # 3 layers of <= 2^-8 weight rounding


def test_executorch_one_8da4w_layer_within_the_bf16_bound(tmp_path):
    torch.manual_seed(1)
    layer, x = nn.Sequential(nn.Linear(128, 64)).eval(), torch.randn(8, 128)
    qm = fxqat.prepare_qat(layer, (x,), fxqat.QATConfig.preset("8da4w", first_last_layers=()))
    qm(x)
    qm.eval()
    xs = torch.randn(8, 128) * 2
    y = load_executorch(to_executorch(qm, (xs,), tmp_path / "one.pte"))(xs)[0]
    q = fxqat.named_quantizers(qm)
    with torch.no_grad():
        fq = qm(xs)
        xq, wq = q["fxqat_quant.a_input_1"](xs), q["fxqat_quant.w_0"](layer[0].weight)
        bound = BF16_U * (xq.abs() @ wq.abs().t()) + 1e-5 * float(fq.abs().max())  # module docstring
    assert bool(((y - fq).abs() <= bound).all())
    assert float((y - fq).abs().max()) > 0


def test_executorch_8da4w_program_is_4_bit(mlp_program):
    net, x, _, path = mlp_program
    # size: 4-bit codes two per byte and bf16 scales, against the FP program of the same network
    fp_bytes = len(to_executorch(net, (x,)))
    q_bytes = os.path.getsize(path)
    n_q = 128 * 256 + 256 * 128
    packed = n_q // 2 + 2 * (n_q // 32) + 4 * (128 * 16 + 16 + 256 + 128)  # codes + scales + FP last layer, biases
    assert q_bytes <= packed + 16 * 1024  # program and flatbuffer overhead; int8 codes alone (65 kB) would not fit
    assert fp_bytes >= 4 * (n_q + 128 * 16) and fp_bytes / q_bytes > 4


def test_executorch_refuses_weight_only_with_the_reason():
    net, x = _mlp(), torch.randn(8, 128)
    qm = trained(net, x, "int4_weight_only", steps=1)
    with pytest.raises(ExportError, match="weight-only.*8da4w"):
        to_executorch(qm, (x,))


@pytest.mark.slow
def test_executorch_char_llama_8da4w_on_tiny_shakespeare(tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed: pip install -e '.[hf]'")
    from fxqat.models.hf import char_llama
    from fxqat.text_data import tiny_shakespeare
    from fxqat.training.lm import LMRecipe, train_lm

    corpus = tiny_shakespeare()
    fp = char_llama(corpus.vocab_size, num_hidden_layers=1).eval()  # one decoder layer: lowering time (~20 s)
    batches = list(corpus.batches("val", 3, 4, 64, seed=1337))
    x0 = batches[0][0]
    qm = fxqat.prepare_qat(fp, (x0,), fxqat.QATConfig.preset("8da4w"))
    train_lm(qm, corpus, LMRecipe(steps=10, lr=3e-3, warmup=2, batch_size=8, context=64), progress=False)
    qm.eval()
    path = to_executorch(qm, (x0,), tmp_path / "llama.pte")
    run = load_executorch(path)
    tb = to_torchao(qm, scale_dtype=torch.bfloat16)
    agree = n = 0
    with torch.no_grad():
        for x, _ in batches:
            y, ref, fq = run(x)[0], tb(x).logits, qm(x).logits
            # the program is the bf16-scale torchao model up to float summation order (~1e-7) through 7 linears,
            # attention and the norms; where that moves a value across an int8 activation rounding boundary one
            # code flips (1/255 of that token's range; measured once: 3.6e-3 on logits of max 3.4), so: nearly all
            # logits agree to 1e-4·max, and the rare flips stay within 1e-2·max
            d = (y - ref).abs()
            assert float((d <= 1e-4 * float(ref.abs().max())).float().mean()) >= 0.99
            assert float(d.max()) <= 1e-2 * float(ref.abs().max())
            # vs fake-quant, the bf16 rounding (<= 2^-8 per weight) adds up over the layers: a tenth of the
            # logit spread bounds it with a wide margin (measured in docs/deploy.md)
            assert float((y - fq).abs().max()) <= 0.1 * float(fq.std())
            agree += int((y.argmax(-1) == fq.argmax(-1)).sum())
            n += y.shape[0] * y.shape[1]
    assert agree / n >= 0.99  # next-token predictions; disagreements only between near-equal logits
    n_q = sum(p.numel() for name, p in fp.named_parameters() if name.endswith("proj.weight"))
    n_fp = sum(p.numel() for name, p in fp.named_parameters() if not name.endswith("proj.weight"))
    size = (tmp_path / "llama.pte").stat().st_size
    assert size <= n_q // 2 + 2 * (n_q // 32) + 4 * n_fp + 64 * 1024  # 4-bit packed; int8 codes would not fit
