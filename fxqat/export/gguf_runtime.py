"""Running a GGUF file in llama.cpp (through ``llama-cpp-python``, the optional extra ``fxqat[llamacpp]``): logits on
given token ids, and decode speed, to check a :func:`fxqat.export.to_gguf` file against the model it came from.

``llama-cpp-python`` builds llama.cpp from source when pip installs it (about 10 minutes on 2 cores; pip caches the
wheel); nothing else in fxqat needs it.

Example:
    >>> import importlib.util
    >>> importlib.util.find_spec("llama_cpp") is None or callable(llama_cpp_logits)
    True
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

__all__ = ["llama_cpp_logits", "llama_cpp_decode_speed", "load_llama_cpp"]


def load_llama_cpp(path: "str | os.PathLike", n_ctx: int, threads: int = 1) -> Any:
    """A ``llama_cpp.Llama`` for the GGUF file ``path`` that keeps every position's logits (CPU, ``threads``)."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise ImportError("running GGUF files needs llama-cpp-python: pip install 'fxqat[llamacpp]' (it builds "
                          "llama.cpp from source).") from exc
    return llama_cpp.Llama(model_path=os.fspath(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                           n_threads=threads, n_threads_batch=threads, verbose=False)


def llama_cpp_logits(path: "str | os.PathLike", ids: torch.Tensor, threads: int = 1) -> torch.Tensor:
    """llama.cpp's logits for each row of ``ids`` (``[B, T]`` token ids), as a float32 tensor ``[B, T, vocab]``;
    each row is evaluated from an empty cache in one batch."""
    ids = torch.as_tensor(ids).reshape(-1, ids.shape[-1])
    llm = load_llama_cpp(path, ids.shape[1], threads)
    rows = []
    for row in ids.tolist():
        llm.reset()
        llm.eval(row)
        rows.append(np.array(llm.scores[: len(row)], dtype=np.float32))
    llm.close()
    return torch.from_numpy(np.stack(rows))


def llama_cpp_decode_speed(path: "str | os.PathLike", n_tokens: int, threads: int = 1, prompt: int = 1) -> float:
    """Tokens per second of llama.cpp decoding ``n_tokens`` tokens one at a time (token id 0 after a ``prompt``-token
    start; the logits are computed, nothing is sampled)."""
    llm = load_llama_cpp(path, prompt + n_tokens, threads)
    llm.reset()
    llm.eval([0] * prompt)
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        llm.eval([0])
    dt = time.perf_counter() - t0
    llm.close()
    return n_tokens / dt
