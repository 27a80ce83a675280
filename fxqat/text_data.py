"""Character-level text corpora (Tiny Shakespeare) and seeded language-model batches.

The corpus is read from the shared data folder (``tinyshakespeare.txt``; the same search order as
:mod:`fxqat.data`), nothing is downloaded. The vocabulary is the sorted set of the text's characters; the first
``train_fraction`` of the characters train, the rest validate. Batches are windows of ``context + 1`` characters
at start positions drawn from a ``torch.Generator``, so a seed fixes every batch.

Example:
    >>> corpus = CharCorpus("abcabcabcabd" * 20)
    >>> corpus.vocab_size, corpus.decode(corpus.encode("cab"))
    (4, 'cab')
    >>> x, y = corpus.batch("train", batch_size=2, context=8, generator=torch.Generator().manual_seed(0))
    >>> tuple(x.shape), bool((x[:, 1:] == y[:, :-1]).all())
    ((2, 8), True)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

import torch

from fxqat.data import search_paths

__all__ = ["CharCorpus", "tiny_shakespeare", "find_text"]

PathLike = Union[str, os.PathLike]


class CharCorpus:
    """A character-level corpus with a train/validation split by position.

    Args:
        text: the whole corpus.
        train_fraction: share of the characters (from the start) used for training.
    """

    def __init__(self, text: str, train_fraction: float = 0.9) -> None:
        if not text:
            raise ValueError("CharCorpus: the text is empty")
        if not 0.0 < train_fraction < 1.0:
            raise ValueError(f"CharCorpus: train_fraction must be in (0, 1), got {train_fraction}")
        self.chars: List[str] = sorted(set(text))
        self._index = {c: i for i, c in enumerate(self.chars)}
        data = self.encode(text)
        n = int(train_fraction * len(data))
        self.splits = {"train": data[:n], "val": data[n:]}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """int64 ids of ``text`` (every character must be in the vocabulary)."""
        try:
            return torch.tensor([self._index[c] for c in text], dtype=torch.long)
        except KeyError as e:
            raise ValueError(f"CharCorpus.encode: character {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def batch(self, split: str, batch_size: int, context: int,
              generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)`` of shape ``(batch_size, context)``; targets are the inputs shifted by one."""
        data = self.splits[split]
        if len(data) <= context + 1:
            raise ValueError(f"CharCorpus: split {split!r} has {len(data)} characters, fewer than context+1")
        starts = torch.randint(0, len(data) - context - 1, (batch_size,), generator=generator)
        window = torch.stack([data[s: s + context + 1] for s in starts.tolist()])
        return window[:, :-1], window[:, 1:]

    def batches(self, split: str, n: int, batch_size: int, context: int,
                seed: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """``n`` batches from one generator seeded with ``seed`` (the same seed gives the same batches)."""
        gen = torch.Generator().manual_seed(seed)
        for _ in range(n):
            yield self.batch(split, batch_size, context, gen)


def find_text(name: str = "tinyshakespeare.txt", root: Optional[PathLike] = None) -> Path:
    """The first ``name`` in :func:`fxqat.data.search_paths`; a FileNotFoundError lists the places searched."""
    tried = []
    for base in search_paths(root):
        cand = base if base.is_file() else base / name
        tried.append(str(cand))
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"fxqat.text_data: {name} not found. Searched: {', '.join(tried)}. Pass root= or set "
                            f"FXQAT_DATA=/path/to/shared/data. Nothing is downloaded.")


def tiny_shakespeare(root: Optional[PathLike] = None, train_fraction: float = 0.9) -> CharCorpus:
    """Tiny Shakespeare as a :class:`CharCorpus` (65 characters; 1,003,854 train / 111,540 validation)."""
    return CharCorpus(find_text("tinyshakespeare.txt", root).read_text(encoding="utf-8"), train_fraction)
