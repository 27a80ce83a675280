"""Block-replacement options measured in benchmarks/br_controls.py: running-average path sensitivity, path weights,
sampled paths, and sub-layer (attention / MLP) blocks on a Hugging Face decoder."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxqat
from fxqat.path_losses import PathLossAverages


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(),
                         nn.Linear(24, 5))


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 6, generator=g), torch.randint(0, 5, (64,), generator=g)


def _prepared(calibrate: bool = True, **hybrid):
    x, _ = _batch()
    cfg = fxqat.QATConfig(w_bits=2, a_bits=2, hybrid=fxqat.HybridConfig(**hybrid))
    qm = fxqat.prepare_qat(_mlp(), (x,), cfg)
    if calibrate:
        fxqat.calibrate(qm, x)
    return qm


@pytest.mark.parametrize("paths", ["all", 1])
def test_running_sensitivity_equals_the_direct_path_estimate_on_a_fixed_batch(paths):
    """Train-mode steps on one batch without parameter updates: the running averages are averages of one constant
    value per output, so the table equals ``fxqat.sensitivity(method="paths")`` on that batch. The direct estimate
    re-initialises the step sizes from the batch at the table's bit-width, so the model is left uncalibrated and
    initialises them from the same batch at its first step. Tolerance 1e-6: the running losses are float32
    cross-entropies averaged in float64 (bias-corrected EMA, exact for a constant), the direct ones float32."""
    x, y = _batch()
    qm = _prepared(calibrate=False, paths=paths)
    qm.train()
    for _ in range(12):  # with paths=1 every one of the 3 paths runs at least once in 12 seeded steps
        fxqat.hybrid_loss(qm(x), y)
    run = fxqat.running_sensitivity(qm)
    direct = fxqat.sensitivity(qm, [(x, y)], bits=run.bits)
    assert [r.block for r in run.rows] == [r.block for r in direct.rows]
    for a, b in zip(run.rows, direct.rows):
        assert a.sensitivity[0] == pytest.approx(b.sensitivity[0], abs=1e-6)
        assert a.spread[0] == pytest.approx(0.0, abs=1e-6)  # a constant loss has no spread
    counts = qm.fxqat_path_losses.counts()
    assert counts[0] == counts[-1] == 12
    assert int(counts[1:-1].sum()) == (12 * qm.n_paths if paths == "all" else 12)
    # the table telescopes to LP loss − FP loss
    with torch.no_grad():
        gap = float(F.cross_entropy(qm.eval()(x), y) - F.cross_entropy(qm.fxqat_partner(x), y))
    assert sum(r.sensitivity[0] for r in run.rows) == pytest.approx(gap, abs=1e-5)


def test_running_averages_follow_training_and_weight_recent_steps():
    """Under training the averages are the bias-corrected EMA of the per-step losses (recomputed here from the
    losses hybrid_loss reports; same float64 arithmetic: tolerance 1e-12)."""
    x, y = _batch()
    qm = _prepared()
    opt = torch.optim.SGD(fxqat.trainable_parameters(qm), lr=0.05)
    seen = []
    for _ in range(6):
        loss, parts = fxqat.hybrid_loss(qm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen.append(float(parts["ce_lp"]))
    d = qm.fxqat_path_losses.decay
    ema = 0.0
    for v in seen:
        ema = d * ema + (1 - d) * v
    assert float(qm.fxqat_path_losses.means()[-1]) == pytest.approx(ema / (1 - d ** len(seen)), abs=1e-12)
    assert seen[-1] < seen[0]


def test_running_sensitivity_refuses_untrained_models_and_other_modes():
    with pytest.raises(ValueError, match="no training step"):
        fxqat.running_sensitivity(_prepared())
    with pytest.raises(ValueError, match="lp_prefix"):
        fxqat.running_sensitivity(_prepared(mode="fp_prefix"))
    with pytest.raises(ValueError, match="decay"):
        PathLossAverages(3, decay=1.0)


def test_path_weights_weigh_each_path_term():
    """hybrid_loss with explicit path weights = backbone terms + Σ w_i (CE_i + KD_i), recomputed by hand."""
    x, y = _batch()
    w = (0.25, 1.0, 2.0)
    qm = _prepared(path_weights=w)
    out = qm(x)
    total, parts = fxqat.hybrid_loss(out, y)
    expect = parts["ce_lp"] + parts["kd_lp"] + sum(wi * (parts[f"ce_path{i}"] + parts[f"kd_path{i}"])
                                                   for i, wi in enumerate(w))
    assert float(total) == pytest.approx(float(expect), rel=1e-6)  # float32 sums in another order
    uniform = fxqat.hybrid_loss(out, y, fxqat.HybridConfig())[0]
    assert abs(float(total) - float(uniform)) > 1e-3


def test_sampled_paths_run_the_selected_path_and_update_only_its_average():
    """paths=1: one FP suffix per step, the one select_paths names; only its running average moves."""
    x, y = _batch()
    qm = _prepared(paths=1)
    for _ in range(4):
        ids = qm.select_paths(qm.step)
        before = qm.fxqat_path_losses.counts()
        out = qm(x)
        assert out.path_ids == tuple(ids) and len(out.paths) == 1
        fxqat.hybrid_loss(out, y)
        moved = (qm.fxqat_path_losses.counts() - before).tolist()
        assert moved == [1] + [int(i in ids) for i in range(qm.n_paths)] + [1]


@pytest.mark.slow
def test_char_llama_residual_blocks_keep_running_sensitivity_exact():
    """Sub-layer blocks (attention / MLP halves of each decoder layer) on the HF char Llama: the running table has
    one row per block and equals the direct path estimate on a fixed batch (tolerance as above)."""
    from fxqat.models.hf import char_llama

    torch.manual_seed(0)
    model = char_llama(20, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=16)
    x = torch.randint(0, 20, (4, 16))
    y = torch.randint(0, 20, (4, 16))
    cfg = fxqat.QATConfig.preset("int2_weight_only", hybrid=fxqat.HybridConfig(cuts="residual"))
    qm = fxqat.prepare_qat(copy.deepcopy(model), (x,), cfg)  # uncalibrated: see the first test
    qm.train()
    for _ in range(3):
        fxqat.hybrid_loss(qm(x), y)
    run = fxqat.running_sensitivity(qm)
    direct = fxqat.sensitivity(qm, [(x, y)], bits=run.bits)
    assert len(run.rows) == len(direct.rows) >= 4
    for a, b in zip(run.rows, direct.rows):
        assert a.sensitivity[0] == pytest.approx(b.sensitivity[0], abs=1e-6)


def test_paired_block_differences_cancel_the_batch_to_batch_variation():
    """Losses that move together from batch to batch (constant block differences): the paired average is the
    difference itself with zero spread (exact in float64), while the unpaired bound sees the batch variation."""
    avg = PathLossAverages(n_paths=2, decay=0.9)
    for base in (1.0, 2.0, 4.0, 3.0):
        t = torch.tensor
        avg.update(t(base), {1: t(base + 0.75), 0: t(base + 0.5)}, t(base + 2.0))
    mean, std, paired = avg.block_differences()
    assert paired.tolist() == [True, True, True]
    assert mean.tolist() == pytest.approx([0.5, 0.25, 1.25], abs=1e-12)
    assert std.tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    unpaired = (avg.variances()[1:] + avg.variances()[:-1]).sqrt()
    assert bool((unpaired > 0.5).all())
    # a sampled path never beside its neighbour path: block 1 (path 0 -> path 1) falls back to the averages
    sampled = PathLossAverages(n_paths=2, decay=0.9)
    sampled.update(torch.tensor(1.0), {0: torch.tensor(1.5)}, torch.tensor(3.0))
    sampled.update(torch.tensor(1.0), {1: torch.tensor(2.0)}, torch.tensor(3.0))
    mean, _, paired = sampled.block_differences()
    assert paired.tolist() == [True, False, True]
    assert mean.tolist() == pytest.approx([0.5, 0.5, 1.0], abs=1e-12)
