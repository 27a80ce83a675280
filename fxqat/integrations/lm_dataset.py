"""A character corpus as a map-style dataset of causal-LM examples in the Hugging Face convention.

Item ``i`` is ``{"input_ids": x, "labels": x}`` with ``x`` the ``context`` characters starting at a position drawn
by a generator seeded with ``(seed, i)``: the same item for the same index in every epoch, process and resumed run,
whatever order a sampler asks for. The labels equal the inputs because Hugging Face causal LMs (and
:func:`fxqat.integrations.causal_lm.causal_lm_loss`) shift them: position ``t`` predicts character ``t + 1``.

Example:
    >>> from fxqat.text_data import CharCorpus
    >>> ds = CharLMDataset(CharCorpus("to be or not to be " * 20), "train", n=8, context=6, seed=0)
    >>> len(ds), tuple(ds[3]["input_ids"].shape), bool((ds[3]["labels"] == ds[3]["input_ids"]).all())
    (8, (6,), True)
    >>> bool((ds[3]["input_ids"] == CharLMDataset(ds.corpus, "train", 8, 6, seed=0)[3]["input_ids"]).all())
    True
"""

from __future__ import annotations

from typing import Dict

import torch
from torch.utils.data import Dataset

__all__ = ["CharLMDataset"]


class CharLMDataset(Dataset):
    """``n`` seeded windows of ``context`` characters of ``corpus.splits[split]``.

    Args:
        corpus: a :class:`fxqat.text_data.CharCorpus`.
        split: ``"train"`` or ``"val"``.
        n: number of items (e.g. steps × batch size for one pass).
        context: characters per item.
        seed: item ``i`` starts at a position drawn from ``torch.Generator().manual_seed(seed * 1_000_003 + i)``.
    """

    def __init__(self, corpus, split: str, n: int, context: int, seed: int = 0) -> None:
        if split not in corpus.splits:
            raise ValueError(f"CharLMDataset: split {split!r} is not one of {sorted(corpus.splits)}.")
        if n < 1 or context < 2:
            raise ValueError(f"CharLMDataset: n={n} and context={context} must be >= 1 and >= 2.")
        if len(corpus.splits[split]) <= context:
            raise ValueError(f"CharLMDataset: split {split!r} has {len(corpus.splits[split])} characters, "
                             f"not more than context={context}.")
        self.corpus, self.split, self.n, self.context, self.seed = corpus, split, n, context, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        if not -self.n <= i < self.n:
            raise IndexError(f"CharLMDataset: index {i} out of range for {self.n} items")
        i %= self.n
        data = self.corpus.splits[self.split]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        start = int(torch.randint(0, len(data) - self.context, (1,), generator=gen))
        x = data[start: start + self.context].clone()
        return {"input_ids": x, "labels": x.clone()}
