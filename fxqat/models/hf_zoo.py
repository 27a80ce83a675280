"""The Hugging Face zoo: tiny transformers models with random weights (no hub download), one set for the tests, the
benchmarks (``benchmarks/coverage.py``) and the CLI's ``hf:<name>`` models.

Each entry builds ``(model, example_inputs, example_kwargs)``; :data:`ZOO` maps a readable name to its builder and
:data:`MOE` names the mixture-of-experts entries (3-D expert parameters in transformers 5, per-expert ``nn.Linear``
before). An entry whose classes the installed transformers lacks raises ``ValueError`` from :func:`build`.

Example:
    >>> model, args, kwargs = build("mixtral")  # doctest: +SKIP
    >>> tuple(model.model.layers[0].mlp.experts.gate_up_proj.shape)  # doctest: +SKIP
    (4, 128, 32)
    >>> sorted(MOE)
    ['mixtral', 'qwen2_moe', 'qwen3_moe']
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch import nn

__all__ = ["ZOO", "MOE", "build"]

_TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64)


def _ids(vocab: int = 99, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


def _image(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def _causal(cls_name: str, cfg_name: str, **extra) -> Callable[[], Tuple[nn.Module, Tuple, Dict]]:
    def build_one():
        import transformers

        if not hasattr(transformers, cls_name):
            raise ValueError(f"fxqat.models.hf_zoo: transformers {transformers.__version__} has no {cls_name}.")
        cfg = getattr(transformers, cfg_name)(**{**_TEXT, "use_cache": False, **extra})
        return getattr(transformers, cls_name)(cfg), (_ids(),), {}
    return build_one


def _vision(cls_name: str, cfg_name: str, **extra) -> Callable[[], Tuple[nn.Module, Tuple, Dict]]:
    def build_one():
        import transformers

        base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                    patch_size=8, num_labels=5)
        cfg = getattr(transformers, cfg_name)(**{**base, **extra})
        return getattr(transformers, cls_name)(cfg), (_image(),), {}
    return build_one


def _t5():
    import transformers

    cfg = transformers.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                num_heads=4, use_cache=False, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg), (_ids(),), {"decoder_input_ids": _ids(length=6)}


def _bart():
    import transformers

    cfg = transformers.BartConfig(vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=64, use_cache=False)
    return transformers.BartForConditionalGeneration(cfg), (_ids(),), {}


ZOO: Dict[str, Callable[[], Tuple[nn.Module, Tuple, Dict]]] = {
    "llama": _causal("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2, tie_word_embeddings=False),
    "llama_tied": _causal("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2, tie_word_embeddings=True),
    "mistral": _causal("MistralForCausalLM", "MistralConfig", num_key_value_heads=2),
    "qwen2": _causal("Qwen2ForCausalLM", "Qwen2Config", num_key_value_heads=2),
    "gpt2": _causal("GPT2LMHeadModel", "GPT2Config", n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "gpt_neox": _causal("GPTNeoXForCausalLM", "GPTNeoXConfig"),
    "opt": _causal("OPTForCausalLM", "OPTConfig", ffn_dim=64, word_embed_proj_dim=32),
    "phi3": _causal("Phi3ForCausalLM", "Phi3Config", num_key_value_heads=2, pad_token_id=0),
    "bert": _causal("BertForSequenceClassification", "BertConfig", num_labels=3),
    "roberta": _causal("RobertaForMaskedLM", "RobertaConfig", pad_token_id=1),
    "distilbert": _causal("DistilBertForSequenceClassification", "DistilBertConfig", dim=32, n_layers=2, n_heads=4,
                          hidden_dim=64),
    "vit": _vision("ViTForImageClassification", "ViTConfig"),
    "deit": _vision("DeiTForImageClassification", "DeiTConfig"),
    "t5": _t5,
    "bart": _bart,
    # mixture of experts: 4 experts, 2 per token
    "mixtral": _causal("MixtralForCausalLM", "MixtralConfig", num_key_value_heads=2, num_local_experts=4,
                       num_experts_per_tok=2),
    "qwen3_moe": _causal("Qwen3MoeForCausalLM", "Qwen3MoeConfig", num_key_value_heads=2, head_dim=8, num_experts=4,
                         num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    "qwen2_moe": _causal("Qwen2MoeForCausalLM", "Qwen2MoeConfig", num_key_value_heads=2, num_experts=4,
                         num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64),
}
#: the mixture-of-experts entries of :data:`ZOO`
MOE = ("mixtral", "qwen3_moe", "qwen2_moe")


def build(name: str, dropout: bool = True) -> Tuple[nn.Module, Tuple, Dict]:
    """``(model, example_inputs, example_kwargs)`` for a ZOO entry, built with ``torch.manual_seed(0)``.

    ``dropout=False`` sets every dropout probability of the config to 0 (for comparisons of separate train-mode
    calls, which would otherwise draw different masks).
    """
    torch.manual_seed(0)
    model, args, kwargs = ZOO[name]()
    if not dropout:
        cfg = model.config
        for key, value in list(vars(cfg).items()):
            if "drop" in key and isinstance(value, float):
                setattr(cfg, key, 0.0)
        torch.manual_seed(0)
        model = type(model)(cfg)
    return model, args, kwargs
