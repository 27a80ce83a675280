"""``fxqat.find_blocks`` on a model ``prepare_qat`` returned gives the blocks of the FP model it was prepared from.

Regression: the "prepared already" branch of ``find_blocks`` called an undefined name (``NameError``) on a
graph-root model.
"""

import torch
import torchvision
from qat_helpers import DataDepRoot

import fxqat


def _summary(blocks):
    return [(b.name, tuple(b.modules)) for b in blocks]


def test_find_blocks_of_a_prepared_graph_root_model_equals_its_fp_blocks():
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 64, 64)
    fp = fxqat.find_blocks(model, (x,))
    qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig())
    assert isinstance(qm, torch.fx.GraphModule) and not fxqat.capture_report(qm).regions[1:]  # one graph region
    got = fxqat.find_blocks(qm, (x,))
    assert _summary(got) == _summary(fp)
    assert [b.name for b in got][:3] == ["stem", "layer1.0", "layer1.1"] and len(got) == 10


def test_find_blocks_of_a_prepared_eager_root_model_equals_its_fp_blocks():
    torch.manual_seed(0)
    model, x = DataDepRoot(features=False), torch.randn(2, 8)
    fp = fxqat.find_blocks(model, (x,))
    qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig())
    assert fxqat.capture_report(qm).regions[0].kind == "eager"
    got = fxqat.find_blocks(qm, (x,))
    assert _summary(got) == _summary(fp)
    assert [b.name for b in got] == ["layers.0", "layers.1", "layers.2", "suffix"]
