"""Tiny Hugging Face transformers models with random weights (no hub downloads), for the capture tests.

Each entry builds ``(model, example_inputs, example_kwargs)``; ``ZOO`` maps a readable name to its builder.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch import nn

__all__ = ["ZOO", "build"]

_TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64)


def _ids(vocab: int = 99, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


def _image(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def _causal(cls_name: str, cfg_name: str, **extra) -> Callable[[], Tuple[nn.Module, Tuple, Dict]]:
    def build_one():
        import transformers

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
}


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
