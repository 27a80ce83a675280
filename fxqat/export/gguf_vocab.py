"""The tokenizer a GGUF file carries: a byte-level BPE vocabulary (llama.cpp's ``"gpt2"`` tokenizer model).

llama.cpp refuses a BPE vocabulary without merges ("cannot find tokenizer merges in model file"), so every
:class:`GGUFVocab` holds at least one. Two sources:

* :meth:`GGUFVocab.from_chars`: a character-level vocabulary (token ``i`` = character ``i``, as
  :class:`fxqat.text_data.CharCorpus` numbers them), each character written in the byte-level alphabet of GPT-2's
  BPE (printable bytes as themselves, the others, space and newline included, as the code points 256 onwards), with
  one merge of the first two tokens (it produces a string that is no token, so text still tokenizes character by
  character);
* :meth:`GGUFVocab.from_tokenizer`: a Hugging Face fast tokenizer whose model is byte-level BPE (Llama 3, Qwen2,
  GPT-2 style), its tokens, merges and special tokens as they are.

Example:
    >>> v = GGUFVocab.from_chars(["\\n", " ", "a", "b"])
    >>> v.tokens, v.merges
    (('Ċ', 'Ġ', 'a', 'b'), ('Ċ Ġ',))
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

__all__ = ["GGUFVocab", "byte_to_unicode"]

_NORMAL, _CONTROL = 1, 3  # gguf.TokenType values


@functools.lru_cache(maxsize=None)
def byte_to_unicode() -> Dict[int, str]:
    """GPT-2's byte-level alphabet: each byte 0..255 as one printable character (the printable Latin-1 bytes as
    themselves, the remaining ones as ``chr(256 + n)`` in byte order).

    Example:
        >>> byte_to_unicode()[ord("a")], byte_to_unicode()[ord(" ")], byte_to_unicode()[ord("\\n")]
        ('a', 'Ġ', 'Ċ')
    """
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


@dataclass(frozen=True)
class GGUFVocab:
    """A byte-level BPE vocabulary as GGUF stores it.

    Attributes:
        tokens: token strings in the byte-level alphabet, index = token id.
        merges: ``"left right"`` pairs, highest priority first (at least one).
        token_types: gguf ``TokenType`` of each token (1 normal, 3 control).
        bos_id, eos_id: special token ids, or None.
        pre: llama.cpp's pre-tokenizer name (``tokenizer.ggml.pre``); ``"default"`` is GPT-2's regex.
    """

    tokens: Tuple[str, ...]
    merges: Tuple[str, ...]
    token_types: Tuple[int, ...]
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    pre: str = "default"

    def __post_init__(self) -> None:
        if not self.merges:
            raise ValueError("GGUFVocab: llama.cpp refuses a BPE vocabulary without merges; give at least one.")
        if len(self.token_types) != len(self.tokens):
            raise ValueError(f"GGUFVocab: {len(self.token_types)} token types for {len(self.tokens)} tokens.")
        for name in ("bos_id", "eos_id"):
            i = getattr(self, name)
            if i is not None and not 0 <= i < len(self.tokens):
                raise ValueError(f"GGUFVocab.{name}={i} is not a token id (0..{len(self.tokens) - 1}).")

    @classmethod
    def from_chars(cls, chars: Sequence[str], bos_id: Optional[int] = None,
                   eos_id: Optional[int] = None) -> "GGUFVocab":
        """A character-level vocabulary: token ``i`` is ``chars[i]`` (distinct characters, at least two)."""
        chars = list(chars)
        if len(chars) < 2 or len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError("GGUFVocab.from_chars: give at least two distinct single characters.")
        table = byte_to_unicode()
        tokens = tuple("".join(table[b] for b in c.encode("utf-8")) for c in chars)
        return cls(tokens, (f"{tokens[0]} {tokens[1]}",), (_NORMAL,) * len(tokens), bos_id, eos_id)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, pre: str = "default") -> "GGUFVocab":
        """The vocabulary of a Hugging Face fast tokenizer with a byte-level BPE model.

        Args:
            tokenizer: a ``PreTrainedTokenizerFast`` (``tokenizer.backend_tokenizer`` is read).
            pre: llama.cpp's pre-tokenizer name for it (llama.cpp's converter recognises it by hashing the
                tokenizer's output; say ``"llama-bpe"`` for Llama 3, ``"qwen2"`` for Qwen2).
        """
        backend = getattr(tokenizer, "backend_tokenizer", None)
        spec = json.loads(backend.to_str()) if backend is not None else {}
        model = spec.get("model", {})
        if model.get("type") != "BPE" or not model.get("merges"):
            raise ValueError(
                f"GGUFVocab.from_tokenizer: {type(tokenizer).__name__} is not a byte-level BPE fast tokenizer with "
                "merges; pass GGUFVocab.from_chars(...) or a GGUFVocab built from the tokens and merges."
            )
        vocab = dict(model["vocab"])
        special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        vocab.update(special)
        n = max(vocab.values()) + 1
        tokens = [f"[PAD{i}]" for i in range(n)]
        for tok, i in vocab.items():
            tokens[i] = tok
        types = tuple(_CONTROL if t in special else _NORMAL for t in tokens)
        merges = tuple(m if isinstance(m, str) else " ".join(m) for m in model["merges"])
        return cls(tuple(tokens), merges, types, tokenizer.bos_token_id, tokenizer.eos_token_id, pre)

    def write(self, writer: Any) -> None:
        """Add the ``tokenizer.ggml.*`` keys to a ``gguf.GGUFWriter``."""
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(list(self.tokens))
        writer.add_token_types(list(self.token_types))
        writer.add_token_merges(list(self.merges))
        if self.bos_id is not None:
            writer.add_bos_token_id(self.bos_id)
        if self.eos_id is not None:
            writer.add_eos_token_id(self.eos_id)
        writer.add_add_bos_token(False)
