"""Tiny Hugging Face transformers models with random weights, built from configs (no hub download).

Example:
    >>> model, ids = tiny_hf_model("llama")  # doctest: +SKIP
    >>> type(model).__name__, tuple(ids.shape)  # doctest: +SKIP
    ('LlamaForCausalLM', (1, 16))
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from fxqat.models.hf_zoo import ZOO, build

__all__ = ["tiny_hf_model", "char_llama", "CHAR_LLAMA"]

_SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128, num_key_value_heads=2, head_dim=16)


def tiny_hf_model(model_type: str, seq_len: int = 16, seed: int = 0) -> Tuple[nn.Module, torch.Tensor]:
    """A tiny model with random weights: the HF zoo's entry ``model_type`` (:mod:`fxqat.models.hf_zoo`, the models
    the tests and benchmarks use, MoE ones included: ``"mixtral"``, ``"qwen3_moe"``, ``"qwen2_moe"``) when it has one
    that takes a single input, else a causal LM (or the base model when the type has no causal-LM head) of any
    transformers ``model_type`` with tiny sizes (``seq_len`` and ``seed`` apply to those).

    Raises:
        ValueError: transformers is not installed or does not know ``model_type``.
    """
    if model_type in ZOO:
        model, args, kwargs = build(model_type)
        if not kwargs and len(args) == 1:
            return model, args[0]
    try:
        import transformers
    except ImportError as e:
        raise ValueError("hf: models need the optional extra: pip install 'fxqat[hf]'") from e
    try:
        default = transformers.AutoConfig.for_model(model_type, use_cache=False)
    except ValueError as e:
        raise ValueError(f"transformers does not know the model type {model_type!r}: {e}") from e
    # built again with the tiny sizes so that the fields the config derives from them (head_dim, key/value heads)
    # follow; setting attributes afterwards left e.g. Llama with 4 query heads and 32 key/value heads
    cfg = transformers.AutoConfig.for_model(
        model_type, use_cache=False, **{k: v for k, v in _SIZES.items() if hasattr(default, k)})
    torch.manual_seed(seed)
    try:
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    except ValueError:
        model = transformers.AutoModel.from_config(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(seed))
    return model, ids


#: the LLM benchmark's model (../shared/docs/llm_benchmark.md): 804,224 parameters, 29 nn.Linear, 1 nn.Embedding
CHAR_LLAMA = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)


def char_llama(vocab_size: int = 65, seed: int = 0, **overrides) -> nn.Module:
    """The character-level ``LlamaForCausalLM`` of the LLM benchmark, built after ``torch.manual_seed(seed)``.

    Example:
        >>> m = char_llama()  # doctest: +SKIP
        >>> sum(p.numel() for p in m.parameters())  # doctest: +SKIP
        804224
    """
    try:
        import transformers
    except ImportError as e:
        raise ValueError("char_llama needs the optional extra: pip install 'fxqat[hf]'") from e
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, use_cache=False, **{**CHAR_LLAMA, **overrides})
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)
