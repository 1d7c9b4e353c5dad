"""The graph page on a graph traced on the zoo's code-tiny with random TopK transcoders saved in a workspace
(``trace_prompt``: the library's ``attribute``, stored): the sparse server-side pruning equals the library's dense
``prune``; the cap, the layout, the pinned paths, the suggested supernodes, the annotations round trip, the export
qParams and the graph's linear prediction are checked against independent references; the page (AppTest) shows the
scores, re-prunes, opens a node's panel with the decoder's logits, pins two nodes and shows their subgraph, restores
the pins when reopened, and shows intervention logits equal to the prompt lab's API on the same intervention; stale
or broken graphs give a message, never an exception."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from streamlit.testing.v1 import AppTest

from workbench.analyses.prompt_lab.analysis import compare_next_token, load_lab_model
from workbench.analysis import write_tables
from workbench.app.graph_explorer import (
    Annotations,
    circuit_tracer_id,
    column_centres,
    dense_graph,
    export_view,
    graph_figure,
    linear_prediction,
    load_stored_graph,
    node_xy,
    open_graph_parts,
    paths_between,
    prune_sparse,
    read_annotations,
    subgraph,
    suggest_supernodes,
    trace_prompt,
    write_annotations,
)
from workbench.circuits.attribution.pruning import prune
from workbench.circuits.attribution.store import ANALYSIS as GRAPHS
from workbench.circuits.sae.base import SAEConfig, create_sae
from workbench.circuits.sae.evals import sae_dir
from workbench.interventions import Intervention
from workbench.workspace import Workspace

PAGE = Path(__file__).resolve().parents[2] / "app" / "views" / "graph.py"
PROMPT = "def f(x):\n    return x"
D_MODEL, D_SAE = 64, 32


def save_random_transcoders(workspace: Workspace, prefix: str = "gv") -> list[str]:
    """TopK transcoders on code-tiny's two MLPs (random weights, large enough decoders to matter), saved under the
    workspace's saes/ → their ids."""
    generator = torch.Generator().manual_seed(0)
    ids = []
    for layer in (0, 1):
        sae = create_sae(SAEConfig("topk", d_in=D_MODEL, d_sae=D_SAE, k=4, hook_in=f"blocks.{layer}.hook_resid_pre",
                                   hook_out=f"blocks.{layer}.hook_mlp_out"))  # fmt: skip
        with torch.no_grad():
            sae.W_dec.copy_(torch.randn(D_SAE, D_MODEL, generator=generator) * 0.2)
        sae.save(sae_dir(workspace, f"{prefix}.L{layer}"))
        ids.append(f"{prefix}.L{layer}")
    return ids


def workspace_with_code_tiny(root: Path, zoo_workspace) -> Workspace:
    workspace = Workspace(root).ensure()
    (workspace.root / "models").mkdir(exist_ok=True)
    os.symlink(zoo_workspace.model_dir("code-tiny"), workspace.root / "models" / "code-tiny")
    return workspace


@pytest.fixture(scope="module")
def traced(tmp_path_factory, zoo_workspace) -> tuple[Workspace, str, str]:
    workspace = workspace_with_code_tiny(tmp_path_factory.mktemp("graph-ws"), zoo_workspace)
    ids = save_random_transcoders(workspace)
    phases: list[str] = []
    model, graph = trace_prompt(workspace, "code-tiny", ids, PROMPT, step=phases.append)
    assert phases[0] == "loading code-tiny" and phases[-1].startswith("storing")
    return workspace, model, graph


def _page(workspace: Workspace, monkeypatch) -> AppTest:
    monkeypatch.setenv("WORKBENCH_WORKSPACE", str(workspace.root))
    return AppTest.from_file(str(PAGE), default_timeout=180).run()


def _edge_matrix(graph, kept) -> np.ndarray:
    dense = np.zeros((graph.n_nodes, graph.n_nodes), dtype=bool)
    rows = np.repeat(np.arange(graph.n_nodes), np.diff(graph.adjacency.indptr))
    dense[rows[kept.edges], graph.adjacency.indices[kept.edges]] = True
    return dense


def test_sparse_pruning_equals_the_library_prune(traced) -> None:
    workspace, model, name = traced
    stored = load_stored_graph(workspace, model, name)
    dense = dense_graph(stored)
    assert stored.n_features > 10 and stored.count("target") > 1  # several logits: the weights are solved
    hooked = load_lab_model("code-tiny", workspace=workspace)
    tokens = torch.tensor(json.loads(stored.summary["tokens"]))
    with torch.no_grad():
        probs = hooked(tokens[None])[0, -1].double().softmax(-1)
    targets = stored.nodes[stored.nodes["kind"] == "target"]
    want = probs[torch.tensor(targets["feature"].to_numpy())].numpy()
    assert np.allclose(
        stored.target_weights[targets["node"]], want / want.sum(), atol=1e-6
    )  # logit probabilities
    for node_t, edge_t in ((0.8, 0.98), (0.5, 0.9), (1.0, 1.0), (0.3, 0.5), (0.05, 0.05)):
        expected, got = prune(dense, node_t, edge_t), prune_sparse(stored, node_t, edge_t)
        assert np.array_equal(expected.nodes.numpy(), got.nodes)
        assert np.array_equal(expected.edges.numpy(), _edge_matrix(stored, got))


def test_subgraph_caps_what_the_browser_receives(traced) -> None:
    workspace, model, name = traced
    stored = load_stored_graph(workspace, model, name)
    full = subgraph(stored, 1.0, 1.0)
    kept = prune(dense_graph(stored), 1.0, 1.0)
    assert (full.pruned_nodes, full.pruned_edges) == (int(kept.nodes.sum()), int(kept.edges.sum()))
    assert not full.capped and len(full.nodes) == full.pruned_nodes and len(full.edges) == full.pruned_edges
    capped = subgraph(stored, 1.0, 1.0, max_nodes=25, max_edges=30)
    assert capped.capped and len(capped.nodes) == 25 and len(capped.edges) <= 30
    assert {"token", "target"} <= set(capped.nodes["kind"])  # inputs and targets are always sent
    assert set(capped.edges["source"]) | set(capped.edges["target"]) <= set(capped.nodes["node"])
    inside = full.edges[
        full.edges["source"].isin(capped.nodes["node"]) & full.edges["target"].isin(capped.nodes["node"])
    ]
    assert capped.edges["weight"].abs().min() >= inside["weight"].abs().nlargest(30).min()


def test_the_layout_puts_inputs_below_and_targets_above(traced) -> None:
    workspace, model, name = traced
    stored = load_stored_graph(workspace, model, name)
    shown = subgraph(stored, 0.8, 0.98)
    n_pos = len(stored.token_texts)
    xy = node_xy(shown.nodes, stored.n_layers, n_pos)
    kinds = shown.nodes["kind"]
    assert (xy["y"][kinds == "token"] == -1).all() and (xy["y"][kinds == "target"] == stored.n_layers).all()
    inner = kinds.isin(["feature", "error"])
    assert (xy["y"][inner] == shown.nodes["layer"][inner]).all()
    # columns: in prompt order, each as wide as its most crowded cell; every node inside its column, none shared
    centres, widths = column_centres(shown.nodes, stored.n_layers, n_pos)
    most = shown.nodes.assign(y=xy["y"]).groupby(["y", "position"]).size().groupby(level="position").max()
    assert np.allclose(widths[most.index], np.maximum(most, 1)) and np.allclose(
        np.diff(centres), (widths[1:] + widths[:-1]) / 2
    )
    position = shown.nodes["position"].to_numpy()
    assert (np.abs(xy["x"] - centres[position]) <= 0.45 * widths[position] + 1e-9).all()
    assert not xy.duplicated().any()
    pinned = shown.nodes["node"].iloc[:2].tolist()
    figure = graph_figure(shown, stored.token_texts, stored.n_layers, pinned)
    assert {trace.type for trace in figure.data} == {"scattergl"}
    markers = {trace.name: trace for trace in figure.data if trace.mode == "markers"}
    assert markers["error"].marker.symbol != markers["feature"].marker.symbol
    assert sum(len(t.x) for n, t in markers.items() if n != "pinned") == len(shown.nodes)
    assert list(markers["pinned"].customdata) == pinned
    assert list(figure.layout.xaxis.ticktext) == [t.replace("\n", "↵") for t in stored.token_texts]


def test_paths_between_pins_and_suggested_supernodes_on_planted_graphs() -> None:
    edges = pd.DataFrame({"source": [0, 1, 2, 0, 5, 4], "target": [1, 2, 3, 4, 3, 6], "weight": 1.0})
    assert paths_between(edges, [0, 3]) == {0, 1, 2, 3}  # 0→1→2→3; 0→4 leads to 6, not to 3; 5 only feeds 3
    assert paths_between(edges, [3, 0]) == {0, 1, 2, 3}
    assert paths_between(edges, [4, 5]) == {4, 5}
    # features 0, 1 (layers 0, 1): same direction, same inputs and outputs; 2: same direction, other neighbours;
    # 3: same neighbours as 0 but an orthogonal direction; 4: like 0 but three layers up
    n = 9
    adjacency = sp.lil_matrix((n, n))
    for f in (0, 1, 3, 4):
        adjacency[f, 5], adjacency[7, f] = 1.0, 2.0
    adjacency[2, 6], adjacency[8, 2] = 1.0, 1.0
    features = pd.DataFrame({"node": [0, 1, 2, 3, 4], "layer": [0, 1, 1, 0, 3]})
    directions = np.array([[1.0, 0.1], [0.9, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    groups = suggest_supernodes(features, directions, adjacency.tocsr(), layer_span=1)
    assert groups == [[0, 1]]
    assert suggest_supernodes(features, directions, adjacency.tocsr(), layer_span=3) == [[0, 1, 4]]


def test_the_linear_prediction_is_the_closed_form_of_the_graph(traced) -> None:
    workspace, model, name = traced
    stored = load_stored_graph(workspace, model, name)
    nodes = stored.nodes
    features = nodes.index[nodes["kind"] == "feature"].to_numpy()
    changed = features[:3]
    delta = np.zeros(stored.n_nodes)
    delta[changed] = -nodes["activation"].to_numpy()[changed]  # ablate three features
    adjacency = stored.adjacency.toarray()
    per_unit = np.zeros(stored.n_nodes)
    per_unit[features] = 1.0 / nodes["activation"].to_numpy()[features]
    effect = adjacency * per_unit[None, :]
    free = np.zeros(stored.n_nodes, dtype=bool)
    free[features] = True
    free[changed] = False
    # x = delta + D_free (E x)  →  (I − D_free E) x = delta ; prediction = E x
    x = np.linalg.solve(np.eye(stored.n_nodes) - free[:, None] * effect, delta)
    assert np.allclose(linear_prediction(stored, delta), effect @ x, atol=1e-10)


def test_annotations_round_trip_and_export_with_qparams(traced) -> None:
    workspace, model, name = traced
    stored = load_stored_graph(workspace, model, name)
    shown = subgraph(stored, 0.8, 0.98)
    feats = shown.nodes[shown.nodes["kind"] == "feature"]["node"].tolist()[:3]
    assert len(feats) >= 2
    notes = Annotations(pins=feats, groups={"pair": feats[:2]}, notes={feats[0]: "fires on x"},
                        view={"node_threshold": 0.8, "edge_threshold": 0.98})  # fmt: skip
    assert write_annotations(workspace, stored, notes) == 1 + len(feats) + 2 + 1
    assert read_annotations(workspace, stored) == notes
    write_annotations(workspace, stored, Annotations(view=notes.view))  # clearing every pin clears them
    assert read_annotations(workspace, stored) == Annotations(view=notes.view)
    exported = export_view(stored, 0.8, 0.98, notes)
    dense = dense_graph(stored)
    kept = prune(dense, 0.8, 0.98).nodes.numpy()
    assert {n["node_id"] for n in exported["nodes"]} == {
        circuit_tracer_id(row, stored.n_layers) for row in stored.nodes[kept].itertuples()
    }  # fmt: skip
    ids = [circuit_tracer_id(stored.nodes.iloc[f], stored.n_layers) for f in feats]
    assert exported["qParams"]["pinnedIds"][: len(ids)] == ids
    assert exported["qParams"]["supernodes"] == [["pair", *ids[:2]]]
    assert len(exported["links"]) == int(prune(dense, 0.8, 0.98).edges.sum())


def test_the_page_reprunes_opens_a_node_pins_and_intervenes_as_the_api(traced, monkeypatch) -> None:
    workspace, model, name = traced
    stored = load_stored_graph(workspace, model, name)
    write_annotations(workspace, stored, Annotations())
    app = _page(workspace, monkeypatch)
    assert not app.exception, app.exception
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["replacement score"] == f"{stored.summary['replacement_score']:.3f}"
    kept = prune_sparse(stored, 0.8, 0.98)
    counts = f"pruned: **{int(kept.nodes.sum())}** nodes, **{int(kept.edges.sum())}** edges"
    assert any(m.value.startswith(counts) for m in app.markdown)
    app.slider(key="node_t").set_value(0.3).run()
    app.slider(key="edge_t").set_value(0.5).run()
    fewer = prune_sparse(stored, 0.3, 0.5)
    assert int(fewer.nodes.sum()) < int(kept.nodes.sum())
    assert any(m.value.startswith(f"pruned: **{int(fewer.nodes.sum())}** nodes") for m in app.markdown)
    app.slider(key="node_t").set_value(0.8).run()
    app.slider(key="edge_t").set_value(0.98).run()
    # a feature's panel: the top logits through its decoder
    shown = subgraph(stored, 0.8, 0.98).nodes
    feats = shown[shown["kind"] == "feature"].sort_values("influence", ascending=False)
    first, second = int(feats.iloc[0]["node"]), int(feats.iloc[1]["node"])
    app.selectbox(key="graph_node").set_value(first).run()
    assert not app.exception, app.exception
    layer, feature = int(feats.iloc[0]["layer"]), int(feats.iloc[0]["feature"])
    opened = open_graph_parts(workspace, stored)
    sae = opened.transcoders[layer][1]
    hooked = opened.model
    effects = (
        sae.W_dec[feature].detach().float() @ hooked.model.get_output_embeddings().weight.detach().float().T
    )
    logits = next(f.value for f in app.dataframe if list(f.value.columns) == ["direction", "token", "effect"])
    assert np.allclose(logits["effect"].iloc[:10], effects.topk(10).values.numpy(), atol=1e-5)
    # pin two, see their subgraph, reopen: the pins come back
    app.button(key="pin_button").click().run()
    app.selectbox(key="graph_node").set_value(second).run()
    app.button(key="pin_button").click().run()
    assert not app.exception, app.exception
    assert read_annotations(workspace, stored).pins == [first, second]
    on_path = paths_between(subgraph(stored, 0.8, 0.98).edges, [first, second])
    assert any(m.value.startswith(f"pinned subgraph: **{len(on_path)}** nodes") for m in app.markdown)
    reopened = _page(workspace, monkeypatch)
    assert not reopened.exception and any(m.value.startswith("pinned subgraph") for m in reopened.markdown)
    # intervene: scale both pinned features ×3; the page's logits equal the API's on the same stack
    reopened.multiselect(key="iv_targets").set_value([f"node {first}", f"node {second}"])
    reopened.radio(key="iv_mode").set_value("scale")
    reopened.number_input(key="iv_value").set_value(3.0)
    reopened.button(key="FormSubmitter:intervention_form-run intervention").click().run()
    assert not reopened.exception, reopened.exception
    stack = []
    for node in (first, second):
        row = stored.nodes.iloc[node]
        sae = opened.transcoders[int(row["layer"])][1]
        stack.append(Intervention.steer(sae.hook_out, sae.W_dec[int(row["feature"])], scale=2.0 * row["activation"],
                                        positions=[int(row["position"])]))  # fmt: skip
    tokens = torch.tensor(json.loads(stored.summary["tokens"]))[None]
    api = compare_next_token(hooked, tokens, stack)
    shown_logits = next(f.value for f in reopened.dataframe if "logit_intervened" in f.value.columns)
    assert np.allclose(shown_logits["logit_intervened"], api.table["logit_intervened"], atol=1e-5)
    assert np.allclose(shown_logits["logit_clean"], api.table["logit_clean"], atol=1e-5)
    assert (api.table["logit_intervened"] != api.table["logit_clean"]).any()
    targets = next(f.value for f in reopened.dataframe if "graph prediction" in f.value.columns)
    shift = (api.intervened - api.clean).double()
    logit_rows = stored.nodes[stored.nodes["kind"] == "target"]
    want = [float(shift[t] - shift.mean()) for t in logit_rows["feature"]]
    assert np.allclose(targets["model change"], want, atol=1e-5)
    assert targets["graph prediction"].abs().sum() > 0
    assert any(f"KL(clean‖intervened) = {api.kl:.4f} nats" in m.value for m in reopened.markdown)


def _graph_frames(workspace: Workspace, model: str, name: str) -> dict[str, pd.DataFrame]:
    results = workspace.results()
    return {table: results.read(table, model=model, graph=name) for table in GRAPHS.table_names}


def test_stale_and_broken_graphs_give_messages(traced, tmp_path, monkeypatch) -> None:
    workspace, model, name = traced
    frames = _graph_frames(workspace, model, name)
    drop = ["workbench_version", "created_at", "hook", "dataset"]
    frames = {t: f.drop(columns=[c for c in drop if c in f]) for t, f in frames.items()}
    # the model and transcoders are gone: the graph is drawn, the panel says why logits and interventions are absent
    gone = Workspace(tmp_path / "gone")
    write_tables(gone, GRAPHS, {t: f.assign(model="/nowhere/model") for t, f in frames.items()})
    app = _page(gone, monkeypatch)
    assert not app.exception, app.exception
    assert any("cannot be opened" in i.value for i in app.info)
    assert any(m.value.startswith("pruned: **") for m in app.markdown)
    # an older schema: nodes without influence
    old = Workspace(tmp_path / "old")
    write_tables(old, GRAPHS, {"attribution_graphs": frames["attribution_graphs"],
                               "attribution_nodes": frames["attribution_nodes"].drop(columns=["influence"])})  # fmt: skip
    app = _page(old, monkeypatch)
    assert not app.exception and "older schema" in app.error[0].value
    # an empty graph: a summary row without nodes, and one with nodes but no edges
    empty = Workspace(tmp_path / "empty")
    write_tables(empty, GRAPHS, {"attribution_graphs": frames["attribution_graphs"]})
    app = _page(empty, monkeypatch)
    assert not app.exception and "no stored nodes" in app.error[0].value
    write_tables(empty, GRAPHS, {"attribution_nodes": frames["attribution_nodes"]})
    app = _page(empty, monkeypatch)
    assert not app.exception and "has no edges" in app.warning[0].value


def test_the_page_without_graphs_names_the_command(tmp_path, monkeypatch) -> None:
    workspace = Workspace(tmp_path)
    workspace.results().write("unrelated", pd.DataFrame({"x": [1]}))
    app = _page(workspace, monkeypatch)
    assert not app.exception and "workbench circuits attribute" in app.info[0].value


def test_the_trace_form_stores_and_opens_a_new_graph(traced, monkeypatch) -> None:
    workspace, model, name = traced
    app = _page(workspace, monkeypatch)
    app.text_input(key="trace_model").input("code-tiny")
    app.multiselect(key="trace_transcoders").set_value(["gv.L0", "gv.L1"])
    app.text_area(key="trace_prompt").input("x = 1")
    app.button(key="FormSubmitter:trace_form-trace").click().run()
    assert not app.exception, app.exception
    graphs = workspace.results().read("attribution_graphs")
    new = graphs[graphs["prompt"] == "x = 1"]
    assert len(new) == 1 and new.iloc[0]["graph"] != name
    assert app.selectbox(key="graph_id").value == new.iloc[0]["graph"]  # opened
    assert json.loads(new.iloc[0]["transcoders"]) == ["gv.L0", "gv.L1"]
