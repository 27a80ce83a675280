"""train_lm on the shared step, loop and checkpointer: an interrupted and resumed run ends bit-exactly where an
uninterrupted one does; the non-finite guard skips a poisoned step without touching the model."""

import math

import torch
import torch.nn as nn

import fxqat
from fxqat.quantizers.control import quantizer_parameters
from fxqat.text_data import CharCorpus
from fxqat.training.lm import LMRecipe, lm_loss, lm_optimizer_spec, train_lm
from fxqat.training.optimizer import build_optimizer

CORPUS = CharCorpus("to be or not to be, that is the question " * 40)
RECIPE = LMRecipe(steps=12, lr=1e-2, warmup=2, batch_size=4, context=8)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(CORPUS.vocab_size, 8), nn.LayerNorm(8), nn.Linear(8, CORPUS.vocab_size))


def _qat(seed=0):
    qm = fxqat.prepare_qat(_model(seed), (torch.zeros(2, 8, dtype=torch.long),), fxqat.QATConfig(w_bits=4))
    fxqat.calibrate(qm, [torch.zeros(2, 8, dtype=torch.long)])
    return qm


def test_resume_mid_run_gives_the_same_final_loss_bit_exactly(tmp_path):
    ref = _qat()
    full = train_lm(ref, CORPUS, RECIPE, seed=3, progress=False)
    m1 = _qat()
    part = train_lm(m1, CORPUS, RECIPE, seed=3, progress=False, out_dir=tmp_path, stop_after=5)
    assert part["status"] == "interrupted" and part["steps"] == 5
    m2 = _qat()  # a fresh process: new model, new optimizer, state from checkpoint.pt
    rest = train_lm(m2, CORPUS, RECIPE, seed=3, progress=False, out_dir=tmp_path, resume=True)
    assert rest["status"] == "complete" and full["status"] == "complete"
    assert rest["steps"] == full["steps"] == RECIPE.steps
    assert rest["loss"] == full["loss"]  # every step's loss, the final one included, bit for bit
    for (n, a), b in zip(ref.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), n


def test_nonfinite_guard_skips_a_step_in_train_lm():
    starts = []  # the parameters each step starts from

    def loss_fn(model, x, y):
        starts.append([p.detach().clone() for p in model.parameters()])
        loss = lm_loss(model, x, y)
        return loss * float("nan") if len(starts) == 4 else loss

    m = _model()
    hist = train_lm(m, CORPUS, RECIPE, seed=0, progress=False, loss_fn=loss_fn)
    assert hist["nonfinite_steps"] == [4] and hist["status"] == "complete" and hist["steps"] == RECIPE.steps
    assert math.isnan(hist["loss"][3]) and all(math.isfinite(v) for i, v in enumerate(hist["loss"]) if i != 3)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    same = [all(torch.equal(a, b) for a, b in zip(starts[k], starts[k + 1])) for k in range(len(starts) - 1)]
    assert same == [k == 3 for k in range(len(starts) - 1)]  # only the poisoned step 4 left the model as it was


def test_lm_optimizer_groups_keep_the_recipe_order():
    """AdamW groups: decay on non-quantizer matrices; everything else in one group in parameter order (the order
    gradient clipping sums the norms in, so the LLM benchmark's numbers stay bit-exact)."""
    qm = _qat()
    params = list(fxqat.trainable_parameters(qm))
    qids = {id(p) for p in quantizer_parameters(qm).values()}
    opt = build_optimizer(qm, lm_optimizer_spec(RECIPE), params)
    decay = [p for p in params if p.dim() >= 2 and id(p) not in qids]
    rest = [p for p in params if not (p.dim() >= 2 and id(p) not in qids)]
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [[id(p) for p in decay], [id(p) for p in rest]]
    assert [g["weight_decay"] for g in opt.param_groups] == [RECIPE.weight_decay, 0.0] and qids
    assert any(id(p) in qids for p in rest) and any(p.dim() < 2 and id(p) not in qids for p in rest)
