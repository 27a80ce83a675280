"""Training helpers: losses (hybrid_loss), the training loop, transition-rate scheduling, gradient quantization,
progressive bit-width schedules. Submodules are imported on use (``from fxqat.training.loop import fit``)."""

from fxqat.training.losses import distillation_loss, hybrid_loss, kd_loss

__all__ = ["hybrid_loss", "distillation_loss", "kd_loss"]
