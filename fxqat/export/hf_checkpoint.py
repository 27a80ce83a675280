"""Hugging Face checkpoints of trained fxqat models: ``save_pretrained`` here, ``from_pretrained`` anywhere.

:func:`save_pretrained` writes a directory that ``transformers.AutoModelForCausalLM.from_pretrained(dir)`` loads
with transformers and torchao alone (no fxqat import): ``config.json`` carries a ``TorchAoConfig`` (transformers' own
torchao quantization integration) and ``model.safetensors`` the weights of every quantized linear layer as torchao
``IntxUnpackedToInt8Tensor`` data: int8 codes, one scale and zero point per group, written in torchao's safetensors
layout (the tensor's parts plus metadata naming its class, which transformers reads back into the same tensor).
The tensors are :func:`fxqat.export.to_torchao`'s, whose codes and scales are fxqat's own, so the loaded model
computes what ``fxqat.convert(qm)`` computes.

Why torchao's integration rather than compressed-tensors': fxqat already builds bit-exact torchao tensors from its
learned parameters (weight-only and 8da4w, whose per-token int8 activations the tensor carries), torchao is in the
``export`` extra, and vLLM and SGLang load torchao-quantized Hugging Face checkpoints as well.

:func:`load_for_qat` reads such a checkpoint back for more QAT: the weights become the dequantized (on-grid) values
and each weight quantizer starts from the stored step sizes instead of a fresh initialisation.

Example:
    >>> import tempfile, torch, transformers, fxqat
    >>> cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
    ...     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    >>> _ = torch.manual_seed(0); m = transformers.LlamaForCausalLM(cfg).eval(); x = torch.randint(0, 32, (1, 8))
    >>> qm = fxqat.prepare_qat(m, (x,), fxqat.QATConfig.preset("int4_weight_only")); _ = qm(x); qm = qm.eval()
    >>> d = tempfile.mkdtemp(); _ = save_pretrained(qm, d)
    >>> hf = transformers.AutoModelForCausalLM.from_pretrained(d)
    >>> bool(torch.equal(hf(x).logits, fxqat.convert(qm)(x).logits))
    True
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from torch import nn

from fxqat.api import prepare_qat
from fxqat.config import QATConfig
from fxqat.export.affine import ExportError
from fxqat.export.gguf import weight_quantizers
from fxqat.export.torchao_handoff import to_torchao, torchao_configs
from fxqat.quantizers.gguf import is_gguf_quantizer

__all__ = ["save_pretrained", "load_for_qat", "WEIGHTS_NAME"]

log = logging.getLogger(__name__)

#: the weights file transformers looks for
WEIGHTS_NAME = "model.safetensors"


def _libs():
    try:
        import safetensors.torch
        import transformers
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
        from torchao.quantization import FqnToConfig, IntxUnpackedToInt8Tensor
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("fxqat.export.save_pretrained needs transformers, safetensors and torchao: "
                          "pip install 'fxqat[export,hf]'.") from exc
    return transformers, safetensors.torch, flatten_tensor_state_dict, FqnToConfig, IntxUnpackedToInt8Tensor


def save_pretrained(qm: nn.Module, directory: "str | os.PathLike") -> Path:
    """Write the trained Hugging Face model ``qm`` (from :func:`fxqat.prepare_qat`) as a quantized checkpoint.

    Args:
        qm: the prepared model of a Hugging Face ``PreTrainedModel`` (not modified); its quantized layers must have
            a torchao form (:func:`fxqat.export.to_torchao`: per-group or per-channel affine weights of up to 8 bits,
            weight-only or with 8-bit dynamic per-token activations; e.g. the ``int4_weight_only``, ``8da4w`` and
            ``gguf_q4_0`` presets).
        directory: created if needed; ``config.json``, ``model.safetensors`` (and ``generation_config.json`` when
            the model has one) are written into it.

    Returns:
        The path of ``model.safetensors``.

    Raises:
        ExportError: the model is no Hugging Face model, or a layer has no torchao form (names it).
    """
    transformers, st, flatten, FqnToConfig, _ = _libs()
    if not isinstance(getattr(qm, "config", None), transformers.PretrainedConfig):
        raise ExportError(f"save_pretrained: {type(qm).__name__} has no Hugging Face config; it writes models "
                          "prepared from a transformers PreTrainedModel.")
    model = to_torchao(qm)
    configs = torchao_configs(qm)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors, metadata = flatten(model.state_dict())
    path = out / WEIGHTS_NAME
    st.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    config = model.config
    config.quantization_config = transformers.TorchAoConfig(quant_type=FqnToConfig(configs))
    config.save_pretrained(out)
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(out)
    log.info("fxqat: wrote %s (%d torchao-quantized layers, %d bytes)", path, len(configs), path.stat().st_size)
    return path


def _stored_steps(model: nn.Module, tensor_type: type) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Replace every torchao weight of ``model`` by its dequantized value; weight name -> (scales, zero points)."""
    steps: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, tensor_type):
            steps[f"{name}.weight" if name else "weight"] = (w.scale.detach().reshape(-1).float(),
                                                              w.zero_point.detach().reshape(-1).float())
            mod.weight = nn.Parameter(w.dequantize().detach().clone())
    return steps


def load_for_qat(directory: "str | os.PathLike", example_inputs: Any, config: QATConfig, **kwargs: Any) -> nn.Module:
    """A checkpoint of :func:`save_pretrained`, prepared again for QAT with its stored step sizes.

    Args:
        directory: the checkpoint.
        example_inputs: as for :func:`fxqat.prepare_qat`.
        config: the configuration the checkpoint was trained with (the same bits, granularity and group size).
        **kwargs: passed to ``from_pretrained``.

    Returns:
        The prepared model: latent weights = the checkpoint's dequantized weights, each weight quantizer's step size
        = the stored scale (for ``gguf`` Q4_0, negative where the stored zero point is −1), so it computes what the
        checkpoint computes and training goes on from there.

    Raises:
        ExportError: the checkpoint's groups do not match ``config`` (names the weight).
    """
    transformers, _, _, _, tensor_type = _libs()
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    steps = _stored_steps(model, tensor_type)
    model.config.quantization_config = None
    del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    qm = prepare_qat(model.eval(), example_inputs, config)
    for name, q in weight_quantizers(qm).items():
        if name not in steps:
            raise ExportError(f"load_for_qat: {name} is quantized by the config but stored in floating point.")
        scale, zp = steps[name]
        with torch.no_grad():
            q(qm.get_parameter(name))  # shapes the step-size parameter (one per group)
            if q.scale.numel() != scale.numel():
                raise ExportError(f"load_for_qat: {name} has {scale.numel()} stored scales, the config's quantizer "
                                  f"{q.scale.numel()}; give the config the checkpoint was trained with.")
            if is_gguf_quantizer(q) and q.bits == 4:
                scale = torch.where(zp < 0, -scale, scale)
            elif bool((zp != 0).any()):
                raise ExportError(f"load_for_qat: {name} has non-zero zero points; {type(q).__name__} is symmetric.")
            q.scale.copy_(scale.to(q.scale.dtype).reshape(q.scale.shape))
    return qm
