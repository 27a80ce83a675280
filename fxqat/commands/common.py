"""What the ``fxqat`` subcommands share: datasets, models and FP weights from command-line names.

Each helper turns a bad name or file into a :class:`fxqat.errors.UsageError` that says what to write instead (the CLI
prints it as one ``fxqat: error: ...`` line).

Example:
    >>> build_model("mlp", 10, (1, 28, 28)).__class__.__name__
    'MLP'
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

from fxqat import data
from fxqat.errors import UsageError
from fxqat.models import MODELS, get_model
from fxqat.training.checkpoint import load_checkpoint

__all__ = ["load_datasets", "build_model", "load_fp_weights", "default_shape"]


def load_datasets(name: str, data_dir: Optional[str], train_subset=None, test_subset=None):
    """The train and test splits of dataset ``name`` (optionally their first N examples)."""
    if data_dir is not None and not Path(data_dir).expanduser().exists():
        raise UsageError(f"--data-dir {data_dir}: no such folder. Point it to the folder holding the data files.")
    if name not in data.DATASETS:
        raise UsageError(f"--data {name!r}: unknown dataset; known datasets: {sorted(data.DATASETS)}.")
    tr, te = data.load(name, data_dir, train=True), data.load(name, data_dir, train=False)
    return (tr.subset(train_subset) if train_subset else tr), (te.subset(test_subset) if test_subset else te)


def build_model(name: str, num_classes: int, in_shape):
    """``fxqat.models.get_model`` with errors phrased for ``--model``."""
    try:
        return get_model(name, num_classes=num_classes, in_shape=in_shape)
    except ValueError as e:
        raise UsageError(str(e)) from e
    except TypeError as e:  # torchvision model that does not take our arguments
        raise UsageError(f"--model {name!r} cannot be built for {num_classes} classes: {e}") from e


def load_fp_weights(model, path: str, trusted: bool = False) -> None:
    """Load the FP ``state_dict`` (or a checkpoint holding one under ``"model"``) of ``--fp-ckpt`` into ``model``."""
    ck = load_checkpoint(path, trusted=trusted)
    state = ck.get("model", ck)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UsageError(f"--fp-ckpt {path} does not fit the model: {e}") from e


def default_shape(name: str) -> Tuple[int, ...]:
    """The input shape (C, H, W) ``fxqat inspect`` assumes for a model family."""
    if name.startswith("resnet") and name in MODELS:
        return (3, 32, 32)
    if name in MODELS:
        return (1, 28, 28)
    return (3, 224, 224)
