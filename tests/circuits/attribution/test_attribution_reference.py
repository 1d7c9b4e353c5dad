"""Attribution internals against independent references (issue 31, speed and memory): the value maps read off fused
Q/K/V projections equal the value columns of the weights, and the graphs built through them equal the graphs built
through the model's own attention (adjacency and head loadings, float64); a forward stopped at the output head reads
what the full forward reads; the chunked influence estimate equals the dense formula."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest
import torch
import transformers

from workbench.circuits.attribution import replacement as replacement_module
from workbench.circuits.attribution.graph import _partial_influence, attribute
from workbench.circuits.attribution.replacement import ReplacementModel
from workbench.circuits.attribution.transcoders import as_transcoders
from workbench.circuits.sae.base import SAEConfig, create_sae
from workbench.model import HookedModel

D_MODEL, N_HEADS, N_LAYERS, LATENTS, VOCAB = 16, 4, 2, 24, 40
TOKENS = torch.tensor([1, 7, 3, 9, 12, 5, 30, 2])


def _tiny(family: str) -> tuple[HookedModel, dict]:
    """A float64 random GPT-2 (fused Conv1D ``c_attn``, [q | k | v]) or sequential GPT-NeoX (fused Linear
    ``query_key_value``, per head [q | k | v]) with ReLU transcoders on ``hook_resid_mid``."""
    torch.manual_seed(0)
    if family == "gpt2":
        config: dict[str, Any] = {"n_layer": N_LAYERS, "n_embd": D_MODEL, "n_head": N_HEADS, "n_positions": 16,
                                  "vocab_size": VOCAB}  # fmt: skip
        hf: Any = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config))
    else:
        hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            num_hidden_layers=N_LAYERS, hidden_size=D_MODEL, num_attention_heads=N_HEADS, intermediate_size=32,
            max_position_embeddings=16, vocab_size=VOCAB, use_parallel_residual=False))  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in hf.named_parameters():
            if name.endswith("bias"):  # value biases too: the map's constant must be exercised
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    model = HookedModel.from_hf(hf.double().eval(), None, name=f"ref-{family}")
    saes = {}
    for layer in range(N_LAYERS):
        sae = create_sae(SAEConfig("relu", d_in=D_MODEL, d_sae=LATENTS, hook_in=f"blocks.{layer}.hook_resid_mid",
                                   hook_out=f"blocks.{layer}.hook_mlp_out"))  # fmt: skip
        with torch.no_grad():
            sae.b_enc.copy_(torch.randn(LATENTS, generator=generator) * 0.3)
        saes[layer] = sae.double().eval()
    return model, saes


def _value_columns(model: HookedModel, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The value projection (W [d_model, heads · d_head], b) cut out of the fused weights by their documented
    layouts: GPT-2's Conv1D weight [d, 3d] is [q | k | v]; GPT-NeoX's Linear weight [3d, d] is per head [q | k | v]."""
    d_head = D_MODEL // N_HEADS
    hf: Any = model.model
    if hasattr(hf, "transformer"):  # GPT-2
        c_attn = hf.transformer.h[layer].attn.c_attn
        return c_attn.weight[:, 2 * D_MODEL :], c_attn.bias[2 * D_MODEL :]
    qkv = hf.gpt_neox.layers[layer].attention.query_key_value
    weight = qkv.weight.view(N_HEADS, 3 * d_head, D_MODEL)[:, 2 * d_head :].reshape(D_MODEL, D_MODEL)
    bias = qkv.bias.view(N_HEADS, 3 * d_head)[:, 2 * d_head :].reshape(D_MODEL)
    return weight.T, bias


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_value_maps_are_the_value_columns_of_the_fused_weights(family: str) -> None:
    model, saes = _tiny(family)
    replacement = ReplacementModel(model, as_transcoders(model, saes), TOKENS)
    for layer, found in enumerate(replacement.value_maps):
        assert found is not None, f"layer {layer}: no value map for a fused Q/K/V projection"
        weight, bias = _value_columns(model, layer)
        torch.testing.assert_close(found.weight, weight.detach(), atol=1e-12, rtol=0)
        torch.testing.assert_close(found.bias, bias.detach(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_graphs_through_value_maps_equal_graphs_through_the_models_attention(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, saes = _tiny(family)
    # a budget below the active features: selection by estimated influence and the dropped sums are exercised too
    options = {
        "targets": ["logits", "feature:1:6:3"],
        "max_logits": 2,
        "max_feature_nodes": 10,
        "batch_size": 8,
    }
    fast = attribute(model, saes, TOKENS, **options)
    monkeypatch.setattr(replacement_module, "value_map", lambda *args, **kwargs: None)
    reference = attribute(model, saes, TOKENS, **options)
    assert fast.n_features == reference.n_features == 10 < fast.n_active
    torch.testing.assert_close(fast.features, reference.features)
    torch.testing.assert_close(fast.adjacency, reference.adjacency, atol=1e-10, rtol=0)
    torch.testing.assert_close(fast.constants, reference.constants, atol=1e-10, rtol=0)
    torch.testing.assert_close(fast.dropped, reference.dropped, atol=1e-10, rtol=0)
    assert float(fast.dropped.abs().max()) > 0
    assert fast.head_loadings is not None and reference.head_loadings is not None
    keys = ["target", "source", "layer", "head"]
    ours = fast.head_loadings.sort_values(keys).reset_index(drop=True)
    theirs = reference.head_loadings.sort_values(keys).reset_index(drop=True)
    assert len(ours) == len(theirs) > 0
    pd.testing.assert_frame_equal(ours[keys], theirs[keys])
    assert float((ours["weight"] - theirs["weight"]).abs().max()) < 1e-10


def test_a_forward_stopped_at_the_head_reads_what_the_full_forward_reads() -> None:
    model, saes = _tiny("gpt_neox")
    replacement = ReplacementModel(model, as_transcoders(model, saes), TOKENS)
    reads = [replacement.final_hook, "blocks.1.attn.hook_z", "blocks.0.attn.hook_v"]
    sources = replacement.clean_sources(batch=2)
    logits, full = replacement.forward(sources, reads=reads)
    stopped, partial = replacement.forward(sources, reads=reads, until_head=True)
    assert logits is not None and stopped is None
    torch.testing.assert_close(logits[0], replacement.logits, atol=1e-10, rtol=0)
    for name in [*reads, "blocks.0.hook_resid_mid", "blocks.1.hook_resid_mid"]:
        torch.testing.assert_close(partial[name], full[name], atol=1e-12, rtol=0)


def test_chunked_influence_estimate_equals_the_dense_formula() -> None:
    generator = torch.Generator().manual_seed(4)
    n_rows, n_columns = 11, 17
    matrix = torch.randn(n_rows, n_columns, generator=generator, dtype=torch.float64)
    matrix[3] = 0  # a row without inputs
    row_nodes = torch.randperm(n_columns, generator=generator)[:n_rows]
    weights = torch.zeros(n_columns, dtype=torch.float64)
    weights[row_nodes[:2]] = torch.tensor([0.7, 0.3], dtype=torch.float64)
    normalised = matrix.abs() / matrix.abs().sum(1, keepdim=True).clamp_min(1e-10)
    expected, current = torch.zeros(n_columns, dtype=torch.float64), weights
    for _ in range(6):
        current = current[row_nodes] @ normalised
        expected += current
    found = _partial_influence(matrix, row_nodes, weights, max_iter=6, chunk=3)
    torch.testing.assert_close(found, expected, atol=1e-12, rtol=1e-12)
