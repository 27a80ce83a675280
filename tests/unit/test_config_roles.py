"""QATConfig's per-role form (``weight=QuantSpec(...)``, ``act=``, ``grad=``, ``kv=``) and its short form
(``w_bits=4, a_bits=4, method="lsq"``) give the same specs, per layer, as the config fields of before (issue 28).

``legacy_spec_for`` below is ``QATConfig.spec_for`` as it was when the config stored ``w_bits``/``a_bits``/...
fields (copied, reading a dict of those fields): the specs of today must equal it.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import fxqat
from fxqat import KVSpec, QATConfig, QuantSpec, per_channel, per_group, per_head, per_tensor, per_token
from fxqat.config import PRESETS
from fxqat.granularity import parse_granularity
from fxqat.passes.annotate import QMETA

LEGACY_DEFAULTS = dict(w_bits=4, a_bits=4, g_bits=None, method="lsq", w_method=None, a_method=None, per_channel=False,
                       w_options=(), a_options=(), g_options=(), w_granularity=None, group_size=None,
                       a_granularity="per_tensor")


def legacy_spec_for(short, kind, bits=None, method=None, signed=None):
    """The spec of the config fields ``short`` as ``QATConfig.spec_for`` computed it before the per-role form."""
    c = {**LEGACY_DEFAULTS, **short}
    opts = {k: tuple(sorted(dict(c[k]).items())) for k in ("w_options", "a_options", "g_options")}
    if kind == "weight":
        gran = c["w_granularity"] or ("per_channel" if c["per_channel"] else "per_tensor")
        return QuantSpec(bits=bits or c["w_bits"], method=method or c["w_method"] or c["method"], kind="weight",
                         signed=True, granularity=gran, group_size=c["group_size"] if gran == "per_group" else None,
                         options=opts["w_options"])
    if kind == "act":
        if c["a_granularity"] == "per_token":
            return QuantSpec(bits=bits or c["a_bits"] or 8, method="dynamic", kind="act", granularity="per_token")
        return QuantSpec(bits=bits or c["a_bits"] or 8, method=method or c["a_method"] or c["method"], kind="act",
                         signed=signed, options=opts["a_options"])
    return QuantSpec(bits=bits or c["g_bits"] or 8, method="grad", kind="grad", signed=True, options=opts["g_options"])


# short form -> the same config in the per-role form
TABLE = [
    (dict(), dict()),
    (dict(w_bits=2, a_bits=2), dict(weight=QuantSpec(bits=2), act=QuantSpec(bits=2))),
    (dict(w_bits=3, a_bits=None, method="qil"), dict(weight=QuantSpec(bits=3, method="qil"), act=None)),
    (dict(w_bits=4, a_bits=8, per_channel=True),
     dict(weight=QuantSpec(bits=4, granularity=per_channel()), act=QuantSpec(bits=8))),
    (dict(w_granularity="per_group", group_size=8, a_bits=None),
     dict(weight=QuantSpec(bits=4, granularity=per_group(8)), act=None)),
    (dict(w_method="lsq", a_method="pact"), dict(act=QuantSpec(bits=4, method="pact"))),
    (dict(a_bits=8, a_granularity="per_token"), dict(act=QuantSpec(bits=8, method="dynamic", granularity=per_token()))),
    (dict(g_bits=8, g_options={"update": "manual"}), dict(grad=QuantSpec(bits=8, options={"update": "manual"}))),
    (dict(method="dorefa", first_last=None),
     dict(weight=QuantSpec(bits=4, method="dorefa"), act=QuantSpec(bits=4, method="dorefa"), first_last=None)),
    (dict(w_options={"init": "mse"}, a_options={"grad_scale": False}),
     dict(weight=QuantSpec(bits=4, options={"init": "mse"}), act=QuantSpec(bits=4, options={"grad_scale": False}))),
    (dict(first_last=4, overrides=(fxqat.Override("2", w_bits=2, a_bits=3, method="qil"),)),
     dict(first_last=4, overrides=(fxqat.Override("2", w_bits=2, a_bits=3, method="qil"),))),
    (dict(kv_bits=4, kv_granularity="per_head"), dict(kv=KVSpec(bits=4, granularity=per_head()))),
]
LEGACY_ONLY = ("first_last", "overrides", "kv_bits", "kv_granularity")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 16), nn.GELU(),
                         nn.Linear(16, 4))


def _layer_specs(cfg):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*found no attention keys")  # kv rows: an MLP has no attention
        qm = fxqat.prepare_qat(_model(), (torch.randn(2, 16),), cfg)
    return [(n.meta[QMETA].owner, n.meta[QMETA]) for n in qm.graph.nodes if QMETA in n.meta]


@pytest.mark.parametrize("short, roles", TABLE, ids=[str(i) for i in range(len(TABLE))])
def test_short_form_and_per_role_form_give_the_same_specs_per_layer(short, roles):
    a, b = QATConfig(**short), QATConfig(**roles)
    assert a == b
    legacy = {k: v for k, v in short.items() if k not in LEGACY_ONLY}
    for kind in ("weight", "act", "grad"):
        for args in [(), (6,), (6, "qil"), (None, None, False)]:
            if kind == "grad" and len(args) > 1:
                continue
            try:
                want = legacy_spec_for(legacy, kind, *args)
            except ValueError:
                with pytest.raises(ValueError):
                    a.spec_for(kind, *args)
                continue
            assert a.spec_for(kind, *args) == want, (kind, args)
    specs = _layer_specs(a)
    assert specs == _layer_specs(b) and len(specs) == (2 if a.first_last is None else 4)
    # the per-layer weight specs are legacy_spec_for's under the first/last policy and the override
    for idx, lq in specs:
        bits = a.first_last if idx in ("0", "5") else 2 if idx == "2" and a.overrides else None
        method = "qil" if idx == "2" and a.overrides else None
        assert lq.weights[0][1] == legacy_spec_for(legacy, "weight", bits, method), idx


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.integers(1, 8), st.sampled_from(["lsq", "qil", "dorefa", "pact", "lsq_plus", "dsq", "ewgs"]),
       st.sampled_from(["per_tensor", "per_channel", 16, 32]), st.none() | st.integers(2, 8),
       st.sampled_from(["per_tensor", "per_token"]))
def test_short_form_equals_per_role_form(bits, method, gran, a_bits, a_gran):
    """Property: for any bits/method/granularity the short form builds exactly the per-role config."""
    short = dict(w_bits=bits, w_method=method, a_bits=a_bits, a_granularity=a_gran)
    if isinstance(gran, int):
        short.update(w_granularity="per_group", group_size=gran)
        g = per_group(gran)
    else:
        short["w_granularity"] = gran
        g = per_tensor() if gran == "per_tensor" else per_channel()
    act = None if a_bits is None else QuantSpec(bits=a_bits, method="dynamic", granularity=per_token()) \
        if a_gran == "per_token" else QuantSpec(bits=a_bits)
    try:
        want = QATConfig(weight=QuantSpec(bits=bits, method=method, granularity=g), act=act)
    except ValueError:  # e.g. a method that has no per-group form
        with pytest.raises(ValueError):
            QATConfig(**short)
        return
    assert QATConfig(**short) == want
    assert QATConfig().with_(**short) == want
    assert QATConfig(**short).spec_for("weight") == legacy_spec_for(short, "weight")
    if a_bits is not None:
        assert QATConfig(**short).spec_for("act", signed=False) == legacy_spec_for(short, "act", signed=False)


@pytest.mark.parametrize("value, want", [
    ("per_tensor", ("per_tensor", None, None)), (per_tensor(), ("per_tensor", None, None)),
    ("per_channel", ("per_channel", None, None)), ("per_channel(axis=1)", ("per_channel", None, 1)),
    (per_channel(1), ("per_channel", None, 1)), ("per_group(32)", ("per_group", 32, None)),
    ("per_group(group_size=64)", ("per_group", 64, None)), (per_group(16), ("per_group", 16, None)),
    ("per_token", ("per_token", None, None)), (per_token(), ("per_token", None, None)),
])
def test_granularity_strings_and_objects_normalise(value, want):
    assert parse_granularity(value, "QuantSpec", "granularity") == want


def test_one_granularity_value_sets_the_spec():
    s = QuantSpec(bits=4, kind="weight", granularity=per_group(32))
    assert (s.granularity, s.group_size, s.per_channel, s.ch_axis) == ("per_group", 32, False, 0)
    assert s == QuantSpec(bits=4, kind="weight", granularity="per_group(32)")
    assert s == QuantSpec(bits=4, kind="weight", granularity="per_group", group_size=32)
    c = QuantSpec(bits=4, kind="weight", granularity=per_channel(axis=1))
    assert (c.granularity, c.per_channel, c.ch_axis) == ("per_channel", True, 1)
    with pytest.raises(ValueError, match=r"QuantSpec.granularity='per_grup'.*Did you mean 'per_group'"):
        QuantSpec(bits=4, granularity="per_grup")
    with pytest.raises(ValueError, match="give the group size once"):
        QuantSpec(bits=4, granularity=per_group(32), group_size=64)
    with pytest.raises(ValueError, match="per_group.group_size=0"):
        per_group(0)
    with pytest.raises(ValueError, match="KV cache only"):
        QuantSpec(bits=4, granularity=per_head())


def test_a_per_token_spec_names_its_method():
    with pytest.raises(ValueError, match="names its method; write method='dynamic'"):
        QATConfig(act=QuantSpec(bits=8, granularity=per_token()))
    with pytest.raises(ValueError, match="'lsq' does not support granularity='per_token'"):
        QATConfig(act=QuantSpec(bits=8, method="lsq", granularity=per_token()))
    with pytest.raises(ValueError, match="'pact' does not support granularity='per_token'"):
        QATConfig(a_bits=8, a_granularity="per_token", a_method="pact")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = QATConfig(a_bits=8, a_granularity="per_token")  # no method named: dynamic, no warning
    assert quiet.act.method == "dynamic"
    with pytest.warns(UserWarning, match=r"method 'qil' cannot quantize activations per token.*a_method='dynamic'") \
            as caught:
        loud = QATConfig(a_bits=8, a_granularity="per_token", method="qil")
    assert caught[0].filename == __file__  # points at the user's line
    assert (loud.weight.method, loud.act.method) == ("qil", "dynamic")
    assert PRESETS["8da4w"]["act"]["method"] == "dynamic"


def test_roles_bind_kind_and_refuse_what_another_field_owns():
    c = QATConfig(weight=QuantSpec(bits=3), act=QuantSpec(bits=5), grad=QuantSpec(bits=6))
    assert (c.weight.kind, c.weight.signed, c.act.kind, c.act.signed) == ("weight", True, "act", None)
    assert (c.grad.kind, c.grad.method, c.grad.signed) == ("grad", "grad", True)
    assert (c.w_bits, c.a_bits, c.g_bits, c.method) == (3, 5, 6, "lsq")
    with pytest.raises(ValueError, match=r"QATConfig.act=QuantSpec\(signed=False.*act_signed=False"):
        QATConfig(act=QuantSpec(bits=4, signed=False))
    with pytest.raises(ValueError, match=r"QATConfig.weight=QuantSpec\(kind='act'"):
        QATConfig(weight=QuantSpec(bits=4, kind="act"))
    with pytest.raises(TypeError, match="QATConfig.weight=None"):
        QATConfig(weight=None)
    with pytest.raises(TypeError, match="QATConfig.kv=4"):
        QATConfig(kv=4)
    with pytest.raises(ValueError, match="KVSpec.granularity='per_group'"):
        KVSpec(bits=4, granularity="per_group")


def test_short_form_edits_the_given_specs_and_with_keeps_them():
    c = QATConfig(weight=QuantSpec(bits=4, granularity=per_group(32)), a_bits=8)
    assert (c.weight.group_size, c.a_bits) == (32, 8)
    d = c.with_(w_bits=2)
    assert (d.weight.bits, d.weight.granularity, d.weight.group_size, d.act) == (2, "per_group", 32, c.act)
    assert replace(c, group_size=64).weight.group_size == 64
    assert c.with_(weight=QuantSpec(bits=3)).weight.granularity == "per_tensor"
    with pytest.warns(UserWarning, match="cannot quantize activations per token"):
        p = QATConfig.preset("8da4w", method="qil", w_options={})
    assert (p.weight.method, p.act.method) == ("qil", "dynamic")
    assert QATConfig.preset("int4_weight_only", a_bits=8).act == QATConfig(a_bits=8).act
    with pytest.raises(TypeError, match="no field 'w_bit'. Did you mean 'w_bits'"):
        QATConfig().with_(w_bit=2)
