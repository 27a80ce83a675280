"""QAT with LoRA adapters (issue 27): PEFT models and a LoRA module of one's own, both preparation orders, merged and
base-only fake quantization, gradients, exact merge, export of the merged model, PEFT's keyword calls.

Tiny random-weight models only (a 2-layer char-Llama, an MLP); every comparison that is exact maths uses atol=0.
"""

import copy

import pytest
import torch
import torch.nn as nn

import fxqat
from fxqat.capture.layer_quant import WEIGHT_QUANT
from fxqat.capture.lora import effective_weight, lora_parts, named_lora_layers
from fxqat.capture.lora_adopt import adopt_lora
from fxqat.capture.lora_merge import merge_lora

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
from fxqat.models.hf import char_llama  # noqa: E402

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=32)
TARGETS = ["q_proj", "v_proj", "down_proj"]  # attention projections (eager region) and an MLP layer (graph region)
INT4 = fxqat.QATConfig.preset("int4_weight_only")


def _llama(seed=0):
    return char_llama(65, seed=seed, **SIZES)


def _ids(seed=0, batch=2, seq=16):
    return torch.randint(0, 65, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _peft(model, seed=1):
    """PEFT LoRA with random (non-zero) B, so that W + s·B·A differs from W."""
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    return peft.get_peft_model(model, cfg)


def _lora_quantizers(qm):
    return {name: getattr(lora_parts(m).base, WEIGHT_QUANT) for name, m in named_lora_layers(qm)}


class LoRA(nn.Module):
    """A LoRA module of one's own, following fxqat's protocol."""

    def __init__(self, base: nn.Linear, r: int = 4, scaling: float = 2.0):
        super().__init__()
        self.base_layer, self.scaling = base, scaling
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.05)
        base.weight.requires_grad_(False)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling


@pytest.mark.parametrize("mode", ["merged", "base"])
@pytest.mark.parametrize("example", ["positional", "keyword"])
def test_lora_factor_never_gets_weight_quantizer(mode, example):
    qm_in = _peft(_llama())
    ids = _ids()
    kw = {"example_inputs": (ids,)} if example == "positional" else {"example_inputs": (),
                                                                     "example_kwargs": {"input_ids": ids}}
    qm = fxqat.prepare_qat(qm_in, config=INT4.with_(lora=mode), **kw)
    names = list(fxqat.named_quantizers(qm))
    assert not [n for n in names if "lora_A" in n or "lora_B" in n]
    layers = dict(named_lora_layers(qm))
    assert len(layers) == 2 * len(TARGETS)
    for name, m in layers.items():
        assert f"{name}.base_layer.{WEIGHT_QUANT}" in names
        assert not any(hasattr(f, WEIGHT_QUANT) for f in lora_parts(m).factors)
    # every nn.Linear of the FP model but lm_head (the preset keeps the last layer FP) has one weight quantizer
    n_linear = sum(isinstance(m, nn.Linear) for m in _llama().modules())
    assert sum(q.kind == "weight" for q in fxqat.named_quantizers(qm).values()) == n_linear - 1
    assert fxqat.capture_report(qm).unquantized is not None or True  # the report builds with LoRA factors in it


def test_lora_peft_keyword_call_after_positional_example():
    ids = _ids()
    qm = fxqat.prepare_qat(_peft(_llama()), (ids,), INT4).eval()
    with torch.no_grad():
        by_position = qm(ids).logits
        by_keyword = qm(input_ids=ids).logits
    assert torch.equal(by_position, by_keyword)


@pytest.mark.parametrize("mode", ["merged", "base"])
def test_lora_gradients_reach_factors_and_step_sizes_not_base(mode):
    ids = _ids()
    qm = fxqat.prepare_qat(_peft(_llama()), (ids,), INT4.with_(lora=mode))
    qm(ids).logits.square().mean().backward()
    trainable = {id(p) for p in fxqat.trainable_parameters(qm)}
    for name, m in named_lora_layers(qm):
        parts = lora_parts(m)
        for f in (parts.a, parts.b):
            assert f.grad is not None and f.grad.abs().sum() > 0, name
            assert id(f) in trainable
        w = parts.base.weight
        assert not w.requires_grad and w.grad is None and id(w) not in trainable, name
        steps = list(getattr(parts.base, WEIGHT_QUANT).parameters())
        assert steps and all(p.grad is not None and p.grad.abs().sum() > 0 for p in steps), name


def test_lora_merged_forward_is_linear_on_quantized_effective_weight():
    torch.manual_seed(0)
    net = nn.Sequential(LoRA(nn.Linear(64, 64)), nn.ReLU(), nn.Linear(64, 8))
    x = torch.randn(4, 64)
    for mode in ("merged", "base"):
        qm = fxqat.prepare_qat(net, (x,), INT4.with_(lora=mode)).eval()
        layer = qm.get_submodule("0")
        parts = lora_parts(layer)
        wq = getattr(parts.base, WEIGHT_QUANT)
        with torch.no_grad():
            if mode == "merged":
                want = nn.functional.linear(x, wq(effective_weight(parts)), parts.base.bias)
            else:
                want = nn.functional.linear(x, wq(parts.base.weight), parts.base.bias) + \
                    layer.lora_B(layer.lora_A(x)) * layer.scaling
            assert torch.equal(layer(x), want)
    assert isinstance(net[0], LoRA) and not hasattr(net[0].base_layer, WEIGHT_QUANT)  # the user's model untouched


def _train_steps(qm, ids, steps=3):
    opt = torch.optim.AdamW(fxqat.trainable_parameters(qm), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        qm(ids).logits.square().mean().backward()
        opt.step()
    return qm.eval()


def test_lora_merged_weights_equal_fake_quantized_effective_weights():
    """fxqat.convert (which merges with merge_lora) and PEFT's merge_and_unload both give the codes training saw."""
    ids = _ids()
    qm = _train_steps(fxqat.prepare_qat(_peft(_llama()), (ids,), INT4), ids)
    quantizers = _lora_quantizers(qm)
    with torch.no_grad():
        want = {n: getattr(lora_parts(m).base, WEIGHT_QUANT)(effective_weight(lora_parts(m)))
                for n, m in named_lora_layers(qm)}
        lp = fxqat.convert(qm)
        peft_merged = copy.deepcopy(qm).merge_and_unload()  # a copy: PEFT merges in place
        ties = 0
        for name, wq_eff in want.items():
            inner = name.removeprefix("base_model.model.")
            got = lp.get_submodule(inner).weight
            assert torch.equal(got, wq_eff), name  # the converted weight is the fake-quantized effective weight
            q = quantizers[name]
            codes = q.integer_repr(wq_eff)
            assert torch.equal(q.integer_repr(got), codes)
            eff = effective_weight(lora_parts(qm.get_submodule(name)))
            assert torch.equal(peft_merged.get_submodule(inner).weight, eff), name  # PEFT merges the same floats
            scale = q.affine_qparams()[0].reshape(-1, 1)
            g = eff.reshape(-1, q.group_size) / scale
            ties += int(((g - g.floor()) == 0.5).sum())
        assert ties == 0  # no value sits on a rounding tie, so the codes cannot depend on the tie rule
        assert torch.equal(lp(ids).logits, qm(ids).logits)


def test_lora_both_preparation_orders_give_same_quantizers_and_outputs():
    ids = _ids()
    first_peft = fxqat.prepare_qat(_peft(_llama()), (ids,), INT4)
    qm = fxqat.prepare_qat(_llama(), (ids,), INT4)
    first_fxqat = _peft(qm)
    adopted = adopt_lora(first_fxqat)
    assert sorted(adopted) == sorted(n for n, _ in named_lora_layers(first_peft))
    a, b = _lora_quantizers(first_peft), _lora_quantizers(first_fxqat)
    assert sorted(a) == sorted(b)
    with torch.no_grad():
        out_a, out_b = first_peft(ids).logits, first_fxqat(ids).logits
    for name in a:
        assert a[name].spec == b[name].spec
        for (ka, pa), (kb, pb) in zip(a[name].state_dict().items(), b[name].state_dict().items()):
            assert ka == kb and torch.equal(pa, pb), (name, ka)
    assert torch.equal(out_a, out_b)
    sa = {n for n, p in first_peft.named_parameters() if p.requires_grad}
    sb = {n for n, p in first_fxqat.named_parameters() if p.requires_grad}
    lora_trainable = {n for n in sa if "lora_" in n or any(n.startswith(k) for k in a)}
    assert {n for n in sb if "lora_" in n} == {n for n in sa if "lora_" in n} and lora_trainable


def test_lora_merged_model_exports_to_torchao():
    from fxqat.export import to_torchao

    ids = _ids()
    qm = _train_steps(fxqat.prepare_qat(_peft(_llama()), (ids,), INT4), ids)
    merged = merge_lora(qm)
    tm = to_torchao(merged)
    with torch.no_grad():
        ref = fxqat.convert(qm)(ids).logits
        got = tm(ids).logits
    for name, _ in named_lora_layers(qm):
        inner = name.removeprefix("base_model.model.")
        assert type(tm.get_parameter(f"{inner}.weight")).__name__ == "IntxUnpackedToInt8Tensor"
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)  # same codes and scales; torchao's matmul order differs


def _trainer_run(out, steps, resume=None):
    from transformers import Trainer, TrainingArguments

    from fxqat.integrations.lm_dataset import CharLMDataset
    from fxqat.integrations.transformers import FxqatCallback, prepare_for_trainer
    from fxqat.text_data import tiny_shakespeare

    corpus = tiny_shakespeare()
    data = CharLMDataset(corpus, "train", n=steps * 4, context=16, seed=0)
    example = torch.stack([data[i]["input_ids"] for i in range(2)])
    model = char_llama(corpus.vocab_size, seed=0, **SIZES)
    qm = prepare_for_trainer(_peft(model), {"input_ids": example}, INT4)
    args = TrainingArguments(str(out), per_device_train_batch_size=4, max_steps=steps, learning_rate=3e-3,
                             logging_steps=1, save_strategy="steps", save_steps=2, report_to=[], disable_tqdm=True,
                             use_cpu=True, seed=0, dataloader_num_workers=0, lr_scheduler_type="constant")
    trainer = Trainer(model=qm, args=args, train_dataset=data, callbacks=[FxqatCallback()])
    trainer.train(resume_from_checkpoint=resume)
    return qm, trainer


def _lora_state(qm):
    """LoRA factors and quantizer state, by parameter name."""
    keep = ("lora_A", "lora_B", "fxqat_")
    return {k: v for k, v in qm.state_dict().items() if any(s in k for s in keep)}


@pytest.mark.slow
def test_lora_peft_model_in_trainer_saves_and_resumes_adapters_and_step_sizes(tmp_path):
    from fxqat.integrations.transformers import QUANTIZER_FILE

    full, _ = _trainer_run(tmp_path / "full", 4)
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert (ckpt / QUANTIZER_FILE).exists() and (ckpt / "adapter_model.safetensors").exists()
    resumed, trainer = _trainer_run(tmp_path / "resumed", 4, resume=str(ckpt))
    assert trainer.state.global_step == 4
    a, b = _lora_state(full), _lora_state(resumed)
    assert len([k for k in a if "fxqat_wq" in k]) >= 2 * len(TARGETS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # atol=0: same batches, RNG, state
