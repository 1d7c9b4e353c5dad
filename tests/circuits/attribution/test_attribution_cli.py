"""`workbench circuits attribute` and `workbench circuits qk` end to end on the packaged pretrained MiniLM (a
bidirectional BERT encoder without an LM head: a feature target) and on a user's GPT-2 directory (QK attribution),
with the bad input of issue 31 refused: exit 2, one `error:` line naming the fix, nothing written."""

from __future__ import annotations

import re

import pytest
import torch
from typer.testing import CliRunner

from tests.circuits.attribution.test_attribution import (
    D_MODEL,
    _model,
    _per_layer,
    save_user_files,
    word_tokenizer,
)
from tests.circuits.attribution.test_attribution_qk import _reference_score
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
    """No attribution table (graphs, nodes, edges, heads, batch) in the workspace's results."""
    ws = Workspace(workspace)
    tables = set(ws.results().tables()) if ws.results_path.exists() else set()
    assert not {table for table in tables if table.startswith("attribution")}, tables


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


def test_cli_refuses_a_diff_token_outside_the_vocabulary_and_a_probe_of_another_width(tmp_path) -> None:
    """`circuits attribute DIR --target diff:A,B` on a user's GPT-2 directory with a word tokenizer, naming a word
    outside the vocabulary, two tokens or an id past it, and `--target probe:NAME` of a probe saved at another width
    (another model's d_model; this model's MLP hidden layer): exit 2, one line naming the problem and the fix, and
    no attribution rows in the workspace."""
    from workbench.probes.linear import LinearProbes
    from workbench.probes.readout import save_probe

    model_dir, ids = save_user_files(
        _model("gpt2"), _per_layer("ln2.hook_normalized", skip=True), tmp_path, "my-gpt2"
    )
    word_tokenizer().save_pretrained(model_dir)
    workspace = tmp_path / "ws"
    command = ["circuits", "attribute", str(model_dir), *ids, "--prompt", "w1 w2 w3 w4 w5", "--workspace",
               str(workspace), "--no-progress"]  # fmt: skip
    runner = CliRunner()
    for target, message in (
        ("diff:w3,zebra", "'zebra' is not in the vocabulary (the tokenizer reads it as the unknown token '[UNK]'); "
                          "name a token of the vocabulary (or its id) in diff:A,B"),
        ("diff:w3 w4,w5", "'w3 w4' is 2 tokens ('w3', 'w4'), not one; name a single token of the vocabulary"),
        ("diff:3,400", "token 400 is not in the vocabulary (0..39); pick a token id below 40"),
    ):  # fmt: skip
        assert message in _one_error(runner.invoke(app, [*command, "--target", target]))
    generator = torch.Generator().manual_seed(0)
    for name, site, width in (("other-model", "blocks.1.hook_resid_post", 2 * D_MODEL),
                              ("mlp-hidden", "blocks.1.mlp.hook_post", 4 * D_MODEL)):  # fmt: skip
        probes = LinearProbes("classification", torch.randn(1, width, 2, generator=generator), torch.zeros(1, 2),
                              torch.zeros(1, width), torch.ones(1, width), torch.tensor([0, 1]), [site], 1.0)  # fmt: skip
        save_probe(workspace, name, probes)
    line = _one_error(runner.invoke(app, [*command, "--target", "probe:other-model"]))
    assert f"probe 'other-model' expects {2 * D_MODEL} features at blocks.1.hook_resid_post" in line
    assert "fit one on this model (workbench probe run" in line and "--save NAME)" in line
    line = _one_error(runner.invoke(app, [*command, "--target", "probe:mlp-hidden"]))
    assert f"the probe direction has shape [{4 * D_MODEL}] but a target is a direction in" in line
    assert f"(d_model={D_MODEL})" in line and "fit one on this model at a d_model-wide hook" in line
    _nothing_written(workspace)
    assert runner.invoke(app, [*command, "--target", "diff:w3,w4"]).exit_code == 0  # the same command, fixed
    assert {"attribution_graphs", "attribution_nodes"} <= set(Workspace(workspace).results().tables())
