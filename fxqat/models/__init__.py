"""Models for examples, tests and benchmarks, and a name registry that also reaches torchvision.

Example:
    >>> from fxqat.models import get_model
    >>> get_model("resnet20").fc.out_features
    10
    >>> get_model("resnet18", num_classes=5).fc.out_features
    5
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence

import torch.nn as nn

from fxqat.models.resnet_cifar import (
    BasicBlock,
    CifarResNet,
    PadShortcut,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
)
from fxqat.models.small import MLP, SmallCNN

__all__ = [
    "get_model", "available_models", "MODELS", "CifarResNet", "BasicBlock", "PadShortcut", "MLP", "SmallCNN",
    "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
]


def _mlp(num_classes: int = 10, in_shape: Sequence[int] = (1, 28, 28), **kw: Any) -> nn.Module:
    return MLP(num_classes, in_shape, **kw)


def _cnn(num_classes: int = 10, in_shape: Sequence[int] = (1, 28, 28), **kw: Any) -> nn.Module:
    return SmallCNN(num_classes, in_channels=int(in_shape[0]), **kw)


def _resnet(make: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def build(num_classes: int = 10, in_shape: Sequence[int] = (3, 32, 32), **kw: Any) -> nn.Module:
        return make(num_classes, in_channels=int(in_shape[0]), **kw)

    return build


#: fxqat's own models; ``get_model`` also accepts any torchvision classification model name.
MODELS: Dict[str, Callable[..., nn.Module]] = {
    "resnet20": _resnet(resnet20), "resnet32": _resnet(resnet32), "resnet44": _resnet(resnet44),
    "resnet56": _resnet(resnet56), "resnet110": _resnet(resnet110), "mlp": _mlp, "cnn": _cnn,
}


def _torchvision_names() -> List[str]:
    try:
        import torchvision.models as tvm

        return sorted(tvm.list_models(module=tvm))
    except Exception:  # pragma: no cover - torchvision is a dependency
        return []


def available_models() -> List[str]:
    """fxqat's model names followed by torchvision's classification model names."""
    return sorted(MODELS) + [n for n in _torchvision_names() if n not in MODELS]


def get_model(name: str, num_classes: int = 10, in_shape: Sequence[int] = (3, 32, 32), **kwargs: Any) -> nn.Module:
    """Build a model by name, randomly initialised (torchvision models with ``weights=None``: nothing downloads).

    Args:
        name: one of :data:`MODELS` (``resnet20/32/44/56/110``, ``mlp``, ``cnn``) or a torchvision classification
            model (``resnet18``, ``mobilenet_v2``, ...).
        num_classes: outputs of the classifier.
        in_shape: ``(C, H, W)`` of one input (used by ``mlp`` and for the input channels of ``cnn``/``resnet*``).
        **kwargs: passed to the constructor (e.g. ``shortcut="B"`` for the CIFAR ResNets).

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    if name in MODELS:
        return MODELS[name](num_classes=num_classes, in_shape=in_shape, **kwargs)
    tv = _torchvision_names()
    if name in tv:
        import torchvision.models as tvm

        return tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    raise ValueError(
        f"fxqat.models: unknown model {name!r}. fxqat models: {sorted(MODELS)}; or a torchvision classification "
        f"model such as 'resnet18', 'mobilenet_v2' ({len(tv)} available, see fxqat.models.available_models())."
    )
