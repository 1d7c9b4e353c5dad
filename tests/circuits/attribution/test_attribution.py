"""Attribution graphs on tiny random models in float64 (GPT-2 with position embeddings and skip transcoders on
ln2.hook_normalized, parallel GPT-NeoX with hook_resid_pre transcoders, Llama with RMSNorm and grouped-query
attention on hook_resid_mid, a cross-layer transcoder on Llama, and the encoders BERT (masked LM) and ViT): every row adds up to its node's value, the
batched adjacency equals a dense autograd Jacobian of the frozen replacement model and the effect of removing a
source, the replacement model reproduces the logits, and bad input is refused with a message naming the fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers
from transformer_lens import HookedTransformer, HookedTransformerConfig

from workbench.circuits.attribution.graph import Graph, attribute, probe_target
from workbench.circuits.attribution.pruning import graph_scores, node_influence, prune
from workbench.circuits.attribution.replacement import ReplacementModel, Sources
from workbench.circuits.attribution.transcoders import AttributionError, as_transcoders
from workbench.circuits.sae.base import SAEConfig, create_sae
from workbench.circuits.sae.formats.circuit_tracer import CrossLayerTranscoder
from workbench.model import HookedModel

D_MODEL, N_LAYERS, D_TRANSCODER, VOCAB = 16, 2, 16, 40
TARGETS = ["logits", "feature:1:5:3", "diff:3,4"]


def _randomise(module: torch.nn.Module) -> None:
    """Non-trivial norm weights and biases everywhere, so that every bias constant is exercised."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name:
                parameter.copy_(torch.rand(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.4 + 0.8
                                if name.endswith("weight") else
                                torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.1)  # fmt: skip


def _model(family: str) -> HookedModel:
    torch.manual_seed(0)
    shape = {"vocab_size": VOCAB}
    if family == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=N_LAYERS, n_embd=D_MODEL, n_head=4,
                                                                  n_positions=16, bos_token_id=0, eos_token_id=0, **shape))  # fmt: skip
    elif family == "gpt_neox":
        hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            num_hidden_layers=N_LAYERS, hidden_size=D_MODEL, num_attention_heads=4, intermediate_size=32,
            max_position_embeddings=16, rotary_pct=0.5, use_parallel_residual=True, bos_token_id=0, eos_token_id=0,
            **shape))  # fmt: skip
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            num_hidden_layers=N_LAYERS, hidden_size=D_MODEL, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=32, max_position_embeddings=16, bos_token_id=0, eos_token_id=0, **shape))  # fmt: skip
    hf = hf.double().eval()
    _randomise(hf)
    return HookedModel.from_hf(hf, None, name=f"tiny-{family}")


def _per_layer(hook: str, skip: bool, architecture: str = "relu") -> dict:
    generator = torch.Generator().manual_seed(2)
    saes = {}
    for layer in range(N_LAYERS):
        sae = create_sae(SAEConfig(architecture, d_in=D_MODEL, d_sae=D_TRANSCODER, skip=skip,
                                   hook_in=f"blocks.{layer}.{hook}", hook_out=f"blocks.{layer}.hook_mlp_out"))  # fmt: skip
        with torch.no_grad():
            sae.b_enc.copy_(torch.randn(D_TRANSCODER, generator=generator) * 0.3)
            sae.b_dec.copy_(torch.randn(D_MODEL, generator=generator) * 0.1)
            if sae.W_skip is not None:
                sae.W_skip.copy_(torch.randn(D_MODEL, D_MODEL, generator=generator) * 0.05)
        saes[layer] = sae.double().eval()
    return saes


def _clt() -> CrossLayerTranscoder:
    generator = torch.Generator().manual_seed(3)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale

    return CrossLayerTranscoder(rand(N_LAYERS, D_MODEL, D_TRANSCODER, scale=0.5), rand(N_LAYERS, D_TRANSCODER, scale=0.3),
                                torch.full((N_LAYERS, D_TRANSCODER), 0.05, dtype=torch.float64),
                                [rand(D_TRANSCODER, N_LAYERS - i, D_MODEL, scale=0.2) for i in range(N_LAYERS)],
                                rand(N_LAYERS, D_MODEL, scale=0.1), "mlp.hook_in", "mlp.hook_out")  # fmt: skip


CASES = {
    "gpt2-ln2-skip": ("gpt2", lambda: _per_layer("ln2.hook_normalized", skip=True)),
    "neox-parallel-resid-pre": ("gpt_neox", lambda: _per_layer("hook_resid_pre", skip=False)),
    "llama-gqa-resid-mid": (
        "llama",
        lambda: _per_layer("hook_resid_mid", skip=False, architecture="jumprelu"),
    ),
    "llama-clt": ("llama", _clt),
}
TOKENS = torch.tensor([1, 7, 3, 22, 9, 31, 5])


def save_user_files(model: HookedModel, transcoders: dict, root, name: str, rows: torch.Tensor | None = None):
    """``model`` saved as a user's directory ``root/name`` (float32 save_pretrained), its per-layer transcoders as SAE
    directories ``root/tc<layer>`` and token ``rows`` [n, pos] (default: TOKENS) as ``root/ids.npy`` → (the model
    directory, the ``--transcoders`` arguments). Model and transcoders are left in float64."""
    import numpy as np

    model_dir = root / name
    model.model.float().save_pretrained(model_dir)
    model.model.double()
    arguments = []
    for layer, sae in transcoders.items():
        sae.float().save(root / f"tc{layer}")
        sae.double()
        arguments += ["--transcoders", str(root / f"tc{layer}")]
    np.save(root / "ids.npy", (TOKENS[None] if rows is None else rows).numpy())
    return model_dir, arguments


@pytest.fixture(scope="module")
def built() -> dict[str, tuple[HookedModel, object, Graph]]:
    models = {family: _model(family) for family in ("gpt2", "gpt_neox", "llama")}
    found = {}
    for case, (family, make) in CASES.items():
        transcoders = make()
        graph = attribute(models[family], transcoders, TOKENS, targets=TARGETS, batch_size=64)
        found[case] = (models[family], transcoders, graph)
    return found


@pytest.mark.parametrize("case", list(CASES))
def test_every_row_adds_up_to_its_value(built, case) -> None:
    """Features: incoming edges + constant (b_enc and every bias through the frozen paths) = pre-activation; logit
    targets: = the demeaned logit; the diff target: = logit A − logit B; the feature target: its pre-activation."""
    model, _, graph = built[case]
    assert graph.n_features == graph.n_active > 0
    rows = ~torch.isnan(graph.values)
    assert int(rows.sum()) == graph.n_features + graph.n_targets
    total = graph.adjacency.sum(1) + graph.constants + graph.dropped
    assert float((total[rows] - graph.values[rows]).abs().max()) < 1e-5
    logits = model(TOKENS[None])[0, -1].double()
    logit_targets = [t for t in graph.targets if t.kind == "logit"]
    assert logit_targets and sum(t.weight for t in logit_targets) >= 0.95 or len(logit_targets) == 10
    for target in logit_targets:
        assert target.value == pytest.approx(float(logits[target.token] - logits.mean()), abs=1e-6)
    diff = next(t for t in graph.targets if t.kind == "diff")
    assert diff.value == pytest.approx(
        float(logits[3] - logits[4]), abs=1e-6
    )  # Llama's RMSNorm runs in float32
    assert float(graph.constants[graph.n_nodes - graph.n_targets :].abs().max()) > 1e-3  # biases matter here
    assert (
        float(
            graph.adjacency[: graph.n_features, graph.n_features : graph.n_features + graph.n_errors]
            .abs()
            .max()
        )
        > 0
    )


def test_pruning_with_fewer_feature_nodes_keeps_the_identity(built) -> None:
    """max_feature_nodes keeps the most influential features; what the others contribute is reported in
    ``dropped``, so rows still add up, and scores lie in [0, 1]."""
    model, transcoders, full = built["gpt2-ln2-skip"]
    graph = attribute(
        model, transcoders, TOKENS, targets="logits", max_feature_nodes=20, batch_size=8, heads=False
    )
    assert graph.n_features == 20 and graph.n_active == full.n_active
    rows = ~torch.isnan(graph.values)
    total = graph.adjacency.sum(1) + graph.constants + graph.dropped
    assert float((total[rows] - graph.values[rows]).abs().max()) < 1e-5
    assert float(graph.dropped[: graph.n_features].abs().sum()) > 0
    for value in graph.scores.values():
        assert 0.0 <= value <= 1.0
    pruned = prune(full, 0.8, 0.98)
    assert bool(pruned.nodes[full.n_nodes - full.n_inputs - full.n_targets :].all())
    assert 0 < int(pruned.nodes[: full.n_features].sum()) < full.n_features
    assert not bool(pruned.edges[~pruned.nodes].any()) and not bool(pruned.edges[:, ~pruned.nodes].any())
    influence = node_influence(full)
    assert float(influence[full.n_nodes - full.n_targets :].abs().max()) == 0.0  # targets influence nothing
    assert graph_scores(full) == full.scores


def _dense_jacobian(replacement: ReplacementModel, graph: Graph) -> torch.Tensor:
    """A[rows, columns] from torch.autograd.functional.jacobian of the frozen model's read-outs with respect to its
    sources (flattened), mapped onto the graph's columns by each source's vector."""
    sources = replacement.clean_sources()
    shapes = [t.shape for t in sources.leaves()]
    sizes = [t.numel() for t in sources.leaves()]
    tc = replacement.transcoders
    feature_rows = [(tc.hook_in(int(la)), int(p), tc.encoder_vectors(int(la), torch.tensor([int(f)]))[0][0])
                    for la, p, f in graph.features]  # fmt: skip
    rows = feature_rows + [(t.hook, t.position, t.vector) for t in graph.targets]

    def readouts(flat: torch.Tensor) -> torch.Tensor:
        parts = [p.reshape(s) for p, s in zip(flat.split(sizes), shapes, strict=True)]
        pos_embed = parts[2] if replacement.has_pos_embed else None
        _, reads = replacement.forward(Sources(parts[1], pos_embed, parts[0]), reads=[r[0] for r in rows])
        return torch.stack([reads[hook][0, position] @ vector for hook, position, vector in rows])

    flat = torch.cat([t.flatten() for t in sources.leaves()]).detach()
    jacobian = torch.autograd.functional.jacobian(readouts, flat, vectorize=True)  # [n_rows, n_source_dims]
    j_writes, j_embed, *j_pos = (
        j.reshape(len(rows), *s) for j, s in zip(jacobian.split(sizes, 1), shapes, strict=True)
    )
    columns = []
    for (layer, position, feature), value in zip(graph.features.tolist(), graph.activations, strict=True):
        decoder = tc.decoder_vectors(layer, torch.tensor([feature]))[0]  # [n_out, d]
        columns.append(
            value * (j_writes[:, 0, layer : layer + len(decoder), position] * decoder).sum((-1, -2))
        )
    columns += list((j_writes[:, 0] * replacement.errors).sum(-1).flatten(1).T)
    columns += list((j_embed[:, 0] * replacement.embed).sum(-1).T)
    if j_pos:
        columns += list((j_pos[0][:, 0] * replacement.pos_embed).sum(-1).T)
    dense = torch.stack(columns, 1)
    return torch.cat([dense, torch.zeros(len(rows), graph.n_targets, dtype=dense.dtype)], 1)


@pytest.mark.parametrize("case", ["gpt2-ln2-skip", "llama-clt"])
def test_batched_adjacency_equals_a_dense_jacobian(built, case) -> None:
    model, transcoders, graph = built[case]
    replacement = ReplacementModel(model, as_transcoders(model, transcoders), TOKENS)
    dense = _dense_jacobian(replacement, graph)
    rows = torch.cat(
        [torch.arange(graph.n_features), torch.arange(graph.n_nodes - graph.n_targets, graph.n_nodes)]
    )
    assert float((graph.adjacency[rows] - dense).abs().max()) < 1e-9


def test_zeroing_a_source_changes_its_target_by_minus_the_edge(built) -> None:
    """Remove one source from the frozen model (a feature's decoded write, an error, a token embedding) with every
    other source held: the target's read-out moves by exactly −A[t, s]."""
    model, transcoders, graph = built["llama-clt"]
    tc = as_transcoders(model, transcoders)
    replacement = ReplacementModel(model, tc, TOKENS)
    target = graph.targets[0]
    row = graph.n_nodes - graph.n_targets

    def readout(sources: Sources) -> float:
        with torch.no_grad():
            _, reads = replacement.forward(sources, reads=[target.hook])
        return float(reads[target.hook][0, target.position] @ target.vector)

    base = readout(replacement.clean_sources())
    strongest = int(graph.adjacency[row, : graph.n_features].abs().argmax())
    layer, position, feature = graph.features[strongest].tolist()
    sources = replacement.clean_sources()
    decoder = tc.decoder_vectors(layer, torch.tensor([feature]))[0]
    sources.writes[0, layer : layer + len(decoder), position] -= graph.activations[strongest] * decoder
    assert readout(sources) - base == pytest.approx(-float(graph.adjacency[row, strongest]), abs=1e-9)
    sources = replacement.clean_sources()
    sources.writes[0, 0, 2] -= replacement.errors[0, 2]
    error_node = graph.n_features + 0 * graph.n_pos + 2
    assert readout(sources) - base == pytest.approx(-float(graph.adjacency[row, error_node]), abs=1e-9)
    sources = replacement.clean_sources()
    sources.embed[0, 3] = 0
    token_node = graph.n_features + graph.n_errors + 3
    assert readout(sources) - base == pytest.approx(-float(graph.adjacency[row, token_node]), abs=1e-9)


@pytest.mark.parametrize("case", list(CASES))
def test_replacement_reproduces_the_logits(built, case) -> None:
    """With error nodes the frozen replacement model's logits are the model's; without them they are not."""
    model, transcoders, _ = built[case]
    replacement = ReplacementModel(model, as_transcoders(model, transcoders), TOKENS)
    with torch.no_grad():
        truth = model(TOKENS[None])[0]
        logits, _ = replacement.forward(replacement.clean_sources(batch=2))
        sources = replacement.clean_sources()
        sources.writes -= replacement.errors[None]
        without_errors, _ = replacement.forward(sources)
    assert float((logits - truth[None]).abs().max()) < 1e-5
    assert float((without_errors[0] - truth).abs().max()) > 1e-3
    gap = replacement.error_gap()
    assert gap["reproduction_max_diff"] < 1e-5
    assert gap["errors_zeroed_max_diff"] == pytest.approx(
        float((without_errors[0] - truth).abs().max()), rel=1e-9
    )
    log_p, log_q = truth.double().log_softmax(-1), without_errors[0].double().log_softmax(-1)
    kl = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean()
    assert gap["errors_zeroed_kl"] == pytest.approx(float(kl), rel=1e-6) and gap["errors_zeroed_kl"] > 0
    assert 0.0 <= gap["errors_zeroed_top1"] <= 1.0
    assert built[case][2].error_gap == pytest.approx(gap, rel=1e-6, abs=1e-9)  # the graph records it


def test_probe_target_rows_add_up(built) -> None:
    model, transcoders, _ = built["llama-gqa-resid-mid"]
    replacement = ReplacementModel(model, as_transcoders(model, transcoders), TOKENS)
    direction = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    target = probe_target(
        replacement, "blocks.1.hook_resid_post", direction, bias=0.25, position=4, label="probe"
    )
    graph = attribute(model, transcoders, TOKENS, targets=[target], batch_size=8, heads=False)
    last = graph.n_nodes - 1
    total = graph.adjacency[last].sum() + graph.constants[last] + graph.dropped[last]
    assert float(total) == pytest.approx(target.value, abs=1e-9)
    with torch.no_grad(), model.capture("blocks.1.hook_resid_post") as cache:
        model(TOKENS[None])
    assert target.value == pytest.approx(
        float(cache["blocks.1.hook_resid_post"][0, 4] @ direction + 0.25), abs=1e-6
    )
    features_after = graph.features[:, 1] > 4
    assert not bool(
        graph.adjacency[last, : graph.n_features][features_after].any()
    )  # causal: no later positions


def _encoder(family: str) -> HookedModel:
    torch.manual_seed(0)
    if family == "bert":
        hf: torch.nn.Module = transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=4,
            intermediate_size=32, max_position_embeddings=16))  # fmt: skip
    else:
        hf = transformers.ViTForImageClassification(transformers.ViTConfig(
            num_hidden_layers=N_LAYERS, hidden_size=D_MODEL, num_attention_heads=4, intermediate_size=32,
            image_size=8, patch_size=2, num_channels=1, num_labels=10))  # fmt: skip
    hf = hf.double().eval()
    _randomise(hf)
    return HookedModel.from_hf(hf, None, name=f"tiny-{family}")


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_encoders_bert_mlm_and_vit_class_logits(family) -> None:
    """Bidirectional encoders: BERT's masked-LM logits (read at its head's input, the transform's GELU frozen at
    its prompt gain and its LayerNorm at its scale), a feature and a probe direction; ViT's class logits (read at
    the class token of the final norm) and a feature. Rows add up in float64, equal a dense Jacobian, match the
    Hugging Face model's logits, the replacement reproduces the outputs, and edges run from later positions too."""
    model = _encoder(family)
    transcoders = _per_layer("hook_resid_mid", skip=False)
    prompt = TOKENS if family == "bert" else torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(4),
                                                          dtype=torch.float64)  # fmt: skip
    replacement = ReplacementModel(model, as_transcoders(model, transcoders), prompt)
    targets: list = ["logits", "feature:1:2:3"]
    if family == "bert":
        direction = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        targets += [
            "diff:3,4",
            probe_target(replacement, "blocks.1.hook_resid_mid", direction, 0.1, position=1),
        ]
    graph = attribute(model, transcoders, prompt, targets=targets, position=3, batch_size=16)
    assert graph.head_loadings is None  # bidirectional: no unique first head
    rows = ~torch.isnan(graph.values)
    total = graph.adjacency.sum(1) + graph.constants + graph.dropped
    assert float((total[rows] - graph.values[rows]).abs().max()) < 1e-9
    with torch.no_grad():
        hf_logits = (model.model(input_ids=TOKENS[None]).logits[0, 3] if family == "bert"
                     else model.model(pixel_values=prompt[None]).logits[0])  # fmt: skip
    logit_targets = [t for t in graph.targets if t.kind == "logit"]
    assert logit_targets and all(t.position == (3 if family == "bert" else 0) for t in logit_targets)
    for target in logit_targets:
        assert target.value == pytest.approx(float(hf_logits[target.token] - hf_logits.mean()), abs=1e-9)
    dense = _dense_jacobian(replacement, graph)
    row_index = torch.cat(
        [torch.arange(graph.n_features), torch.arange(graph.n_nodes - graph.n_targets, graph.n_nodes)]
    )
    assert float((graph.adjacency[row_index] - dense).abs().max()) < 1e-9
    assert graph.error_gap["reproduction_max_diff"] < 1e-9 and graph.error_gap["errors_zeroed_kl"] > 0
    position = torch.tensor(graph.nodes()["position"].to_numpy())
    later = position[None, :] > position[:, None]
    assert bool((graph.adjacency[: graph.n_features].abs() * later[: graph.n_features] > 1e-12).any())
    if family == "vit":  # two images have the same positions 0..n; their stored graphs must not collide
        from workbench.circuits.attribution.store import graph_id

        small = [attribute(model, transcoders, image, targets="logits", max_feature_nodes=0, batch_size=16)
                 for image in (prompt, prompt.flip(-1))]  # fmt: skip
        assert graph_id(small[0], ["t0", "t1"], 0) != graph_id(small[1], ["t0", "t1"], 0)


def test_bad_input_is_refused_naming_the_fix(built) -> None:
    model, transcoders, _ = built["gpt2-ln2-skip"]
    with pytest.raises(AttributionError, match="no transcoder for layer"):
        attribute(model, {0: transcoders[0]}, TOKENS)
    wide = create_sae(SAEConfig("relu", d_in=D_MODEL * 2, d_sae=8, hook_in="blocks.0.ln2.hook_normalized",
                                hook_out="blocks.0.hook_mlp_out"))  # fmt: skip
    with pytest.raises(AttributionError, match="another model"):
        attribute(model, {0: wide, 1: transcoders[1]}, TOKENS)
    with pytest.raises(AttributionError, match="hook_resid_mid"):
        attribute(model, _per_layer("hook_resid_pre", skip=False), TOKENS)
    with pytest.raises(AttributionError, match="not an MLP input"):
        attribute(model, _per_layer("hook_resid_post", skip=False), TOKENS)
    with pytest.raises(AttributionError, match="not in the vocabulary"):
        attribute(model, transcoders, TOKENS, targets="diff:3,400")
    with pytest.raises(AttributionError, match="shorten the prompt"):
        attribute(model, transcoders, torch.arange(20) % VOCAB)
    with pytest.raises(AttributionError, match="is not one of"):
        attribute(model, transcoders, TOKENS, targets="heads")


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A whitespace word tokenizer over the tiny models' vocabulary: ``w1`` .. ``w39`` are tokens 1..39, anything
    else is the unknown token ``[UNK]`` (0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(
        models.WordLevel({"[UNK]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}, unk_token="[UNK]")
    )
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", pad_token="[UNK]")


def test_a_text_prompt_longer_than_the_positions_is_refused_not_cut() -> None:
    """A text prompt of 20 tokens on a model of 16 positions, which the tokenizer alone cuts to 16 silently, is
    refused naming its length, the limit and the fix; one of exactly 16 tokens is traced whole. diff tokens that are
    not one token of the vocabulary are refused naming them."""
    model = _model("gpt2")
    model.tokenizer = word_tokenizer()
    transcoders = _per_layer("ln2.hook_normalized", skip=True)
    words = [f"w{1 + i % (VOCAB - 1)}" for i in range(20)]
    assert model.tokenize(" ".join(words))["input_ids"].shape == (1, 16)  # what used to be traced
    with pytest.raises(AttributionError, match=r"^the prompt has 20 tokens but tiny-gpt2 has 16 positions; shorten "
                       r"the prompt to at most 16 tokens$"):  # fmt: skip
        attribute(model, transcoders, " ".join(words), targets="feature:1:5:3")
    fits = " ".join(words[:16])
    graph = attribute(model, transcoders, fits, targets="diff:w3,w4", max_feature_nodes=0, heads=False)
    assert graph.tokens.tolist() == list(range(1, 17)) and graph.prompt == fits
    with pytest.raises(AttributionError, match=r"'zebra' is not in the vocabulary .*'\[UNK\]'.*name a token"):
        attribute(model, transcoders, fits, targets="diff:w3,zebra")
    with pytest.raises(AttributionError, match=r"'w3 w4' is 2 tokens \('w3', 'w4'\), not one; name a single"):
        attribute(model, transcoders, fits, targets="diff:w3 w4,w5")


def test_a_transformer_lens_model_graph_adds_up_and_counts_its_bos(tmp_path: Path) -> None:
    """A TransformerLens-backed model (norm weights and biases not folded: TransformerLens hooks
    ``ln_final.hook_normalized`` before them) in float64: every row adds up to its value, logit and diff targets
    equal the model's logits. TransformerLens prepends BOS and cuts at n_ctx itself: on 16 positions, 15 words + BOS
    are traced whole and 16 words + BOS (17 tokens) are refused, not silently cut to 16."""
    tokenizer = word_tokenizer()
    tokenizer.bos_token = "[UNK]"
    tokenizer.save_pretrained(tmp_path)  # TransformerLens rebuilds its tokenizer from a saved one
    cfg = HookedTransformerConfig(n_layers=N_LAYERS, d_model=D_MODEL, n_ctx=16, d_head=4, n_heads=4, d_vocab=VOCAB,
                                  act_fn="gelu", d_mlp=32, seed=0, dtype=torch.float64)  # fmt: skip
    tl = HookedTransformer(cfg, tokenizer=transformers.AutoTokenizer.from_pretrained(tmp_path))
    _randomise(tl)
    model = HookedModel.from_transformer_lens(tl)
    transcoders = {layer: create_sae(SAEConfig("relu", d_in=D_MODEL, d_sae=8, hook_in=f"blocks.{layer}.hook_resid_mid",
                                               hook_out=f"blocks.{layer}.hook_mlp_out")).double()
                   for layer in range(N_LAYERS)}  # fmt: skip
    words = [f"w{1 + i}" for i in range(16)]
    graph = attribute(
        model, transcoders, " ".join(words[:15]), targets=TARGETS, max_feature_nodes=0, heads=False
    )
    assert graph.tokens.tolist() == [0, *range(1, 16)]
    rows = ~torch.isnan(graph.values)
    total = graph.adjacency.sum(1) + graph.constants + graph.dropped
    assert float((total[rows] - graph.values[rows]).abs().max()) < 1e-5
    logits = model(graph.tokens[None])[0, -1].detach()
    for target in graph.targets:
        if target.kind == "logit":
            assert target.value == pytest.approx(float(logits[target.token] - logits.mean()), abs=1e-6)
    diff = next(t for t in graph.targets if t.kind == "diff")
    assert diff.value == pytest.approx(float(logits[3] - logits[4]), abs=1e-6)
    with pytest.raises(AttributionError, match=r"^the prompt has 17 tokens but .* has 16 positions"):
        attribute(model, transcoders, " ".join(words), targets="feature:1:5:3")


@pytest.mark.parametrize("case", ["gpt2-ln2-skip", "llama-gqa-resid-mid", "llama-clt"])
def test_head_loadings_sum_to_their_edges(built, case) -> None:
    """Every edge between two positions is split over the (layer, head) pairs through which its paths first leave
    the source's position; the parts add up to the edge, and same-position edges get no loadings."""
    _, _, graph = built[case]
    loadings = graph.head_loadings
    assert loadings is not None and len(loadings) > 0
    summed = loadings.groupby(["target", "source"])["weight"].sum()
    targets = torch.tensor(summed.index.get_level_values(0).to_numpy())
    sources = torch.tensor(summed.index.get_level_values(1).to_numpy())
    edges = graph.adjacency[targets, sources]
    assert float((edges - torch.tensor(summed.to_numpy())).abs().max()) < 1e-9
    nodes = graph.nodes()
    position = torch.tensor(nodes["position"].to_numpy())
    assert bool((position[targets] != position[sources]).all())
    crossing = (position[:, None] != position[None, :]) & (graph.adjacency.abs() > 1e-12)
    rows, cols = torch.nonzero(crossing, as_tuple=True)
    assert set(zip(rows.tolist(), cols.tolist(), strict=True)) <= set(
        zip(targets.tolist(), sources.tolist(), strict=True)
    )
    assert loadings["head"].nunique() > 1 and loadings["layer"].nunique() == N_LAYERS


def test_run_returns_the_graph_tables_that_write_tables_stores(built, tmp_path) -> None:
    """The analysis contract: ``store.run`` gives the four declared tables of ``attribute``'s graph, keyed by its
    graph id, and ``write_tables`` then ``read_graph`` gives them back row for row."""
    import pandas as pd

    from workbench.analysis import write_tables
    from workbench.circuits.attribution.store import ANALYSIS, graph_id, read_graph, run

    model, transcoders, graph = built[
        "gpt2-ln2-skip"
    ]  # made with TARGETS and batch_size 64, every feature kept
    ids = ["tc0", "tc1"]
    frames = run(model, TOKENS, transcoders=transcoders, transcoder_ids=ids, targets=TARGETS, batch_size=64)
    assert set(frames) == set(ANALYSIS.table_names)
    summary = frames["attribution_graphs"].iloc[0]
    assert summary["graph"] == graph_id(graph, ids, 7500) and summary["transcoders"] == '["tc0", "tc1"]'
    assert len(frames["attribution_nodes"]) == graph.n_nodes == summary["n_nodes"]
    assert len(frames["attribution_edges"]) == int((graph.adjacency != 0).sum()) == summary["n_edges"]
    edges = frames["attribution_edges"]
    dense = torch.zeros(graph.n_nodes, graph.n_nodes, dtype=torch.float64)
    dense[torch.tensor(edges["target"].to_numpy()), torch.tensor(edges["source"].to_numpy())] = torch.tensor(
        edges["weight"].to_numpy()
    )
    assert torch.allclose(dense, graph.adjacency.double(), atol=1e-12)
    write_tables(tmp_path, ANALYSIS, frames)
    stored = read_graph(tmp_path, graph.model, summary["graph"])
    for table, frame in frames.items():  # rows in any order (the store reads edges back grouped differently)
        columns = [c for c in frame.columns if c in stored[table].columns]

        def rows(found: pd.DataFrame, columns: list[str] = columns) -> pd.DataFrame:
            return found[columns].sort_values(columns).reset_index(drop=True)

        pd.testing.assert_frame_equal(rows(stored[table]), rows(frame), check_dtype=False)


def test_cli_attributes_a_users_gpt2_directory_and_stores_the_graph(built, tmp_path) -> None:
    """`workbench circuits attribute DIR --transcoders T0 T1 --data ids.npy --out OUT`: the unpruned graph lands in
    the workspace's tables (re-running replaces it), the pruned graph in circuit-tracer's JSON; bad input exits 2
    with one line and writes nothing."""
    import json

    import numpy as np
    from typer.testing import CliRunner

    from workbench.circuits.attribution.store import read_graph
    from workbench.cli import app

    model, transcoders, _ = built["gpt2-ln2-skip"]
    model_dir = tmp_path / "my-gpt2"
    model.model.float().save_pretrained(model_dir)
    model.model.double()
    ids = []
    for layer, sae in transcoders.items():
        sae.float().save(tmp_path / f"tc{layer}")
        sae.double()
        ids.append(str(tmp_path / f"tc{layer}"))
    np.save(tmp_path / "ids.npy", TOKENS[None].numpy())
    workspace, out = tmp_path / "ws", tmp_path / "out"
    command = ["circuits", "attribute", str(model_dir), "--transcoders", ids[0], "--transcoders", ids[1],
               "--data", str(tmp_path / "ids.npy"), "--workspace", str(workspace), "--out", str(out),
               "--no-progress", "--batch-size", "64", "--max-feature-nodes", "30"]  # fmt: skip
    runner = CliRunner()
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    found = re.search(r"graph ([0-9a-f]{12}):", result.output)
    assert found, result.output
    name = found.group(1)
    frames = read_graph(workspace, str(model_dir), name)
    summary = frames["attribution_graphs"].iloc[0]
    nodes, edges = frames["attribution_nodes"], frames["attribution_edges"]
    assert len(nodes) == summary["n_nodes"] and len(edges) == summary["n_edges"] > 0
    assert 0 <= summary["replacement_score"] <= 1 and 0 <= summary["completeness_score"] <= 1
    assert summary["reproduction_max_diff"] < 1e-4 and summary["errors_zeroed_kl"] > 0
    printed = re.search(r"error nodes zeroed: KL\(model ‖ replacement\) ([0-9.]+) nats", result.output)
    assert printed and float(printed.group(1)) == pytest.approx(summary["errors_zeroed_kl"], abs=1e-4)
    assert "(the replacement reproduces the model)" in result.output
    rows = nodes[nodes["value"].notna()].set_index("node")
    totals = edges.groupby("target")["weight"].sum().reindex(rows.index, fill_value=0.0)
    assert (
        float((totals + rows["constant"] + rows["dropped"] - rows["value"]).abs().max()) < 1e-4
    )  # float32 model
    assert len(frames["attribution_heads"]) > 0
    assert runner.invoke(app, command).exit_code == 0  # the same request replaces its rows
    assert len(read_graph(workspace, str(model_dir), name)["attribution_nodes"]) == len(nodes)
    exported = json.loads((out / f"{name}.json").read_text())
    assert {"metadata", "qParams", "nodes", "links"} <= set(exported)
    node_ids = {n["node_id"] for n in exported["nodes"]}
    assert exported["qParams"]["pinnedIds"] and set(exported["qParams"]["pinnedIds"]) <= node_ids
    assert all(link["source"] in node_ids and link["target"] in node_ids for link in exported["links"])
    assert sum(n["is_target_logit"] for n in exported["nodes"]) == 1
    # a saved probe as the target: its log-odds at blocks.1.hook_resid_post, position 4, with its standardisation
    from workbench.probes.linear import LinearProbes
    from workbench.probes.readout import save_probe

    generator = torch.Generator().manual_seed(7)
    probes = LinearProbes("classification", torch.randn(1, D_MODEL, 2, generator=generator),
                          torch.tensor([[0.3, -0.2]]), torch.randn(1, D_MODEL, generator=generator) * 0.1,
                          torch.rand(1, D_MODEL, generator=generator) + 0.5, torch.tensor([0, 1]),
                          ["blocks.1.hook_resid_post"], 1.0)  # fmt: skip
    save_probe(workspace, "topic", probes, model=model, label_names=["no", "yes"])
    probed = runner.invoke(app, [*command[:9], "--workspace", str(workspace), "--no-progress", "--no-heads",
                                 "--target", "probe:topic:1:yes", "--position", "4", "--out", str(tmp_path / "np"),
                                 "--format", "neuronpedia", "--scan", "tiny-gpt2"])  # fmt: skip
    assert probed.exit_code == 0, probed.output
    graph_name = re.search(r"graph ([0-9a-f]{12}):", probed.output)
    assert graph_name, probed.output
    probe_nodes = read_graph(workspace, str(model_dir), graph_name.group(1))["attribution_nodes"]
    target = probe_nodes[probe_nodes["kind"] == "target"].iloc[0]
    assert target["label"] == "probe topic class yes log-odds at blocks.1.hook_resid_post @4"
    with torch.no_grad(), model.capture("blocks.1.hook_resid_post") as cache:
        model(TOKENS[None])
    decision = probes.decision_function(cache["blocks.1.hook_resid_post"][:, 4:5].float())[0, 0]
    assert target["value"] == pytest.approx(float(decision[1] - decision[0]), abs=1e-4)
    probe_edges = read_graph(workspace, str(model_dir), graph_name.group(1))["attribution_edges"]
    incoming = probe_edges[probe_edges["target"] == target["node"]]["weight"].sum()
    assert float(incoming + target["constant"] + target["dropped"]) == pytest.approx(
        target["value"], abs=1e-4
    )
    # Neuronpedia's graph upload JSON, field by field against its published graph-schema.json
    uploaded = json.loads((tmp_path / "np" / f"{graph_name.group(1)}.json").read_text())
    assert set(uploaded) == {"metadata", "qParams", "nodes", "links"}
    meta = uploaded["metadata"]
    assert (
        meta["slug"] == graph_name.group(1)
        and meta["scan"] == "tiny-gpt2"
        and isinstance(meta["prompt"], str)
    )
    assert isinstance(meta["prompt_tokens"], list) and len(meta["prompt_tokens"]) == len(TOKENS)
    assert all(isinstance(t, str) for t in meta["prompt_tokens"])
    assert meta["pruning_settings"] == {"node_threshold": 0.8, "edge_threshold": 0.98}
    assert (
        meta["generation_settings"]["max_feature_nodes"] == 7500
        and meta["generation_settings"]["batch_size"] == 64
    )
    assert meta["info"]["generator"]["name"] == "interpretability workbench"
    assert (
        isinstance(meta["info"]["create_time_ms"], int)
        and "completeness score" in meta["info"]["description"]
    )
    assert isinstance(uploaded["qParams"]["pinnedIds"], list) and uploaded["qParams"]["linkType"] == "both"
    kinds = {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}
    for node in uploaded["nodes"]:
        assert (
            isinstance(node["node_id"], str)
            and isinstance(node["jsNodeId"], str)
            and isinstance(node["clerp"], str)
        )
        assert node["feature"] is None or isinstance(node["feature"], int)
        assert isinstance(node["layer"], (str, int)) and isinstance(node["ctx_idx"], int)
        assert node["feature_type"] in kinds
        assert node["influence"] is None or isinstance(node["influence"], float)
    assert "probe topic class yes" in next(
        n["clerp"] for n in uploaded["nodes"] if n["feature_type"] == "logit"
    )
    ids_uploaded = {n["node_id"] for n in uploaded["nodes"]}
    assert uploaded["links"] and all(
        link["source"] in ids_uploaded
        and link["target"] in ids_uploaded
        and isinstance(link["weight"], float)
        for link in uploaded["links"]
    )
    assert "written as Neuronpedia graph JSON" in probed.output
    for spec, message in (("probe:nothing", "no saved probe 'nothing'"), ("probe:topic:1:maybe", "no class"),
                          ("probe:topic:0", "0 sites at layer 0")):  # fmt: skip
        bad = runner.invoke(app, [*command[:9], "--workspace", str(workspace), "--target", spec])
        assert bad.exit_code == 2 and message in bad.output, bad.output
    bad = runner.invoke(app, [*command[:7], "--prompt-index", "3", "--workspace", str(tmp_path / "ws2")])
    assert bad.exit_code == 2 and "prompt-index" in bad.output
    bad = runner.invoke(
        app, [*command[:5], "--data", str(tmp_path / "ids.npy"), "--workspace", str(tmp_path / "ws2")]
    )
    assert bad.exit_code == 2 and "no transcoder for layer(s) [1]" in bad.output
    assert not (tmp_path / "ws2" / "results.duckdb").exists()


def test_cli_attributes_a_users_bert_mlm_directory(tmp_path) -> None:
    """`workbench circuits attribute` on a saved BertForMaskedLM directory (a bidirectional encoder): masked-LM
    logits at --position and a feature target; rows add up in the stored tables, no head loadings are stored, and
    the error-node gap is printed."""
    from typer.testing import CliRunner

    from workbench.circuits.attribution.store import read_graph
    from workbench.cli import app

    model_dir, ids = save_user_files(
        _encoder("bert"), _per_layer("hook_resid_mid", skip=False), tmp_path, "my-bert"
    )
    workspace = tmp_path / "ws"
    result = CliRunner().invoke(app, ["circuits", "attribute", str(model_dir), *ids, "--data", str(tmp_path / "ids.npy"),
                                      "--workspace", str(workspace), "--no-progress", "--position", "3",
                                      "--target", "logits", "--target", "feature:1:2:3"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "error nodes zeroed: KL(model ‖ replacement)" in result.output
    assert "(the replacement reproduces the model)" in result.output
    name = re.search(r"graph ([0-9a-f]{12}):", result.output)
    assert name, result.output
    frames = read_graph(workspace, str(model_dir), name.group(1))
    nodes, edges = frames["attribution_nodes"], frames["attribution_edges"]
    rows = nodes[nodes["value"].notna()].set_index("node")
    totals = edges.groupby("target")["weight"].sum().reindex(rows.index, fill_value=0.0)
    assert float((totals + rows["constant"] + rows["dropped"] - rows["value"]).abs().max()) < 1e-4
    targets = nodes[nodes["kind"] == "target"]
    assert (targets["position"] == 3).sum() >= 1 and (targets["label"] == "L1 #3 @2").sum() == 1
    assert frames["attribution_heads"].empty
