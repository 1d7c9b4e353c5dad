"""Transcoder circuits on code-tiny: exact decomposition identities, head OV sums, de-embedding, path search; logit
roots (the final norm frozen) against the model's own logits and a float64 reference, on GPT-NeoX and on a tiny
random Llama (RMSNorm, grouped-query attention)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.circuits.circuit_export import token_text
from workbench.circuits.transcoder_circuits import (
    SEARCH_KINDS,
    CircuitError,
    deembedding,
    feature_attribution,
    find_logit_paths,
    find_paths,
    logit_attribution,
    pullback,
    salient_tokens,
)

PROMPT = "def area(width, height):\n    return (width * height) / 2\n"


@pytest.fixture(scope="module")
def circuit_setup(code_series):
    from workbench.circuits.sae.base import SAEConfig, create_sae
    from workbench.circuits.sae.train import TrainConfig, train_saes
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
    rows = rows[rows["kind"].isin(SEARCH_KINDS)]
    assert sorted(first["attribution"].abs().round(5)) == sorted(rows["attribution"].abs().head(2).round(5))
    assert (
        nodes[nodes["kind"] == "error"]["depth"] >= 1
    ).all()  # errors are leaves: no node has one as parent
    assert not set(nodes["parent"]) & set(nodes[nodes["kind"] == "error"]["id"])
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


NOTES = [
    "for item in items:    total = total + item",
    "def area(width, height):    return width * height / 2",
]


def _cli(workspace, *args: str):
    from typer.testing import CliRunner

    from workbench.cli import app

    return CliRunner().invoke(app, ["sae", "circuit", *args, "--workspace", str(workspace)])


def test_cli_circuit_on_code_tiny_transcoders_from_a_users_text(
    circuit_setup, zoo_workspace, tmp_path
) -> None:
    """`sae circuit code-tiny@300 --data notes.txt --transcoder DIR ...`: the stored nodes are find_paths's on the
    dataset's second token row, keyed by model, checkpoint, dataset and target; a bad prompt index is refused."""
    from workbench.datasets import load_dataset
    from workbench.workspace import Workspace

    model, transcoders, _, _ = circuit_setup
    workspace = Workspace(tmp_path / "ws").ensure()
    workspace.model_dir("code-tiny").symlink_to(
        zoo_workspace.model_dir("code-tiny"), target_is_directory=True
    )
    for layer, transcoder in transcoders.items():
        transcoder.save(tmp_path / f"tc{layer}")
    notes = tmp_path / "notes.txt"
    notes.write_text("\n".join(NOTES) + "\n")
    args = ["code-tiny@300", "--data", str(notes), "--transcoder", str(tmp_path / "tc0"), "--transcoder",
            str(tmp_path / "tc1"), "--prompt-index", "1", "--top-k", "2", "--depth", "2"]  # fmt: skip
    result = _cli(workspace.root, *args)
    assert result.exit_code == 0, result.output
    rows = workspace.results().read("transcoder_circuits")
    tokens = torch.tensor(load_dataset(notes).token_rows(model.tokenizer, context_length=64)[1])
    with torch.no_grad(), model.capture("blocks.1.hook_resid_pre") as cache:
        model(tokens[None])
    feature = int(transcoders[1].encode(cache["blocks.1.hook_resid_pre"][0, -1]).argmax())
    expected = find_paths(model, transcoders, tokens, layer=1, feature=feature, top_k=2, depth=2).nodes
    assert set(rows["target"]) == {f"L1#{feature}@{len(tokens) - 1}"} and set(rows["dataset"]) == {
        "notes.txt"
    }
    assert (
        set(rows["model"]) == {"code-tiny"}
        and set(rows["checkpoint"]) == {300}
        and (rows["prompt_index"] == 1).all()
    )
    rows = rows.sort_values("id").reset_index(drop=True)
    assert rows["kind"].tolist() == expected["kind"].tolist()
    np.testing.assert_allclose(rows["attribution"], expected["attribution"], rtol=1e-5, atol=1e-6)
    assert _cli(workspace.root, *args).exit_code == 0  # a rerun replaces the circuit's rows
    assert len(workspace.results().read("transcoder_circuits")) == len(rows)
    result = _cli(workspace.root, *args[:-6], "--prompt-index", "5")
    assert result.exit_code == 2 and "no prompt 5" in result.output.splitlines()[-1]
    result = _cli(workspace.root, *args[:5], "--layer", "1")  # only the layer-0 transcoder
    assert result.exit_code == 2 and "no transcoder at layer 1" in result.output
    result = _cli(workspace.root, *args, "--root", "logit", "--max-logits", "2")
    assert result.exit_code == 0, result.output
    rows = (
        workspace.results().read("transcoder_circuits", target=f"logits@{len(tokens) - 1}").sort_values("id")
    )
    expected = find_logit_paths(model, transcoders, tokens, max_logits=2, top_k=2, depth=2).nodes
    assert rows["kind"].tolist() == expected["kind"].tolist() and rows["kind"].iloc[0] == "logit"
    np.testing.assert_allclose(rows["attribution"], expected["attribution"], rtol=1e-5, atol=1e-6)
    result = _cli(workspace.root, *args, "--root", "logit", "--layer", "1")
    assert result.exit_code == 2 and "pass --root feature" in result.output


def test_cli_circuit_on_gpt2_fails_at_once_with_the_reason(zoo_workspace, tmp_path) -> None:
    """GPT-2 has learned absolute positions, not rotary embeddings: refused before the transcoders or the data are
    read (they do not even exist here), one `error:` line, nothing written."""
    import shutil

    import transformers

    path = tmp_path / "my-gpt2"
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=512, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(zoo_workspace.model_dir("code-tiny") / name, path / name)
    workspace = tmp_path / "ws"
    result = _cli(workspace, str(path), "--data", str(tmp_path / "absent.txt"), "--transcoder", "absent")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert (
        lines[-1].startswith("error: transcoder_circuits needs rotary position embeddings")
        and "gpt2" in lines[-1]
    )
    assert "Traceback" not in result.output and not (workspace / "results.duckdb").exists()


def test_run_takes_a_list_of_transcoders_and_refuses_ones_of_another_model(circuit_setup) -> None:
    from workbench.circuits.sae.base import SAEConfig, create_sae
    from workbench.circuits.transcoder_circuits import run
    from workbench.datasets import Dataset

    model, transcoders, _, _ = circuit_setup
    data = Dataset("two-prompts", texts=lambda: NOTES)
    frames = run(model, data, list(transcoders.values()), top_k=1, depth=1)
    nodes = frames["transcoder_circuits"]
    assert (
        len(nodes) == 2
        and nodes["target"].iloc[0].startswith("L1#")
        and (nodes["dataset"] == "two-prompts").all()
    )
    wide = create_sae(SAEConfig("topk", d_in=32, d_sae=16, d_out=32, k=2, hook_in="blocks.0.hook_resid_pre",
                                hook_out="blocks.0.hook_mlp_out", model="other"))  # fmt: skip
    with pytest.raises(
        CircuitError, match=r"\(trained on 'other'\) has d_in=32.*transcoder of another model"
    ):
        run(model, data, {0: wide, 1: transcoders[1]})
    with pytest.raises(CircuitError, match="maps 'blocks.0.hook_resid_pre' → 'blocks.0.hook_resid_post'"):
        run(model, data, [create_sae(SAEConfig("topk", d_in=64, d_sae=16, k=2, hook_in="blocks.0.hook_resid_pre",
                                               hook_out="blocks.0.hook_resid_post"))])  # fmt: skip


def test_logit_attribution_sums_to_the_models_own_logit(circuit_setup) -> None:
    """Every writer of the final residual stream through the frozen final LayerNorm, plus its bias through W_U,
    adds up to the logit the model computes (raw, and demeaned over the vocabulary as circuit-tracer roots it)."""
    model, transcoders, prompt, _ = circuit_setup
    with torch.no_grad():
        logits = model(prompt[None])[0, -1].double()
    for demean in (False, True):
        rows = logit_attribution(model, transcoders, prompt, demean=demean)
        token = rows.attrs["token"]
        expected = float(logits[token] - (logits.mean() if demean else 0.0))
        assert token == int(logits.argmax())
        assert rows["attribution"].sum() == pytest.approx(expected, abs=1e-3 * max(1.0, abs(expected)))
        assert rows.attrs["logit"] == pytest.approx(expected, abs=1e-4)
        assert rows.attrs["probability"] == pytest.approx(float(torch.softmax(logits, 0)[token]), abs=1e-6)
    assert set(rows["kind"]) == {"transcoder", "attention", "embedding", "bias", "error"}
    assert set(rows[rows["kind"] == "transcoder"]["layer"]) == {0, 1}  # every layer writes to the logit
    other = int(logits.argsort()[-2])
    rows = logit_attribution(model, transcoders, prompt, token=other, position=5, demean=False)
    with torch.no_grad():
        at_five = model(prompt[None])[0, 5]
    assert rows["attribution"].sum() == pytest.approx(
        float(at_five[other]), abs=1e-3 * max(1.0, abs(float(at_five[other])))
    )


def test_direct_paths_to_the_logit_equal_a_float64_reference(circuit_setup) -> None:
    """With the final LayerNorm's scale σ frozen at the prompt, feature i of layer L reaches the demeaned logit of t
    directly by activation × (W_dec[i] · v), v = centre(γ ⊙ (W_U[t] − mean_t' W_U[t'])) / σ, and the token embedding
    by W_E[token] · v: computed here in float64 from the HF weights."""
    model, transcoders, prompt, _ = circuit_setup
    rows = logit_attribution(model, transcoders, prompt)
    token = rows.attrs["token"]
    norm, unembed = (
        model.model.gpt_neox.final_layer_norm,
        model.model.get_output_embeddings().weight.detach().double(),
    )
    hooks = ["blocks.1.hook_resid_post", "blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    with torch.no_grad(), model.capture(hooks) as cache:
        model(prompt[None])
    x = cache["blocks.1.hook_resid_post"][0, -1].double()
    sigma = torch.sqrt(x.var(unbiased=False) + norm.eps)
    scaled = norm.weight.detach().double() * (unbiased := unembed[token] - unembed.mean(0))
    vector = (scaled - scaled.mean()) / sigma
    for layer, transcoder in transcoders.items():
        with torch.no_grad():
            acts = transcoder.encode(cache[f"blocks.{layer}.hook_resid_pre"][0, -1]).double()
        active = torch.nonzero(acts).flatten()
        expected = (acts * (transcoder.W_dec.detach().double() @ vector))[active]
        got = rows[(rows["kind"] == "transcoder") & (rows["layer"] == layer)].set_index("index")[
            "attribution"
        ]
        np.testing.assert_allclose(got.loc[active.numpy()].to_numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
    embedding = rows[rows["kind"] == "embedding"]["attribution"].item()
    assert embedding == pytest.approx(
        float(model.embedding_matrix().detach().double()[prompt[-1]] @ vector), abs=1e-4
    )
    bias = rows[(rows["kind"] == "bias") & (rows["index"] == -3)]["attribution"].item()
    assert bias == pytest.approx(float(norm.bias.detach().double() @ unbiased), abs=1e-4)
    graph = find_logit_paths(model, transcoders, prompt, logit_tokens=[token], top_k=4, depth=1).nodes
    first = rows[rows["kind"].isin(SEARCH_KINDS)].head(4)
    assert (
        graph.iloc[0]["kind"] == "logit" and graph.iloc[0]["index"] == token and graph.iloc[0]["layer"] == 2
    )
    np.testing.assert_allclose(graph.iloc[1:]["attribution"], first["attribution"], rtol=1e-5)


def test_logit_paths_start_at_the_most_probable_tokens(circuit_setup) -> None:
    model, transcoders, prompt, _ = circuit_setup
    with torch.no_grad():
        logits = model(prompt[None])[0, -1]
    probabilities = torch.softmax(logits, 0)
    chosen = salient_tokens(logits, max_logits=10, probability=0.5)
    order = probabilities.argsort(descending=True)
    assert chosen == order[: len(chosen)].tolist()
    assert probabilities[chosen].sum() >= 0.5 > probabilities[chosen[:-1]].sum() or len(chosen) == 10
    graph = find_logit_paths(
        model, transcoders, prompt, max_logits=2, logit_probability=1.0, top_k=2, depth=2
    )
    nodes = graph.nodes
    roots = nodes[nodes["parent"] < 0]
    assert roots["kind"].tolist() == ["logit", "logit"] and roots["index"].tolist() == order[:2].tolist()
    np.testing.assert_allclose(roots["probability"], probabilities[order[:2]].numpy(), rtol=1e-5)
    assert roots["output"].tolist() == model.to_str_tokens(order[:2])
    assert (roots["position"] == len(prompt) - 1).all() and len(nodes) <= 2 * (1 + 2 + 4)
    labels = graph.labelled()["node"]
    assert (
        labels.iloc[0]
        == f'logit "{token_text(roots["output"].iloc[0])}" p={roots["probability"].iloc[0]:.3f} @{len(prompt) - 1}'
    )
    figure = graph.figure()
    assert list(figure.layout.yaxis.ticktext)[-1] == "logits"
    with pytest.raises(CircuitError, match=r"layer\(s\) \[0\] below layer 2"):
        find_logit_paths(model, {1: transcoders[1]}, prompt)
    with pytest.raises(CircuitError, match="token 99999 is out of range"):
        logit_attribution(model, transcoders, prompt, token=99999)


def test_logit_circuits_on_a_llama_with_rmsnorm_and_grouped_query_attention() -> None:
    """A random tiny Llama (RMSNorm with non-unit γ, 4 query heads on 2 key/value heads, hook_resid_mid
    transcoders): the decomposition adds up to the model's logit, and each layer's head rows plus the output bias
    add up to its attention output read along the logit direction."""
    import transformers

    from workbench.circuits.sae.base import SAEConfig, create_sae
    from workbench.model import HookedModel

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        hf.model.norm.weight.uniform_(0.5, 1.5)
    model = HookedModel.from_hf(hf, None, name="tiny-llama")
    transcoders = {
        layer: create_sae(SAEConfig("relu", d_in=32, d_sae=48, hook_in=f"blocks.{layer}.hook_resid_mid",
                                    hook_out=f"blocks.{layer}.hook_mlp_out"))
        for layer in (0, 1)
    }  # fmt: skip
    tokens = torch.randint(96, (10,), generator=torch.Generator().manual_seed(1))
    rows = logit_attribution(model, transcoders, tokens, demean=False)
    hooks = ["blocks.0.hook_attn_out", "blocks.1.hook_attn_out", "blocks.1.hook_resid_post"]
    with torch.no_grad(), model.capture(hooks) as cache:
        logits = model(tokens[None])[0, -1]
    expected = float(logits[rows.attrs["token"]])
    assert rows["attribution"].sum() == pytest.approx(expected, abs=1e-3 * max(1.0, abs(expected)))
    x = cache["blocks.1.hook_resid_post"][0, -1].double()
    rms = torch.sqrt(x.pow(2).mean() + hf.model.norm.variance_epsilon)
    vector = (
        hf.model.norm.weight.detach().double()
        * hf.lm_head.weight.detach().double()[rows.attrs["token"]]
        / rms
    )
    for layer in (0, 1):
        heads = rows[(rows["kind"] == "attention") & (rows["layer"] == layer)]["attribution"].sum()
        bias = rows[(rows["kind"] == "bias") & (rows["layer"] == layer) & (rows["index"] == -2)][
            "attribution"
        ].sum()
        assert heads + bias == pytest.approx(
            float(cache[f"blocks.{layer}.hook_attn_out"][0, -1].double() @ vector), abs=1e-4
        )
    graph = find_logit_paths(model, transcoders, tokens, max_logits=1, top_k=3, depth=2)
    assert graph.nodes.iloc[0]["kind"] == "logit" and len(graph.nodes) > 1
