"""Transcoder circuits out as circuit-tracer graph files, and the dashboard's readable circuit view.

circuit-tracer pins an older transformers, so it is not installed: the graph JSON is checked field by field
against its documented schema (``circuit_tracer/frontend/graph_models.py``: Metadata, QParams, Node, Link; node ids
``{layer}_{feature}_{pos}``, ``{layer}_-1_{pos}`` (errors), ``E_{token}_{pos}`` and ``{n_layers + 1}_{token}_{pos}``
(logits), with the jsNodeId, feature, token_prob and is_target_logit its Node factories give) and the feature files
against what its frontend reads (``top_logits``, ``bottom_logits``, ``act_min``, ``act_max``, ``examples_quantiles``).
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from workbench.circuits.circuit_export import cantor, circuit_tracer_graph, node_label, write_circuit_tracer
from workbench.circuits.sae import SAEConfig, create_sae
from workbench.circuits.transcoder_circuits import CircuitGraph

Schema = dict[str, type | tuple[type, ...]]
METADATA: Schema = {"slug": str, "scan": str, "transcoder_list": list, "prompt_tokens": list, "prompt": str,
            "node_threshold": (float, type(None)), "schema_version": (int, type(None))}  # fmt: skip
QPARAMS: Schema = {"pinnedIds": list, "supernodes": list, "linkType": str, "clickedId": str, "sg_pos": str}
NODE: Schema = {"node_id": str, "feature": int, "layer": str, "ctx_idx": int, "feature_type": str, "token_prob": float,
        "is_target_logit": bool, "run_idx": int, "reverse_ctx_idx": int, "jsNodeId": str, "clerp": str,
        "influence": (float, type(None)), "activation": (float, type(None))}  # fmt: skip
FEATURE_TYPES = {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}


def check_schema(graph: dict, n_layers: int = 2) -> None:
    assert set(graph) == {"metadata", "qParams", "nodes", "links"}
    for section, schema in ((graph["metadata"], METADATA), (graph["qParams"], QPARAMS)):
        assert set(section) == set(schema)
        for key, kind in schema.items():
            assert isinstance(section[key], kind), (key, section[key])
    ids = [node["node_id"] for node in graph["nodes"]]
    assert len(ids) == len(set(ids))
    for node in graph["nodes"]:
        assert set(node) == set(NODE)
        for key, kind in NODE.items():
            assert isinstance(node[key], kind), (key, node)
        assert node["feature_type"] in FEATURE_TYPES
        if node["feature_type"] == "embedding":
            token, pos = node["node_id"].split("_")[1:]
            assert (
                node["node_id"] == f"E_{token}_{pos}" and node["layer"] == "E" and node["ctx_idx"] == int(pos)
            )
            assert node["feature"] == int(pos) and node["jsNodeId"] == f"E_{token}-{pos}"
        elif node["feature_type"] == "logit":
            layer, token, pos = map(int, node["node_id"].split("_"))
            assert layer == n_layers + 1 and node["layer"] == str(layer) and node["feature"] == token
            assert node["ctx_idx"] == pos and node["jsNodeId"] == f"L_{token}-{pos}"
            assert 0 < node["token_prob"] <= 1 and node["clerp"].startswith('Output "')
            assert node["clerp"].endswith(f"(p={node['token_prob']:.3f})") and node["influence"] is None
        elif node["feature_type"] == "mlp reconstruction error":
            layer, minus_one, pos = map(int, node["node_id"].split("_"))
            assert minus_one == -1 and node["feature"] == -1 and int(node["layer"]) == layer < n_layers
            assert node["ctx_idx"] == pos and node["jsNodeId"] == f"{layer}_-1-{pos}"
        else:
            layer, feature, pos = map(int, node["node_id"].split("_"))
            assert node["feature"] == cantor(layer, feature) and node["layer"] == str(layer)
            assert node["ctx_idx"] == pos and node["jsNodeId"] == f"{layer}_{feature}-0"
        if node["feature_type"] != "logit":
            assert node["token_prob"] == 0.0 and not node["is_target_logit"]
    logits = [node for node in graph["nodes"] if node["feature_type"] == "logit"]
    if logits:  # exactly one target logit: the most probable; the logits are the pinned roots
        assert [n["is_target_logit"] for n in logits].count(True) == 1
        assert max(logits, key=lambda n: n["token_prob"])["is_target_logit"]
        assert set(graph["qParams"]["pinnedIds"]) == {n["node_id"] for n in logits}
    for link in graph["links"]:
        assert set(link) == {"source", "target", "weight"} and isinstance(link["weight"], float)
        assert link["source"] in ids and link["target"] in ids
    assert set(graph["qParams"]["pinnedIds"]) <= set(ids)
    for pos in graph["metadata"]["prompt_tokens"]:
        assert "\n" not in pos


def test_graph_folds_attention_and_merges_repeated_nodes(tmp_path) -> None:
    """A hand-made search tree: target L1#5@3 <- head L0.H1 from @1 <- emb(@1); target <- L0#2@3 <- emb(@3), and the
    same embedding reached twice becomes one node whose links carry the summed attributions."""
    nodes = pd.DataFrame([
        {"id": 0, "parent": -1, "depth": 0, "kind": "target", "layer": 1, "index": 5, "position": 3, "attribution": 2.0, "text": "c", "activation": 1.25},
        {"id": 1, "parent": 0, "depth": 1, "kind": "attention", "layer": 0, "index": 1, "position": 1, "attribution": 0.8, "text": "\n"},
        {"id": 2, "parent": 0, "depth": 1, "kind": "transcoder", "layer": 0, "index": 2, "position": 3, "attribution": 0.5, "text": "c"},
        {"id": 3, "parent": 1, "depth": 2, "kind": "embedding", "layer": -1, "index": 42, "position": 1, "attribution": 0.7, "text": "\n"},
        {"id": 4, "parent": 2, "depth": 2, "kind": "embedding", "layer": -1, "index": 7, "position": 3, "attribution": 0.3, "text": "c"},
        {"id": 5, "parent": 2, "depth": 2, "kind": "embedding", "layer": -1, "index": 7, "position": 3, "attribution": -0.1, "text": "c"},
    ])  # fmt: skip
    graph = circuit_tracer_graph(nodes, ["a", "\n", "b", "c"], slug="g", scan="./features/toy",
                                 transcoder_list=["t0", "t1"], prompt="a\nbc")  # fmt: skip
    check_schema(graph)
    assert {n["node_id"] for n in graph["nodes"]} == {"1_5_3", "0_2_3", "E_42_1", "E_7_3"}
    links = {(link["source"], link["target"]): link["weight"] for link in graph["links"]}
    assert links == {
        ("E_42_1", "1_5_3"): 0.7,
        ("0_2_3", "1_5_3"): 0.5,
        ("E_7_3", "0_2_3"): pytest.approx(0.2),
    }
    by_id = {n["node_id"]: n for n in graph["nodes"]}
    assert by_id["E_42_1"]["clerp"] == 'emb "⏎" @1 (via head L0.H1)'
    assert graph["qParams"]["pinnedIds"] == ["1_5_3"] and by_id["1_5_3"]["activation"] == 1.25
    assert graph["metadata"]["prompt_tokens"] == ["a", "⏎", "b", "c"]
    page = pd.Series({"top_contexts": json.dumps([{"activation": 1.5, "focus": 1, "row": 0, "tokens": ["x", "\n"],
                                                   "acts": [0.0, 1.5]}]),
                      "quantile_samples": json.dumps([{"low": 0.0, "high": None, "count": 3, "contexts": []}]),
                      "promoted_tokens": json.dumps([["up", 0.4]]), "suppressed_tokens": json.dumps([["down", -0.2]]),
                      "max_activation": 1.5})  # fmt: skip
    path = write_circuit_tracer(tmp_path, graph, {(1, 5): page})
    assert json.loads(path.read_text()) == graph
    assert json.loads((tmp_path / "graph-metadata.json").read_text()) == {"graphs": [graph["metadata"]]}
    written = json.loads((tmp_path / "features" / "toy" / f"{cantor(1, 5)}.json").read_text())
    assert set(written) == {"top_logits", "bottom_logits", "act_min", "act_max", "examples_quantiles"}
    assert written["top_logits"] == ["up"] and written["act_max"] == 1.5
    top = written["examples_quantiles"][0]
    assert top["quantile_name"] == "Top activations"
    assert top["examples"] == [{"tokens": ["x", "⏎"], "tokens_acts_list": [0.0, 1.5], "train_token_ind": 1,
                                "is_repeated_datapoint": False}]  # fmt: skip
    assert (tmp_path / "features" / "toy" / f"{cantor(0, 2)}.json").is_file()  # a feature without a page
    with pytest.raises(ValueError, match="./features/"):
        write_circuit_tracer(tmp_path, graph | {"metadata": graph["metadata"] | {"scan": "toy"}}, {})


def test_logit_rooted_graph_has_circuit_tracers_logit_and_error_nodes() -> None:
    """Two logit roots at the last position (layer n_layers here, n_layers + 1 in circuit-tracer's numbering): the
    more probable is the target logit; an error node links to a logit; a feature reached from both logits is one
    node with a link to each."""
    nodes = pd.DataFrame([
        {"id": 0, "parent": -1, "depth": 0, "kind": "logit", "layer": 2, "index": 17, "position": 2, "attribution": 3.0, "text": "b", "output": " x", "probability": 0.6},
        {"id": 1, "parent": -1, "depth": 0, "kind": "logit", "layer": 2, "index": 9, "position": 2, "attribution": 2.5, "text": "b", "output": "\n", "probability": 0.3},
        {"id": 2, "parent": 0, "depth": 1, "kind": "transcoder", "layer": 1, "index": 4, "position": 2, "attribution": 1.5, "text": "b", "activation": 0.9},
        {"id": 3, "parent": 0, "depth": 1, "kind": "error", "layer": 0, "index": -1, "position": 2, "attribution": -0.4, "text": "b"},
        {"id": 4, "parent": 1, "depth": 1, "kind": "transcoder", "layer": 1, "index": 4, "position": 2, "attribution": 0.7, "text": "b", "activation": 0.9},
        {"id": 5, "parent": 2, "depth": 2, "kind": "embedding", "layer": -1, "index": 33, "position": 2, "attribution": 0.2, "text": "b"},
    ])  # fmt: skip
    graph = circuit_tracer_graph(nodes, ["a", "b", "b"], slug="logits", scan="./features/toy",
                                 transcoder_list=["t0", "t1"], prompt="abb")  # fmt: skip
    check_schema(graph, n_layers=2)
    by_id = {n["node_id"]: n for n in graph["nodes"]}
    assert set(by_id) == {"3_17_2", "3_9_2", "1_4_2", "0_-1_2", "E_33_2"}
    assert by_id["3_17_2"]["is_target_logit"] and not by_id["3_9_2"]["is_target_logit"]
    assert (
        by_id["3_17_2"]["clerp"] == 'Output " x" (p=0.600)'
        and by_id["3_9_2"]["clerp"] == 'Output "⏎" (p=0.300)'
    )
    assert by_id["3_17_2"]["token_prob"] == 0.6 and by_id["1_4_2"]["activation"] == 0.9
    assert (
        by_id["0_-1_2"]["feature_type"] == "mlp reconstruction error"
        and by_id["0_-1_2"]["clerp"] == 'error L0 @2 "b"'
    )
    links = {(link["source"], link["target"]): link["weight"] for link in graph["links"]}
    assert links == {("1_4_2", "3_17_2"): 1.5, ("0_-1_2", "3_17_2"): -0.4, ("1_4_2", "3_9_2"): 0.7,
                     ("E_33_2", "1_4_2"): 0.2}  # fmt: skip
    assert by_id["1_4_2"]["influence"] == pytest.approx(2.2) and graph["qParams"]["pinnedIds"] == [
        "3_17_2",
        "3_9_2",
    ]


@pytest.fixture(scope="module")
def code_ws(zoo_workspace, tmp_path_factory):
    """A fresh workspace whose models/code-tiny links to the zoo's (results land here, not in the shared zoo)."""
    from workbench.workspace import Workspace

    workspace = Workspace(tmp_path_factory.mktemp("circuit-export")).ensure()
    workspace.model_dir("code-tiny").symlink_to(
        zoo_workspace.model_dir("code-tiny"), target_is_directory=True
    )
    return workspace


@pytest.fixture(scope="module")
def tiny_transcoders(code_ws):
    """Seeded (untrained) MLP transcoders on both layers of code-tiny, saved in the workspace."""
    from workbench.references import resolve_model

    model = resolve_model("code-tiny", workspace=code_ws)
    names = set(model.hook_names())
    ids = []
    for layer in range(model.cfg.n_layers):
        hook_in = f"blocks.{layer}.hook_resid_mid"
        hook_in = hook_in if hook_in in names else f"blocks.{layer}.hook_resid_pre"
        torch.manual_seed(layer)
        tc = create_sae(SAEConfig("topk", d_in=model.cfg.d_model, d_sae=32, k=6, hook_in=hook_in,
                                  hook_out=f"blocks.{layer}.hook_mlp_out", model="code-tiny"))  # fmt: skip
        with torch.no_grad():
            tc.W_enc.normal_()
        tc.save(code_ws.root / "saes" / f"export-tc{layer}")
        ids.append(f"export-tc{layer}")
    return model, ids


def test_circuits_export_cli(tmp_path, code_ws, tiny_transcoders) -> None:
    from typer.testing import CliRunner

    from workbench.cli import app

    model, ids = tiny_transcoders
    text = tmp_path / "code.txt"
    text.write_text("\n".join(f"def f{i}(x):\n    return x + {i}" for i in range(20)))
    args = ["circuits", "export", "code-tiny", "--data", str(text), "--out", str(tmp_path / "graph"),
            "--context-length", "24", "--pages-tokens", "600", "--top-k", "2", "--depth", "2",
            "--workspace", str(code_ws.root)]  # fmt: skip
    for tc in ids:
        args += ["--transcoder", tc]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (graph_file,) = (tmp_path / "graph").glob("code-tiny-*.json")
    graph = json.loads(graph_file.read_text())
    check_schema(graph)
    logits = [n for n in graph["nodes"] if n["feature_type"] == "logit"]
    last = len(graph["metadata"]["prompt_tokens"]) - 1
    assert logits and all(n["ctx_idx"] == last for n in logits)  # rooted at the next-token prediction
    with torch.no_grad():
        probabilities = torch.softmax(model(torch.tensor([rows_tokens(model, text)]))[0, -1], 0)
    top = max(logits, key=lambda n: n["token_prob"])
    assert top["feature"] == int(probabilities.argmax())
    assert top["token_prob"] == pytest.approx(float(probabilities.max()), abs=1e-5)
    assert {link["target"] for link in graph["links"]} & {n["node_id"] for n in logits}
    embeddings = {n["ctx_idx"]: n for n in graph["nodes"] if n["feature_type"] == "embedding"}
    prompt_ids = rows_tokens(model, text)
    assert sorted(embeddings) == list(
        range(len(prompt_ids))
    )  # every token node, as circuit-tracer keeps them
    assert all(embeddings[p]["node_id"] == f"E_{t}_{p}" for p, t in enumerate(prompt_ids))
    rows = code_ws.results().read("sae_features", sae_id=ids)
    assert (
        sorted(rows["sae_id"].unique()) == ids
    )  # pages computed for the transcoders, cached in sae_features
    tokens = model.to_str_tokens(model.tokenizer(text.read_text().splitlines()[0])["input_ids"])
    assert graph["metadata"]["prompt_tokens"][: len(tokens)] == [t.replace("\n", "⏎") for t in tokens]
    assert graph["metadata"]["transcoder_list"] == ids and graph["metadata"]["scan"] == "./features/code-tiny"
    features = [n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"]
    for node in features:
        page = json.loads(
            (tmp_path / "graph" / "features" / "code-tiny" / f"{node['feature']}.json").read_text()
        )
        assert set(page) == {"top_logits", "bottom_logits", "act_min", "act_max", "examples_quantiles"}
    result = CliRunner().invoke(app, [*args[:-2], "--format", "graphml"])
    assert result.exit_code == 2 and "is not one of circuit-tracer" in result.output
    result = CliRunner().invoke(app, [*args, "--layer", "1"])
    assert result.exit_code == 2 and "pass --root feature" in result.output
    result = CliRunner().invoke(app, [*args, "--root", "feature", "--layer", "1", "--slug", "feature-root"])
    assert result.exit_code == 0, result.output
    graph = json.loads((tmp_path / "graph" / "feature-root.json").read_text())
    check_schema(graph)
    (pinned,) = graph["qParams"]["pinnedIds"]
    assert pinned.startswith("1_") and not any(n["feature_type"] == "logit" for n in graph["nodes"])
    listing = json.loads((tmp_path / "graph" / "graph-metadata.json").read_text())
    assert {g["slug"] for g in listing["graphs"]} == {graph_file.stem, "feature-root"}


def rows_tokens(model, path) -> list[int]:
    """The first token row of a text file as the CLI reads it (one document per row, at most 24 tokens)."""
    from workbench.datasets import load_dataset

    return list(load_dataset(path).token_rows(model.tokenizer, context_length=24, max_rows=1)[0])


def test_dashboard_circuit_figure_is_readable() -> None:
    """Integer token positions with the tokens as tick labels, layers named, labels a person can follow (no E200)."""
    nodes = pd.DataFrame([
        {"id": 0, "parent": -1, "depth": 0, "kind": "target", "layer": 1, "index": 124, "position": 31, "attribution": 2.9, "text": " m"},
        {"id": 1, "parent": 0, "depth": 1, "kind": "transcoder", "layer": 0, "index": 198, "position": 31, "attribution": 0.7, "text": " m"},
        {"id": 2, "parent": 0, "depth": 1, "kind": "transcoder", "layer": 0, "index": 16, "position": 31, "attribution": 0.5, "text": " m"},
        {"id": 3, "parent": 0, "depth": 1, "kind": "attention", "layer": 0, "index": 2, "position": 30, "attribution": -0.2, "text": "\n"},
        {"id": 4, "parent": 1, "depth": 2, "kind": "embedding", "layer": -1, "index": 336, "position": 31, "attribution": 0.7, "text": " m"},
    ])  # fmt: skip
    graph = CircuitGraph(nodes)
    figure = graph.figure()
    assert list(figure.layout.xaxis.tickvals) == [30, 31]
    assert list(figure.layout.xaxis.ticktext) == ['30<br>"⏎"', '31<br>" m"']
    assert list(figure.layout.yaxis.ticktext) == ["embedding", "L0", "L1"]
    markers = figure.data[-1]
    assert list(markers.text) == ["★ L1 #124", "L0 #198", "L0 #16", "L0.H2", '" m"']
    assert not any(label.startswith("E") for label in markers.text)
    assert {round(v % 1, 6) for v in markers.x} != {
        0.0
    }  # nodes sharing (layer 0, @31) are spread in the cell
    assert list(graph.labelled()["node"]) == ['target L1 #124 @31 " m"', 'L0 #198 @31 " m"', 'L0 #16 @31 " m"',
                                              'head L0.H2 ← @30 "⏎"', 'emb " m" @31']  # fmt: skip
    assert node_label("embedding", -1, 336, 31, " m") == 'emb " m" @31'


def test_dashboard_view_shows_a_logit_rooted_circuit(code_ws, tiny_transcoders, monkeypatch) -> None:
    """run(root="logit") rows stored next to a feature-rooted circuit: the view picks either root, shows the top
    logit's token and probability, and lists the logit nodes first."""
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from workbench.circuits.sae.analysis import find_sae
    from workbench.circuits.transcoder_circuits import run, write_results
    from workbench.datasets import Dataset

    model, ids = tiny_transcoders
    transcoders = [find_sae(i, code_ws)[1] for i in ids]
    prompts = ["def f(x):\n    return x + 1", "import os\n"]
    data = Dataset("two-defs", texts=lambda: prompts)
    logit = run(model, data, transcoders, root="logit", top_k=2, depth=2, max_logits=2)["transcoder_circuits"]
    feature = run(model, data, transcoders, top_k=1, depth=1)["transcoder_circuits"]
    write_results(code_ws, {"transcoder_circuits": pd.concat([feature, logit], ignore_index=True)})
    assert set(logit["target"]) == {f"logits@{len(model.to_tokens(prompts[0])[0]) - 1}"}
    assert (logit["hook"] == "ln_final.hook_normalized").all()
    with pytest.raises(ValueError, match="no target layer or feature"):
        run(model, data, transcoders, root="logit", layer=1)
    monkeypatch.setenv("WORKBENCH_WORKSPACE", str(code_ws.root))
    view = Path(__file__).resolve().parents[1] / "app" / "views" / "circuits.py"
    app = AppTest.from_file(str(view), default_timeout=60).run()
    assert not app.exception, app.exception
    target = next(box for box in app.selectbox if "root" in box.label)
    assert set(target.options) == set(logit["target"]) | set(feature["target"])
    app = target.set_value(logit["target"].iloc[0]).run()
    assert not app.exception, app.exception
    top = logit.iloc[0]
    assert app.metric[0].label == f'logit of "{top["output"]}" (demeaned)'
    assert app.metric[0].value == f"{top['attribution']:.3f}"
    shown = app.dataframe[0].value
    assert shown.iloc[0]["kind"] == "logit" and shown.iloc[0]["node"].startswith("logit ")
