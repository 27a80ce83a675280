"""Benchmark scripts import only ``fxqat``, ``benchmarks/_common.py`` and installed packages.

Not the test suite's helpers (``tests/``) and not another benchmark script: code two scripts share lives in
``_common.py``.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "benchmarks").glob("*.py"))
LOCAL = {p.stem for p in SCRIPTS if p.stem != "_common"} | {p.stem for p in (REPO / "tests").rglob("*.py")}


def _imported(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_there_are_benchmark_scripts():
    assert len(SCRIPTS) >= 5 and "autobits" in LOCAL and "hf_zoo" not in {p.stem for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_imports_no_test_helper_or_other_script(script):
    bad = sorted({m for m in _imported(script) if m in LOCAL or m == "tests"})
    assert not bad, (f"benchmarks/{script.name} imports {bad}: benchmarks import only fxqat and benchmarks/_common.py "
                     "(move shared code into _common.py or fxqat)")
    assert '"tests"' not in script.read_text(), f"benchmarks/{script.name} puts tests/ on sys.path"
