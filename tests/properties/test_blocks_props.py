"""Properties of the block partition (fxqat.graph) on random residual / branching CNNs and MLPs.

Checked on every drawn model, for the structural and the flat grouping:

* the blocks partition the compute nodes (all but placeholders and ``output``) exactly once, in a topological order,
  and ``node.meta["fxqat.block"]`` agrees;
* one entry and one exit per block: a node reads only its own block, the previous block's exit (or the inputs for
  block 0) or a free node, and only the exit is read outside its block; every exit except a multi-output one is a
  true cut (removing it disconnects the inputs from the output, checked with plain reachability);
* no cut falls inside a branch-and-rejoin structure (residual, inception, dense concat, branch sum);
* ``suffix_module(i)(prefix_module(i)(x))`` reproduces ``gm(x)`` bit-exactly at every cut, sharing parameters;
* every block holds a quantized layer; ``max_blocks`` and ``boundaries`` are honoured;
* the dominator-based cut nodes equal the brute-force ones on random DAGs and on the traced models.
"""

from __future__ import annotations

import networkx as nx
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import REJOIN_CLASSES, any_model_st, cnn_st
from torch import fx

from fxqat.graph import (
    META_KEY,
    SINK,
    SOURCE,
    cut_nodes,
    default_is_quantized,
    free_nodes,
    node_stack,
    partition,
    prefix_module,
    suffix_module,
    to_networkx,
)

STRUCTURAL = pytest.mark.parametrize("structural", [True, False], ids=["structural", "flat"])


def _trace(model_x):
    model, x = model_x
    return fx.symbolic_trace(model), model, x


def _compute(gm):
    return [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]


def _brute_force_cuts(view: nx.DiGraph):
    cuts = []
    for node in view.nodes:
        if node in (SOURCE, SINK):
            continue
        reduced = view.copy()
        reduced.remove_node(node)
        if not nx.has_path(reduced, SOURCE, SINK):
            cuts.append(node)
    return set(cuts)


@STRUCTURAL
@given(model_x=any_model_st())
def test_blocks_partition_compute_nodes_once_in_topological_order(model_x, structural):
    gm, _, _ = _trace(model_x)
    blocks = partition(gm, structural=structural)
    compute = _compute(gm)
    flat = [name for b in blocks for name in b.nodes]
    assert sorted(flat) == sorted(n.name for n in compute)
    assert len(flat) == len(set(flat))
    assert [b.index for b in blocks] == list(range(len(blocks)))
    position = {name: i for i, name in enumerate(flat)}
    block_of = {name: b.index for b in blocks for name in b.nodes}
    for n in compute:
        assert n.meta[META_KEY] == block_of[n.name]
        for a in n.all_input_nodes:
            assert a.op == "placeholder" or position[a.name] < position[n.name], (a.name, n.name)
    assert len({b.name for b in blocks}) == len(blocks)


@STRUCTURAL
@given(model_x=any_model_st())
def test_every_block_has_one_entry_and_one_exit(model_x, structural):
    gm, _, _ = _trace(model_x)
    blocks = partition(gm, structural=structural)
    by_name = {n.name: n for n in gm.graph.nodes}
    free = free_nodes(to_networkx(gm))
    view = to_networkx(gm)
    placeholder = next(n.name for n in gm.graph.nodes if n.op == "placeholder")
    assert blocks[0].entry == placeholder
    for k, b in enumerate(blocks):
        assert b.entry == (placeholder if k == 0 else blocks[k - 1].exit)
        members = set(b.nodes)
        for name in b.nodes:
            node = by_name[name]
            for a in node.all_input_nodes:
                assert a.name in members or a.name == b.entry or a.name in free, (k, name, a.name)
            if name != b.exit and name not in free:
                assert all(u.name in members for u in node.users), (k, name, [u.name for u in node.users])
        if by_name[b.exit].op != "output":
            assert b.exit in members
            reduced = view.copy()
            reduced.remove_node(b.exit)
            assert not nx.has_path(reduced, SOURCE, SINK), f"exit {b.exit} of block {k} is not a cut"
    output = next(n for n in gm.graph.nodes if n.op == "output")
    assert blocks[-1].exit in {a.name for a in output.all_input_nodes} | {output.name}


@given(model_x=any_model_st())
def test_branches_that_rejoin_never_cross_a_cut(model_x):
    gm, model, _ = _trace(model_x)
    blocks = partition(gm)
    block_of = {name: b.index for b in blocks for name in b.nodes}
    rejoin_paths = [path for path, m in model.named_modules() if isinstance(m, REJOIN_CLASSES)]
    for path in rejoin_paths:
        inside = {block_of[n.name] for n in _compute(gm) if any(e.path == path for e in node_stack(n, gm))}
        assert len(inside) == 1, f"{path} is split across blocks {sorted(inside)}"


@STRUCTURAL
@given(model_x=any_model_st())
def test_prefix_then_suffix_reproduces_the_output_bit_exactly(model_x, structural):
    gm, model, x = _trace(model_x)
    blocks = partition(gm, structural=structural)
    params = {id(p) for p in gm.parameters()}
    with torch.no_grad():
        y = gm(x)
        for i, b in enumerate(blocks):
            prefix, suffix = prefix_module(gm, blocks, i), suffix_module(gm, blocks, i)
            h = prefix(x)
            assert torch.equal(suffix(h), y), f"cut {i} ({b.exit})"
            assert {id(p) for p in suffix.parameters()} <= params
            assert {id(p) for p in prefix.parameters()} <= params
            assert sum(1 for n in suffix.graph.nodes if n.op == "placeholder") == 1


@given(model_x=any_model_st())
def test_each_block_holds_a_quantized_layer(model_x):
    gm, _, _ = _trace(model_x)
    by_name = {n.name: n for n in gm.graph.nodes}
    for b in partition(gm):
        assert any(default_is_quantized(by_name[name]) for name in b.nodes), b


@given(model_x=any_model_st(), data=st.data())
def test_max_blocks_merges_down_to_the_limit(model_x, data):
    gm, _, x = _trace(model_x)
    full = partition(gm)
    limit = data.draw(st.integers(1, len(full) + 1), label="max_blocks")
    blocks = partition(gm, max_blocks=limit)
    assert len(blocks) == min(limit, len(full))
    assert [name for b in blocks for name in b.nodes] == [name for b in full for name in b.nodes]
    assert {b.exit for b in blocks} <= {b.exit for b in full}
    with torch.no_grad():
        assert torch.equal(suffix_module(gm, blocks, 0)(prefix_module(gm, blocks, 0)(x)), gm(x))


@given(model_x=cnn_st(), data=st.data())
def test_boundaries_end_blocks_and_bad_ones_are_named(model_x, data):
    gm, model, _ = _trace(model_x)
    finest = partition(gm, is_quantized=lambda n: True, structural=False)
    cuts = {b.exit for b in finest[:-1]}
    last_node = {}
    for n in _compute(gm):
        for e in node_stack(n, gm):
            last_node[e.path] = n.name
    valid = sorted(p for p, n in last_node.items() if n in cuts)
    invalid = sorted(p for p, n in last_node.items() if n not in cuts and n != finest[-1].exit)
    if valid:
        chosen = data.draw(st.lists(st.sampled_from(valid), min_size=1, max_size=3), label="boundaries")
        exits = {b.exit for b in partition(gm, boundaries=chosen)}
        assert {last_node[p] for p in chosen} <= exits
    if invalid:
        bad = data.draw(st.sampled_from(invalid), label="bad boundary")
        with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
            partition(gm, boundaries=[bad])
    with pytest.raises(ValueError, match="not a module"):
        partition(gm, boundaries=["no_such_module"])


@given(model_x=any_model_st())
def test_dominator_cuts_match_brute_force_on_models(model_x):
    gm, _, _ = _trace(model_x)
    view = to_networkx(gm)
    assert set(cut_nodes(view)) == _brute_force_cuts(view)


@st.composite
def dag_st(draw):
    """A random DAG over 2..14 nodes with a virtual source (to node 0.. some) and sink (from the last ones)."""
    n = draw(st.integers(2, 14))
    edges = [(i, j) for i in range(n) for j in range(i + 1, n) if draw(st.integers(0, 3)) == 0]
    edges += [(i, i + 1) for i in range(n - 1) if draw(st.booleans())]
    g = nx.DiGraph(edges)
    g.add_nodes_from(range(n))
    g.add_edge(SOURCE, 0)
    g.add_edges_from((SOURCE, i) for i in range(1, n) if draw(st.integers(0, 5)) == 0)
    g.add_edge(n - 1, SINK)
    g.add_edges_from((i, SINK) for i in range(n - 1) if draw(st.integers(0, 5)) == 0)
    if not nx.has_path(g, SOURCE, SINK):
        g.add_edges_from((i, i + 1) for i in range(n - 1))
    return g


@given(dag_st())
def test_cut_nodes_match_brute_force_on_random_dags(g):
    cuts = cut_nodes(g)
    assert set(cuts) == _brute_force_cuts(g)
    order = {n: i for i, n in enumerate(nx.topological_sort(g))}
    assert cuts == sorted(cuts, key=order.__getitem__)


@given(data=st.data())
def test_generated_models_satisfy_the_documented_invariants(data):
    state = torch.random.get_rng_state()
    model, x = data.draw(any_model_st(), label="model")
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert not model.training and x.shape[0] == 2
    gm = fx.symbolic_trace(model)
    ops = [n.op for n in gm.graph.nodes]
    assert ops.count("placeholder") == 1 and "get_attr" not in ops
    y = model(x)
    assert y.ndim == 2 and y.shape[0] == 2 and 1 <= y.shape[1] <= 4 and torch.isfinite(y).all()
    assert torch.equal(gm(x), y) and torch.equal(model(x), y)
    assert any(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            assert m.in_channels <= 8 and m.out_channels <= 8
        if isinstance(m, torch.nn.Linear):
            assert m.in_features <= 8 and m.out_features <= 8
    assert x.ndim == 2 or x.shape[-1] <= 8
    view = to_networkx(gm)
    assert not (set(view.nodes) - nx.ancestors(view, SINK) - {SINK})  # no dead code
