"""Every Python example of the README and docs/ runs, and so does every ``fxqat`` command-line example.

Python blocks of one page run in order in one namespace, as a reader would run them. Names a snippet leaves to the
reader (``model``, ``x``, ``loader`` ...) come from ``SETUP``; ``EDITS`` shrinks training budgets (a snippet that
trains 250 steps runs 2) and stands in tiny configs for full-size ones; each edited text must still be in the block,
so a changed example is noticed. Command-line examples run with the example's own flags plus a small budget
(``CAPS``: a few steps on a data subset) and ``--out`` in a temporary folder; ``...`` placeholders and benchmark runs
(``fxqat bench``) are only parsed. Examples that need an optional extra skip with a reason when it is missing.
A new snippet needs no entry here when it runs as written.
"""

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxqat.cli as cli
from fxqat import data

REPO = Path(__file__).resolve().parents[2]
PAGES = ["README.md"] + sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)

pytestmark = pytest.mark.slow

_TINY_LLAMA = ("transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, "
               "num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)")
_IMAGE = ("import torch, torch.nn as nn, torchvision, fxqat\n"
          "from fxqat.models import get_model\n"
          "torch.manual_seed(0)\n"
          "model = fp_model = net = get_model('cnn', num_classes=10, in_shape=(1, 28, 28))\n"
          "x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))\n"
          "loader = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(2)]\n"
          "batches, epochs, log = loader, 1, (lambda *a: None)\n")
_LLAMA = ("import torch, fxqat\n"
          "from fxqat.models.hf import tiny_hf_model\n"
          "model, input_ids = tiny_hf_model('llama')\n"
          "llama, ids = model, input_ids\n")

#: (page, index of the python block on the page) -> code run before it
SETUP = {
    ("README.md", 2): "import transformers\ninput_ids = torch.randint(0, 128, (2, 16))\n",
    ("README.md", 3): ("from fxqat.integrations.lm_dataset import CharLMDataset\n"
                       "from fxqat.text_data import tiny_shakespeare\n"
                       "ids = input_ids\n"
                       "ds = CharLMDataset(tiny_shakespeare(), 'train', n=8, context=16, seed=0)\n"),
    ("README.md", 1): "fp_model = torchvision.models.resnet18(num_classes=10)\n",
    ("docs/adding_a_quantizer.md", 0): "import torch\n",  # the page's doctest session imported it
    ("docs/block_replacement.md", 0): _IMAGE,
    ("docs/capture.md", 0): ("import torch, torch.nn as nn, fxqat\n"
                             "class MyLayer(nn.Linear):\n"
                             "    def forward(self, x):\n"
                             "        return my_op(x, self.weight, self.bias)\n"
                             "def my_op(x, w, b):\n"
                             "    return torch.nn.functional.linear(x, w, b)\n"),
    ("docs/capture.md", 1): "qm = fxqat.prepare_qat(nn.Sequential(MyLayer(4, 4)), (torch.randn(2, 4),))\n",
    ("docs/choosing_bits.md", 0): _IMAGE,
    ("docs/deploy.md", 0): _IMAGE,
    ("docs/deploy.md", 2): _LLAMA,
    ("docs/deploy.md", 3): _LLAMA + "x = ids\nchars = [chr(0x100 + i) for i in range(llama.config.vocab_size)]\n",
    ("docs/llm.md", 1): ("from transformers import LlamaConfig, LlamaForCausalLM\n"
                         "cfg = " + _TINY_LLAMA.replace("transformers.", "") + "\n"),
    ("docs/lora.md", 0): _LLAMA,
    ("docs/getting_started.md", 1): "fp_model = torchvision.models.resnet18(num_classes=10)\n"
                                     "y = torch.randint(0, 10, (8,))\n",
    ("docs/hf_trainer.md", 1): "args = trainer.args\n",
    ("docs/llm.md", 0): _LLAMA,
    ("docs/training_methods.md", 0): _IMAGE,
}
#: (page, index) -> [(text in the block, what runs instead)]: smaller budgets, tiny models, a temporary folder
EDITS = {
    ("README.md", 2): [("transformers.LlamaConfig(use_cache=False)", _TINY_LLAMA)],
    ("README.md", 3): [("max_steps=250", "max_steps=2, per_device_train_batch_size=2, report_to=[]")],
    ("docs/deploy.md", 0): [("# ... train ...", "fxqat.calibrate(qm, [x])  # stands in for training")],
    ("docs/deploy.md", 1): [("# ... train pm ...", "pm(x)  # stands in for training")],
    ("docs/deploy.md", 2): [("# ... train ...", "fxqat.calibrate(qm, [ids])  # stands in for training")],
    ("docs/deploy.md", 3): [("# ... train ...", "fxqat.calibrate(qm, [x])  # stands in for training"),
                            ('GGUFVocab.from_tokenizer(tokenizer, pre="llama-bpe")', "GGUFVocab.from_chars(chars)")],
    ("docs/lora.md", 0): [("lr=1e-3)\n...\n", "lr=1e-3)\nqm(ids)  # stands in for training\n")],
    ("docs/hf_trainer.md", 0): [("n=250 * 32, context=128", "n=8, context=32"),
                                ("max_steps=250, learning_rate=1e-4, save_steps=125",
                                 "max_steps=2, learning_rate=1e-4, save_steps=125, per_device_train_batch_size=2, "
                                 "report_to=[]")],
}
#: (page, index) -> why the block does not run on its own
SKIP = {
    ("docs/pipeline.md", 1): "the printed output of the block before, not code to run",
    ("docs/fsdp.md", 0): "runs under torchrun: test_fsdp_python_example starts it with 2 processes",
}
#: (page, index) -> modules (optional extras) it needs
NEEDS = {
    ("README.md", 2): ("transformers",), ("README.md", 3): ("transformers", "accelerate"),
    ("docs/deploy.md", 0): ("onnx", "onnxruntime", "torchao"), ("docs/deploy.md", 2): ("torchao", "executorch"),
    ("docs/deploy.md", 3): ("transformers", "gguf"), ("docs/lora.md", 0): ("transformers", "peft", "torchao"),
    ("docs/fsdp.md", 0): ("transformers",), ("docs/hf_trainer.md", 0): ("transformers", "accelerate"),
    ("docs/hf_trainer.md", 1): ("transformers", "accelerate"), ("docs/llm.md", 0): ("transformers",),
}


def python_blocks(page: str):
    """``(index, code)`` of the page's python blocks (pycon pages are doctests: tests/unit/test_docs_quantizers.py)."""
    blocks = [body for lang, body in FENCE.findall((REPO / page).read_text()) if lang == "python"]
    return list(enumerate(blocks))


def _missing(mods):
    return [m for m in mods if importlib.util.find_spec(m) is None]


def _edited(page, i, code):
    for old, new in EDITS.get((page, i), ()):
        assert old in code, f"{page} python block {i} no longer contains {old!r}: update EDITS in {__file__}"
        code = code.replace(old, new)
    return code


@pytest.mark.parametrize("page", [p for p in PAGES if any((p, i) not in SKIP for i, _ in python_blocks(p))])
def test_python_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FXQAT_CACHE", str(tmp_path / "cache"))
    ns = {"__name__": "__doc_example__"}
    ran = 0
    for i, code in python_blocks(page):
        key = (page, i)
        if key in SKIP:
            continue
        missing = _missing(NEEDS.get(key, ()))
        if missing:
            pytest.skip(f"{page} python block {i} needs {missing}: pip install 'fxqat[export,executorch,hf]'")
        try:
            exec(compile(SETUP.get(key, "") + _edited(page, i, code), f"{page}[python {i}]", "exec"), ns)
        except Exception as e:
            raise AssertionError(f"{page} python block {i} failed: {type(e).__name__}: {e}\n{code}") from e
        ran += 1
    assert ran > 0, f"{page}: every python block was skipped"


def test_fsdp_python_example(tmp_path):
    """docs/fsdp.md's script, under ``torch.distributed.run`` with 2 processes (gloo on CPU)."""
    if _missing(("transformers",)):
        pytest.skip("docs/fsdp.md needs transformers: pip install 'fxqat[hf]'")
    (code,) = [c for i, c in python_blocks("docs/fsdp.md") if ("docs/fsdp.md", i) in SKIP]
    script = tmp_path / "fsdp_example.py"
    script.write_text(code + "\nif rank == 0:\n    print('STATE', len(state))\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert int(re.search(r"STATE (\d+)", r.stdout).group(1)) > 10


# ----------------------------------------------------------------------------------------------- command line
CAPS = {
    "train": ["--steps", "2", "--fp-steps", "2", "--train-subset", "256", "--test-subset", "128", "--batch-size",
              "32", "--no-progress"],
    "autobits": ["--steps", "2", "--fp-steps", "2", "--train-subset", "256", "--test-subset", "128", "--batch-size",
                 "32", "--sens-batches", "1", "--no-progress"],
    "demo": ["--quick", "--steps", "2", "--fp-steps", "2", "--no-progress"],
}


def _shell_commands():
    """``(where, argv)`` of every fxqat command in shell blocks, inline code of the pages, and cli.py's docstring."""
    found = []
    texts = [(p, (REPO / p).read_text()) for p in PAGES] + [("fxqat/cli.py", cli.__doc__)]
    for where, text in texts:
        shell = "\n".join(body for lang, body in FENCE.findall(text) if lang in ("bash", "sh", "shell", ""))
        if where == "fxqat/cli.py":
            shell = text
        for line in shell.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if re.match(r"(fxqat|torchrun .*-m fxqat) \w", line):
                found.append((where, line))
        for inline in re.findall(r"`(fxqat \w+ [^`]+)`", text):  # complete commands only: they parse
            try:
                cli.build_parser().parse_args(shlex.split(inline)[1:])
            except SystemExit:
                continue
            found.append((where, inline))
    unique, seen = [], set()
    for where, line in sorted({(where, " ".join(line.split())) for where, line in found}):
        key = _budget_free(line)
        if key not in seen:  # the same command up to its budget and run folder runs once
            seen.add(key)
            unique.append((where, line))
    return unique


def _budget_free(line: str) -> tuple:
    words = shlex.split(line)
    drop = {i + 1 for i, w in enumerate(words) if w in ("--steps", "--epochs", "--out")}
    return tuple(w for i, w in enumerate(words) if i not in drop and w not in ("--steps", "--epochs", "--out"))


COMMANDS = _shell_commands()


def test_the_readme_and_docs_show_command_examples():
    lines = [c for _, c in COMMANDS]
    assert "fxqat inspect hf:llama" in lines and "fxqat demo --quick" in lines and len(lines) >= 8


@pytest.mark.parametrize("where,line", COMMANDS, ids=[f"{w}: {c}" for w, c in COMMANDS])
def test_command_line_example_runs(where, line, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FXQAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    words = shlex.split(line)
    torchrun = words[0] == "torchrun"
    argv = words[words.index("fxqat") + 1:] if torchrun else words[1:]
    if "..." in argv:
        pytest.skip(f"{line!r} is a placeholder for the flags of the example before it")
    args = cli.build_parser().parse_args(argv)  # every example parses
    if args.command == "bench":
        return  # a benchmark run: parsing is the check (tests/integration/test_cli.py runs its dispatch)
    if args.command == "inspect" and args.model.startswith("hf:") and _missing(("transformers",)):
        pytest.skip("hf: models need transformers: pip install 'fxqat[hf]'")
    dataset = getattr(args, "data", None)
    if dataset in ("cifar10", "mnist") and not data.data_available(dataset):
        pytest.skip(f"{dataset} data not found in {[str(p) for p in data.search_paths()]}")
    if "--out" in argv:
        argv[argv.index("--out") + 1] = str(tmp_path / "run")
    elif args.command in ("train", "autobits", "demo"):
        argv += ["--out", str(tmp_path / "run")]
    argv += CAPS.get(args.command, [])
    if torchrun:
        nproc = words[words.index("--nproc_per_node") + 1]
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", nproc, "-m", "fxqat",
                            *argv], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return
    torch.manual_seed(0)
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    if args.command == "inspect":
        assert re.search(r"^\d+ quantizers", out, re.M)
    if args.command in ("train", "autobits"):
        assert (tmp_path / "run").is_dir() and any((tmp_path / "run").iterdir())
