"""GGUF export for llama.cpp: a trained Llama-family Hugging Face model as one ``.gguf`` file, with fxqat's codes
and learned steps in Q4_0 / Q8_0 blocks.

:func:`to_gguf` writes the tensors and metadata that llama.cpp's own converter (``convert_hf_to_gguf.py``) writes for
the architecture, with the ``gguf`` package (the reader/writer maintained with llama.cpp; extra ``fxqat[export]``):

* weights quantized by the ``gguf_q4_0`` / ``gguf_q8_0`` presets (method ``"gguf"``, :mod:`fxqat.quantizers.gguf`):
  Q4_0 / Q8_0, fxqat's codes and fp16 steps as they are, so the file's dequantized weight equals the converted
  model's weight exactly (checked for every tensor before the file is written);
* weights of the ``int4_weight_only`` / ``8da4w`` presets (LSQ, symmetric, groups of 32): Q4_0 with each learned
  step rounded to fp16 (a warning gives the largest change; the codes are fxqat's);
* every other weight in ``float_type`` (F16 by default, as the converter's ``--outtype f16``), 1-D tensors (norms,
  biases) in F32; a 2-D weight whose reduction dimension is not a multiple of 32 can hold no Q4_0/Q8_0 block: it is
  written F16 with a warning naming it, as llama.cpp's converter does;
* Llama and Mistral (llama.cpp architecture ``llama``): the query and key projections' rows are reordered from the
  Hugging Face rotary layout (halves) to llama.cpp's (interleaved pairs), as the converter does; Qwen2 (``qwen2``)
  keeps them.

Activation quantizers are not written: llama.cpp quantizes the input of a Q4_0/Q8_0 matrix product to Q8_0 blocks
itself on CPU (so the 8da4w preset's per-token int8 activations are not what llama.cpp computes).

Example:
    >>> import tempfile, os, torch, transformers, fxqat, gguf
    >>> cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
    ...     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    >>> _ = torch.manual_seed(0); m = transformers.LlamaForCausalLM(cfg).eval(); x = torch.randint(0, 32, (1, 8))
    >>> qm = fxqat.prepare_qat(m, (x,), fxqat.QATConfig.preset("gguf_q4_0")); _ = qm(x)
    >>> path = os.path.join(tempfile.mkdtemp(), "tiny.gguf")
    >>> types = to_gguf(qm, path, GGUFVocab.from_chars([chr(97 + i) for i in range(26)] + list(" .,;:!")))
    >>> types["blk.0.attn_q.weight"], types["output.weight"], types["output_norm.weight"]
    ('Q4_0', 'F16', 'F32')
    >>> gguf.GGUFReader(path).fields["general.architecture"].contents()
    'llama'
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from fxqat.capture.eager_model import convert_eager, is_eager_model
from fxqat.export.affine import ExportError
from fxqat.export.gguf_vocab import GGUFVocab
from fxqat.mixed.quant_layers import quant_layers
from fxqat.quantizers.base import Quantizer
from fxqat.quantizers.gguf import BLOCK, gguf_step, is_gguf_quantizer

__all__ = ["to_gguf", "GGUFVocab", "SUPPORTED_ARCHS", "weight_quantizers", "pack_blocks", "GGUFTensor",
           "gguf_tensors"]

log = logging.getLogger(__name__)

#: Hugging Face ``config.model_type`` -> (llama.cpp architecture, reorder q/k rows for llama.cpp's rotary layout)
SUPPORTED_ARCHS: Dict[str, Tuple[str, bool]] = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
}


def _gguf():
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("fxqat.export.to_gguf needs the gguf package: pip install 'fxqat[export]'.") from exc
    return gguf


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as it goes into the file.

    Attributes:
        name: the GGUF name (``blk.0.attn_q.weight``).
        source: the Hugging Face parameter name.
        type: ``"Q4_0"``, ``"Q8_0"``, ``"F16"`` or ``"F32"``.
        data: what is written: packed blocks (uint8, ``[rows, bytes]``) or the float array.
        value: the weight the converted model computes with, in the file's row order (float32).
    """

    name: str
    source: str
    type: str
    data: np.ndarray
    value: torch.Tensor


def weight_quantizers(qm: nn.Module) -> Dict[str, Quantizer]:
    """Qualified weight name -> its enabled weight quantizer, for every quantized layer of the prepared ``qm``.

    Example:
        >>> import torch, torch.nn as nn, fxqat
        >>> qm = fxqat.prepare_qat(nn.Sequential(nn.Linear(32, 8)), (torch.randn(2, 32),),
        ...                        fxqat.QATConfig.preset("gguf_q8_0", first_last_layers=()))
        >>> {k: q.format for k, q in weight_quantizers(qm).items()}
        {'0.weight': 'Q8_0'}
    """
    out: Dict[str, Quantizer] = {}
    for layer in quant_layers(qm).values():
        for qname, param in zip(layer.weights, layer.params):
            q = qm.get_submodule(qname)
            if param and isinstance(q, Quantizer) and q._fq_on:
                out[param] = q
    return out


def pack_blocks(k: torch.Tensor, d16: torch.Tensor, fmt: str, rows: int) -> np.ndarray:
    """Q4_0 / Q8_0 blocks as GGUF stores them: per block the fp16 step (2 bytes) then the codes (Q4_0: 16 bytes,
    element ``j`` in the low nibble of byte ``j`` and element ``j + 16`` in its high nibble, each as ``k + 8``;
    Q8_0: 32 int8). ``k`` is ``[R, 32]`` (level indices), ``d16`` ``[R]``; returns uint8 ``[rows, bytes per row]``.

    Example:
        >>> b = pack_blocks(torch.arange(-8, 24).clamp(max=7).reshape(1, 32), torch.ones(1, dtype=torch.float16),
        ...                 "Q4_0", 1)
        >>> b.shape, float(b[0, :2].view(np.float16)[0]), hex(b[0, 2]), hex(b[0, 17])  # (k0 = -8, k16 = 7): 0xf0
        ((1, 18), 1.0, '0xf0', '0xff')
    """
    d = d16.to(torch.float16).numpy().reshape(-1, 1).view(np.uint8)
    codes = k.to(torch.int16).numpy()
    if fmt == "Q4_0":
        q = (codes + 8).astype(np.uint8)
        qs = q[:, :BLOCK // 2] | (q[:, BLOCK // 2:] << np.uint8(4))
    else:
        qs = codes.astype(np.int8).view(np.uint8)
    return np.concatenate([d, qs], axis=1).reshape(rows, -1)


def _rope_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a query/key projection from Hugging Face's rotary layout (each head's first half of dimensions then
    its second half) to llama.cpp's (pairs of neighbouring dimensions)."""
    per = t.shape[0] // n_head
    return t.reshape(n_head, 2, per // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def _block_codes(w: torch.Tensor, q: Quantizer, where: str) -> Tuple[str, torch.Tensor, torch.Tensor]:
    """(format, level indices ``[R, 32]``, fp16 steps ``[R]``) of the weight ``w`` under its quantizer ``q``."""
    if w.dim() != 2 or w.shape[1] % BLOCK or q.granularity != "per_group" or q.group_size != BLOCK:
        raise ExportError(f"{where}: GGUF blocks are 32 consecutive input elements of a 2-D weight; this quantizer "
                          f"is {q.granularity} (group_size={q.group_size}) on shape {tuple(w.shape)}. Train it with "
                          "QATConfig.preset('gguf_q4_0') or 'gguf_q8_0'.")
    if is_gguf_quantizer(q):
        k, d16 = q.block_codes(w)
        return q.format, k, d16
    scale, zp, qmin, qmax = q.affine_qparams()
    if q.bits != 4 or (qmin, qmax) != (-8, 7) or bool((zp != 0).any()):
        raise ExportError(f"{where}: {type(q).__name__} ({q.bits}-bit, codes {qmin}..{qmax}, zero points "
                          f"{'non-zero' if bool((zp != 0).any()) else '0'}) has no Q4_0/Q8_0 form (4-bit symmetric "
                          "codes -8..7 with zero point 0, or the gguf presets); train with "
                          "QATConfig.preset('gguf_q4_0') / 'gguf_q8_0' or 'int4_weight_only'.")
    k = q.integer_repr(w.detach()).reshape(-1, BLOCK).to(torch.int8)
    return "Q4_0", k, gguf_step(scale.reshape(-1)).to(torch.float16)


def _hf_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHS:
        what = f"model_type {model_type!r}" if model_type else f"{type(model).__name__} (no Hugging Face config)"
        raise ExportError(f"to_gguf: {what} is not supported; it writes the Llama-family architectures "
                          f"{sorted(SUPPORTED_ARCHS)}. Convert other models with llama.cpp's convert_hf_to_gguf.py "
                          "from an FP checkpoint (fxqat.export.save_pretrained).")
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ExportError(f"to_gguf: rope scaling {rope.get('rope_type', rope.get('type'))!r} is not written "
                          "(only plain rotary embeddings); export an unscaled model.")
    return config


def gguf_tensors(qm: nn.Module, float_type: str = "f16") -> List[GGUFTensor]:
    """The tensors :func:`to_gguf` writes for the prepared Hugging Face model ``qm``, in the file's order."""
    gguf = _gguf()
    if float_type not in ("f16", "f32"):
        raise ValueError(f"to_gguf: float_type={float_type!r}; use 'f16' or 'f32'.")
    config = _hf_config(qm)
    arch, reorder = SUPPORTED_ARCHS[config.model_type]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    if not is_eager_model(qm):
        raise ExportError(f"to_gguf: {type(qm).__name__} is not a prepared Hugging Face model; pass what "
                          "fxqat.prepare_qat returns for the LlamaForCausalLM / Qwen2ForCausalLM itself.")
    quantizers = weight_quantizers(qm)
    lp = convert_eager(qm)
    skip = tuple(n + "." for n, m in lp.named_modules() if isinstance(m, Quantizer))
    n_head, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    out: List[GGUFTensor] = []
    unaligned: List[str] = []
    rounded: Dict[str, float] = {}
    for src, value in lp.named_parameters():
        if src.startswith(skip):
            continue
        name = names.get_name(src, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"to_gguf: parameter {src!r} of {type(qm).__name__} has no llama.cpp tensor name for "
                              f"architecture {arch!r}; the model differs from a plain {config.model_type} model.")
        value = value.detach().float().cpu()
        heads = n_head if name.endswith("attn_q.weight") else n_kv if name.endswith("attn_k.weight") else None
        if src in quantizers:
            fmt, k, d16 = _block_codes(qm.get_parameter(src).detach(), quantizers[src], src)
            k, d16 = k.cpu(), d16.cpu()
            data = pack_blocks(k, d16, fmt, value.shape[0])
            exact = (k.float() * d16.float()[:, None]).reshape(value.shape)
            if not torch.equal(exact, value):
                rounded[src] = float((exact - value).abs().max())
            value = exact
        elif value.dim() == 2 and (float_type == "f16" or value.shape[1] % BLOCK):
            if value.shape[1] % BLOCK and not name.startswith(("token_embd", "output.")):
                unaligned.append(f"{src} (reduction dimension {value.shape[1]})")
            fmt, data = "F16", value.numpy().astype(np.float16)
            value = torch.from_numpy(data.astype(np.float32))
        else:
            fmt, data = "F32", value.numpy().astype(np.float32)
        if reorder and heads is not None:
            data = _rope_rows(torch.from_numpy(np.ascontiguousarray(data)), heads).numpy()
            value = _rope_rows(value, heads)
        out.append(GGUFTensor(name, src, fmt, np.ascontiguousarray(data), value))
    if rounded:
        worst = max(rounded, key=rounded.get)
        warnings.warn(f"to_gguf: {len(rounded)} weight(s) have steps that are not fp16 values; rounded for the file, "
                      f"they change the weights by up to {rounded[worst]:.3g} ({worst}). Train with "
                      "QATConfig.preset('gguf_q4_0') / 'gguf_q8_0' for a file equal to the converted model.",
                      stacklevel=3)
    if unaligned:
        warnings.warn(f"to_gguf: no Q4_0/Q8_0 block fits these weights, written F16 as llama.cpp's converter does: "
                      f"{', '.join(unaligned)}.", stacklevel=3)
    return out


def _check(t: GGUFTensor, gguf: Any) -> None:
    """The packed blocks, dequantized by the gguf package, must give the converted weight exactly."""
    qtype = gguf.GGMLQuantizationType[t.type]
    back = torch.from_numpy(gguf.quants.dequantize(t.data, qtype).astype(np.float32)).reshape(t.value.shape)
    if not torch.equal(back, t.value):
        raise ExportError(f"to_gguf: {t.source}: gguf's dequantized {t.type} blocks differ from the converted weight "
                          f"by up to {float((back - t.value).abs().max()):.3g}.")


def to_gguf(qm: nn.Module, path: "str | os.PathLike", vocab: GGUFVocab, *, float_type: str = "f16",
            name: Optional[str] = None) -> Dict[str, str]:
    """Write the trained Llama / Mistral / Qwen2 model ``qm`` (from :func:`fxqat.prepare_qat`) as a GGUF file.

    Args:
        qm: the prepared model of a Hugging Face ``LlamaForCausalLM``, ``MistralForCausalLM`` or
            ``Qwen2ForCausalLM`` (not modified).
        path: the ``.gguf`` file to write.
        vocab: its tokenizer (:meth:`GGUFVocab.from_chars` for a character-level model,
            :meth:`GGUFVocab.from_tokenizer` for a byte-level BPE tokenizer); its size must equal the model's.
        float_type: ``"f16"`` (default) or ``"f32"`` for the weights that are not quantized (embeddings, ``lm_head``
            under the LLM presets).
        name: ``general.name`` (default: the config's ``_name_or_path`` or the class name).

    Returns:
        GGUF tensor name -> its type (``"Q4_0"``, ``"Q8_0"``, ``"F16"``, ``"F32"``).

    Raises:
        ExportError: an unsupported architecture (the message names it), a quantizer with no Q4_0/Q8_0 form (names
            the layer), or a vocabulary of the wrong size.
    """
    gguf = _gguf()
    config = _hf_config(qm)
    if len(vocab.tokens) != config.vocab_size:
        raise ExportError(f"to_gguf: the vocabulary has {len(vocab.tokens)} tokens, the model {config.vocab_size}.")
    tensors = gguf_tensors(qm, float_type)
    for t in tensors:
        if t.type in ("Q4_0", "Q8_0"):
            _check(t, gguf)
    arch = SUPPORTED_ARCHS[config.model_type][0]
    types = {t.type for t in tensors}
    ftype = gguf.LlamaFileType
    file_type = (ftype.MOSTLY_Q4_0 if "Q4_0" in types else ftype.MOSTLY_Q8_0 if "Q8_0" in types
                 else ftype.MOSTLY_F16 if "F16" in types else ftype.ALL_F32)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = dict(getattr(config, "rope_parameters", None) or {})
    writer = gguf.GGUFWriter(os.fspath(path), arch)
    writer.add_name(name or getattr(config, "_name_or_path", "") or type(qm).__name__)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_file_type(int(file_type))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.write(writer)
    for t in tensors:
        raw = None if t.type in ("F16", "F32") else gguf.GGMLQuantizationType[t.type]
        writer.add_tensor(t.name, t.data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    log.info("fxqat: wrote %s (%d tensors: %s)", path, len(tensors), ", ".join(sorted(types)))
    return {t.name: t.type for t in tensors}
