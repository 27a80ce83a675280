"""Scale benchmark: Llama-shaped models of 0.1B, 0.4B and 1.1B parameters, random weights, fp32 and bf16.

Arms (each (size, dtype, arm) runs in its own subprocess, so that its peak resident memory is its own):

* ``fp``       the model alone (no quantizers): the training step and memory of plain fine-tuning
* ``torchao``  torchao QAT 8da4w: ``quantize_(model, QATConfig(torchao_config("8da4w"), step="prepare"),
  filter_fn=not_lm_head)`` in place (``benchmarks/_common.py``: int4 per-group-32 symmetric weights, int8 asymmetric
  per-token activations, every Linear but lm_head); convert with ``step="convert"``
* ``fxqat``    ``prepare_qat(model, (x,), QATConfig.preset("8da4w"), inplace=True)`` + ``calibrate(qm, [x])``
  (lm_head in FP by the preset, like torchao's filter); convert with ``fxqat.convert``
* ``br``       the same + block replacement, ``HybridConfig(paths=1)`` (one sampled path per step; ``"all"`` would run
  a forward per decoder layer per step): a frozen partner, except at 1.1B in fp32 where the frozen fp32 copy does not
  fit beside AdamW in 24 GB: ``partner="shared"`` there (column ``partner``)

Per arm: prepare (+ calibrate) time, the second training step (forward + backward + AdamW; the first one allocates
AdamW's state) on one batch of 1 × 256 tokens, convert time, and the subprocess's peak resident memory
(``ru_maxrss``) after prepare and at the end. Times are wall-clock and CPU (``time.process_time``); on a machine shared
with other jobs the CPU time is the steadier one. Threads: ``--threads`` (default 1) intra-op threads per subprocess.

Memory safety: before each arm the parent checks ``MemAvailable`` against the arm's estimate and waits (up to
``--wait`` seconds) or skips the arm; while an arm runs, the parent kills it if the machine's available memory drops
below ``--floor-gb``.

Usage::

    python benchmarks/scale.py                                  # every size, dtype and arm -> results/scale.{md,json,png}
    python benchmarks/scale.py --sizes 0.1B 0.4B --dtypes fp32  # a subset (merged into an existing scale.json)
    python benchmarks/scale.py --report                         # re-render scale.md / scale.png from scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, mem_available_gb, not_lm_head, torchao_config, torchao_qat_convert  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("fp", "torchao", "fxqat", "br")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: Llama-shaped configurations (vocabulary 32000, untied embeddings); 1.1B is Llama-3.2-1B's shape
SIZES: Dict[str, Dict[str, int]] = {
    "0.1B": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4),
    "0.4B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=4, num_attention_heads=32,
                 num_key_value_heads=8),
    "1.1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8),
}
VOCAB = 32000


def n_params(size: str) -> int:
    """Parameter count of a size's model (embeddings, layers, final norm, lm_head)."""
    c = SIZES[size]
    h, i, n = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return 2 * VOCAB * h + n * layer + h


def needed_gb(size: str, dtype: str) -> float:
    """Available memory an arm needs before it starts (weights, gradients, AdamW's two moments, a copy, slack)."""
    if size == "1.1B":
        return 20.0 if dtype == "fp32" else 12.0
    return n_params(size) * (4 if dtype == "fp32" else 2) * 5 / 1e9 + 1.0


# ------------------------------------------------------------------------------------------------- one arm (child)
def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    sync()
    return out, time.perf_counter() - w, time.process_time() - c


def run_arm(size: str, dtype: str, arm: str, seq: int, partner: str, device: str = "cpu") -> Dict[str, Any]:
    """Build the model, prepare it for ``arm``, take two training steps, convert; the measurements."""
    import transformers

    import fxqat
    from fxqat.config import HybridConfig
    from fxqat.training.lm import hybrid_lm_loss, lm_loss

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=max(seq, 512), use_cache=False,
                                   tie_word_embeddings=False, **SIZES[size])
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[dtype])  # built in its dtype: no float32 copy inflates a bf16 arm's peak memory
    try:
        with torch.device(device):  # random init where the model lives
            model = transformers.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    ids = torch.randint(0, VOCAB, (1, seq + 1), generator=torch.Generator().manual_seed(0)).to(device)
    x, y = ids[:, :-1], ids[:, 1:]
    rec: Dict[str, Any] = {"params": sum(p.numel() for p in model.parameters()), "rss_model_gb": peak_gb()}
    loss_fn = lm_loss
    if arm == "torchao":
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig as AOQATConfig

        _, rec["prepare_s"], rec["prepare_cpu_s"] = timed(
            lambda: quantize_(model, AOQATConfig(torchao_config("8da4w"), step="prepare"), filter_fn=not_lm_head))
    elif arm in ("fxqat", "br"):
        qcfg = fxqat.QATConfig.preset("8da4w")
        if arm == "br":
            qcfg = qcfg.with_(hybrid=HybridConfig(paths=1, partner=partner))
            rec["partner"] = partner
            loss_fn = hybrid_lm_loss

        def prep():
            qm = fxqat.prepare_qat(model, (x,), qcfg, inplace=True)
            fxqat.calibrate(qm, [x])
            return qm

        model, rec["prepare_s"], rec["prepare_cpu_s"] = timed(prep)
    rec["rss_prepared_gb"] = peak_gb()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    rec["loss_first"], rec["step_first_s"], rec["step_first_cpu_s"] = timed(step)
    rec["loss"], rec["step_s"], rec["step_cpu_s"] = timed(step)
    rec["rss_trained_gb"] = peak_gb()
    opt.zero_grad(set_to_none=True)
    opt.state.clear()  # convert runs without AdamW's moments, as after training
    if arm == "torchao":
        _, rec["convert_s"], rec["convert_cpu_s"] = timed(lambda: torchao_qat_convert(model, "8da4w"))
    elif arm in ("fxqat", "br"):
        _, rec["convert_s"], rec["convert_cpu_s"] = timed(lambda: fxqat.convert(model))
    rec["rss_peak_gb"] = peak_gb()
    if device.startswith("cuda"):
        rec["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return rec


# ------------------------------------------------------------------------------------------------- parent
def partner_for(size: str, dtype: str) -> str:
    return "shared" if (size == "1.1B" and dtype == "fp32") else "frozen"


def spawn(args, size: str, dtype: str, arm: str) -> Dict[str, Any]:
    """Run one arm in a subprocess; kill it if the machine runs short of memory."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", size, dtype, arm, "--seq", str(args.seq),
           "--threads", str(args.threads), "--device", args.device]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    killed = None
    while proc.poll() is None:
        time.sleep(1.0)
        if mem_available_gb() < args.floor_gb:
            proc.kill()
            killed = f"killed: machine memory available fell below {args.floor_gb} GB"
    out, err = proc.communicate()
    rec: Dict[str, Any] = {"wall_total_s": time.perf_counter() - t0}
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if killed:
        rec["error"] = killed
    elif proc.returncode != 0 or not lines:
        tail = [ln for ln in err.strip().splitlines() if ln.strip()][-3:]
        rec["error"] = f"exit {proc.returncode}: " + " | ".join(tail)
    else:
        rec.update(json.loads(lines[-1]))
    return rec


def run_all(args) -> Dict[str, Any]:
    from tqdm import tqdm

    path = Path(args.out) / "scale.json"
    payload = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    payload.update({"machine": machine(), "threads": args.threads, "seq": args.seq, "batch": 1, "device": args.device,
                    "torch": torch.__version__, "note": args.note})
    jobs = [(s, d, a) for s in args.sizes for d in args.dtypes for a in args.arms]
    for size, dtype, arm in tqdm(jobs, desc="scale arms", unit="arm"):
        key = f"{size}/{dtype}/{arm}"
        need, deadline = needed_gb(size, dtype), time.time() + args.wait
        while mem_available_gb() < need and time.time() < deadline:
            time.sleep(30)
        avail = mem_available_gb()
        if avail < need:
            rec = {"error": f"not run: {avail:.1f} GB available, {need:.0f} GB needed"}
        else:
            rec = spawn(args, size, dtype, arm)
            rec["mem_available_at_start_gb"] = round(avail, 1)
        rec["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        payload["rows"][key] = rec
        tqdm.write(f"{key}: {json.dumps(rec)}")
        path.write_text(json.dumps(payload, indent=2))
    return payload


# ------------------------------------------------------------------------------------------------- report
def fmt(v: Optional[float], spec: str = ".1f") -> str:
    return "—" if v is None else format(v, spec)


def markdown(payload: Dict[str, Any]) -> str:
    m = payload["machine"]
    rows = payload["rows"]
    lines = [
        "# Scale benchmark (issue 24)", "",
        f"Machine: {m['cpu']} VM, {m['cores']} cores, 24 GB; torch {payload['torch']}, device {payload.get('device', 'cpu')}; "
        f"{payload['threads']} intra-op thread(s) per arm; one batch of {payload['batch']} × {payload['seq']} tokens. "
        f"{payload.get('note') or ''}", "",
        "Llama-shaped models (vocabulary 32000, untied embeddings, random weights), each arm in its own subprocess. "
        "`prep` = prepare (+ calibrate for fxqat), `step` = the second training step (forward + backward + AdamW), "
        "`conv` = convert; wall seconds, CPU seconds in brackets; `peak` = the subprocess's ru_maxrss; `×ao` = ratio "
        "to torchao's QAT of the same size and dtype (same run). fxqat and torchao prepare in place; the 8da4w "
        "preset keeps lm_head in FP and torchao's filter does too.", "",
        "| size | dtype | arm | params | prep s | prep s/100M | step s | step ×ao | conv s | peak GB | peak ×ao | run (UTC) "
        "| note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in rows.items():
        size, dtype, arm = key.split("/")
        ao = rows.get(f"{size}/{dtype}/torchao", {})
        if "error" in r:
            lines.append(f"| {size} | {dtype} | {arm} | | | | | | | | | {r.get('when', '')[11:16]} | {r['error'][:160]} |")
            continue
        per100 = r.get("prepare_cpu_s", None)
        per100 = None if per100 is None else per100 / (r["params"] / 1e8)
        step_x = r["step_cpu_s"] / ao["step_cpu_s"] if "step_cpu_s" in ao else None
        peak_x = r["rss_peak_gb"] / ao["rss_peak_gb"] if "rss_peak_gb" in ao else None
        prep = f"{fmt(r.get('prepare_s'))} ({fmt(r.get('prepare_cpu_s'))})" if "prepare_s" in r else "—"
        conv = f"{fmt(r.get('convert_s'))} ({fmt(r.get('convert_cpu_s'))})" if "convert_s" in r else "—"
        note = f"partner={r['partner']}" if "partner" in r else ""
        lines.append(f"| {size} | {dtype} | {arm} | {r['params'] / 1e6:.0f}M | {prep} | {fmt(per100, '.2f')} | "
                     f"{fmt(r['step_s'])} ({fmt(r['step_cpu_s'])}) | {fmt(step_x, '.2f')} | {conv} | "
                     f"{r['rss_peak_gb']:.2f} | {fmt(peak_x, '.2f')} | {r.get('when', '')[11:16]} | {note} |")
    lines += ["", "`step ×ao` compares CPU seconds; `prep s/100M` is CPU seconds per 100M parameters.", ""]
    lines += targets(rows)
    return "\n".join(lines)


def targets(rows: Dict[str, Dict[str, Any]]) -> List[str]:
    """The issue's targets per size and dtype, from the rows: fxqat prepare + calibrate <= 3 CPU s per 100M
    parameters, peak memory <= 1.1x torchao's, training step <= torchao's; block replacement's extra bytes per
    parameter over fxqat's plain QAT."""
    out = ["## Targets (fxqat 8da4w against torchao's QAT of the same size and dtype)", "",
           "| size | dtype | prepare CPU s / 100M (≤ 3) | peak ÷ torchao (≤ 1.1) | step ÷ torchao (≤ 1) | "
           "BR extra bytes / param |", "|---|---|---|---|---|---|"]
    for size in SIZES:
        for dtype in DTYPES:
            fx, ao, br = (rows.get(f"{size}/{dtype}/{a}", {}) for a in ("fxqat", "torchao", "br"))
            if "rss_peak_gb" not in fx:
                continue
            per100 = fx["prepare_cpu_s"] / (fx["params"] / 1e8)
            peak = fx["rss_peak_gb"] / ao["rss_peak_gb"] if "rss_peak_gb" in ao else None
            step = fx["step_cpu_s"] / ao["step_cpu_s"] if "step_cpu_s" in ao else None
            extra = ((br["rss_peak_gb"] - fx["rss_peak_gb"]) * 1e9 / fx["params"]) if "rss_peak_gb" in br else None
            mark = lambda v, lim: "—" if v is None else f"{v:.2f} {'✓' if v <= lim else '✗'}"  # noqa: E731
            note = f" ({br['partner']} partner)" if "partner" in br else ""
            out.append(f"| {size} | {dtype} | {mark(per100, 3.0)} | {mark(peak, 1.1)} | {mark(step, 1.0)} | "
                       f"{fmt(extra)}{note} |")
    out += ["", "Causes of the gaps and what was changed: docs/performance.md, section *Scale*.", ""]
    return out


def plot(payload: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = (("prepare_cpu_s", "prepare + calibrate, CPU s"), ("step_cpu_s", "training step, CPU s"),
              ("rss_peak_gb", "peak resident memory, GB"))
    for ax, (field, title) in zip(axes, panels):
        for arm in ARMS:
            for dtype, style in (("fp32", "-o"), ("bf16", "--s")):
                pts = sorted((r["params"] / 1e9, r[field]) for k, r in payload["rows"].items()
                             if k.endswith(f"/{dtype}/{arm}") and field in r)
                if pts:
                    ax.plot(*zip(*pts), style, color=f"C{ARMS.index(arm)}", label=f"{arm} {dtype}")
        ax.set_xlabel("parameters (billions)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for ax in axes:
        ax.legend(fontsize=7)
    m = payload["machine"]
    fig.suptitle(f"Scale: {m['cpu']}, {m['cores']} cores, {payload['threads']} thread(s); other jobs ran "
                 "concurrently (CPU times shown)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(payload: Dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(payload, indent=2))
    (out / "scale.md").write_text(markdown(payload))
    plot(payload, out / "scale.png")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--seq", type=int, default=256, help="tokens in the training batch (batch size 1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="where each arm runs (cuda: GPU peak memory is recorded too)")
    ap.add_argument("--wait", type=float, default=600, help="seconds to wait for enough free memory before an arm")
    ap.add_argument("--floor-gb", type=float, default=1.5, help="kill an arm if available memory drops below this")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--note", default="Other jobs ran concurrently on the machine: wall times are under load.")
    ap.add_argument("--report", action="store_true", help="re-render scale.md and scale.png from scale.json")
    ap.add_argument("--child", nargs=3, metavar=("SIZE", "DTYPE", "ARM"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        size, dtype, arm = args.child
        partner = partner_for(size, dtype) if args.device == "cpu" else "frozen"
        print(json.dumps(run_arm(size, dtype, arm, args.seq, partner, args.device)), flush=True)
        return 0
    out = Path(args.out)
    payload = json.loads((out / "scale.json").read_text()) if args.report else run_all(args)
    write_report(payload, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
