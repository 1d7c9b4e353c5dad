"""Transcoder circuits on code-tiny: exact decomposition identities, head OV sums, de-embedding, path search."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from circuits.transcoder_circuits import (
    CircuitError,
    deembedding,
    feature_attribution,
    find_paths,
    pullback,
)

PROMPT = "def area(width, height):\n    return (width * height) / 2\n"


@pytest.fixture(scope="module")
def circuit_setup(code_series):
    from circuits.sae.base import SAEConfig, create_sae
    from circuits.sae.train import TrainConfig, train_saes
    from workbench.zoo.labels import python_label_dataset

    model = code_series.load(code_series.steps[-1])
    tokens, _ = python_label_dataset(model.tokenizer, 48, 64, seed=3)
    hooks = [f"blocks.{layer}.{kind}" for layer in (0, 1) for kind in ("hook_resid_pre", "hook_mlp_out")]
    with torch.no_grad(), model.capture(hooks) as cache:
        model(tokens, attention_mask=(tokens != model.tokenizer.pad_token_id).long())
    keep = (tokens != model.tokenizer.pad_token_id).flatten()
    rows = {h: cache[h].reshape(-1, cache[h].shape[-1])[keep] for h in hooks}
    transcoders = {
        layer: create_sae(SAEConfig(architecture="topk", d_in=64, d_sae=128, k=8,
                                    hook_in=f"blocks.{layer}.hook_resid_pre", hook_out=f"blocks.{layer}.hook_mlp_out"))
        for layer in (0, 1)
    }  # fmt: skip
    generator = torch.Generator().manual_seed(0)

    def batches():
        while True:
            index = torch.randint(len(rows[hooks[0]]), (256,), generator=generator)
            yield {h: v[index] for h, v in rows.items()}

    trained = train_saes({str(k): v for k, v in transcoders.items()}, batches(),
                         TrainConfig(steps=150, lr=3e-3, warmup_steps=10, progress=False)).saes  # fmt: skip
    transcoders = {int(k): v.eval() for k, v in trained.items()}
    prompt = model.to_tokens(PROMPT)[0]
    acts = transcoders[1].encode(_resid(model, prompt, 1)[-1])
    return model, transcoders, prompt, int(acts.argmax())


def _resid(model, tokens, layer):
    with torch.no_grad(), model.capture(f"blocks.{layer}.hook_resid_pre") as cache:
        model(tokens[None])
    return cache[f"blocks.{layer}.hook_resid_pre"][0]


def test_attribution_rows_sum_to_the_pre_activation(circuit_setup) -> None:
    model, transcoders, prompt, feature = circuit_setup
    rows = feature_attribution(model, transcoders, prompt, layer=1, feature=feature, position=-1)
    total = rows["attribution"].sum() + float(transcoders[1].b_enc[feature].detach())
    assert total == pytest.approx(rows.attrs["pre_activation"], abs=1e-3 * max(1, abs(total)))
    assert rows.attrs["activation"] > 0
    assert set(rows["kind"]) >= {"transcoder", "attention", "embedding", "bias", "error"}
    transcoder_rows = rows[rows["kind"] == "transcoder"]
    assert (transcoder_rows["layer"] == 0).all()
    np.testing.assert_allclose(
        transcoder_rows["attribution"], transcoder_rows["activation"] * transcoder_rows["pullback"], rtol=1e-5
    )


def test_head_contributions_sum_to_the_models_attention_output(circuit_setup) -> None:
    model, transcoders, prompt, feature = circuit_setup
    rows = feature_attribution(model, transcoders, prompt, layer=1, feature=feature, position=5)
    vector = transcoders[1].W_enc[:, feature].detach()
    with torch.no_grad(), model.capture("blocks.0.hook_attn_out") as cache:
        model(prompt[None])
    expected = float(cache["blocks.0.hook_attn_out"][0, 5] @ vector)
    heads = rows[(rows["kind"] == "attention") & (rows["layer"] == 0)]["attribution"].sum()
    bias = rows[(rows["kind"] == "bias") & (rows["index"] == -2)]["attribution"].sum()
    assert heads + bias == pytest.approx(expected, abs=1e-4)
    dense = model.model.gpt_neox.layers[
        0
    ].attention.dense  # the output projection's own bias, from the weights
    assert bias == pytest.approx(float(dense.bias.detach() @ vector), abs=1e-4)
    assert (rows[rows["kind"] == "attention"]["source_position"] <= 5).all()


def test_pullback_and_deembedding_match_the_weights(circuit_setup) -> None:
    model, transcoders, _, feature = circuit_setup
    table = pullback(transcoders, 1, feature, top_k=None)
    expected = transcoders[0].W_dec.detach() @ transcoders[1].W_enc[:, feature].detach()
    ordered = table.sort_values("source_feature")["pullback"].to_numpy()
    np.testing.assert_allclose(ordered, expected.numpy(), rtol=1e-5, atol=1e-6)
    tokens = deembedding(model, transcoders, 1, feature, top_k=5)
    scores = model.embedding_matrix().detach() @ transcoders[1].W_enc[:, feature].detach()
    assert int(tokens["token"].iloc[0]) == int(scores.argmax())
    assert int(tokens["token"].iloc[5]) == int(scores.argmin())


def test_path_search_expands_the_strongest_contributors(circuit_setup) -> None:
    model, transcoders, prompt, feature = circuit_setup
    graph = find_paths(model, transcoders, prompt, layer=1, feature=feature, top_k=2, depth=2)
    nodes = graph.nodes
    assert nodes.iloc[0]["kind"] == "target" and len(nodes) <= 1 + 2 + 4
    first = nodes[nodes["depth"] == 1]
    rows = feature_attribution(model, transcoders, prompt, layer=1, feature=feature)
    rows = rows[rows["kind"].isin(["transcoder", "attention", "embedding"])]
    assert sorted(first["attribution"].abs().round(5)) == sorted(rows["attribution"].abs().head(2).round(5))
    assert (nodes[nodes["depth"] == 2]["layer"] < 1).all()
    assert len(graph.figure().data) == len(nodes)


def test_bad_circuit_queries_are_named(circuit_setup) -> None:
    model, transcoders, prompt, feature = circuit_setup
    with pytest.raises(CircuitError, match="no transcoder at layer 3"):
        pullback(transcoders, 3, 0)
    with pytest.raises(CircuitError, match="out of range"):
        feature_attribution(model, transcoders, prompt, 1, 500)
    with pytest.raises(
        CircuitError, match=r"no transcoder for layer\(s\) \[0\] below layer 1.*Train transcoders"
    ):
        feature_attribution(model, {1: transcoders[1]}, prompt, 1, feature)
    with pytest.raises(CircuitError, match=r"layer\(s\) \[0\]"):
        find_paths(model, {1: transcoders[1]}, prompt, 1, feature)
    with pytest.raises(CircuitError, match="position 99"):
        feature_attribution(model, transcoders, prompt, 1, feature, position=99)
