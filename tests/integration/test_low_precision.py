"""bf16 / fp16 models end to end (issue 24 item 1): prepare, train, convert and export in the model's own dtype.

Models: the LLM benchmark's character-level Llama at its ``--quick`` shape (``benchmarks/llm.py``), bf16 and fp16,
with the 8da4w preset (LSQ per-group int4 weights, dynamic per-token int8 activations); ResNet-20 (CIFAR) in bf16
with LSQ W4A4 (BatchNorm in bf16).

Bounds, and why:

* fake-quantized == converted, ``atol=0``: ``fxqat.convert`` stores each weight quantizer's own output and keeps the
  activation quantizers, so the same float operations run on the same values.
* converted weight == ``((k − z)·s)`` rounded to the model's dtype, ``atol=0``: the quantizer computes its codes ``k``
  and the product in float32 on its float32 step size ``s`` and rounds once (``fxqat.quantizers.base.compute_dtype``).
* codes of the bf16/fp16 weights vs the fp32 model they were cast from, on the same (float32) grid: equal except
  where the cast moves a weight across a rounding boundary. Casting rounds ``w`` by at most ``u·|w|`` (unit roundoff
  ``u`` = 2^-8 for bf16, 2^-11 for fp16; plus 2^-25 absolute in fp16's subnormal range), so ``v = w/s`` moves by at most
  ``u·|v|`` (+ 2^-25/s): a code may differ only where ``v`` lies that close to a half-integer (a "tie"). The test counts
  those ties and asserts every other code equal. A quantizer that divided in bf16 or used a bf16-rounded step size
  would move ``v`` by up to about twice that, and changes codes outside the band.
* torchao hand-off: weight-only is exact (``atol=0``: float32 scales, ``dequantize`` computes ``(k − z)·s`` in float32
  and rounds once, as fxqat does). 8da4w is not: torchao computes the per-token activation scale and ``x·(1/s)`` in
  the activation's dtype (bf16), fxqat in float32 (its rule for every quantizer; torchao's own QAT also quantizes in
  float32 but rounds the scale to bf16 first), so an activation code can differ by one step; the weight codes are
  still exactly fxqat's (asserted) and the logits differ by 0.6 % of their range here (asserted ≤ 5 %).
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fxqat
from fxqat.models import get_model
from fxqat.quantizers.layout import channel_view, from_groups

pytest.importorskip("transformers")
from fxqat.models.hf import char_llama  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
#: the LLM benchmark's --quick model shape (benchmarks/llm.py profile(quick=True))
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=32)
#: unit roundoff of the cast from float32, and the absolute rounding of the subnormal range (fp16)
ROUNDOFF = {torch.bfloat16: (2.0**-8, 0.0), torch.float16: (2.0**-11, 2.0**-25)}


def _weight_inputs(qm, run):
    """(parameter name, weight quantizer, latent weight) of every enabled weight quantizer that ``run()`` calls."""
    seen = {}

    def record(mod, args, _out):  # returns None: the output is left as it is
        seen.setdefault(id(mod), (mod, args[0]))

    hooks = [q.register_forward_hook(record) for q in fxqat.named_quantizers(qm).values()
             if q.kind == "weight" and q._fq_on]
    with torch.no_grad():
        run()
    for h in hooks:
        h.remove()
    names = {p.data_ptr(): n for n, p in qm.named_parameters()}
    return [(names[w.data_ptr()], q, w) for q, w in seen.values()]


def _element_scale(q, w):
    """The step size of each element of ``w`` (``w``'s shape, float32)."""
    scale, zp, _, _ = q.affine_qparams()
    if q.granularity == "per_group":
        return (from_groups(scale.reshape(-1, 1).expand(-1, q.group_size), w.shape, q.spec.ch_axis),
                from_groups(zp.reshape(-1, 1).expand(-1, q.group_size), w.shape, q.spec.ch_axis))
    if scale.numel() > 1:
        return channel_view(scale, w, q.ch_axis).expand(w.shape), channel_view(zp, w, q.ch_axis).expand(w.shape)
    return scale.expand(w.shape), zp.expand(w.shape)


def _codes_against_fp32(qm, fp32_state, dtype, run):
    """Compare each weight's codes with those of the fp32 weight it was cast from (same quantizer, same grid);
    returns (elements, ties, differing codes)."""
    u, tiny = ROUNDOFF[dtype]
    total = ties = differ = 0
    for name, q, w in _weight_inputs(qm, run):
        w32 = fp32_state[name]
        assert w.dtype == dtype and w32.dtype == torch.float32 and torch.equal(w, w32.to(dtype)), name
        k, k32 = q.integer_repr(w), q.integer_repr(w32)
        s, _ = _element_scale(q, w)
        v = w32 / s
        tie = (v - torch.floor(v) - 0.5).abs() <= u * v.abs() + tiny / s  # within the cast's rounding of a boundary
        assert bool((k == k32)[~tie].all()), name  # every code away from a tie is the fp32 model's
        total, ties, differ = total + w.numel(), ties + int(tie.sum()), differ + int((k != k32).sum())
    return total, ties, differ


def _convert_is_exact(qm, lp, dtype, run):
    """Each converted weight is the nearest ``dtype`` value to its code times the float32 step size."""
    lp_params = dict(lp.named_parameters())  # an eager-root model's converted weights replace the latent ones
    if isinstance(lp, torch.fx.GraphModule):  # a traced model's are buffers read in their place
        lp_params.update({n.meta["fxqat.frozen_from"][1]: lp.get_buffer(n.target) for n in lp.graph.nodes
                          if n.op == "get_attr" and "fxqat.frozen_from" in n.meta})
    n = 0
    for name, q, w in _weight_inputs(qm, run):
        s, zp = _element_scale(q, w)
        expected = ((q.integer_repr(w) - zp) * s).to(dtype)
        assert lp_params[name].dtype == dtype and torch.equal(lp_params[name], expected), name
        n += 1
    return n


def _train(qm, loss_fn, steps=3, lr=1e-3, **adam):
    opt = torch.optim.AdamW(fxqat.trainable_parameters(qm), lr=lr, **adam)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _quantizer_state(qm):
    return {n: t.detach().clone() for n, q in fxqat.named_quantizers(qm).items() for n2, t in q.named_parameters()
            for n in [f"{n}.{n2}"]}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_char_llama_in_its_own_dtype(dtype):
    m32 = char_llama(**SMALL)
    ids = torch.randint(0, 65, (4, 32), generator=torch.Generator().manual_seed(0))
    qm = fxqat.prepare_qat(copy.deepcopy(m32).to(dtype), (ids,), fxqat.QATConfig.preset("8da4w"))
    fxqat.calibrate(qm, [ids])
    total, ties, differ = _codes_against_fp32(qm, m32.state_dict(), dtype, lambda: qm.eval()(ids))
    print(f"char-Llama {dtype}: {differ} of {total} weight codes differ from the fp32 model's, all among {ties} ties")
    assert total == 2 * (2 * 32 * 32 + 2 * 16 * 32 + 3 * 64 * 32) and ties < 0.05 * total  # 7 linears a layer
    s0 = _quantizer_state(qm)
    qm.train()
    # fp16 cannot hold AdamW's default eps=1e-8 (it rounds to 0: 0/0 = NaN on the first step, the FP model too)
    losses = _train(qm, lambda: qm(ids, labels=ids).loss, **({"eps": 1e-4} if dtype == torch.float16 else {}))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert {p.dtype for n, p in qm.named_parameters() if "fxqat" not in n} == {dtype}
    s1 = _quantizer_state(qm)
    assert {t.dtype for t in s1.values()} == {torch.float32} and any(not torch.equal(s0[k], s1[k]) for k in s0)
    qm.eval()
    lp = fxqat.convert(qm)
    with torch.no_grad():
        fq, cv = qm(ids).logits, lp(ids).logits
    assert fq.dtype == dtype and torch.equal(fq, cv)
    assert _convert_is_exact(qm, lp, dtype, lambda: qm(ids)) == 14  # 7 linear layers a decoder layer, lm_head FP


def test_resnet20_bf16_with_batchnorm():
    torch.manual_seed(0)
    m32 = get_model("resnet20")
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3])
    dtype = torch.bfloat16
    qm = fxqat.prepare_qat(copy.deepcopy(m32).to(dtype), (x.to(dtype),), fxqat.QATConfig(w_bits=4, a_bits=4))
    fxqat.calibrate(qm, [x.to(dtype)])
    total, ties, differ = _codes_against_fp32(qm, m32.state_dict(), dtype, lambda: qm.eval()(x.to(dtype)))
    print(f"ResNet-20 bf16: {differ} of {total} weight codes differ from the fp32 model's, all among {ties} ties")
    assert total == sum(p.numel() for p in m32.parameters() if p.dim() > 1) and ties < 0.05 * total  # all weights
    qm.train()
    losses = _train(qm, lambda: F.cross_entropy(qm(x.to(dtype)).float(), y))
    assert all(torch.isfinite(torch.tensor(losses)))
    bn = qm.get_submodule("bn1")
    assert bn.weight.dtype == dtype and bn.running_mean.dtype == dtype
    qm.eval()
    lp = fxqat.convert(qm)
    with torch.no_grad():
        fq, cv = qm(x.to(dtype)), lp(x.to(dtype))
    assert fq.dtype == dtype and torch.equal(fq, cv)
    assert _convert_is_exact(qm, lp, dtype, lambda: qm(x.to(dtype))) == 20  # conv1, 18 block convs, fc


def test_block_replacement_with_a_bf16_model():
    ids = torch.randint(0, 65, (4, 33), generator=torch.Generator().manual_seed(0))
    cfg = fxqat.QATConfig.preset("8da4w", hybrid=fxqat.HybridConfig(seed=1))
    qm = fxqat.prepare_qat(char_llama(**SMALL).to(torch.bfloat16), (ids[:, :-1],), cfg)
    fxqat.calibrate(qm, [ids[:, :-1]])
    partner0 = {n: p.clone() for n, p in qm.fxqat_partner.named_parameters()}
    qm.train()
    losses = _train(qm, lambda: fxqat.hybrid_loss(qm(ids[:, :-1]), ids[:, 1:])[0])
    assert all(torch.isfinite(torch.tensor(losses)))
    partner = dict(qm.fxqat_partner.named_parameters())
    assert {p.dtype for p in partner.values()} == {torch.bfloat16}  # the frozen FP partner in the model's dtype
    assert all(torch.equal(partner0[n], partner[n]) for n in partner0)
    qm.eval()
    with torch.no_grad():
        fq = qm(ids[:, :-1]).logits
        assert fq.dtype == torch.bfloat16 and torch.equal(fq, fxqat.convert(qm)(ids[:, :-1]).logits)


def test_autocast_over_an_fp32_model():
    m = char_llama(**SMALL)
    ids = torch.randint(0, 65, (4, 32), generator=torch.Generator().manual_seed(0))
    qm = fxqat.prepare_qat(m, (ids,), fxqat.QATConfig.preset("8da4w"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fxqat.calibrate(qm, [ids])
        qm.train()
        logits = qm(ids).logits
        losses = _train(qm, lambda: qm(ids, labels=ids).loss)
    assert logits.dtype == torch.bfloat16 and all(torch.isfinite(torch.tensor(losses)))
    assert {t.dtype for t in _quantizer_state(qm).values()} == {torch.float32}
    assert {p.dtype for p in qm.parameters()} == {torch.float32}
    qm.eval()
    with torch.no_grad():
        assert torch.equal(qm(ids).logits, fxqat.convert(qm)(ids).logits)  # fp32 outside autocast: exact as ever


def test_qdq_exports_of_a_bf16_graph_model(tmp_path):
    pytest.importorskip("torchao")
    from fxqat.export import ExportError, to_onnx, to_pt2e, to_torch_ao

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).to(torch.bfloat16)
    x = torch.randn(8, 16).to(torch.bfloat16)
    qm = fxqat.prepare_qat(net, (x,), fxqat.QATConfig(w_bits=8, a_bits=8))
    qm(x)
    qm.eval()
    with torch.no_grad():
        fq = qm(x)
        assert torch.equal(to_pt2e(qm, (x,))(x), fq)  # PT2E's Q/DQ ops take bf16: the same grid, exact
    for export in (to_torch_ao, to_onnx):  # float32-only formats refuse, naming the float32 copy to export
        with pytest.raises(ExportError, match=r"qm\.float\(\)"):
            export(qm, (x,), *([tmp_path / "m.onnx"] if export is to_onnx else []))
    q32 = copy.deepcopy(qm).float()
    with torch.no_grad():  # the float32 copy: same codes; outputs differ only by bf16 vs float32 arithmetic
        assert float((to_torch_ao(q32, (x.float(),))(x.float()) - fq.float()).abs().max()) <= 0.02 * float(
            fq.float().abs().max())


@pytest.fixture(scope="module")
def bf16_llamas():
    pytest.importorskip("torchao")
    ids = torch.randint(0, 65, (4, 32), generator=torch.Generator().manual_seed(0))
    out = {}
    for preset in ("int4_weight_only", "8da4w"):
        qm = fxqat.prepare_qat(char_llama(**SMALL).to(torch.bfloat16), (ids,), fxqat.QATConfig.preset(preset))
        fxqat.calibrate(qm, [ids])
        qm.train()
        _train(qm, lambda qm=qm: qm(ids, labels=ids).loss)
        out[preset] = qm.eval()
    return ids, out


def test_torchao_hand_off_of_a_bf16_model(bf16_llamas):
    from fxqat.export import to_torchao

    ids, models = bf16_llamas
    for preset, qm in models.items():
        tm = to_torchao(qm)
        with torch.no_grad():
            ta, cv = tm(ids).logits, fxqat.convert(qm)(ids).logits
        assert ta.dtype == torch.bfloat16
        weights = {n: p for n, p in tm.named_parameters() if hasattr(p, "qdata")}
        assert len(weights) == 14
        for name, q, w in _weight_inputs(qm, lambda qm=qm: qm(ids)):
            t = weights[name]
            assert t.scale.dtype == torch.float32 and torch.equal(t.qdata.float(), q.integer_repr(w)), name
        if preset == "int4_weight_only":
            assert torch.equal(ta, cv)  # module docstring: exact
        else:  # per-token activation arithmetic in bf16 (torchao) vs float32 (fxqat): module docstring
            assert float((ta.float() - cv.float()).abs().max()) <= 0.05 * float(cv.float().abs().max())


@pytest.mark.slow  # lowers two programs with ExecuTorch (about a minute here)
def test_executorch_refuses_bf16_and_exports_its_fp32_copy(bf16_llamas, tmp_path):
    pytest.importorskip("executorch")
    from fxqat.export import ExportError, load_executorch, to_executorch, to_torchao

    ids, models = bf16_llamas
    qm = models["8da4w"]
    with pytest.raises(ExportError, match="bfloat16"):
        to_executorch(qm, (ids,))
    q32 = copy.deepcopy(qm).float()  # quantizer state is float32 already; bf16 weights widen exactly
    codes16 = {n: p.qdata for n, p in to_torchao(qm).named_parameters() if hasattr(p, "qdata")}
    codes32 = {n: p.qdata for n, p in to_torchao(q32).named_parameters() if hasattr(p, "qdata")}
    assert codes16.keys() == codes32.keys() and all(torch.equal(codes16[n], codes32[n]) for n in codes16)
    path = to_executorch(q32, (ids,), tmp_path / "llama.pte")
    out = load_executorch(path)(ids)[0]
    with torch.no_grad():
        ref = to_torchao(q32, scale_dtype=torch.bfloat16)(ids).logits
    # XNNPACK vs its torchao model: float summation order, and (rarely) one int8 activation code (test_executorch.py)
    assert float((out - ref).abs().max()) <= 0.02 * float(ref.abs().max())


# ------------------------------------------------------------------------------------------------ FSDP2, 2 processes
def _fsdp_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, use_cache=False, **SMALL)
    ids = torch.randint(0, 64, (8, 13), generator=torch.Generator().manual_seed(5))
    qm = fxqat.prepare_qat(LlamaForCausalLM(cfg), (ids[:2, :-1],), fxqat.QATConfig.preset("int4_weight_only"))
    fxqat.calibrate(qm, [ids[:, :-1]])
    return qm, ids


def _fsdp_worker(rank, world, port, out):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from fxqat.training.fsdp import full_state_dict, shard_prepared

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        qm, ids = _fsdp_llama()
        shard_prepared(qm, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
        seen = set()

        def record(mod, args, out):  # returns None: the output is left as it is
            seen.add((args[0].dtype, out.dtype, *(p.dtype for p in mod.parameters())))

        for q in fxqat.named_quantizers(qm).values():
            q.register_forward_hook(record)
        batch = ids[rank::world]
        losses = _train(qm, lambda: qm(batch[:, :-1], labels=batch[:, :-1]).loss, lr=3e-3)
        state = {k: v.clone() for k, v in full_state_dict(qm).items()}
        torch.save({"losses": losses, "seen": seen, "state": state}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing transformers: about a minute on 2 loaded cores
def test_fsdp2_bf16_mixed_precision_on_two_gloo_processes(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    # inside FSDP the weights reach the quantizers in bf16 and the quantizers compute on float32 parameters
    assert r0["seen"] == r1["seen"] == {(torch.bfloat16, torch.bfloat16, torch.float32)}
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in (r0, r1))
    assert r0["state"].keys() == r1["state"].keys()
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])  # one model on both ranks
    start, _ = _fsdp_llama()
    scales = [k for k in r0["state"] if k.endswith(".scale")]
    assert len(scales) == 14 and all(r0["state"][k].dtype == torch.float32 for k in scales)
    assert sum(not torch.equal(r0["state"][k], start.state_dict()[k]) for k in scales) == 14  # all trained
    # the first step's loss is what the model computes on each rank's half batch with its parameters cast to bf16 as
    # FSDP casts them: every parameter but the quantizers' (float32), no buffer (the rotary frequencies stay float32)
    ref = copy.deepcopy(start).train()
    for mod in ref.modules():
        if not isinstance(mod, fxqat.Quantizer):
            for p in mod.parameters(recurse=False):
                p.data = p.data.to(torch.bfloat16)
    for r, res in enumerate((r0, r1)):
        batch = _fsdp_llama()[1][r::2]
        with torch.no_grad():
            assert res["losses"][0] == float(ref(batch[:, :-1], labels=batch[:, :-1]).loss)
