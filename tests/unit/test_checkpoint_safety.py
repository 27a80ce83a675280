"""Checkpoint safety: crafted pickles are refused (and run no code) unless trusted, damage is detected, stale
temporary files are removed and never read, and every loader of fxqat goes through ``load_checkpoint``.

A "crafted" file is what an attacker would hand out as a checkpoint: a torch file whose pickle holds an object
with a ``__reduce__`` that runs code (here: writes a marker file) the moment it is unpickled.
"""

import ast
import logging
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from qat_helpers import RunsCode

from fxqat import data
from fxqat.cli import main
from fxqat.models import get_model
from fxqat.training import checkpoint as ckpt_mod
from fxqat.training import recipes
from fxqat.training.checkpoint import (
    DIGEST_KEY,
    CheckpointError,
    atomic_save,
    clean_stale_tmp,
    load_checkpoint,
    rng_state,
)
from fxqat.training.loop import TrainConfig, fit

PKG = Path(ckpt_mod.__file__).resolve().parents[1]
# the smallest real CLI run: MLP on digits, no FP stage, 4 QAT steps
TRAIN = ["train", "--model", "mlp", "--data", "digits", "--fp-steps", "0", "--steps", "4", "--batch-size", "32",
         "--train-subset", "256", "--test-subset", "64", "--no-progress"]


def _craft(path: Path, marker: Path, base=None) -> Path:
    """A torch file that looks like a checkpoint (``base`` or a tiny model dict) plus the code-running object."""
    obj = dict(base) if base is not None else {"model": {"w": torch.ones(3)}}
    obj["payload"] = RunsCode(marker)
    torch.save(obj, path)
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FXQAT_CACHE", str(tmp_path / "cache"))


def _fit_run(out: Path, steps: int = 3, **kw):
    torch.manual_seed(0)
    tr = data.digits(train=True).subset(256)
    m = get_model("mlp", in_shape=tr.input_shape)
    return m, fit(m, data.BatchLoader(tr, 32), TrainConfig(steps=steps, lr=0.05, progress=False, plot=False),
                  out_dir=out, **kw)


# ------------------------------------------------------------------------------------- crafted pickles
def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    evil = _craft(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(evil)
    msg = str(e.value)
    assert str(evil) in msg and "exec" in msg and "trusted=True" in msg and "--trust-checkpoint" in msg
    assert "add_safe_globals" not in msg  # torch's advice to allow-list the callable is not repeated
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_file_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    for proto in (0, 2, pickle.HIGHEST_PROTOCOL):  # not a torch zip: the legacy loader, same unpickler
        p = tmp_path / f"evil{proto}.pkl"
        p.write_bytes(pickle.dumps({"model": RunsCode(marker)}, protocol=proto))
        with pytest.raises(CheckpointError, match="refused") as e:
            load_checkpoint(p)
        assert str(p) in str(e.value) and "--trust-checkpoint" in str(e.value)
    assert not marker.exists()


def test_trusted_opt_in_really_unpickles(tmp_path):
    marker = tmp_path / "marker"
    evil = _craft(tmp_path / "evil.pt", marker)
    ck = load_checkpoint(evil, trusted=True)  # the caller vouched for the file: the payload runs
    assert marker.read_text() == "pwned"
    assert ck["payload"] is None and torch.equal(ck["model"]["w"], torch.ones(3))


def test_fxqat_checkpoints_load_without_the_opt_in(tmp_path):
    _, hist = _fit_run(tmp_path / "run")
    assert hist["status"] == "complete"
    path = tmp_path / "run" / "checkpoint.pt"
    need = ("model", "optimizer", "scheduler", "rng", "pos", "history")
    safe = load_checkpoint(path, required=need)
    raw = torch.load(path, weights_only=False)  # what the file holds, unpickled without restrictions
    assert DIGEST_KEY in raw and DIGEST_KEY not in safe
    assert ckpt_mod.state_digest(safe) == ckpt_mod.state_digest(raw) == raw[DIGEST_KEY]
    assert safe["pos"]["step"] == 3 and len(safe["history"]["steps"]) == 3
    assert set(safe["model"]) == set(raw["model"]) and all(torch.equal(safe["model"][k], raw["model"][k])
                                                           for k in raw["model"])


# ------------------------------------------------------------------------------------- damage
def test_a_flipped_tensor_byte_is_refused(tmp_path):
    _fit_run(tmp_path / "run")
    path = tmp_path / "run" / "checkpoint.pt"
    raw = torch.load(path, weights_only=True)
    rng = random.Random(0)
    name = rng.choice(sorted(k for k, v in raw["model"].items() if v.is_floating_point() and v.numel() > 1))
    flat = raw["model"][name].view(-1).view(torch.uint8)
    i = rng.randrange(flat.numel())
    flat[i] ^= 1 << rng.randrange(8)  # one bit of one byte of one tensor; the stored digest is left as it was
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="damaged") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


def test_a_changed_plain_value_is_refused(tmp_path):
    _fit_run(tmp_path / "run")
    path = tmp_path / "run" / "checkpoint.pt"
    raw = torch.load(path, weights_only=True)
    raw["pos"]["step"] += 1  # a resume position that no longer matches the weights
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(path)


def test_truncated_files_are_refused(tmp_path):
    src = tmp_path / "full.pt"
    atomic_save({"model": {"w": torch.randn(64, 64)}, "rng": rng_state(), "step": 5}, src)
    blob = src.read_bytes()
    rng = random.Random(1)
    for cut in [0, 1, len(blob) // 2, len(blob) - 1, *rng.sample(range(2, len(blob) - 1), 8)]:
        p = tmp_path / f"cut{cut}.pt"
        p.write_bytes(blob[:cut])
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(p)
        assert str(p) in str(e.value), cut
    assert load_checkpoint(src)["step"] == 5


# ------------------------------------------------------------------------------------- stale temporary files
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # exited and reaped: os.kill(pid, 0) fails
    return p.pid


def test_stale_tmp_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    target = tmp_path / "checkpoint.pt"
    marker = tmp_path / "marker"
    dead = [tmp_path / f".checkpoint.pt.{_dead_pid()}.tmp" for _ in range(2)]
    _craft(dead[0], marker)
    dead[1].write_bytes(b"half a zip")
    live_proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".checkpoint.pt.{live_proc.pid}.tmp"
        live.write_bytes(b"being written")
        other = tmp_path / f".other.pt.{_dead_pid()}.tmp"  # another file's temporary: not ours to remove
        other.write_bytes(b"x")
        atomic_save({"step": 1}, target)
        assert not any(p.exists() for p in dead) and live.exists() and other.exists()
        assert load_checkpoint(target) == {"step": 1} and not marker.exists()
        assert clean_stale_tmp(target) == 0
    finally:
        live_proc.kill()
        live_proc.wait()
    assert clean_stale_tmp(target) == 1 and not live.exists()  # its writer is gone now


def test_resume_never_reads_a_stale_tmp(tmp_path):
    out = tmp_path / "run"
    _, ref = _fit_run(tmp_path / "ref", steps=4)
    _fit_run(out, steps=4, stop_after=2)
    marker = tmp_path / "marker"
    stale = out / f".checkpoint.pt.{_dead_pid()}.tmp"  # a newer-looking but unfinished save of a killed writer
    _craft(stale, marker, base={"model": {}, "pos": {"step": 3}})
    _, res = _fit_run(out, steps=4, resume=True)
    assert not marker.exists() and not stale.exists()
    assert [s["loss"] for s in res["steps"]] == [s["loss"] for s in ref["steps"]]  # resumed from step 2, exactly


# ------------------------------------------------------------------------------------- every loader of fxqat
def test_cli_resume_refuses_a_crafted_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TRAIN + ["--out", str(out), "--stop-after", "2"]) == 0
    marker = tmp_path / "marker"
    good = torch.load(out / "checkpoint.pt", weights_only=True)
    _craft(out / "checkpoint.pt", marker, base=good)  # the real checkpoint, plus the payload
    capsys.readouterr()
    assert main(TRAIN + ["--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxqat: error:") and str(out / "checkpoint.pt") in err and "--trust-checkpoint" in err
    assert not marker.exists() and not (out / "model.pt").exists()


def test_cli_fp_ckpt_refuses_a_crafted_file(tmp_path, capsys):
    marker = tmp_path / "marker"
    m = get_model("mlp", in_shape=(1, 8, 8))
    evil = _craft(tmp_path / "fp.pt", marker, base={"model": m.state_dict()})
    rc = main(TRAIN + ["--out", str(tmp_path / "run"), "--fp-ckpt", str(evil)])
    err = capsys.readouterr().err
    assert rc == 2 and str(evil) in err and "--trust-checkpoint" in err and not marker.exists()


def test_cli_inspect_checkpoint_refuses_a_crafted_file(tmp_path, capsys):
    marker = tmp_path / "marker"
    evil = _craft(tmp_path / "model.pt", marker)
    rc = main(["inspect", "mlp", "--input-shape", "1,8,8", "--checkpoint", str(evil)])
    err = capsys.readouterr().err
    assert rc == 2 and str(evil) in err and not marker.exists()


def test_fp_cache_refuses_a_crafted_file_and_retrains(tmp_path, caplog):
    tr = data.digits(train=True).subset(128)
    loader = data.BatchLoader(tr, 32)
    cfg = TrainConfig(steps=2, lr=0.05, progress=False, plot=False)
    key = {"model": "mlp", "data": "digits"}
    _, first = recipes.train_fp(get_model("mlp", in_shape=tr.input_shape), loader, cfg, key=key)
    path = Path(first["path"])
    marker = tmp_path / "marker"
    _craft(path, marker, base=torch.load(path, weights_only=True))
    with caplog.at_level(logging.WARNING, logger="fxqat.training.recipes"):
        _, again = recipes.train_fp(get_model("mlp", in_shape=tr.input_shape), loader, cfg, key=key)
    assert not again["cached"] and not marker.exists()
    assert any(str(path) in r.getMessage() and "refused" in r.getMessage() for r in caplog.records)
    assert load_checkpoint(path, required=("model", "top1"))["top1"] == again["top1"]  # rewritten, safe again


class _Retrained(Exception):
    pass


def test_lm_cache_refuses_a_crafted_file(tmp_path, monkeypatch, caplog):
    pytest.importorskip("transformers")
    from fxqat.text_data import CharCorpus
    from fxqat.training.lm import LMRecipe

    corpus = CharCorpus("to be or not to be, that is the question. " * 8)
    recipe = LMRecipe(steps=1, batch_size=2, context=8)
    # stand-ins for the (minutes-long) pre-training, so the test exercises only the cache path
    monkeypatch.setattr(recipes, "train_lm", lambda *a, **k: {"time_s": 0.0})
    monkeypatch.setattr(recipes, "evaluate_lm", lambda *a, **k: 1.25)
    _, info = recipes.pretrained_char_llama(corpus, recipe, progress=False, n_val=1)
    path = Path(info["path"])
    assert load_checkpoint(path)["val_loss"] == 1.25
    marker = tmp_path / "marker"
    _craft(path, marker, base=torch.load(path, weights_only=True))

    def retrain(*a, **k):
        raise _Retrained

    monkeypatch.setattr(recipes, "train_lm", retrain)
    with caplog.at_level(logging.WARNING, logger="fxqat.training.recipes"), pytest.raises(_Retrained):
        recipes.pretrained_char_llama(corpus, recipe, progress=False, n_val=1)
    assert not marker.exists() and any(str(path) in r.getMessage() for r in caplog.records)


def _load_calls(tree: ast.AST):
    """Calls that deserialize: ``torch.load``, ``torch.serialization.load``, ``pickle.load(s)``, ``np.load``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = ast.unparse(node.func.value)
            if (node.func.attr == "load" and owner in ("torch", "torch.serialization", "np", "numpy")) or \
                    (node.func.attr in ("load", "loads") and owner in ("pickle", "dill", "joblib", "cloudpickle")):
                yield owner, node


def test_every_deserializer_in_the_package_is_the_safe_one():
    """Static complement of the behavioural tests above: a new ``torch.load`` elsewhere would bypass them."""
    found = []
    for py in sorted(PKG.rglob("*.py")):
        for owner, call in _load_calls(ast.parse(py.read_text(), str(py))):
            rel = py.relative_to(PKG).as_posix()
            kw = {k.arg: ast.unparse(k.value) for k in call.keywords}
            found.append((rel, owner))
            if owner.startswith("torch"):
                assert rel == "training/checkpoint.py" and kw.get("weights_only") == "not trusted", (rel, kw)
            elif owner in ("np", "numpy"):
                assert kw.get("allow_pickle", "False") == "False", (rel, kw)  # numpy's default refuses pickles
            else:
                pytest.fail(f"{rel}: {owner}.{call.func.attr} unpickles arbitrary objects; use load_checkpoint")
    assert ("training/checkpoint.py", "torch") in found  # the scan sees the one safe call
