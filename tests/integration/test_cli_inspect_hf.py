"""``fxqat inspect hf:<type>`` (shown in the README) on tiny transformers models with random weights.

Regression: ``tiny_hf_model`` set the tiny sizes as attributes after building the config, so Llama kept 32
key/value heads for 4 query heads and ``fxqat inspect hf:llama`` exited 1 with a size mismatch.
"""

import re

import pytest

from fxqat.cli import main

transformers = pytest.importorskip("transformers", reason="needs the optional extra: pip install 'fxqat[hf]'")


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_inspect_hf_model_exits_0_and_lists_blocks_and_quantizers(capsys, model_type):
    assert main(["inspect", f"hf:{model_type}"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^hf:{model_type}: 3 blocks \(input \(16,\)\)$", out, re.M)  # 2 decoder layers + suffix
    n = int(re.search(r"^(\d+) quantizers \(W4A4", out, re.M).group(1))
    rows = re.findall(r"^(\S+)\s+(weight|act)\s+(\d+)\s", out, re.M)
    assert len(rows) == n and n > 0
    # 2 layers x (q, k, v, o, gate, up, down) + lm_head = 15 weight quantizers
    assert sum(kind == "weight" for _, kind, _ in rows) == 15
