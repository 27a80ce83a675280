"""Fuzzing the configuration and the inputs of ``prepare_qat`` (hypothesis, fixed profile below).

Every QATConfig / HybridConfig field (and short-form keyword) gets valid, out-of-range, wrong-type, NaN/inf and empty values. The contract:

* a config either builds into a *working* one (``prepare_qat`` succeeds and a train step runs, finite) or construction
  raises ``ValueError``/``TypeError`` whose message names the field;
* unknown names (method, preset, option, field) get the nearest valid one suggested;
* an override pattern that decides no layer warns (``UnmatchedOverrideWarning``) naming the pattern; one that decides
  a layer does not;
* odd example inputs (dtype, empty batch, batch of one with BatchNorm in train mode, wrong shape) give a working model
  or a ``ValueError`` naming the module or the inputs;
* the user's model is never modified: parameters, buffers, structure, train/eval mode, requires_grad, on success and on
  error.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from dataclasses import fields

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fxqat
from fxqat.config import PRESETS, SHORTHAND, UnmatchedOverrideWarning
from fxqat.quantizers import available_methods, get_method

# A fixed profile, whatever HYPOTHESIS_PROFILE says: same examples on every run, bounded time (the file < 60 s).
FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
METHODS = available_methods()
STATIC = [m for m in METHODS if m not in ("grad", "dynamic")]


class Net(nn.Module):
    """conv-BN-ReLU x2, then an MLP head with BatchNorm1d: 4 quantizable layers, named for override tests."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential()
        self.head.add_module("fc1", nn.Linear(64, 8))
        self.head.add_module("bn", nn.BatchNorm1d(8))
        self.head.add_module("act", nn.ReLU())
        self.head.add_module("fc2", nn.Linear(8, 3))

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


LAYERS = ("features.0", "features.3", "head.fc1", "head.fc2")
MODULES = [n for n, _ in Net().named_modules() if n]


def _net(train: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return Net().train(train)


def _x(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(1))


def _snapshot(m: nn.Module):
    return ({k: v.clone() for k, v in m.state_dict().items()}, repr(m), [x.training for x in m.modules()],
            [p.requires_grad for p in m.parameters()])


def _assert_unchanged(m: nn.Module, snap) -> None:
    state, structure, modes, grads = snap
    now = m.state_dict()
    assert now.keys() == state.keys() and repr(m) == structure
    assert all(torch.equal(now[k], state[k]) for k in state), "the user's model was modified"
    assert [x.training for x in m.modules()] == modes and [p.requires_grad for p in m.parameters()] == grads


def _train_step(qm: nn.Module) -> None:
    """One forward/backward in train mode (hybrid outputs through hybrid_loss) and an eval forward: all finite."""
    y = torch.tensor([0, 1, 2, 0])
    out = qm.train()(_x())
    loss = fxqat.hybrid_loss(out, y)[0] if isinstance(out, fxqat.HybridOutput) else nn.functional.cross_entropy(out, y)
    loss.backward()
    assert math.isfinite(float(loss))
    assert torch.isfinite(qm.eval()(_x())).all()


def _check(make_config, named, model=None):
    """Build the config (maybe raising, naming one of ``named``), prepare, train one step; the model never changes."""
    model = model or _net()
    snap = _snapshot(model)
    try:
        cfg = make_config()
    except (ValueError, TypeError) as e:
        assert any(n in str(e) for n in named), f"{type(e).__name__} does not name {named}: {e}"
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnmatchedOverrideWarning)
            qm = fxqat.prepare_qat(model, (_x(),), cfg)
        _train_step(qm)
    finally:
        _assert_unchanged(model, snap)
    return cfg


# ---------------------------------------------------------------------------------------------- values
def junk() -> st.SearchStrategy:
    """Out-of-range, wrong-type, NaN/inf and empty values."""
    return st.one_of(
        st.integers(-(10**12), 10**12), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
        st.sampled_from([None, True, False, "", [], (), {}, float("nan"), -1, 0, 17, 2**70, object(), b"x",
                         ("first", 3), [None], {"x": 1}, nn.Linear, int]),
    )


QAT_VALID = {
    "weight": st.builds(fxqat.QuantSpec, bits=st.integers(2, 8), method=st.sampled_from(["lsq", "qil", "dorefa"]),
                        granularity=st.sampled_from(["per_tensor", "per_channel", fxqat.per_channel()])),
    "act": st.none() | st.builds(fxqat.QuantSpec, bits=st.integers(2, 8), method=st.sampled_from(["lsq", "pact"])),
    "grad": st.none() | st.builds(fxqat.QuantSpec, bits=st.integers(4, 8)),
    "kv": st.none() | st.builds(fxqat.KVSpec, bits=st.integers(2, 8), granularity=st.sampled_from(["per_token",
                                                                                                   "per_head"])),
    "w_bits": st.integers(2, 8), "a_bits": st.none() | st.integers(2, 8), "g_bits": st.none() | st.integers(4, 8),
    "method": st.sampled_from(STATIC), "w_method": st.none() | st.sampled_from(STATIC),
    "a_method": st.none() | st.sampled_from(STATIC), "per_channel": st.booleans(),
    "first_last": st.none() | st.integers(2, 8), "act_signed": st.sampled_from(["auto", True, False]),
    "overrides": st.just(()), "hybrid": st.none(), "w_options": st.just({}), "a_options": st.just(()),
    "g_options": st.none(), "leaf_modules": st.just(()), "w_granularity": st.sampled_from([None, "per_tensor"]),
    "group_size": st.none(), "a_granularity": st.just("per_tensor"),
    "first_last_layers": st.sampled_from([(), ("first",), ("last",), ("first", "last"), "last"]),
    "quantize_matmuls": st.just(False),  # True needs a_bits (drawn None above); tests/unit/test_matmuls.py covers it
    "quantize_router": st.booleans(), "quantize_embeddings": st.booleans(),
    "lora": st.sampled_from(["merged", "base"]), "kv_bits": st.none() | st.integers(2, 8),
    "kv_granularity": st.sampled_from(["per_token", "per_head"]),
}
HYBRID_VALID = {
    "paths": st.sampled_from(["all", 1, 2, 3]), "partner": st.sampled_from(["frozen", "shared"]),
    "mode": st.sampled_from(["lp_prefix", "fp_prefix", "single"]), "kd_weight": st.floats(0, 4),
    "temperature": st.floats(0.1, 8), "path_weights": st.just("uniform"), "task_weight": st.floats(0, 4),
    "seed": st.integers(0, 2**31), "max_blocks": st.none() | st.integers(2, 4), "boundaries": st.just(()),
    "shared_suffix_grad": st.just(False), "cuts": st.sampled_from(["auto", "layers", "residual"]),
}


def test_every_field_has_a_strategy():
    assert set(QAT_VALID) == {f.name for f in fields(fxqat.QATConfig)} | set(SHORTHAND)
    assert set(HYBRID_VALID) == {f.name for f in fields(fxqat.HybridConfig)}


# one rejected value per field, so that the fuzzing above cannot pass by never reaching an error
QAT_BAD = {
    "weight": fxqat.QuantSpec(bits=4, kind="act"), "act": 3, "grad": fxqat.QuantSpec(bits=4, method="lsq"),
    "kv": "per_token", "w_bits": 0, "a_bits": 2.5, "g_bits": "8", "method": "lqs", "w_method": 3, "a_method": [], "per_channel": "yes",
    "first_last": 17, "act_signed": "no", "overrides": "fc", "hybrid": {}, "w_options": 5, "a_options": "init",
    "g_options": [1], "leaf_modules": [3], "w_granularity": "per_chanel", "group_size": 0, "a_granularity": "token",
    "first_last_layers": ("middle",), "quantize_matmuls": "yes", "quantize_router": "no", "quantize_embeddings": 1,
    "lora": "merge", "kv_bits": 0, "kv_granularity": "token",
}
HYBRID_BAD = {
    "paths": 0, "partner": "froze", "mode": "lp", "kd_weight": float("nan"), "temperature": 0.0, "path_weights": (),
    "task_weight": -1.0, "seed": 2.5, "max_blocks": 1, "boundaries": [3], "shared_suffix_grad": "yes",
    "cuts": "blocks",
}


@pytest.mark.parametrize("field", sorted(QAT_BAD))
def test_each_qatconfig_field_rejects_a_bad_value_by_name(field):
    with pytest.raises((ValueError, TypeError), match=rf"QATConfig\.{field}\b"):
        fxqat.QATConfig(**{field: QAT_BAD[field]})


@pytest.mark.parametrize("field", sorted(HYBRID_BAD))
def test_each_hybridconfig_field_rejects_a_bad_value_by_name(field):
    with pytest.raises((ValueError, TypeError), match=rf"HybridConfig\.{field}\b"):
        fxqat.HybridConfig(**{field: HYBRID_BAD[field]})


def test_every_field_has_a_bad_value():
    assert set(QAT_BAD) == set(QAT_VALID) and set(HYBRID_BAD) == set(HYBRID_VALID)


@st.composite
def field_values(draw, valid):
    """1 to 3 fields: each a valid value or junk."""
    names = draw(st.lists(st.sampled_from(sorted(valid)), min_size=1, max_size=3, unique=True))
    return {n: draw(st.one_of(valid[n], junk()) if n not in ("overrides", "hybrid") else junk()) for n in names}


@FUZZ
@given(field_values(QAT_VALID))
def test_qatconfig_fields_build_a_working_config_or_name_the_field(kw):
    _check(lambda: fxqat.QATConfig(**kw), [f"QATConfig.{k}" for k in kw] + [f"{k}=" for k in kw])


@FUZZ
@given(field_values(HYBRID_VALID), st.booleans())
def test_hybridconfig_fields_build_a_working_config_or_name_the_field(kw, shared):
    if shared and "partner" not in kw:
        kw["partner"] = "shared"
    _check(lambda: fxqat.QATConfig(w_bits=4, a_bits=4, hybrid=fxqat.HybridConfig(**kw)),
           [f"HybridConfig.{k}" for k in kw] + [f"HybridConfig: {k}" for k in kw])


@FUZZ
@given(st.sampled_from(STATIC), st.sampled_from(["w_options", "a_options"]),
       st.dictionaries(st.sampled_from(["init", "grad_scale", "impl", "ste", "bogus", "Init", ""]), junk(),
                       max_size=2))
def test_method_options_build_or_name_the_options_field(method, which, options):
    _check(lambda: fxqat.QATConfig(method=method, **{which: options}), [which, "QATConfig.", "QuantSpec.options"])


# ---------------------------------------------------------------------------------------------- names
@st.composite
def typo(draw, names):
    """One edit (drop, swap, double, replace a character, or change case) of one of ``names``."""
    name = draw(st.sampled_from(sorted(names)))
    i = draw(st.integers(0, len(name) - 1))
    kind = draw(st.sampled_from(["drop", "swap", "double", "replace", "upper"]))
    if kind == "drop":
        bad = name[:i] + name[i + 1:]
    elif kind == "swap" and i + 1 < len(name):
        bad = name[:i] + name[i + 1] + name[i] + name[i + 2:]
    elif kind == "double":
        bad = name[:i] + name[i] + name[i:]
    elif kind == "upper":
        bad = name.upper()
    else:
        bad = name[:i] + draw(st.sampled_from("xqz_")) + name[i + 1:]
    assume(bad not in names and bad)
    return name, bad


@FUZZ
@given(typo(METHODS), st.sampled_from(["method", "w_method", "a_method"]))
def test_mistyped_method_names_suggest_the_nearest(pair, field):
    name, bad = pair
    with pytest.raises(ValueError, match=rf"QATConfig\.{field}=") as e:
        fxqat.QATConfig(**{field: bad})
    assert "Did you mean" in str(e.value) and repr(name) in str(e.value).split("Did you mean")[1], str(e.value)
    with pytest.raises(ValueError, match="Did you mean") as e2:
        get_method(bad)
    assert repr(name) in str(e2.value)


@FUZZ
@given(st.one_of(typo(PRESETS).map(lambda p: p[1]), st.sampled_from(sorted(PRESETS)), junk()))
def test_preset_names_give_a_config_or_name_the_preset(name):
    if isinstance(name, str) and name in PRESETS:
        cfg = fxqat.QATConfig.preset(name)
        assert cfg.weight.granularity == "per_group" and cfg.weight.bits == PRESETS[name]["weight"]["bits"]
        return
    with pytest.raises(ValueError, match="QATConfig.preset: unknown preset") as e:
        fxqat.QATConfig.preset(name)
    close = [p for p in PRESETS if isinstance(name, str) and len(name) > 3 and
             (p.lower() == name.lower() or sum(a != b for a, b in zip(p, name)) <= 1 and abs(len(p) - len(name)) <= 1)]
    if close:
        assert "Did you mean" in str(e.value), str(e.value)


@FUZZ
@given(typo([f.name for f in fields(fxqat.QATConfig) if len(f.name) > 4] + [k for k in SHORTHAND if len(k) > 4]))
def test_mistyped_field_names_of_preset_and_with_are_named(pair):
    name, bad = pair
    for call in (lambda: fxqat.QATConfig.preset("8da4w", **{bad: 4}), lambda: fxqat.QATConfig().with_(**{bad: 4})):
        with pytest.raises(TypeError, match=f"no field {bad!r}") as e:
            call()
        assert repr(name) in str(e.value), str(e.value)


# ---------------------------------------------------------------------------------------------- overrides
def _pattern() -> st.SearchStrategy[str]:
    fragments = st.sampled_from(["features", "head", "fc1", "fc2", "0", "3", "bn", "*", ".", "?", "fc", "x", "[0-3]"])
    return st.one_of(st.sampled_from(LAYERS + tuple(MODULES)), typo(LAYERS).map(lambda p: p[1]),
                     st.lists(fragments, min_size=1, max_size=4).map("".join))


@FUZZ
@given(st.lists(_pattern(), min_size=1, max_size=3), st.booleans())
def test_an_override_that_decides_no_layer_warns_naming_its_pattern(patterns, skip):
    model = _net()
    snap = _snapshot(model)
    cfg = fxqat.QATConfig(overrides=tuple(fxqat.Override(p, skip=skip) if skip else fxqat.Override(p, w_bits=3)
                                          for p in patterns))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qm = fxqat.prepare_qat(model, (_x(),), cfg)
    _assert_unchanged(model, snap)
    _train_step(qm)
    messages = [str(w.message) for w in caught if issubclass(w.category, UnmatchedOverrideWarning)]
    taken = set()
    for p in patterns:  # oracle: first match wins, over the quantizable layers
        mine = {n for n in LAYERS if fnmatch.fnmatchcase(n, p)} - taken
        taken |= mine
        warned = [m for m in messages if m.startswith(f"Override(match={p!r}) applies to no quantizable layer")]
        assert bool(warned) == (not mine), (p, messages)
        close = [n for n in LAYERS if sum(a != b for a, b in zip(n, p)) + abs(len(n) - len(p)) <= 1]
        if warned and close and not any(fnmatch.fnmatchcase(n, p) for n in LAYERS):
            assert "Did you mean" in warned[0] and any(repr(n) in warned[0] for n in close), warned[0]


# ---------------------------------------------------------------------------------------------- example inputs
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
          torch.bool]


@FUZZ
@given(st.sampled_from(DTYPES), st.integers(0, 3), st.sampled_from([(1, 4, 4), (1, 5, 5), (3, 4, 4), (16,)]),
       st.booleans(), st.sampled_from([None, "tensor", "list"]))
def test_odd_example_inputs_give_a_working_model_or_name_the_module(dtype, batch, shape, train, wrap):
    model = _net(train)
    snap = _snapshot(model)
    x = (torch.randn(batch, *shape) * 3).to(dtype)
    example = x if wrap == "tensor" else [x] if wrap == "list" else (x,)
    try:
        qm = fxqat.prepare_qat(model, example, fxqat.QATConfig())
    except (ValueError, TypeError) as e:
        msg = str(e)
        assert "example_inputs" in msg or any(repr(n) in msg for n in MODULES), msg
        # a float32 batch of the right shape must work, whatever its size (0 and 1 included, BatchNorm in train mode);
        # other dtypes may fail if the model's own layers refuse them (a float64 input to float32 conv weights...)
        assert not (shape == (1, 4, 4) and dtype == torch.float32), f"a float32 batch was refused: {msg}"
    else:
        assert qm.training == train
        _train_step(qm)
    finally:
        _assert_unchanged(model, snap)
