"""QAT of the tiny char-Llama with an unchanged transformers.Trainer (fxqat.integrations.transformers).

Random init and short runs only (never the cached FP checkpoint): calibration on the first batch, plain QAT,
distillation, block replacement, noise-tempering clocks, TALR through ``optimizers=``, checkpoint reload and resume.
"""

import importlib.util
import math
import pickle
from pathlib import Path

import pytest
import torch

import fxqat

pytest.importorskip("transformers")
from qat_helpers import RunsCode  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from fxqat.integrations.causal_lm import causal_lm_loss  # noqa: E402
from fxqat.integrations.lm_dataset import CharLMDataset  # noqa: E402
from fxqat.integrations.optimizers import TALR_KEY, TALROptimizer  # noqa: E402
from fxqat.integrations.transformers import (  # noqa: E402
    FxqatCallback,
    QATTrainer,
    fxqat_compute_loss,
    load_checkpoint,
    prepare_for_trainer,
)
from fxqat.models.hf import char_llama  # noqa: E402
from fxqat.optim import AdamWT  # noqa: E402
from fxqat.quantizers.noise_temper import NoiseTemperQuantizer  # noqa: E402
from fxqat.text_data import tiny_shakespeare  # noqa: E402
from fxqat.training.losses import distillation_loss, hybrid_loss  # noqa: E402

SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=32)
CONTEXT, BATCH = 32, 8
INT4 = fxqat.QATConfig.preset("int4_weight_only")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hf_trainer_llama.py"


@pytest.fixture(scope="module")
def corpus():
    return tiny_shakespeare()


def _data(corpus, steps, seed=0):
    return CharLMDataset(corpus, "train", n=steps * BATCH, context=CONTEXT, seed=seed)


def _prepared(corpus, config=INT4, seed=0):
    model = char_llama(corpus.vocab_size, seed=seed, **SIZES)
    example = torch.stack([_data(corpus, 1)[i]["input_ids"] for i in range(2)])
    return model, prepare_for_trainer(model, {"input_ids": example}, config)


def _args(out, steps, **kw):
    base = dict(per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=3e-3, logging_steps=1,
                save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, seed=0, dataloader_num_workers=0,
                lr_scheduler_type="constant")
    return TrainingArguments(str(out), **{**base, **kw})


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _scales(qm):
    return {n: q.scale.detach().clone() for n, q in fxqat.named_quantizers(qm).items()}


def _quant_state(qm):
    return {k: v.clone() for k, v in qm.state_dict().items() if "fxqat_" in k}


def test_trainer_callback_calibrates_on_the_first_batch(corpus, tmp_path):
    _, qm = _prepared(corpus)
    _, ref = _prepared(corpus)
    trainer = QATTrainer(model=qm, args=_args(tmp_path, 1, learning_rate=0.0), train_dataset=_data(corpus, 1))
    first = next(iter(trainer.get_train_dataloader()))  # seedable sampler: the batch step 1 sees
    fxqat.calibrate(ref, [{"input_ids": first["input_ids"]}])
    assert not any(q.is_initialized for q in fxqat.named_quantizers(qm).values())
    trainer.train()
    got, want = _scales(qm), _scales(ref)
    assert want and got.keys() == want.keys()
    assert all(torch.equal(got[n], want[n]) for n in want)  # lr = 0: exactly the calibration of that batch
    # per-group scales were created by the initialisation: the optimizer holds the new Parameters
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(q.scale) in held for q in fxqat.named_quantizers(qm).values())


def test_trainer_plain_qat_trains_scales_and_loss_decreases(corpus, tmp_path):
    _, qm = _prepared(corpus)
    trainer = QATTrainer(model=qm, args=_args(tmp_path, 30), train_dataset=_data(corpus, 30))
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    # random init starts near ln(65) = 4.17 and learns the character frequencies within a few steps (measured:
    # 4.15 -> 3.3 over 30 steps); a margin of 0.4 on 3-step means is far above the step-to-step noise (~0.05)
    assert sum(losses[:3]) / 3 > sum(losses[-3:]) / 3 + 0.4
    log = trainer.state.log_history[0]
    assert log["fxqat/quantizers"] == 14 and log["fxqat/problems"] == 0 and log["fxqat/weight_bits"] == 4.0
    assert log["ce_lp"] == pytest.approx(log["loss"], rel=1e-5)  # one micro-batch per step: the logged part is it
    # the quantizer scales are trained (weight decay kept off them)
    assert all(g["weight_decay"] == 0.0 for g in trainer.optimizer.param_groups
               if any(p is q.scale for q in fxqat.named_quantizers(qm).values() for p in g["params"]))
    _, fresh = _prepared(corpus)
    fxqat.calibrate(fresh, [{"input_ids": next(iter(trainer.get_train_dataloader()))["input_ids"]}])
    assert any(not torch.equal(a, b) for a, b in zip(_scales(qm).values(), _scales(fresh).values()))


def test_trainer_block_replacement_reads_the_hybrid_output(corpus, tmp_path):
    fp, qm = _prepared(corpus, INT4.with_(hybrid=fxqat.HybridConfig()))
    partner = {k: v.clone() for k, v in qm.state_dict().items() if k.startswith("fxqat_partner.")}
    trainer = QATTrainer(model=qm, args=_args(tmp_path, 6), train_dataset=_data(corpus, 6))
    trainer.train()
    log = trainer.state.log_history[-2]
    assert {"ce_lp", "kd_lp", "ce_path0", "kd_path0"} <= set(log) and math.isfinite(log["loss"])
    # the loss of one batch is hybrid_loss on the valid next-token positions of lp, every path and the partner
    batch = next(iter(trainer.get_train_dataloader()))
    qm.train()
    torch.manual_seed(0)
    loss = trainer.compute_loss(qm, dict(batch))
    torch.manual_seed(0)
    out = qm(input_ids=batch["input_ids"])
    target = batch["labels"][:, 1:].reshape(-1)
    flat = lambda o: o.logits[:, :-1].reshape(-1, o.logits.shape[-1]).float()  # noqa: E731
    ref, _ = hybrid_loss(out._replace(lp=flat(out.lp), fp=flat(out.fp), paths=[flat(p) for p in out.paths]), target)
    assert torch.allclose(loss, ref, rtol=1e-6, atol=0)  # same terms; only the row order of the flattening differs
    # the FP partner is frozen and stays out of the optimizer
    assert all(torch.equal(qm.state_dict()[k], v) for k, v in partner.items())
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in held for p in qm.fxqat_partner.parameters())


def test_trainer_distills_from_a_frozen_teacher(corpus, tmp_path):
    fp, qm = _prepared(corpus)
    trainer = QATTrainer(model=qm, args=_args(tmp_path, 3), train_dataset=_data(corpus, 3), teacher=fp,
                         kd=fxqat.HybridConfig(kd_weight=0.5, temperature=2.0))
    trainer.train()
    assert "kd_lp" in trainer.state.log_history[0] and not any(p.requires_grad for p in fp.parameters())
    batch = next(iter(trainer.get_train_dataloader()))
    qm.train()
    loss = trainer.compute_loss(qm, dict(batch))
    logits, t_logits = qm(input_ids=batch["input_ids"]).logits, fp(input_ids=batch["input_ids"]).logits
    flat = lambda x: x[:, :-1].reshape(-1, x.shape[-1]).float()  # noqa: E731
    ref, _ = distillation_loss(flat(logits), flat(t_logits), batch["labels"][:, 1:].reshape(-1),
                               fxqat.HybridConfig(kd_weight=0.5, temperature=2.0))
    assert torch.allclose(loss, ref, rtol=1e-6, atol=0)  # the same terms (flattening order aside)


def test_trainer_plain_with_callback_tempers_and_logs(corpus, tmp_path):
    # an unchanged Trainer: compute_loss_func + FxqatCallback; noise tempering with a manual clock (one tick a step)
    cfg = fxqat.QATConfig(w_bits=4, a_bits=None, w_method="noise_temper", per_channel=True, first_last=None,
                          first_last_layers=("last",), w_options={"schedule": "manual", "tau": 4.0})
    _, qm = _prepared(corpus, cfg)
    trainer = Trainer(model=qm, args=_args(tmp_path, 4), train_dataset=_data(corpus, 4),
                      compute_loss_func=fxqat_compute_loss, callbacks=[FxqatCallback()])
    trainer.train()
    tempered = [q for q in fxqat.named_quantizers(qm).values() if isinstance(q, NoiseTemperQuantizer)]
    assert len(tempered) == 14 and all(int(q.step) == 4 for q in tempered)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    # ρ is logged after each step's tick: exp(-t/τ) at t = 1..4
    assert [h["fxqat/rho"] for h in logs] == pytest.approx([math.exp(-t / 4.0) for t in range(1, 5)], rel=1e-6)
    assert all(h["fxqat/problems"] == 0 for h in logs)


def _run(corpus, out, steps, resume=None, optimizer="trainer", save_steps=4):
    _, qm = _prepared(corpus)
    opts = (None, None)  # "trainer": Trainer builds AdamW after loading the checkpoint
    if optimizer == "user":  # built before the Trainer, on the uncalibrated model: its scales get replaced
        opts = (torch.optim.AdamW([p for p in qm.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0), None)
    elif optimizer == "talr":
        opts = (TALROptimizer(AdamWT(qm, total_steps=steps, lr=3e-3)), None)
    trainer = QATTrainer(model=qm, args=_args(out, steps, save_strategy="steps", save_steps=save_steps),
                         train_dataset=_data(corpus, steps), optimizers=opts)
    trainer.train(resume_from_checkpoint=resume)
    return qm, trainer


@pytest.mark.parametrize("optimizer", ["trainer", "user", "talr"])
def test_trainer_checkpoint_reload_and_resume(corpus, tmp_path, optimizer):
    qm, full = _run(corpus, tmp_path / "full", 8, optimizer=optimizer)
    ckpt = tmp_path / "full" / "checkpoint-8"
    # reload: a freshly prepared model gets the quantizer state of the checkpoint, bit for bit
    _, fresh = _prepared(corpus)
    load_checkpoint(fresh, str(ckpt))
    want, got = _quant_state(qm), _quant_state(fresh)
    assert len(want) > 50 and got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # resume: a new model, optimizer and Trainer continue the 8-step run from its checkpoint after step 4
    resumed, trainer = _run(corpus, tmp_path / "resumed", 8, resume=str(tmp_path / "full" / "checkpoint-4"),
                            optimizer=optimizer)
    assert trainer.state.global_step == 8
    a, b = qm.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # atol=0: same batches, RNG, state
    assert _losses(trainer) == _losses(full)  # steps 1-4 restored from trainer_state.json, 5-8 recomputed equal
    sd = torch.load(ckpt / "optimizer.pt", weights_only=True)  # torch >= 2.6 default: loads without pickled code
    assert (TALR_KEY in sd) == (optimizer == "talr")
    if optimizer == "talr":
        assert sd[TALR_KEY]["step"] == 8 and trainer.optimizer.optimizer.talr.state_dict() == sd[TALR_KEY]


@pytest.mark.parametrize("name", ["optimizer.pt", "rng_state.pth"])
def test_trainer_resume_refuses_a_checkpoint_file_that_would_run_code(corpus, tmp_path, name):
    """Resuming a QATTrainer from a shared checkpoint folder: its torch files are read weights-only (transformers
    passes ``weights_only=True``), so a file carrying a code-running pickle is refused and runs nothing."""
    _run(corpus, tmp_path / "run", 4)
    ckpt = tmp_path / "run" / "checkpoint-4"
    marker = tmp_path / "marker"
    evil = torch.load(ckpt / name, weights_only=False)  # the real content (written above: trusted), plus the payload
    evil["payload"] = RunsCode(marker)
    torch.save(evil, ckpt / name)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed") as e:
        _run(corpus, tmp_path / "resumed", 8, resume=str(ckpt))
    assert "exec" in str(e.value)
    assert not marker.exists()


def test_trainer_load_checkpoint_rejects_another_preparation(corpus, tmp_path):
    _, qm = _prepared(corpus)
    fxqat.calibrate(qm, [{"input_ids": _data(corpus, 1)[0]["input_ids"][None]}])
    qm.save_pretrained(tmp_path)  # what Trainer's checkpoint save calls for a PreTrainedModel
    _, other = _prepared(corpus, INT4.with_(first_last_layers=()))  # lm_head quantized too: one quantizer more
    with pytest.raises(ValueError, match=r"does not match this model: missing \['lm_head\.fxqat_quant\."):
        load_checkpoint(other, str(tmp_path))
    _, same = _prepared(corpus)
    want = _quant_state(qm)
    got = _quant_state(load_checkpoint(same, str(tmp_path)))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_trainer_loss_is_token_weighted_under_gradient_accumulation():
    # two micro-batches scaled by the accumulated token count sum to the loss of the whole batch (HF's convention);
    # the plain mean would weight a micro-batch with fewer valid tokens more
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 6, 5), torch.randint(0, 5, (4, 6))
    labels[0, 2:] = -100  # padding: the first row has one valid next-token position
    whole, _ = causal_lm_loss(logits, labels)
    n = int((labels[:, 1:] != -100).sum())
    halves = [causal_lm_loss(logits[i:i + 2], labels[i:i + 2], num_items_in_batch=n)[0] for i in (0, 2)]
    assert torch.allclose(halves[0] + halves[1], whole, rtol=1e-6, atol=0)  # float sums in another order
    means = sum(causal_lm_loss(logits[i:i + 2], labels[i:i + 2])[0] for i in (0, 2)) / 2
    assert not torch.allclose(means, whole, rtol=1e-3)


def test_trainer_example_quick_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("hf_trainer_llama", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--quick", "--random-init", "--out", str(tmp_path)])
    assert result["steps"] == 20 and math.isfinite(result["val_loss"])
    assert result["val_loss"] < math.log(65)  # better than uniform over the 65 characters after 20 steps
