"""QAT of the LLM benchmark's character-level Llama on Tiny Shakespeare with an unchanged ``transformers.Trainer``.

int4 weight-only (``QATConfig.preset("int4_weight_only")``: LSQ, per-group 32, lm_head in FP), the benchmark's
fine-tuning recipe (AdamW, 10 warm-up steps, cosine to 0.1×, clipping 1.0, batch 32 × 128 characters) for 250 steps;
``--hybrid`` adds block replacement (a frozen FP partner, one block per decoder layer), ``--kd`` distillation to the
frozen FP model instead. The validation loss (64 fixed batches, ``../shared/docs/llm_benchmark.md``) is measured on
the FP model and on the converted int4 model. Checkpoints go to ``--out`` (``--resume`` continues the last one).

The FP model is the cached pre-training of ``fxqat.training.recipes.pretrained_char_llama`` when it exists
(``python benchmarks/llm.py`` writes it); otherwise the model starts from random weights (said in the output: QAT of
an untrained model only shows that the pipeline runs, not what int4 QAT recovers). Nothing is trained to make it.

Usage::

    python examples/hf_trainer_llama.py                 # 250 steps (~ CPU minutes), int4 weight-only
    python examples/hf_trainer_llama.py --hybrid        # + block replacement
    python examples/hf_trainer_llama.py --quick         # smoke test: small model, 20 steps, a few seconds
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from typing import Any, Dict, List, Optional

import torch
from transformers import TrainingArguments

import fxqat
from fxqat.integrations.lm_dataset import CharLMDataset
from fxqat.integrations.transformers import QATTrainer, prepare_for_trainer
from fxqat.models.hf import char_llama
from fxqat.text_data import tiny_shakespeare
from fxqat.training.lm import FINETUNE_RECIPE, evaluate_lm
from fxqat.training.recipes import char_llama_cache_path, pretrained_char_llama

log = logging.getLogger("hf_trainer_llama")
QUICK_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=32)


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=FINETUNE_RECIPE.steps)
    p.add_argument("--lr", type=float, default=None, help="peak lr (default: 1e-4 from the FP checkpoint, 1e-3 "
                                                          "from random weights)")
    p.add_argument("--hybrid", action="store_true", help="block replacement on a frozen FP partner")
    p.add_argument("--kd", action="store_true", help="distillation to the frozen FP model (plain QAT otherwise)")
    p.add_argument("--quick", action="store_true", help="smoke test: small model, 20 steps, batch 8 x 32")
    p.add_argument("--random-init", action="store_true", help="do not use the cached FP checkpoint")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--out", default="runs/hf_trainer_llama")
    a = p.parse_args(argv)
    if a.hybrid and a.kd:
        p.error("--hybrid already distils to the FP partner; give one of --hybrid / --kd")
    return a


def fp_model(corpus, sizes: Dict[str, Any], random_init: bool):
    """``(model, source)``: the cached FP pre-training if it exists, else random weights (never trains here)."""
    if not random_init and char_llama_cache_path(corpus, model_overrides=sizes).exists():
        model, info = pretrained_char_llama(corpus, model_overrides=sizes, progress=False)
        return model, f"FP checkpoint {info['path']} (val loss {info['val_loss']:.4f})"
    reason = "--random-init" if random_init else "no cached FP checkpoint (python benchmarks/llm.py writes it)"
    return char_llama(corpus.vocab_size, seed=0, **sizes), f"random weights ({reason})"


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    a = parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("fxqat.integrations").setLevel(logging.INFO)  # calibration; capture details stay quiet
    steps, batch, context = (20, 8, 32) if a.quick else (a.steps, FINETUNE_RECIPE.batch_size, FINETUNE_RECIPE.context)
    n_val = 4 if a.quick else 64
    corpus = tiny_shakespeare()
    fp, source = fp_model(corpus, QUICK_SIZES if a.quick else {}, a.random_init)
    lr = a.lr if a.lr is not None else (FINETUNE_RECIPE.lr if source.startswith("FP") else 1e-3)
    val = list(corpus.batches("val", n_val, batch, context, seed=1337))
    val_fp = evaluate_lm(fp, val)

    train = CharLMDataset(corpus, "train", n=steps * batch, context=context, seed=FINETUNE_RECIPE.seed_offset)
    cfg = fxqat.QATConfig.preset("int4_weight_only", hybrid=fxqat.HybridConfig() if a.hybrid else None)
    qm = prepare_for_trainer(fp, {"input_ids": torch.stack([train[0]["input_ids"], train[1]["input_ids"]])}, cfg)
    args = TrainingArguments(
        a.out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
        warmup_steps=FINETUNE_RECIPE.warmup if not a.quick else 2, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": FINETUNE_RECIPE.floor}, weight_decay=FINETUNE_RECIPE.weight_decay,
        adam_beta1=FINETUNE_RECIPE.betas[0], adam_beta2=FINETUNE_RECIPE.betas[1], max_grad_norm=FINETUNE_RECIPE.clip,
        logging_steps=max(1, steps // 10), save_strategy="steps", save_steps=max(1, steps // 2), save_total_limit=2,
        report_to=[], disable_tqdm=True, use_cpu=True, seed=0, dataloader_num_workers=0,
    )
    trainer = QATTrainer(model=qm, args=args, train_dataset=train, teacher=fp if a.kd else None)
    t0 = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=True if a.resume else None)
    elapsed = time.perf_counter() - t0
    val_q = evaluate_lm(fxqat.convert(qm), val)  # the deployable model: weights quantized, quantizers frozen
    arm = "block replacement" if a.hybrid else "KD" if a.kd else "plain QAT"
    print(f"\nint4 weight-only, {arm}, {steps} steps with transformers.Trainer ({elapsed:.1f} s); model: {source}")
    print(f"validation loss ({n_val} batches of {batch} x {context}): FP {val_fp:.4f} -> int4 converted {val_q:.4f}")
    if not source.startswith("FP"):
        print("note: random initial weights; the numbers show the pipeline, not int4 recovery of a trained model")
    assert math.isfinite(val_q), "validation loss is not finite"
    return {"steps": trainer.state.global_step, "val_loss": val_q, "val_loss_fp": val_fp,
            "train_loss": out.training_loss, "time_s": elapsed, "model": source}


if __name__ == "__main__":
    main()
