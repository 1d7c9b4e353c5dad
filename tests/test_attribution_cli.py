"""`workbench circuits attribute` and `workbench circuits qk` end to end on the packaged pretrained MiniLM (a
bidirectional BERT encoder without an LM head: a feature target) and on a user's GPT-2 directory (QK attribution),
with the bad input of issue 31 refused: exit 2, one `error:` line naming the fix, nothing written."""

from __future__ import annotations

import re

import pytest
import torch
from typer.testing import CliRunner

from tests.test_attribution import _model, _per_layer, save_user_files
from tests.test_attribution_qk import _reference_score
from workbench.circuits.attribution.store import read_graph
from workbench.circuits.sae.base import SAEConfig, create_sae
from workbench.cli import app
from workbench.workspace import Workspace

MINILM_LAYERS, MINILM_D = 6, 384


def _one_error(result) -> str:
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert "Traceback" not in result.output
    return errors[0]


def _nothing_written(workspace) -> None:
    ws = Workspace(workspace)
    assert not ws.results_path.exists() or not {"attribution_graphs", "attribution_nodes"} & set(
        ws.results().tables()
    )


def test_cli_attributes_a_feature_on_minilm(tmp_path) -> None:
    """Random transcoders on MiniLM's six hook_resid_mid sites; a layer-5 feature target: the stored rows add up to
    the feature's pre-activation computed from the model's own activations, no head loadings (bidirectional)."""
    generator = torch.Generator().manual_seed(0)
    transcoders = []
    for layer in range(MINILM_LAYERS):
        sae = create_sae(SAEConfig("relu", d_in=MINILM_D, d_sae=24, hook_in=f"blocks.{layer}.hook_resid_mid",
                                   hook_out=f"blocks.{layer}.hook_mlp_out", model="minilm"))  # fmt: skip
        with torch.no_grad():
            sae.W_enc.copy_(torch.randn(MINILM_D, 24, generator=generator) * 0.05)
            sae.b_enc.copy_(torch.randn(24, generator=generator) * 0.1)
        sae.save(tmp_path / f"tc{layer}")
        transcoders += ["--transcoders", str(tmp_path / f"tc{layer}")]
    workspace = tmp_path / "ws"
    command = ["circuits", "attribute", "minilm", *transcoders, "--prompt", "the cat sat on the mat",
               "--workspace", str(workspace), "--no-progress", "--max-feature-nodes", "60"]  # fmt: skip
    runner = CliRunner()
    result = runner.invoke(app, [*command, "--target", "feature:5:2:7"])
    assert result.exit_code == 0, result.output
    assert "(the replacement reproduces the model)" in result.output
    name = re.search(r"graph ([0-9a-f]{12}):", result.output)
    assert name, result.output
    frames = read_graph(workspace, "minilm", name.group(1))
    nodes, edges = frames["attribution_nodes"], frames["attribution_edges"]
    target = nodes[nodes["kind"] == "target"].iloc[0]
    assert target["label"] == "L5 #7 @2" and target["layer"] == 5 and target["position"] == 2
    from workbench.circuits.sae import load_sae
    from workbench.references import resolve_model

    model = resolve_model("minilm")
    last = load_sae(tmp_path / "tc5")
    with torch.no_grad(), model.capture(last.hook_in) as cache:
        model("the cat sat on the mat")
        pre = float(cache[last.hook_in][0, 2] @ last.W_enc[:, 7] + last.b_enc[7])
    assert target["value"] == pytest.approx(pre, abs=1e-4)
    rows = nodes[nodes["value"].notna()].set_index("node")
    totals = edges.groupby("target")["weight"].sum().reindex(rows.index, fill_value=0.0)
    assert float((totals + rows["constant"] + rows["dropped"] - rows["value"]).abs().max()) < 1e-3
    assert frames["attribution_heads"].empty and (nodes["kind"] == "feature").sum() == 60
    # bad input: no output head for logits, a prompt longer than the positions, transcoders of another model
    clean = tmp_path / "clean"
    bad = [*command[: command.index("--workspace")], "--workspace", str(clean), "--no-progress"]
    assert "no output head" in _one_error(runner.invoke(app, [*bad, "--target", "logits"]))
    long = [*bad[: bad.index("--prompt") + 1], "word " * 600, *bad[bad.index("--prompt") + 2 :]]
    assert "shorten the prompt" in _one_error(runner.invoke(app, [*long, "--target", "feature:5:2:7"]))
    small = create_sae(SAEConfig("relu", d_in=16, d_sae=8, hook_in="blocks.0.hook_resid_mid",
                                 hook_out="blocks.0.hook_mlp_out"))  # fmt: skip
    small.save(tmp_path / "small")
    other = [*bad[:4], str(tmp_path / "small"), *bad[5:]]
    assert "another model" in _one_error(runner.invoke(app, [*other, "--target", "feature:5:2:7"]))
    _nothing_written(clean)


def test_cli_qk_on_a_users_gpt2_directory(tmp_path) -> None:
    """`circuits qk DIR --transcoders ... --data ids.npy --layer 1 --head 3 --query 5 --key 2`: the printed score is
    the model's (q · k / √d_head from its captured projections) and the shown terms plus `other` sum to it."""
    model_dir, ids = save_user_files(
        _model("gpt2"), _per_layer("ln2.hook_normalized", skip=True), tmp_path, "my-gpt2"
    )
    command = ["circuits", "qk", str(model_dir), *ids, "--data", str(tmp_path / "ids.npy"), "--layer", "1",
               "--head", "3", "--workspace", str(tmp_path / "ws"), "--top", "5"]  # fmt: skip
    runner = CliRunner()
    result = runner.invoke(app, [*command, "--query", "5", "--key", "2"])
    assert result.exit_code == 0, result.output
    found = re.search(r"score at query 5, key 2: (\S+) .*\(([-0-9.e]+)\)", result.output)
    assert found, result.output
    from workbench.references import resolve_model

    reference = _reference_score(resolve_model(str(model_dir)), 1, 3, 5, 2)
    assert float(found.group(1)) == pytest.approx(reference, abs=1e-5)
    assert float(found.group(2)) == pytest.approx(reference, abs=1e-5)
    assert "5 other terms" not in result.output and re.search(r"\d+ other terms", result.output)
    assert "pick key ≤ query" in _one_error(runner.invoke(app, [*command, "--query", "2", "--key", "5"]))
    wrong_head = [*command[: command.index("--head") + 1], "9", *command[command.index("--head") + 2 :]]
    assert "does not exist" in _one_error(runner.invoke(app, [*wrong_head, "--query", "5", "--key", "2"]))
