"""``fxqat inspect``: blocks, capture regions and quantizers of a model, its quantizer health, the partition PNG.

Example (shell)::

    fxqat inspect resnet20 --png blocks.png
    fxqat inspect hf:llama --bits 4/8
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch

import fxqat
from fxqat.commands.common import build_model, default_shape
from fxqat.errors import UsageError
from fxqat.models import MODELS
from fxqat.models.hf import tiny_hf_model
from fxqat.training.checkpoint import load_checkpoint
from fxqat.training.health import format_health, quantizer_health, rows_with_problems
from fxqat.training.report import plot_blocks

__all__ = ["cmd_inspect", "print_health"]

def cmd_inspect(a: argparse.Namespace) -> int:
    """Run ``fxqat inspect`` with the parsed flags; prints the tables, returns 0."""
    if a.model.startswith("hf:"):  # a tiny transformers model of that type, random weights
        try:
            model, x = tiny_hf_model(a.model[3:])
        except ValueError as e:
            raise UsageError(str(e)) from e
        shape = tuple(x.shape[1:])
    else:
        try:
            shape = tuple(int(s) for s in a.input_shape.split(",")) if a.input_shape else default_shape(a.model)
        except ValueError as e:
            raise UsageError(f"--input-shape {a.input_shape!r}: write C,H,W, e.g. 3,32,32") from e
        model = build_model(a.model, 10 if a.model in MODELS else 1000, shape)
        x = torch.randn(1, *shape)
    model = model.eval()
    blocks = fxqat.find_blocks(model, (x,))
    print(f"{a.model}: {len(blocks)} blocks (input {shape})")
    print(f"{'#':>3}  {'block':<20} {'nodes':>5}  {'entry':<24} {'exit':<24} modules")
    for k, blk in enumerate(blocks):
        mods = list(blk.modules)
        shown = ", ".join(mods[:4]) + (f", ... (+{len(mods) - 4})" if len(mods) > 4 else "")
        print(f"{k:>3}  {str(blk.name):<20} {len(blk.nodes):>5}  {str(blk.entry):<24} {str(blk.exit):<24} {shown}")
    w, b = a.bits
    qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(w_bits=w, a_bits=b))
    print("\ncapture: graph regions are traced by torch.fx, eager regions run as written")
    print(fxqat.capture_report(qm).to_markdown())
    qs = fxqat.named_quantizers(qm)
    print(f"\n{len(qs)} quantizers (W{w}A{b}, first/last layer 8 bits)")
    print(f"{'quantizer':<40} {'kind':<7} {'bits':>4}  method")
    for name, q in qs.items():
        print(f"{name:<40} {q.kind:<7} {q.bits:>4}  {getattr(q, 'method', '?')}")
    if a.health or a.checkpoint:
        print_health(qm, a.checkpoint, a.trust_checkpoint)
    if a.png:
        plot_blocks(a.model, blocks, a.png)
        print(f"\npartition written to {a.png}")
    return 0


def print_health(qm, checkpoint: Optional[str], trusted: bool) -> None:
    """Print each quantizer's scale range and status, after loading ``checkpoint`` into ``qm`` if given."""
    if checkpoint:
        ck = load_checkpoint(checkpoint, trusted=trusted)
        try:
            qm.load_state_dict(ck.get("model", ck))
        except RuntimeError as e:
            raise UsageError(f"--checkpoint {checkpoint} does not fit {type(qm).__name__} as inspect builds it "
                             f"(same model, --bits and --input-shape as the run?): {e}") from e
    rows = quantizer_health(qm)
    bad = rows_with_problems(rows)
    print(f"\nquantizer health{f' of {checkpoint}' if checkpoint else ''}: {len(rows) - len(bad)} ok, "
          f"{len(bad)} not ({', '.join(sorted({r['status'] for r in bad})) or 'none'})")
    print(format_health(rows))
