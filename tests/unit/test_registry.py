"""The method registry fails loudly on a broken or missing built-in method module (it used to skip a missing one)."""

import sys

import pytest

import fxqat
from fxqat import method_registry as registry
from fxqat.quantizers.base import Quantizer

BUILTINS = ["dorefa", "dsq", "dynamic", "ewgs", "gguf", "grad", "lsq", "lsq_plus", "noise_temper", "pact", "qil"]


@pytest.fixture
def fresh_registry(monkeypatch, tmp_path):
    """An unloaded registry (a copy of the current one, so nothing leaks) with ``tmp_path`` importable."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.syspath_prepend(str(tmp_path))

    def add_module(name, source):
        (tmp_path / f"{name}.py").write_text(source)
        monkeypatch.delitem(sys.modules, name, raising=False)
        monkeypatch.setattr(registry, "_BUILTIN_MODULES", registry._BUILTIN_MODULES + (name,))

    return add_module


def test_builtin_methods_are_all_registered():
    assert fxqat.available_methods() == BUILTINS
    assert all(issubclass(registry.get_method(m), Quantizer) for m in BUILTINS)


@pytest.mark.parametrize(
    "source,cause",
    [
        ("raise RuntimeError('boom at import')", "RuntimeError: boom at import"),
        ("def broken(:\n    pass\n", "SyntaxError"),
        ("import fxqat_no_such_dependency\n", "ModuleNotFoundError: No module named 'fxqat_no_such_dependency'"),
    ],
    ids=["raises", "syntax", "dependency"],
)
def test_broken_method_module_is_an_import_error_naming_it(fresh_registry, source, cause):
    fresh_registry("fxqat_tmp_broken_method", source)
    for _ in range(2):  # the registry is not left half-loaded: the second call fails the same way
        with pytest.raises(ImportError, match="'fxqat_tmp_broken_method' failed to import") as info:
            registry.available_methods()
        assert cause in str(info.value)
    assert not registry._loaded
    with pytest.raises(ImportError, match="fxqat_tmp_broken_method"):
        registry.get_method("lsq")  # every entry point goes through the same loader


def test_missing_method_module_is_not_skipped(fresh_registry, monkeypatch):
    monkeypatch.setattr(registry, "_BUILTIN_MODULES", registry._BUILTIN_MODULES + ("fxqat_tmp_missing_method",))
    with pytest.raises(ImportError, match="'fxqat_tmp_missing_method' failed to import.*ModuleNotFoundError"):
        registry.available_methods()


def test_a_healthy_extra_module_registers_its_method(fresh_registry):
    fresh_registry(
        "fxqat_tmp_good_method",
        "from fxqat.method_registry import register\n"
        "from fxqat.quantizers.lsq import LSQQuantizer\n"
        "@register('tmp_good')\n"
        "class TmpGood(LSQQuantizer):\n"
        "    pass\n",
    )
    assert registry.available_methods() == sorted(BUILTINS + ["tmp_good"])
    assert registry._loaded
    assert registry.get_method("tmp_good").method == "tmp_good"


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown quantizer method 'nope'; choose one of \['dorefa'"):
        registry.get_method("nope")
