"""docs/quantizers.md's granularity table is the code's (generated from the classes), and docs/adding_a_quantizer.md's
worked example runs (it is a doctest)."""

import doctest
import re
from pathlib import Path

import fxqat
from fxqat import method_registry
from fxqat.config import GRANULARITIES
from fxqat.method_registry import get_method
from fxqat.quant_spec import granularity_support, granularity_table

DOCS = Path(__file__).resolve().parents[2] / "docs"
TABLE = re.compile(r"<!-- granularity-table:[^\n]*-->\n(.*?)\n<!-- /granularity-table -->", re.S)


def test_granularity_table_in_the_docs_matches_the_code():
    found = TABLE.findall((DOCS / "quantizers.md").read_text())
    assert len(found) == 1, "docs/quantizers.md needs exactly one generated granularity table"
    assert found[0] == granularity_table(), (
        "docs/quantizers.md is out of date; regenerate the table with "
        "python -c 'from fxqat.quant_spec import granularity_table; print(granularity_table())'"
    )


def test_table_is_derived_from_the_class_attributes(monkeypatch):
    support = granularity_support()
    assert sorted(support) == fxqat.available_methods()
    for name, row in support.items():
        cls = get_method(name)
        assert set(row) == {g for g in cls.granularities if set(cls.kinds) & set(GRANULARITIES[g])}, name
        assert all(row[g] and set(row[g]) <= set(cls.kinds) & set(GRANULARITIES[g]) for g in row), name
    assert support["dynamic"] == {"per_token": ("act",)} and support["grad"] == {"per_tensor": ("grad",)}
    assert support["lsq"] == {"per_tensor": ("weight", "act"), "per_channel": ("weight",), "per_group": ("weight",)}
    before = granularity_table()
    monkeypatch.setattr(get_method("pact"), "granularities", ("per_tensor",))
    after = granularity_table()
    assert "| `pact` | weight, act | — | — | — |" in after.splitlines() and after != before


def test_adding_a_quantizer_page_runs(monkeypatch):
    monkeypatch.setattr(method_registry, "_REGISTRY", dict(method_registry._REGISTRY))  # my_uniform stays here
    result = doctest.testfile(str(DOCS / "adding_a_quantizer.md"), module_relative=False,
                              optionflags=doctest.ELLIPSIS, raise_on_error=False)
    assert result.failed == 0 and result.attempted >= 12, result
    assert "my_uniform" in method_registry._REGISTRY
