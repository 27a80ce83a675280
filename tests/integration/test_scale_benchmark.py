"""benchmarks/scale.py's model shapes and benchmarks/gpu_check.py's behaviour without CUDA."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def test_parameter_counts_match_the_built_models():
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, str(REPO / "benchmarks"))
    import scale

    for size, shape in scale.SIZES.items():
        cfg = transformers.LlamaConfig(vocab_size=scale.VOCAB, tie_word_embeddings=False, **shape)
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(cfg)
        assert scale.n_params(size) == sum(p.numel() for p in model.parameters()), size
    assert 1.09e9 < scale.n_params("1.1B") < 1.11e9  # Llama-3.2-1B's shape with a 32000-token vocabulary: 1.1B
    assert 0.09e9 < scale.n_params("0.1B") < 0.15e9 and 0.35e9 < scale.n_params("0.4B") < 0.4e9


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_gpu_check_says_no_cuda_and_writes_nothing(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "Nothing was run or written" in proc.stderr
