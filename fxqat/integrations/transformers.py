"""QAT of Hugging Face models with an unchanged ``transformers.Trainer`` (optional extra ``fxqat[hf]``).

Three pieces (docs/hf_trainer.md):

* :func:`prepare_for_trainer`: ``fxqat.prepare_qat`` on a ``PreTrainedModel``, specialised to the way Trainer calls
  it (keyword batch, ``use_cache=False``) and marked so that Trainer does not pass ``num_items_in_batch`` into it.
* :class:`FxqatCallback`: calibration on the first training batch (and re-pointing the optimizer at quantizer
  scales created by it or by a resume), noise-tempering clocks with ``schedule="manual"``, quantizer and
  transition-rate scalars in the Trainer log, checks (weight decay on quantizer scales, TALR length, DDP).
* :class:`QATTrainer` (a Trainer) or :func:`fxqat_compute_loss` (``Trainer(compute_loss_func=...)``): the loss of a
  block-replacement model's ``HybridOutput`` or CE + KD to a frozen FP teacher (``QATTrainer(teacher=fp)``).

Checkpoints are Trainer's own: the prepared model's ``state_dict`` (quantizer state included) goes into
``model.safetensors``, and a TALR optimizer (``fxqat.optim.AdamWT``..., wrapped in :class:`TALROptimizer`) saves its
TALR state inside ``optimizer.pt``; ``trainer.train(resume_from_checkpoint=True)`` continues where the run stopped.
:func:`load_checkpoint` reloads a checkpoint into a freshly prepared model and checks every key.

Example:
    >>> import torch, transformers, fxqat
    >>> from fxqat.models.hf import char_llama
    >>> model = char_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    >>> ids = torch.randint(0, 65, (2, 16))
    >>> qm = prepare_for_trainer(model, {"input_ids": ids}, fxqat.QATConfig.preset("int4_weight_only"))
    >>> isinstance(qm, transformers.PreTrainedModel), qm.accepts_loss_kwargs
    (True, False)
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any, Dict, Mapping, Optional

import safetensors.torch
import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from fxqat.api import prepare_qat
from fxqat.config import HybridConfig, QATConfig
from fxqat.hybrid_output import HybridOutput
from fxqat.integrations.causal_lm import causal_lm_loss
from fxqat.integrations.optimizers import TALROptimizer, find_talr, rebind_parameters
from fxqat.integrations.quant_logs import PREFIX, quantizer_logs
from fxqat.quantizers.control import calibrate, named_quantizers, quantizer_parameters
from fxqat.quantizers.noise_temper import NoiseTemperQuantizer
from fxqat.training.losses import logits_of
from fxqat.training.optim import TransitionRateScheduler

__all__ = ["prepare_for_trainer", "FxqatCallback", "QATTrainer", "fxqat_compute_loss", "load_checkpoint",
           "TALROptimizer"]

log = logging.getLogger(__name__)
_NOT_MODEL_INPUTS = ("labels", "num_items_in_batch")


def prepare_for_trainer(model: PreTrainedModel, example_batch: Mapping[str, torch.Tensor],
                        config: Optional[QATConfig] = None) -> PreTrainedModel:
    """``fxqat.prepare_qat`` for training with ``transformers.Trainer`` (``model`` itself is not modified).

    Args:
        model: a ``PreTrainedModel`` (e.g. ``LlamaForCausalLM``), FP weights loaded.
        example_batch: one collated batch as Trainer passes it (``{"input_ids": ..., "attention_mask": ...}``;
            ``labels`` is ignored): the captured graph regions are specialised to calls like it.
        config: the QAT settings (default ``QATConfig()``); ``config.hybrid`` for block replacement.

    Returns:
        The prepared model (same class, module tree and config), its quantizers not yet calibrated: FxqatCallback
        calibrates them on the first training batch, or call ``fxqat.calibrate(qm, [batch])`` first.
    """
    inner = model.get_base_model() if _is_peft(model) else model  # a PEFT (LoRA) model: docs/lora.md
    if not isinstance(inner, PreTrainedModel):
        raise TypeError(f"prepare_for_trainer expects a transformers PreTrainedModel, got {type(model).__name__}; "
                        "use fxqat.prepare_qat for other modules.")
    kwargs = {k: v for k, v in example_batch.items() if k not in _NOT_MODEL_INPUTS}
    if "use_cache" in inspect.signature(inner.forward).parameters:
        kwargs.setdefault("use_cache", False)  # Trainer trains with use_cache=False (TrainingArguments.use_cache)
    qm = prepare_qat(model, (), config, example_kwargs=kwargs)
    if getattr(qm.config, "use_cache", None) is not None:
        qm.config.use_cache = False
    # Trainer passes num_items_in_batch as a model keyword when the forward takes **kwargs; HF models hand it on to
    # every decoder layer, whose captured graph was specialised without it. The losses here use it instead.
    qm.accepts_loss_kwargs = False
    if _is_peft(qm):  # Trainer reads the flag on the model PEFT wraps
        qm.get_base_model().accepts_loss_kwargs = False
    return qm


def _is_peft(model: nn.Module) -> bool:
    """A PEFT ``PeftModel`` (it saves only its adapters: the callback saves the quantizer state beside them)."""
    return callable(getattr(type(model), "get_base_model", None)) and hasattr(model, "peft_config")


#: file a checkpoint of a PEFT model gets for its quantizer state (PEFT's save_pretrained writes the adapters only)
QUANTIZER_FILE = "fxqat_quantizers.safetensors"


def _quantizer_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    keys = {f"{name}.{k}" for name, q in named_quantizers(model).items() for k in q.state_dict()}
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k in keys}


class FxqatCallback(TrainerCallback, ExportableState):
    """Calibration, schedules and quantizer logging for a model prepared by fxqat, in any ``transformers.Trainer``.

    Pass it at construction (``Trainer(..., callbacks=[FxqatCallback()])``; :class:`QATTrainer` adds one itself):
    it records the model's parameters then, to re-point an optimizer you built at parameters a resume replaced.

    Args:
        calibrate: initialise uncalibrated quantizers on the first training batch (``fxqat.calibrate``: eval mode,
            no grad), then re-point the optimizer at scale parameters the initialisation created.
        temper_every: when noise-tempering quantizers with ``schedule="manual"`` advance their clock: ``"step"``
            (every optimizer step), ``"epoch"`` or None (never; ``schedule="step"`` ones advance on every training
            forward by themselves).
        log_quantizers: add :func:`~fxqat.integrations.quant_logs.quantizer_logs` to every training log.
        detail: with ``log_quantizers``, also one entry per quantizer (scale range, bits).
    """

    def __init__(self, calibrate: bool = True, temper_every: Optional[str] = "step", log_quantizers: bool = True,
                 detail: bool = False) -> None:
        if temper_every not in ("step", "epoch", None):
            raise ValueError(f"FxqatCallback: temper_every={temper_every!r}; use 'step', 'epoch' or None.")
        self.calibrate, self.temper_every = calibrate, temper_every
        self.log_quantizers, self.detail = log_quantizers, detail
        self._params: Dict[str, nn.Parameter] = {}
        self._hook = None
        self.optimizer = None
        self._where = None  # (args, state) of the running Trainer, for state()

    def state(self) -> dict:
        """Trainer stores this in ``trainer_state.json``: where this checkpoint's quantizer file is (PEFT models)."""
        folder = None
        if self._where is not None:
            args, st = self._where
            folder = os.path.abspath(os.path.join(args.output_dir, f"checkpoint-{st.global_step}"))
        return {"args": {"calibrate": self.calibrate, "temper_every": self.temper_every,
                         "log_quantizers": self.log_quantizers, "detail": self.detail},
                "attributes": {"quantizer_checkpoint": folder}}

    # ------------------------------------------------------------------------------------------- set-up
    def on_init_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if isinstance(optimizer, TransitionRateScheduler):
            raise TypeError("FxqatCallback: a fxqat TransitionRateScheduler is not a torch Optimizer; pass "
                            "optimizers=(TALROptimizer(opt), None) (QATTrainer wraps it by itself).")
        if model is not None:
            self._params = dict(model.named_parameters())

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.optimizer = optimizer
        self._where = (args, state)
        mine = (state.stateful_callbacks or {}).get(type(self).__name__)
        folder = mine.get("attributes", {}).get("quantizer_checkpoint") if isinstance(mine, dict) else None
        if state.global_step > 0 and _is_peft(model) and folder:  # resume: PEFT loaded the adapters only
            saved = os.path.join(folder, QUANTIZER_FILE)
            if os.path.exists(saved):
                model.load_state_dict(safetensors.torch.load_file(saved, device="cpu"), strict=False)
        current = dict(model.named_parameters())
        stale = {p: current[n] for n, p in self._params.items() if n in current and current[n] is not p}
        if rebind_parameters(optimizer, stale):  # a resume loaded per-channel scales into new Parameters
            log.info("fxqat: optimizer re-pointed at %d parameters replaced by loading the checkpoint", len(stale))
        self._params = current
        if self.calibrate and any(q.kind != "grad" and not q.is_initialized for q in named_quantizers(model).values()):
            self._start_calibration(args, state, model)
        self._check_decay(model, optimizer)
        talr = find_talr(optimizer)
        if talr is not None and talr.total_steps != state.max_steps:
            log.warning("fxqat: the TALR schedule spans %d steps, the Trainer runs %d; build it with "
                        "total_steps=max_steps.", talr.total_steps, state.max_steps)

    def _start_calibration(self, args, state, model: nn.Module) -> None:
        """Calibrate on the first training forward (a pre-hook that removes itself)."""
        if state.global_step > 0:
            raise RuntimeError(f"FxqatCallback: resuming at step {state.global_step} but the checkpoint held no "
                               "quantizer state (uninitialised quantizers); prepare the model with the same "
                               "QATConfig as the run that wrote it.")
        if args.world_size > 1:
            raise RuntimeError("FxqatCallback: under DDP, calibrate before building the Trainer "
                               "(fxqat.calibrate(qm, [batch])): initialisation creates parameters DDP must see.")
        self._hook = model.register_forward_pre_hook(self._calibrate_hook, with_kwargs=True)

    def _calibrate_hook(self, module: nn.Module, args, kwargs):
        self._hook.remove()
        self._hook = None
        before = dict(module.named_parameters())
        batch = args if args else {k: v for k, v in kwargs.items() if k not in _NOT_MODEL_INPUTS}
        calibrate(module, [batch])
        created = {before[n]: p for n, p in module.named_parameters() if n in before and before[n] is not p}
        rebind_parameters(self.optimizer, created)
        self._params = dict(module.named_parameters())
        log.info("fxqat: calibrated %d quantizers on the first training batch", len(named_quantizers(module)))

    @staticmethod
    def _check_decay(model: nn.Module, optimizer) -> None:
        qids = {id(p) for p in quantizer_parameters(model).values()}
        if any(g.get("weight_decay", 0) and any(id(p) in qids and p.requires_grad for p in g["params"])
               for g in optimizer.param_groups):
            log.warning("fxqat: the optimizer applies weight decay to quantizer scales; QATTrainer (or "
                        "get_decay_parameter_names) excludes them.")

    # ------------------------------------------------------------------------------------------- schedules
    def _advance(self, model: nn.Module) -> None:
        for q in named_quantizers(model).values():
            if isinstance(q, NoiseTemperQuantizer) and q.opts["schedule"] == "manual":
                q.advance(1)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.temper_every == "step":
            self._advance(model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.temper_every == "epoch":
            self._advance(model)

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is not None and _is_peft(model) and args.should_save:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            safetensors.torch.save_file(_quantizer_state(model), os.path.join(folder, QUANTIZER_FILE))

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ------------------------------------------------------------------------------------------- logging
    def logs(self, model: nn.Module) -> Dict[str, float]:
        """What this callback adds to a training log."""
        return quantizer_logs(model, find_talr(self.optimizer), self.detail) if self.log_quantizers else {}

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or "loss" not in logs or any(k.startswith(PREFIX) for k in logs):
            return  # not a training log, or QATTrainer.log added the scalars already
        extra = self.logs(model)
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)


def fxqat_compute_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """``Trainer(compute_loss_func=fxqat_compute_loss)``: the hybrid loss of a ``HybridOutput`` (block replacement),
    otherwise next-token CE (:func:`fxqat.integrations.causal_lm.causal_lm_loss`)."""
    return causal_lm_loss(outputs, labels, num_items_in_batch=num_items_in_batch)[0]


class QATTrainer(Trainer):
    """``transformers.Trainer`` for fxqat models: every Trainer argument, plus

    Args:
        teacher: a frozen FP model for CE + KD on plain outputs (it is put in eval mode, frozen and moved to the
            training device; ignored for a block-replacement model, whose HybridOutput carries its partner's output).
        kd: loss weights (``kd_weight``, ``temperature``, ``task_weight``) of the teacher term; default
            ``HybridConfig()``. A HybridOutput uses its own model's HybridConfig.

    It adds an :class:`FxqatCallback` unless one is given, wraps a TransitionRateScheduler passed in ``optimizers``
    in :class:`TALROptimizer`, keeps weight decay off quantizer parameters, and logs the loss parts (``ce_lp``,
    ``kd_lp``, ``ce_path<i>``...) averaged since the last log. The evaluation loss is the task CE of the LP model.
    """

    def __init__(self, *args, teacher: Optional[nn.Module] = None, kd: Optional[HybridConfig] = None,
                 **kwargs) -> None:
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("QATTrainer computes the loss itself; drop compute_loss_func (or use Trainer with it).")
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if not any(isinstance(c, FxqatCallback) or c is FxqatCallback for c in callbacks):
            callbacks.append(FxqatCallback())
        opt, sched = kwargs.pop("optimizers", (None, None))
        if isinstance(opt, TransitionRateScheduler):
            opt = TALROptimizer(opt)
        super().__init__(*args, callbacks=callbacks, optimizers=(opt, sched), **kwargs)
        self.kd = kd or HybridConfig()
        self.teacher = teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            teacher.to(self.args.device)
        self._parts: Dict[str, float] = {}
        self._n_parts = 0

    def get_decay_parameter_names(self, model: nn.Module) -> list:
        names = super().get_decay_parameter_names(model)
        quant = quantizer_parameters(model)
        return [n for n in names if n not in quant]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError("QATTrainer: the batch has no 'labels' (causal LM: labels = input_ids, -100 = ignored).")
        outputs = model(**inputs)
        if not model.training:  # evaluation: the LP model's task loss, comparable across arms
            loss, parts = causal_lm_loss(outputs, labels)
            return (loss, outputs) if return_outputs else loss
        teacher_logits = None
        if self.teacher is not None and not isinstance(outputs, HybridOutput):
            with torch.no_grad():
                teacher_logits = logits_of(self.teacher(**inputs))
        loss, parts = causal_lm_loss(outputs, labels, teacher_logits,
                                     None if isinstance(outputs, HybridOutput) else self.kd, num_items_in_batch)
        # Trainer divides by the accumulation steps unless the loss is already a share of the accumulated batch
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        for k, v in parts.items():
            self._parts[k] = self._parts.get(k, 0.0) + float(v)
        self._n_parts += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs:
            logs.update({k: v / max(self._n_parts, 1) for k, v in self._parts.items()})
            self._parts, self._n_parts = {}, 0
            cb = next((c for c in self.callback_handler.callbacks if isinstance(c, FxqatCallback)), None)
            if cb is not None:
                logs.update(cb.logs(self.model))
        super().log(logs, start_time)


def load_checkpoint(qm: nn.Module, checkpoint_dir: str) -> nn.Module:
    """Load a Trainer checkpoint (``model.safetensors``) into a model prepared like the one that wrote it.

    Every key of ``qm.state_dict()`` must be in the file except tied weights (saved once, under another key of the
    same tensor), and the file may hold no other key: a differently prepared model raises a ``ValueError``.
    """
    path = os.path.join(checkpoint_dir, "model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_checkpoint: {path} does not exist (a Trainer checkpoint-<step> folder?).")
    saved = safetensors.torch.load_file(path, device="cpu")
    own = qm.state_dict()
    ptr = {}
    for k, v in own.items():
        if v.numel():
            ptr.setdefault(v.data_ptr(), []).append(k)
    tied = {k for keys in ptr.values() if len(keys) > 1 and any(x in saved for x in keys) for k in keys}
    missing = sorted(set(own) - set(saved) - tied)
    unexpected = sorted(set(saved) - set(own))
    if missing or unexpected:
        raise ValueError(f"load_checkpoint: {checkpoint_dir} does not match this model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}; prepare the model with the QATConfig of the saved run.")
    qm.load_state_dict(saved, strict=False)
    return qm
