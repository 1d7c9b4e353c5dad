"""Attribution graphs out as circuit-tracer graph files through the retired commands' aliases (`circuits export`,
`sae circuit`: one deprecation line, then `circuits attribute`).

circuit-tracer pins an older transformers, so it is not installed: the graph JSON is checked field by field
against its documented schema (``circuit_tracer/frontend/graph_models.py``: Metadata, QParams, Node, Link; node ids
``{layer}_{feature}_{pos}``, ``{layer}_-1_{pos}`` (errors), ``E_{token}_{pos}`` and ``{n_layers + 1}_{token}_{pos}``
(logits), with the jsNodeId, feature, token_prob and is_target_logit its Node factories give) and the feature files
against what its frontend reads (``top_logits``, ``bottom_logits``, ``act_min``, ``act_max``, ``examples_quantiles``).
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from workbench.circuits.attribution.export import cantor
from workbench.circuits.sae import SAEConfig, create_sae

Schema = dict[str, type | tuple[type, ...]]
METADATA: Schema = {"slug": str, "scan": str, "transcoder_list": list, "prompt_tokens": list, "prompt": str,
            "node_threshold": (float, type(None)), "schema_version": (int, type(None)), "info": dict}  # fmt: skip
OPTIONAL_METADATA = {"info"}  # circuit-tracer's Metadata ignores extra keys; ours carries the graph's scores
QPARAMS: Schema = {"pinnedIds": list, "supernodes": list, "linkType": str, "clickedId": str, "sg_pos": str}
NODE: Schema = {"node_id": str, "feature": int, "layer": str, "ctx_idx": int, "feature_type": str, "token_prob": float,
        "is_target_logit": bool, "run_idx": int, "reverse_ctx_idx": int, "jsNodeId": str, "clerp": str,
        "influence": (float, type(None)), "activation": (float, type(None))}  # fmt: skip
FEATURE_TYPES = {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}


def check_schema(graph: dict, n_layers: int = 2) -> None:
    assert set(graph) == {"metadata", "qParams", "nodes", "links"}
    for section, schema in ((graph["metadata"], METADATA), (graph["qParams"], QPARAMS)):
        assert set(schema) - OPTIONAL_METADATA <= set(section) <= set(schema)
        for key, kind in schema.items():
            assert key not in section or isinstance(section[key], kind), (key, section[key])
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
            assert 0 < node["token_prob"] <= 1 and f"p={node['token_prob']:.3f}" in node["clerp"]
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


def _deprecation_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if "deprecated" in line]


def test_retired_commands_run_the_attribution_graph(tmp_path, code_ws, tiny_transcoders) -> None:
    """`circuits export` (logit root) and `sae circuit` (feature root, the highest layer's most active feature by
    default) print one deprecation line naming the `circuits attribute` command they run, store that graph, and the
    export is circuit-tracer graph JSON: the next-token logits pinned, the most probable one the target logit, every
    prompt position's embedding node."""
    from typer.testing import CliRunner

    from workbench.cli import app

    model, ids = tiny_transcoders
    text = tmp_path / "code.txt"
    text.write_text("\n".join(f"def f{i}(x):\n    return x + {i}" for i in range(20)))
    args = ["circuits", "export", "code-tiny", "--data", str(text), "--out", str(tmp_path / "graph"),
            "--context-length", "24", "--top-k", "2", "--depth", "2", "--workspace", str(code_ws.root)]  # fmt: skip
    for tc in ids:
        args += ["--transcoder", tc]
    runner = CliRunner()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (line,) = _deprecation_lines(result)
    assert "`workbench circuits export` is deprecated" in line and "circuits attribute code-tiny" in line
    assert "--target logits" in line and "--format circuit-tracer" in line
    name = re.search(r"graph ([0-9a-f]{12}):", result.stdout)
    assert name, result.output
    graph = json.loads((tmp_path / "graph" / f"{name.group(1)}.json").read_text())
    check_schema(graph)
    prompt_ids = rows_tokens(model, text)
    logits = [n for n in graph["nodes"] if n["feature_type"] == "logit"]
    assert logits and all(n["ctx_idx"] == len(prompt_ids) - 1 for n in logits)
    with torch.no_grad():
        probabilities = torch.softmax(model(torch.tensor([prompt_ids]))[0, -1], 0)
    top = next(n for n in logits if n["is_target_logit"])
    assert top["feature"] == int(probabilities.argmax())
    assert top["token_prob"] == pytest.approx(float(probabilities.max()), abs=1e-5)
    assert {link["target"] for link in graph["links"]} & {n["node_id"] for n in logits}
    embeddings = {n["ctx_idx"]: n for n in graph["nodes"] if n["feature_type"] == "embedding"}
    assert sorted(embeddings) == list(range(len(prompt_ids)))
    assert all(embeddings[p]["node_id"] == f"E_{t}_{p}" for p, t in enumerate(prompt_ids))
    assert graph["metadata"]["transcoder_list"] == ids
    stored = code_ws.results().read("attribution_graphs", graph=name.group(1))
    assert len(stored) == 1 and json.loads(stored["transcoders"].iloc[0]) == ids
    # sae circuit: the old default root, a feature: the highest layer's most active transcoder feature at the end
    circuit = runner.invoke(app, ["sae", "circuit", "code-tiny", "--data", str(text), "--context-length", "24",
                                  "--workspace", str(code_ws.root), *[a for tc in ids for a in ("--transcoder", tc)]])  # fmt: skip
    assert circuit.exit_code == 0, circuit.output
    (line,) = _deprecation_lines(circuit)
    from workbench.circuits.sae.analysis import find_sae

    last = find_sae(ids[-1], code_ws)[1]
    with torch.no_grad(), model.capture(last.hook_in) as cache:
        model(torch.tensor([prompt_ids]))
    feature = int(last.encode(cache[last.hook_in][0, -1]).argmax())
    assert f"--target feature:1:{len(prompt_ids) - 1}:{feature}" in line
    name = re.search(r"graph ([0-9a-f]{12}):", circuit.stdout)
    assert name, circuit.output
    targets = json.loads(code_ws.results().read("attribution_graphs", graph=name.group(1))["targets"].iloc[0])
    assert targets == [f"L1 #{feature} @{len(prompt_ids) - 1}"]
    for bad, message in (
        (["--format", "graphml"], "is not one of circuit-tracer"),
        (["--layer", "1"], "pass --root feature"),
    ):
        refused = runner.invoke(app, [*args, *bad])
        assert refused.exit_code == 2 and message in refused.output, refused.output


def rows_tokens(model, path) -> list[int]:
    """The first token row of a text file as the CLI reads it (one document per row, at most 24 tokens)."""
    from workbench.datasets import load_dataset

    return list(load_dataset(path).token_rows(model.tokenizer, context_length=24, max_rows=1)[0])
