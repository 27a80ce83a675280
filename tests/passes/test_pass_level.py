"""Pass-level tests in the style of torch.fx's own: a hand-built input graph, the expected graph after each pass.

The input is ``torch.fx.symbolic_trace`` of a 3-layer MLP that calls one ``nn.ReLU`` twice. ``prepare_qat``
(fxqat/api.py) chains: trace -> ``normalize`` -> ``propagate_shapes`` -> ``annotate`` -> (``mark_cuts`` with a
HybridConfig) -> ``insert_quant`` -> (``build_hybrid``). After each pass the whole graph is compared, node by node
(op, target, argument names), with the meta keys fxqat relies on, and ``graph.lint()`` must pass. The chained result
is the graph ``prepare_qat`` builds (same generated code).
"""

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxqat
from fxqat.capture.shapes import propagate_shapes
from fxqat.passes.annotate import QMETA, LayerQuant, annotate
from fxqat.passes.build_hybrid import CUT, HybridGraphModule, build_hybrid, mark_cuts
from fxqat.passes.insert_quant import CONTAINER, QROLE, insert_quant
from fxqat.passes.normalize import normalize
from fxqat.quantizers.lsq import LSQQuantizer

BLOCK = "fxqat.block"


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.act = nn.ReLU()  # one module, two call sites

    def forward(self, x):
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


X = torch.randn(2, 4)


def nodes(graph):
    """``(op, target, arg names)`` of every node, in order; call_function targets by name."""
    out = []
    for n in graph.nodes:
        target = n.target.__name__ if callable(n.target) else str(n.target)
        args = tuple(a.name if isinstance(a, fx.Node) else a for a in n.args)
        out.append((n.op, target, args))
    return out


def metas(graph, *keys):
    """node name -> the given meta keys it carries."""
    return {n.name: tuple(k for k in keys if k in n.meta) for n in graph.nodes}


def checked(gm):
    gm.graph.lint()  # raises on a malformed graph (dangling users, bad targets, wrong order)
    for n in gm.graph.nodes:  # every call_module / get_attr target resolves in the module tree
        if n.op == "call_module":
            gm.get_submodule(n.target)
        elif n.op == "get_attr":
            gm.get_parameter(n.target)
    return gm


INPUT = [
    ("placeholder", "x", ()),
    ("call_module", "fc1", ("x",)),
    ("call_module", "act", ("fc1",)),
    ("call_module", "fc2", ("act",)),
    ("call_module", "act", ("fc2",)),
    ("call_module", "fc3", ("act_1",)),
    ("output", "output", ("fc3",)),
]
# normalize: the second call site of the stateless ReLU gets its own copy, act_1
NORMALIZED = [INPUT[0], INPUT[1], INPUT[2], INPUT[3], ("call_module", "act_1", ("fc2",)), INPUT[5], INPUT[6]]


@pytest.fixture
def traced():
    torch.manual_seed(0)
    return checked(fx.symbolic_trace(MLP()))


def test_input_graph(traced):
    assert nodes(traced.graph) == INPUT


def test_normalize(traced):
    gm = checked(normalize(traced))
    assert nodes(gm.graph) == NORMALIZED
    assert gm.act is not gm.act_1 and isinstance(gm.act_1, nn.ReLU)
    torch.testing.assert_close(gm(X), MLP.forward(gm, X), rtol=0, atol=0)


def test_normalize_keeps_shared_weights_shared():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))

    gm = checked(normalize(fx.symbolic_trace(Tied())))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["fc", "fc"]  # one Linear, two calls


def test_propagate_shapes(traced):
    gm = normalize(traced)
    propagate_shapes(gm, (X,), "MLP")
    checked(gm)
    assert nodes(gm.graph) == NORMALIZED  # metadata only
    shapes = {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes}
    assert shapes == {"x": (2, 4), "fc1": (2, 8), "act": (2, 8), "fc2": (2, 8), "act_1": (2, 8), "fc3": (2, 3),
                      "output": (2, 3)}


def test_propagate_shapes_leaves_the_module_as_it_was():
    """Shape propagation runs on fake parameters; what a module stores while running is put back afterwards."""

    class Caching(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.tag = nn.Linear(4, 3), "kept"

        def forward(self, x):
            y = self.fc(x)
            self.last, self.tag = y, "changed"  # attributes set in forward (as some caching modules do)
            return y

    model = Caching()
    leafy = fxqat.trace(nn.Sequential(model), leaf_modules=(Caching,))
    before = {k: v for k, v in vars(model).items()}
    weight = model.fc.weight
    propagate_shapes(leafy, (X,), "Sequential")
    assert [tuple(n.meta["tensor_meta"].shape) for n in leafy.graph.nodes if n.op == "call_module"] == [(2, 3)]
    assert vars(model).keys() == before.keys() and all(vars(model)[k] is v for k, v in before.items())
    assert model.fc.weight is weight and type(model.fc.weight) is nn.Parameter


def _annotated(traced, config):
    gm = normalize(traced)
    propagate_shapes(gm, (X,), "MLP")
    return checked(annotate(gm, config))


def test_annotate(traced):
    cfg = fxqat.QATConfig(w_bits=4, a_bits=4)  # first/last layer at 8 bits
    gm = _annotated(traced, cfg)
    assert nodes(gm.graph) == NORMALIZED  # annotate writes metadata only
    assert [n.name for n in gm.graph.nodes if QMETA in n.meta] == ["fc1", "fc2", "fc3"]
    lq = {n.name: n.meta[QMETA] for n in gm.graph.nodes if QMETA in n.meta}
    for name, bits, act_signed, first_last in [("fc1", 8, None, True), ("fc2", 4, False, False),
                                               ("fc3", 8, False, True)]:
        q = lq[name]
        assert isinstance(q, LayerQuant) and (q.style, q.owner, q.first_last) == ("module", name, first_last)
        (where, wspec), = q.weights
        assert where == "weight" and (wspec.bits, wspec.method, wspec.kind, wspec.signed) == (bits, "lsq", "weight",
                                                                                            True)
        # fc1 reads the model input (sign decided from the first batch); fc2 and fc3 read ReLU outputs (unsigned)
        assert (q.act.bits, q.act.kind, q.act.signed) == (bits, "act", act_signed)


def test_annotate_weight_only_and_skip(traced):
    cfg = fxqat.QATConfig(w_bits=4, a_bits=None, first_last=None, overrides=(fxqat.Override("fc2", skip=True),))
    gm = _annotated(traced, cfg)
    assert metas(gm.graph, QMETA) == {"x": (), "fc1": (), "act": (), "fc2": (), "act_1": (), "fc3": (), "output": ()}
    cfg = fxqat.QATConfig(w_bits=4, a_bits=None, first_last_layers=())
    gm = _annotated(fx.symbolic_trace(MLP()), cfg)
    assert all(n.meta[QMETA].act is None for n in gm.graph.nodes if QMETA in n.meta)
    assert [n.name for n in gm.graph.nodes if QMETA in n.meta] == ["fc1", "fc2", "fc3"]


INSERTED = [
    ("placeholder", "x", ()),
    ("call_module", f"{CONTAINER}.a_x", ("x",)),
    ("get_attr", "fc1.weight", ()),
    ("call_module", f"{CONTAINER}.w_fc1", ("fc1_weight",)),
    ("get_attr", "fc1.bias", ()),
    ("call_function", "linear", ("fxqat_quant_a_x", "fxqat_quant_w_fc1", "fc1_bias")),
    ("call_module", "act", ("linear",)),
    ("call_module", f"{CONTAINER}.a_act", ("act",)),
    ("get_attr", "fc2.weight", ()),
    ("call_module", f"{CONTAINER}.w_fc2", ("fc2_weight",)),
    ("get_attr", "fc2.bias", ()),
    ("call_function", "linear", ("fxqat_quant_a_act", "fxqat_quant_w_fc2", "fc2_bias")),
    ("call_module", "act_1", ("linear_1",)),
    ("call_module", f"{CONTAINER}.a_act_1", ("act_1",)),
    ("get_attr", "fc3.weight", ()),
    ("call_module", f"{CONTAINER}.w_fc3", ("fc3_weight",)),
    ("get_attr", "fc3.bias", ()),
    ("call_function", "linear", ("fxqat_quant_a_act_1", "fxqat_quant_w_fc3", "fc3_bias")),
    ("output", "output", ("linear_2",)),
]


def test_insert_quant(traced):
    cfg = fxqat.QATConfig(w_bits=4, a_bits=4)
    gm = checked(insert_quant(_annotated(traced, cfg), cfg))
    assert nodes(gm.graph) == INSERTED
    roles = {n.name: n.meta[QROLE] for n in gm.graph.nodes if QROLE in n.meta}
    assert roles == {"fxqat_quant_a_x": "act", "fxqat_quant_w_fc1": "weight", "fxqat_quant_a_act": "act",
                     "fxqat_quant_w_fc2": "weight", "fxqat_quant_a_act_1": "act", "fxqat_quant_w_fc3": "weight"}
    # the functional layers keep the module's decision and shapes, and name the module they came from
    linears = [n for n in gm.graph.nodes if n.target is F.linear]
    assert [n.meta["fxqat.module"] for n in linears] == ["fc1", "fc2", "fc3"]
    assert all(QMETA in n.meta and "tensor_meta" in n.meta for n in linears)
    qs = dict(getattr(gm, CONTAINER).named_children())
    assert sorted(qs) == ["a_act", "a_act_1", "a_x", "w_fc1", "w_fc2", "w_fc3"]
    assert all(isinstance(q, LSQQuantizer) for q in qs.values())
    assert [(qs[k].bits, qs[k].kind) for k in ("w_fc1", "w_fc2", "w_fc3", "a_x", "a_act", "a_act_1")] == [
        (8, "weight"), (4, "weight"), (8, "weight"), (8, "act"), (4, "act"), (8, "act")]
    assert qs["w_fc2"].weight_target == "fc2.weight" and qs["a_act"].weight_target is None
    assert gm.fc2.weight is dict(gm.named_parameters())["fc2.weight"]  # the weight stays the module's parameter
    with torch.no_grad():
        fxqat.set_quantization(gm.eval(), False)
        torch.testing.assert_close(gm(X), MLP.forward(gm, X), rtol=0, atol=0)  # quantizers off: the FP model


def test_insert_quant_gradient_quantizers(traced):
    cfg = fxqat.QATConfig(w_bits=4, a_bits=4, g_bits=4)
    gm = checked(insert_quant(_annotated(traced, cfg), cfg))
    got = nodes(gm.graph)
    # after each functional layer, an identity-forward gradient quantizer that every former user now reads
    for i, (lin, mod) in enumerate([("linear", "fc1"), ("linear_1", "fc2"), ("linear_2", "fc3")]):
        k = [j for j, n in enumerate(got) if n[0] == "call_function" and n[1] == "linear"][i]
        assert got[k + 1] == ("call_module", f"{CONTAINER}.g_{mod}", (lin,))
    assert ("call_module", "act", ("fxqat_quant_g_fc1",)) in got
    assert got[-1] == ("output", "output", ("fxqat_quant_g_fc3",))
    assert {n.meta[QROLE] for n in gm.graph.nodes if QROLE in n.meta} == {"act", "weight", "grad"}
    assert len(got) == len(INSERTED) + 3


def test_mark_cuts_and_build_hybrid(traced):
    cfg = fxqat.QATConfig(w_bits=4, a_bits=4, hybrid=fxqat.HybridConfig())
    gm = _annotated(traced, cfg)
    fp_graph = mark_cuts(gm, cfg)
    checked(gm)
    fp_graph.lint()
    # blocks end after each ReLU: [fc1, act], [fc2, act_1], [fc3]; the FP copy is the annotated graph as it was
    assert nodes(gm.graph) == NORMALIZED and nodes(fp_graph) == NORMALIZED
    assert {n.name: n.meta[CUT] for n in gm.graph.nodes if CUT in n.meta} == {"act": 0, "act_1": 1}
    assert {n.name: n.meta[BLOCK] for n in gm.graph.nodes if BLOCK in n.meta} == {
        "fc1": 0, "act": 0, "fc2": 1, "act_1": 1, "fc3": 2}
    insert_quant(gm, cfg)
    checked(gm)
    assert nodes(gm.graph) == INSERTED
    # activation quantizers belong to the block of the layer that reads them
    assert {n.name: n.meta[BLOCK] for n in gm.graph.nodes if n.meta.get(QROLE) == "act"} == {
        "fxqat_quant_a_x": 0, "fxqat_quant_a_act": 1, "fxqat_quant_a_act_1": 2}
    hm = checked(build_hybrid(gm, fp_graph, cfg.hybrid))
    assert isinstance(hm, HybridGraphModule) and (hm.n_blocks, hm.n_paths) == (3, 2)
    assert nodes(hm.graph) == INSERTED  # the LP graph is the quantized graph
    views = {k: nodes(v.graph) for k, v in hm._views.items()}
    for v in hm._views.values():
        v.graph.lint()
    assert views["fp"] == NORMALIZED
    assert views["fp_suffix0"] == [("placeholder", "act", ()), ("call_module", "fc2", ("act",)),
                                   ("call_module", "act_1", ("fc2",)), ("call_module", "fc3", ("act_1",)),
                                   ("output", "output", ("fc3",))]
    assert views["fp_suffix1"] == [("placeholder", "act_1", ()), ("call_module", "fc3", ("act_1",)),
                                   ("output", "output", ("fc3",))]
    assert views["lp_block1"] == [("placeholder", "act", ())] + INSERTED[7:13] + [("output", "output", ("act_1",))]
    assert views["lp_cuts"][:-1] == INSERTED[:-1]  # the backbone, returning ...
    out = next(n for n in hm._views["lp_cuts"].graph.nodes if n.op == "output")
    assert [a.name for a in out.args[0]] == ["linear_2", "act", "act_1"]  # LP output, then the cut activations


@pytest.mark.parametrize("hybrid", [None, fxqat.HybridConfig()], ids=["plain", "hybrid"])
def test_chain_is_prepare_qat(hybrid):
    torch.manual_seed(0)
    model = MLP()
    cfg = fxqat.QATConfig(w_bits=4, a_bits=4, hybrid=hybrid)
    qm = fxqat.prepare_qat(model, (X,), cfg)
    gm = normalize(fx.symbolic_trace(model))
    propagate_shapes(gm, (X,), "MLP")
    annotate(gm, cfg)
    fp_graph = mark_cuts(gm, cfg) if hybrid else None
    insert_quant(gm, cfg)
    if hybrid:
        gm = build_hybrid(gm, fp_graph, hybrid)
    assert type(qm).__mro__[1:] == type(gm).__mro__[1:]
    assert qm.code == gm.code
    assert nodes(qm.graph) == nodes(gm.graph) == INSERTED
    assert sorted(fxqat.named_quantizers(qm)) == sorted(f"{CONTAINER}.{k}" for k in
                                                  ("a_x", "a_act", "a_act_1", "w_fc1", "w_fc2", "w_fc3"))
