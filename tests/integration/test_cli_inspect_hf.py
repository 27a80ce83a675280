"""``fxqat inspect hf:<type>`` (shown in the README) on tiny transformers models with random weights.

Regression: ``tiny_hf_model`` set the tiny sizes as attributes after building the config, so Llama kept 32
key/value heads for 4 query heads and ``fxqat inspect hf:llama`` exited 1 with a size mismatch.
"""

import re

import pytest

from fxqat.cli import main

transformers = pytest.importorskip("transformers", reason="needs the optional extra: pip install 'fxqat[hf]'")


# 2 layers x (q, k, v, o, gate, up, down) + lm_head = 15 weight quantizers; Mixtral (the HF zoo's MoE entry):
# 2 layers x (q, k, v, o, experts.gate_up_proj, experts.down_proj) + lm_head = 13 (routers stay FP)
@pytest.mark.parametrize("model_type,n_weight", [("llama", 15), ("mistral", 15), ("mixtral", 13)])
def test_inspect_hf_model_exits_0_and_lists_blocks_and_quantizers(capsys, model_type, n_weight):
    assert main(["inspect", f"hf:{model_type}"]) == 0
    out = capsys.readouterr().out
    # 2 decoder layers + suffix; the input is the HF zoo's example (fxqat.models.hf_zoo)
    assert re.search(rf"^hf:{model_type}: 3 blocks \(input \(12,\)\)$", out, re.M)
    n = int(re.search(r"^(\d+) quantizers \(W4A4", out, re.M).group(1))
    rows = re.findall(r"^(\S+)\s+(weight|act)\s+(\d+)\s", out, re.M)
    assert len(rows) == n and n > 0
    assert sum(kind == "weight" for _, kind, _ in rows) == n_weight
