"""The graph page on a graph attributed on a tiny random GPT-2 with random skip transcoders and stored in a
workspace: the stored graph rebuilt from its tables prunes exactly as the graph that was attributed, the page shows
its scores, re-prunes when a threshold moves, caps what it sends, and shows a node's edges and head loadings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from streamlit.testing.v1 import AppTest

from workbench.app.graph_explorer import graph_figure, node_xy, stored_graph, subgraph
from workbench.circuits.attribution.graph import Graph, attribute
from workbench.circuits.attribution.pruning import graph_scores, prune
from workbench.circuits.attribution.store import read_graph, write_graph
from workbench.circuits.sae.base import SAEConfig, create_sae
from workbench.model import HookedModel
from workbench.workspace import Workspace

PAGE = Path(__file__).resolve().parents[1] / "app" / "views" / "graph.py"
D_MODEL, N_LAYERS, D_TRANSCODER, VOCAB = 16, 2, 24, 40
TOKENS = torch.tensor([1, 7, 3, 22, 9, 31, 5])


def _model() -> HookedModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=N_LAYERS, n_embd=D_MODEL, n_head=4, n_positions=16, vocab_size=VOCAB,
                                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    return HookedModel.from_hf(transformers.GPT2LMHeadModel(config).double().eval(), None, name="tiny-gpt2")


def _transcoders() -> dict:
    generator = torch.Generator().manual_seed(2)
    saes = {}
    for layer in range(N_LAYERS):
        sae = create_sae(SAEConfig("relu", d_in=D_MODEL, d_sae=D_TRANSCODER, skip=True,
                                   hook_in=f"blocks.{layer}.ln2.hook_normalized",
                                   hook_out=f"blocks.{layer}.hook_mlp_out"))  # fmt: skip
        with torch.no_grad():
            sae.b_enc.copy_(torch.randn(D_TRANSCODER, generator=generator) * 0.3)
            sae.W_skip.copy_(torch.randn(D_MODEL, D_MODEL, generator=generator) * 0.05)
        saes[layer] = sae.double().eval()
    return saes


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> tuple[Workspace, Graph, str]:
    workspace = Workspace(tmp_path_factory.mktemp("graph-ws"))
    graph = attribute(_model(), _transcoders(), TOKENS, targets=["logits", "diff:3,4"], batch_size=64)
    name = write_graph(workspace, graph, transcoders=["tc.L0", "tc.L1"], max_feature_nodes=7500)
    return workspace, graph, name


def _page(workspace: Workspace, monkeypatch) -> AppTest:
    monkeypatch.setenv("WORKBENCH_WORKSPACE", str(workspace.root))
    return AppTest.from_file(str(PAGE), default_timeout=120).run()


def test_the_stored_graph_prunes_as_the_attributed_graph(stored) -> None:
    workspace, graph, name = stored
    rebuilt = stored_graph(read_graph(workspace, graph.model, name))
    assert graph.n_targets > 1  # several logits and the diff: the weights are solved, not assumed
    weights = torch.tensor([t.weight for t in graph.targets], dtype=torch.float64)
    assert torch.allclose(rebuilt.target_weights, graph.target_weights, atol=1e-9)
    assert torch.allclose(rebuilt.adjacency, graph.adjacency.double())
    assert rebuilt.token_texts == graph.token_texts and rebuilt.n_layers == graph.n_layers
    assert float(weights.sum()) > 0
    for node_t, edge_t in ((0.8, 0.98), (0.5, 0.9), (1.0, 1.0)):
        want, got = prune(graph, node_t, edge_t), prune(rebuilt, node_t, edge_t)
        assert torch.equal(want.nodes, got.nodes) and torch.equal(want.edges, got.edges)
    assert graph_scores(rebuilt) == pytest.approx(graph.scores, abs=1e-9)


def test_subgraph_caps_what_the_browser_receives(stored) -> None:
    workspace, graph, name = stored
    frames = read_graph(workspace, graph.model, name)
    full = subgraph(graph, frames["attribution_nodes"], 1.0, 1.0)
    kept = prune(graph, 1.0, 1.0)
    assert (full.pruned_nodes, full.pruned_edges) == (int(kept.nodes.sum()), int(kept.edges.sum()))
    assert not full.capped and len(full.nodes) == full.pruned_nodes and len(full.edges) == full.pruned_edges
    capped = subgraph(graph, frames["attribution_nodes"], 1.0, 1.0, max_nodes=20, max_edges=30)
    assert capped.capped and len(capped.nodes) == 20 and len(capped.edges) <= 30
    assert {"token", "target"} <= set(capped.nodes["kind"])  # inputs and targets are always sent
    assert set(capped.edges["source"]) | set(capped.edges["target"]) <= set(capped.nodes["node"])
    strongest = full.edges[
        full.edges["source"].isin(capped.nodes["node"]) & full.edges["target"].isin(capped.nodes["node"])
    ]
    assert capped.edges["weight"].abs().min() >= strongest["weight"].abs().nlargest(30).min()  # fmt: skip


def test_the_layout_puts_inputs_below_and_targets_above(stored) -> None:
    workspace, graph, name = stored
    frames = read_graph(workspace, graph.model, name)
    shown = subgraph(graph, frames["attribution_nodes"], 0.8, 0.98)
    xy = node_xy(shown.nodes, graph.n_layers)
    kinds = shown.nodes["kind"]
    assert (xy["y"][kinds == "token"] == -1).all() and (xy["y"][kinds == "target"] == graph.n_layers).all()
    inner = kinds.isin(["feature", "error"])
    assert (xy["y"][inner] == shown.nodes["layer"][inner]).all()
    assert (np.abs(xy["x"] - shown.nodes["position"]) <= 0.4 + 1e-9).all()
    figure = graph_figure(shown, graph.token_texts, graph.n_layers)
    assert {trace.type for trace in figure.data} == {"scattergl"}
    markers = {trace.name: trace for trace in figure.data if trace.mode == "markers"}
    assert markers["error"].marker.symbol != markers["feature"].marker.symbol
    assert sum(len(t.x) for t in markers.values()) == len(shown.nodes)
    assert list(figure.layout.xaxis.ticktext) == graph.token_texts


def test_the_page_shows_scores_reprunes_and_lists_head_loadings(stored, monkeypatch) -> None:
    workspace, graph, name = stored
    app = _page(workspace, monkeypatch)
    assert not app.exception, app.exception
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["replacement score"] == f"{graph.scores['replacement_score']:.3f}"
    assert metrics["completeness score"] == f"{graph.scores['completeness_score']:.3f}"
    kept = prune(graph, 0.8, 0.98)
    counts = f"pruned: **{int(kept.nodes.sum())}** nodes, **{int(kept.edges.sum())}** edges"
    assert any(m.value.startswith(counts) for m in app.markdown)
    app.slider(key="node_t").set_value(0.3).run()
    app.slider(key="edge_t").set_value(0.5).run()
    assert not app.exception, app.exception
    fewer = prune(graph, 0.3, 0.5)
    assert int(fewer.nodes.sum()) < int(kept.nodes.sum())
    counts = f"pruned: **{int(fewer.nodes.sum())}** nodes, **{int(fewer.edges.sum())}** edges"
    assert any(m.value.startswith(counts) for m in app.markdown)
    nodes = graph.nodes()
    heads = graph.head_loadings
    assert heads is not None and not heads.empty
    # a kept node with an incoming cross-position edge carried by heads
    kept_now = set(torch.nonzero(fewer.nodes).flatten().tolist())
    crossing = heads[heads["target"].isin(kept_now)]
    node = int(crossing.iloc[0]["target"])
    app.selectbox(key="graph_node").set_value(node).run()
    assert not app.exception, app.exception
    loads = next(frame.value for frame in app.dataframe if "head" in frame.value)
    position = nodes["position"]
    into = graph.edges().query("target == @node")
    into = into[into["source"].map(position) != position[node]]
    top = into.reindex(into["weight"].abs().sort_values(ascending=False).index).head(10)["source"]
    want = crossing[(crossing["target"] == node) & crossing["source"].isin(top)]
    assert len(loads) == len(want) > 0
    assert sorted(zip(loads["source"], loads["layer"], loads["head"], strict=True)) == sorted(
        zip(want["source"], want["layer"], want["head"], strict=True)
    )
    assert np.allclose(np.sort(loads["weight"].to_numpy()), np.sort(want["weight"].to_numpy()))
    incoming = [
        frame.value
        for frame in app.dataframe
        if list(frame.value.columns) == ["node", "label", "position", "weight"]
    ]
    strongest = graph.edges().query("target == @node")["weight"].abs().max()
    assert incoming[0]["weight"].abs().max() == pytest.approx(strongest)  # fmt: skip
    assert str(nodes.loc[node, "label"]) in app.selectbox(key="graph_node").format_func(node)


def test_the_page_without_graphs_names_the_command(tmp_path, monkeypatch) -> None:
    import pandas as pd

    workspace = Workspace(tmp_path)
    workspace.results().write("unrelated", pd.DataFrame({"x": [1]}))
    app = _page(workspace, monkeypatch)
    assert not app.exception and "workbench circuits attribute" in app.info[0].value
