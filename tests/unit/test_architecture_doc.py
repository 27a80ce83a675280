"""docs/architecture.md stays true: every path and layered name it gives exists, every fxqat package is in its
layout, and every ``import`` inside fxqat follows its layering table (a module imports its own level or lower)."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "architecture.md").read_text()
PKG = REPO / "fxqat"


def _section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", DOC, re.S | re.M)
    assert m, f"docs/architecture.md has no '## {title}' section"
    return m.group(1)


def _levels():
    """``name -> level`` from the layering table (names relative to fxqat, dotted)."""
    out = {}
    for level, cell in re.findall(r"^\| (\d+) \| (.+) \|$", _section("Layering"), re.M):
        for name in re.findall(r"`([\w.]+)`", cell):
            out[name] = int(level)
    return out


def _exists(dotted: str) -> bool:
    path = PKG.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file() or dotted == "__init__"


def _packages():
    return sorted(p.parent.relative_to(REPO).as_posix() + "/" for p in PKG.rglob("__init__.py"))


def _top_modules():
    return sorted(p.relative_to(REPO).as_posix() for p in PKG.glob("*.py"))


def test_every_path_named_in_the_doc_exists():
    paths = set(re.findall(r"`(fxqat/[\w/.]*)`", DOC))
    assert len(paths) > 30
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, f"docs/architecture.md names {missing}, which do not exist: update the doc"


def test_every_layered_name_exists_and_every_package_and_module_has_a_level():
    levels = _levels()
    assert len(levels) >= 20 and set(levels.values()) == set(range(10))
    missing = sorted(n for n in levels if not _exists(n))
    assert not missing, f"the layering table names {missing}, which do not exist in fxqat/"
    units = {p.removeprefix("fxqat/").rstrip("/").split("/")[0] for p in _packages() if p != "fxqat/"}
    units |= {Path(m).stem for m in _top_modules()}
    unlevelled = sorted(u for u in units if u not in levels)
    assert not unlevelled, f"fxqat/{unlevelled} have no level in docs/architecture.md's layering table"


def test_every_package_and_top_level_module_is_in_the_layout():
    layout = _section("Layout")
    named = set(re.findall(r"`(fxqat/[\w/.]*)`", layout))
    missing = sorted(p for p in _packages() + _top_modules() if p not in named and p != "fxqat/")
    assert not missing, f"docs/architecture.md's layout misses {missing}"


def _level_of(module: str, levels) -> int:
    parts = module.split(".")[1:] or ["__init__"]
    best = max((n for n in levels if parts[: len(n.split("."))] == n.split(".")), key=lambda n: n.count("."),
               default=None)
    assert best is not None, f"{module} has no level in docs/architecture.md"
    return levels[best]


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "fxqat":
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "fxqat")


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: p.relative_to(REPO).as_posix())
def test_imports_follow_the_layering(path):
    levels = _levels()
    module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    mine = _level_of(module, levels)
    upward = sorted({t for t in _imports(path) if _level_of(t, levels) > mine})
    assert not upward, (f"{module} (level {mine}) imports {upward} from a higher level: move the shared code down "
                        "or change docs/architecture.md's layering if the design changed")
