"""Integrations with other training libraries; each submodule imports its library, this package imports none.

* :mod:`fxqat.integrations.transformers`: ``transformers.Trainer`` (extra ``fxqat[hf]``): ``prepare_for_trainer``,
  ``FxqatCallback``, ``QATTrainer``, ``fxqat_compute_loss``, ``load_checkpoint``.
* :mod:`fxqat.integrations.optimizers`: ``TALROptimizer`` (a transition-rate optimizer as a torch ``Optimizer``)
  and ``rebind_parameters``; torch only.
* :mod:`fxqat.integrations.causal_lm`: the causal-LM QAT loss in the Hugging Face label convention; torch only.
* :mod:`fxqat.integrations.lm_dataset`: ``CharLMDataset``, a character corpus as Hugging Face causal-LM items.
* :mod:`fxqat.integrations.quant_logs`: quantizer and schedule scalars for a trainer's log.
"""

__all__: list = []
