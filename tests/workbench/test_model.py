"""HookedModel against independent references: TransformerLens's own cache, HF hidden states, MiniLM."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from workbench.interventions import mean_ablation, patch_from, project_out, steering, zero_ablation
from workbench.model import HookedModel, HookNameError, ModelLoadError

ATTENTION_MAPS = ("hook_pattern", "hook_entropy", "hook_sink", "hook_lse", "hook_max_logit")


def tiny_gpt2() -> T.GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64)
    return T.GPT2LMHeadModel(cfg).eval()


def tiny_neox(parallel: bool = True) -> T.GPTNeoXForCausalLM:
    torch.manual_seed(0)
    cfg = T.GPTNeoXConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=64,
        rotary_pct=0.25,
        use_parallel_residual=parallel,
    )
    return T.GPTNeoXForCausalLM(cfg).eval()


def tiny_llama() -> T.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        vocab_size=100,
        max_position_embeddings=64,
    )
    return T.LlamaForCausalLM(cfg).eval()


def tiny_bert() -> T.BertModel:
    torch.manual_seed(0)
    cfg = T.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=100
    )
    return T.BertModel(cfg).eval()


def tiny_vit() -> T.ViTForImageClassification:
    torch.manual_seed(0)
    cfg = T.ViTConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=8,
        patch_size=2,
        num_channels=1,
        num_labels=10,
    )
    return T.ViTForImageClassification(cfg).eval()


def tl_twin(hf: torch.nn.Module, family: str):
    """The same weights as a TransformerLens HookedTransformer, converted by TransformerLens's own code."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    if family == "gpt2":
        from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights as convert

        c = hf.config
        cfg = HookedTransformerConfig(
            n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head, d_mlp=4 * c.n_embd,
            n_ctx=c.n_positions, d_vocab=c.vocab_size, act_fn="gelu_new", normalization_type="LN",
            eps=c.layer_norm_epsilon, default_prepend_bos=False,
        )  # fmt: skip
    elif family == "llama":
        from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights as convert

        c = hf.config
        cfg = HookedTransformerConfig(
            n_layers=c.num_hidden_layers, d_model=c.hidden_size, n_heads=c.num_attention_heads,
            d_head=c.hidden_size // c.num_attention_heads, n_key_value_heads=c.num_key_value_heads,
            d_mlp=c.intermediate_size, n_ctx=c.max_position_embeddings, d_vocab=c.vocab_size, act_fn="silu",
            normalization_type="RMS", eps=c.rms_norm_eps, positional_embedding_type="rotary", gated_mlp=True,
            rotary_dim=c.hidden_size // c.num_attention_heads, rotary_adjacent_pairs=False, final_rms=True,
            rotary_base=c.rope_parameters["rope_theta"], default_prepend_bos=False,
        )  # fmt: skip
    else:
        from transformer_lens.pretrained.weight_conversions.neox import convert_neox_weights as convert

        c = hf.config
        d_head = c.hidden_size // c.num_attention_heads
        cfg = HookedTransformerConfig(
            n_layers=c.num_hidden_layers, d_model=c.hidden_size, n_heads=c.num_attention_heads, d_head=d_head,
            d_mlp=c.intermediate_size, n_ctx=c.max_position_embeddings, d_vocab=c.vocab_size, act_fn="gelu",
            normalization_type="LN", eps=c.layer_norm_eps, positional_embedding_type="rotary",
            rotary_dim=int(d_head * c.rope_parameters.get("partial_rotary_factor", 0.25)),
            parallel_attn_mlp=c.use_parallel_residual, rotary_adjacent_pairs=False, default_prepend_bos=False,
            rotary_base=c.rope_parameters["rope_theta"],
        )  # fmt: skip
    tl = HookedTransformer(cfg)
    tl.load_and_process_state_dict(
        convert(hf, cfg), fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False, refactor_factored_attn_matrices=False,
    )  # fmt: skip
    return tl.eval()


TWINS = {"gpt2": tiny_gpt2, "gpt_neox": tiny_neox, "llama": tiny_llama}


@pytest.mark.parametrize("family", list(TWINS))
def test_hf_capture_matches_transformer_lens_cache(family: str) -> None:
    """Every hook point both have agrees with TransformerLens's own cache on the same (random-init) weights: the
    norms' hook_scale / hook_normalized (norm weights at their initial 1 and 0, where TransformerLens's pre-weight
    hook_normalized equals the norm's output), attn.hook_attn_scores (masked keys -inf) and per-head hook_result."""
    hf = TWINS[family]()
    tl = tl_twin(hf, family)
    tl.set_use_attn_result(True)
    model = HookedModel.from_hf(hf)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    tl_logits, tl_cache = tl.run_with_cache(ids)
    logits, cache = model.run_with_cache(ids)
    torch.testing.assert_close(logits, tl_logits, atol=1e-5, rtol=1e-4)
    common = [n for n in cache if n in tl_cache]
    expected = {"hook_embed", "blocks.0.attn.hook_q", "blocks.1.attn.hook_z", "blocks.1.attn.hook_pattern",
                "blocks.0.mlp.hook_post", "blocks.1.hook_resid_post", "ln_final.hook_normalized",
                "ln_final.hook_scale", "blocks.1.attn.hook_attn_scores", "blocks.0.attn.hook_result",
                *(f"blocks.{layer}.{ln}.hook_{x}" for layer in range(2) for ln in ("ln1", "ln2") for x in ("scale", "normalized"))}  # fmt: skip
    assert expected <= set(common)
    for name in common:
        ours = cache[name].expand_as(tl_cache[name])  # GPT-2's hook_pos_embed is [1, pos, d_model] here
        torch.testing.assert_close(ours, tl_cache[name], atol=1e-5, rtol=1e-4, msg=name)


def test_transformer_lens_model_passes_names_through() -> None:
    tl = tl_twin(tiny_gpt2(), "gpt2")
    model = HookedModel.from_transformer_lens(tl)
    assert set(tl.hook_dict) <= set(model.hook_names())
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(2))
    tl_logits, tl_cache = tl.run_with_cache(ids)
    with model.capture("blocks.*.hook_resid_post") as cache:
        logits = model(ids)
    torch.testing.assert_close(logits, tl_logits)
    torch.testing.assert_close(
        cache.stack("resid_post"), torch.stack([tl_cache[f"blocks.{i}.hook_resid_post"] for i in range(2)])
    )
    ablated = model.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_mlp_out", zero_ablation())])
    assert not torch.allclose(ablated, logits)
    assert not tl.hook_dict["blocks.1.hook_mlp_out"].fwd_hooks, "hooks must be removed after the call"


@pytest.mark.parametrize(
    "build", [tiny_gpt2, tiny_neox, lambda: tiny_neox(parallel=False), tiny_llama, tiny_bert]
)
def test_resid_post_equals_output_hidden_states(build) -> None:
    hf = build()
    model = HookedModel.from_hf(hf)
    ids = torch.randint(1, 100, (3, 11), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    with torch.no_grad():
        reference = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        bare = model(ids, attention_mask=mask)
        with model.capture(["blocks.*.hook_resid_post", "hook_embed"]) as cache:
            hooked = model(ids, attention_mask=mask)
    torch.testing.assert_close(hooked, bare, atol=0, rtol=0)
    stack = cache.stack("resid_post")
    n_layers = model.cfg.n_layers
    post_ln = model.capabilities.final_norm is None
    checked = n_layers if post_ln else n_layers - 1  # decoders apply the final norm to the last hidden state
    for layer in range(checked):
        torch.testing.assert_close(stack[layer], reference.hidden_states[layer + 1], atol=1e-6, rtol=1e-5)
    if not post_ln:
        with torch.no_grad(), model.capture("ln_final.hook_normalized") as final:
            model(ids, attention_mask=mask)
        torch.testing.assert_close(
            final["ln_final.hook_normalized"], reference.hidden_states[-1], atol=1e-6, rtol=1e-5
        )
    if "hook_pos_embed" not in model.hook_names():  # GPT-2's hidden_states[0] adds the position embedding
        torch.testing.assert_close(cache["hook_embed"], reference.hidden_states[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "build", [tiny_gpt2, tiny_neox, lambda: tiny_neox(parallel=False), tiny_llama, tiny_bert]
)
def test_noop_hooks_on_every_point_leave_logits_unchanged(build) -> None:
    hf = build()
    model = HookedModel.from_hf(hf)
    ids = torch.randint(1, 100, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        bare = model(ids)
        seen: list[str] = []
        hooked = model.run_with_hooks(ids, fwd_hooks=[("*", lambda act, hook: seen.append(hook.name))])
    assert set(seen) == set(model.hook_names())
    torch.testing.assert_close(hooked, bare, atol=1e-5, rtol=1e-4)
    identity = model.run_with_hooks(ids, fwd_hooks=[("*", lambda act, hook: act.clone())])
    torch.testing.assert_close(identity.detach(), bare, atol=1e-5, rtol=1e-4)


def test_vit_capture_and_logits() -> None:
    hf = tiny_vit()
    model = HookedModel.from_hf(hf)
    pixels = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = hf(pixel_values=pixels, output_hidden_states=True)
        with model.capture("blocks.*.hook_resid_post", positions=0) as cache:
            logits = model(pixels)
    torch.testing.assert_close(logits, reference.logits)
    assert cache["blocks.0.hook_resid_post"].shape == (4, 32)
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], reference.hidden_states[1][:, 0])


def test_resid_mid_replacement_flows_into_the_residual_stream() -> None:
    model = HookedModel.from_hf(tiny_llama())
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(6))
    delta = torch.randn(32, generator=torch.Generator().manual_seed(7))
    via_mid = model.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_resid_mid", steering(delta))])
    via_attn_out = model.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_attn_out", steering(delta))])
    torch.testing.assert_close(via_mid, via_attn_out, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(via_mid, model(ids))


def test_qkv_replacement_changes_and_restores_output() -> None:
    model = HookedModel.from_hf(tiny_neox())
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        clean = model(ids)
        for letter in "qkv":
            changed = model.run_with_hooks(
                ids, fwd_hooks=[(f"blocks.0.attn.hook_{letter}", zero_ablation(heads=[1]))]
            )
            assert not torch.allclose(changed, clean), letter


def test_patching_from_a_clean_run_restores_it() -> None:
    model = HookedModel.from_hf(tiny_gpt2())
    gen = torch.Generator().manual_seed(9)
    clean_ids, corrupt_ids = torch.randint(0, 100, (2, 2, 8), generator=gen)
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(
            clean_ids, ["blocks.*.hook_resid_pre", "blocks.1.hook_resid_post"]
        )
        patched = model.run_with_hooks(
            corrupt_ids, fwd_hooks=[("blocks.0.hook_resid_pre", patch_from(clean_cache))]
        )
        torch.testing.assert_close(patched, clean_logits)
        last_only = model.run_with_hooks(
            corrupt_ids, fwd_hooks=[("blocks.1.hook_resid_post", patch_from(clean_cache, positions=[7]))]
        )
        torch.testing.assert_close(last_only[:, 7], clean_logits[:, 7], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(last_only[:, 6], clean_logits[:, 6])
        mean = clean_cache["blocks.1.hook_resid_pre"].mean(dim=(0, 1))
        ablated = model.run_with_hooks(
            clean_ids, fwd_hooks=[("blocks.1.hook_resid_pre", mean_ablation(mean))]
        )
        assert not torch.allclose(ablated, clean_logits)


def test_project_out_removes_the_direction() -> None:
    model = HookedModel.from_hf(tiny_gpt2())
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(10))
    direction = torch.randn(32, generator=torch.Generator().manual_seed(11))
    with torch.no_grad(), model.hooks([("blocks.0.hook_resid_post", project_out(direction))]):
        with model.capture("blocks.0.hook_resid_post") as cache:
            model(ids)
    along = cache["blocks.0.hook_resid_post"] @ (direction / direction.norm())
    assert along.abs().max() < 1e-5


def test_positions_select_and_validate() -> None:
    model = HookedModel.from_hf(tiny_neox())
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(12))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        _, full = model.run_with_cache(ids, "blocks.0.hook_resid_post")
        with model.capture("blocks.0.hook_resid_post", positions="last") as last:
            model(ids, attention_mask=mask)
        with model.capture("blocks.0.hook_resid_post", positions=[0, -1], dtype=torch.float16) as some:
            model(ids)
    resid = full["blocks.0.hook_resid_post"]
    assert last["blocks.0.hook_resid_post"].shape == (2, 32)
    torch.testing.assert_close(last["blocks.0.hook_resid_post"][1], resid[1, 5])
    assert some["blocks.0.hook_resid_post"].dtype == torch.float16
    torch.testing.assert_close(
        some["blocks.0.hook_resid_post"].float(), resid[:, [0, 5]], atol=1e-2, rtol=1e-2
    )
    with pytest.raises(IndexError, match="out of range for a sequence of length 6"):
        with model.capture("blocks.0.hook_resid_post", positions=[6]):
            model(ids)


def test_unknown_hook_name_lists_close_matches() -> None:
    model = HookedModel.from_hf(tiny_neox())
    with pytest.raises(HookNameError, match="blocks.0.hook_resid_post"):
        model.resolve("blocks.0.hook_resid_pots")
    with pytest.raises(HookNameError, match="closest valid names"):
        with model.capture("blocks.*.hook_nothing"):
            pass
    assert model.resolve("blocks.*.hook_resid_post") == [
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_post",
    ]


def test_model_directory_without_config_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no config.json"):
        HookedModel.from_pretrained(tmp_path)


def test_save_and_reload_local_directory(tmp_path) -> None:
    hf = tiny_llama()
    hf.save_pretrained(tmp_path)
    model = HookedModel.from_pretrained(tmp_path)
    ids = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits)
    assert model.cfg.n_kv_heads == 2 and model.cfg.family == "llama"


def test_real_minilm_loads_offline_and_matches_hf() -> None:
    from workbench.model import packaged_model_dir

    model = HookedModel.from_pretrained("minilm")
    assert model.cfg.n_layers == 6 and model.cfg.d_model == 384
    texts = ["The cat sat on the mat.", "Massive activations live in a few dimensions."]
    batch = model.tokenize(texts)
    hf = T.AutoModel.from_pretrained(packaged_model_dir("minilm")).eval()
    with torch.no_grad():
        reference = hf(**batch, output_hidden_states=True)
        with model.capture("blocks.*.hook_resid_post") as cache:
            out = model(texts)
    torch.testing.assert_close(out, reference.last_hidden_state)
    for layer in range(6):
        torch.testing.assert_close(
            cache[f"blocks.{layer}.hook_resid_post"], reference.hidden_states[layer + 1]
        )
    assert model.to_str_tokens("the cat")[0] == "[CLS]"


def test_attention_statistics_agree_across_paths_and_with_transformer_lens() -> None:
    hf = tiny_gpt2()
    tl = HookedModel.from_transformer_lens(tl_twin(hf, "gpt2"))
    model = HookedModel.from_hf(hf)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(14))
    names = ["blocks.*.attn.hook_pattern", "blocks.*.attn.hook_entropy", "blocks.*.attn.hook_sink",
             "blocks.*.attn.hook_lse", "blocks.*.attn.hook_max_logit"]  # fmt: skip
    with torch.no_grad():
        bare = model(ids)
        logits, cache = model.run_with_cache(ids, names)
        _, tl_cache = tl.run_with_cache(ids, names)
        _, sdpa_stats = model.run_with_cache(ids, names[1:])
    torch.testing.assert_close(logits, bare, atol=1e-5, rtol=1e-4)
    for name in cache:
        torch.testing.assert_close(cache[name], tl_cache[name], atol=1e-5, rtol=1e-4, msg=name)
    for name in sdpa_stats:
        torch.testing.assert_close(sdpa_stats[name], cache[name], msg=name)
    pattern = cache["blocks.1.attn.hook_pattern"].double()
    entropy = -(pattern * pattern.clamp_min(1e-300).log()).sum(-1)
    torch.testing.assert_close(cache["blocks.1.attn.hook_entropy"].double(), entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        cache["blocks.1.attn.hook_sink"].double(), pattern[..., 0], atol=1e-6, rtol=1e-5
    )
    assert torch.allclose(
        cache["blocks.0.attn.hook_sink"][:, :, 0], torch.ones(2, 4)
    )  # query 0 sees only key 0


def test_attention_statistics_table_matches_direct_capture() -> None:
    from workbench.analyses.attention.figures import layer_head_heatmap
    from workbench.attention.statistics import attention_statistics

    model = HookedModel.from_hf(tiny_neox())
    ids = torch.randint(0, 100, (3, 8), generator=torch.Generator().manual_seed(15))
    table = attention_statistics(model, ids, batch_size=2)
    assert len(table) == 2 * 4 and set(table.columns) >= {"layer", "head", "entropy", "sink", "n_queries"}
    with torch.no_grad(), model.capture("blocks.1.attn.hook_entropy") as cache:
        model(ids)
    expected = cache["blocks.1.attn.hook_entropy"][:, 2, 1:].double().mean()
    got = table[(table["layer"] == 1) & (table["head"] == 2)]["entropy"].item()
    assert abs(got - expected.item()) < 1e-6
    assert layer_head_heatmap(table).data[0].z.shape == (2, 4)


# ---------------------------------------------------------------------------------------------- adapters: capabilities
@pytest.mark.parametrize(
    "build, declared",
    [
        (tiny_gpt2, dict(positional="learned", norm="layernorm", final_norm="ln_final", output="next_token",
                         module_names="gpt2")),
        (tiny_neox, dict(positional="rotary", norm="layernorm", final_norm="ln_final", output="next_token",
                         module_names="gpt_neox")),
        (tiny_llama, dict(positional="rotary", norm="rmsnorm", final_norm="ln_final", output="next_token",
                          module_names="llama")),
        (tiny_bert, dict(positional="learned", norm="layernorm", final_norm=None, output="hidden", module_names=None)),
        (tiny_vit, dict(modality="image", positional="learned", final_norm="ln_final", output="class")),
        (lambda: tl_twin(tiny_neox(), "gpt_neox"), dict(positional="rotary", norm="layernorm", final_norm="ln_final",
                                                         output="next_token", module_names=None)),
        (lambda: tl_twin(tiny_gpt2(), "gpt2"), dict(positional="learned", output="next_token")),
    ],
)  # fmt: skip
def test_adapters_declare_capabilities(build, declared) -> None:
    from workbench.references import resolve_model

    model = resolve_model(build())
    caps = model.capabilities
    assert {key: getattr(caps, key) for key in declared} == declared
    if caps.final_norm is not None:
        assert {f"{caps.final_norm}.hook_scale", caps.final_hook} <= set(model.hook_names())


def test_a_rotary_transformer_lens_model_passes_a_rotary_requirement() -> None:
    from workbench.analysis import Analysis, AnalysisNotApplicable

    needs_rotary = Analysis("rotary_only", "workbench rotary-only MODEL", (), requires=("rotary",))
    needs_rotary.check(HookedModel.from_transformer_lens(tl_twin(tiny_neox(), "gpt_neox")))
    needs_rotary.check(HookedModel.from_hf(tiny_llama()))
    with pytest.raises(AnalysisNotApplicable, match="rotary position embeddings"):
        needs_rotary.check(HookedModel.from_transformer_lens(tl_twin(tiny_gpt2(), "gpt2")))


def tiny_bert_mlm() -> T.BertForMaskedLM:
    torch.manual_seed(0)
    cfg = T.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=100
    )
    return T.BertForMaskedLM(cfg).eval()


@pytest.mark.parametrize(
    "build, act, activations, prefix_cache",
    [
        (tiny_gpt2, "gelu_new", ("blocks.0.mlp", "blocks.1.mlp"), True),
        (tiny_llama, "silu", (), True),  # gated: hook_post is act(gate) · up
        (tiny_bert_mlm, "gelu", ("blocks.0.mlp", "blocks.1.mlp", "mlm_head"), False),
        (tiny_vit, "gelu", ("blocks.0.mlp", "blocks.1.mlp"), False),
        (lambda: tl_twin(tiny_gpt2(), "gpt2"), "gelu_new", ("blocks.0.mlp", "blocks.1.mlp"), False),
    ],
)
def test_declared_activations_are_elementwise_and_the_prefix_cache_reproduces_the_forward(
    build, act, activations, prefix_cache
) -> None:
    """``capabilities.activations``: each ``P.hook_post`` is the family's activation of ``P.hook_pre``, unit by
    unit; ``capabilities.prefix_cache``: one token after a ``kv_cache`` of the prefix gives the full forward's
    logits at that position."""
    from workbench.references import resolve_model

    model = resolve_model(build())
    caps = model.capabilities
    assert (caps.activations, caps.prefix_cache) == (activations, prefix_cache)
    inputs = torch.randn(1, 1, 8, 8) if caps.modality == "image" else torch.randint(0, 100, (2, 6))
    names = [f"{p}.hook_{end}" for p in activations for end in ("pre", "post")]
    with torch.no_grad(), model.capture(names) as cache:
        full = model(inputs)
    for prefix in activations:
        pre, post = cache[f"{prefix}.hook_pre"], cache[f"{prefix}.hook_post"]
        torch.testing.assert_close(post, T.activations.ACT2FN[act](pre))
    if prefix_cache:
        kv = model.kv_cache()
        with torch.no_grad():
            model(inputs[:, :5], cache=kv, use_cache=True)
            kept = model.cached_keys_values(kv)
            last = model(inputs[:, 5:], cache=model.kv_cache(kept), use_cache=False)
        assert len(kept) == model.cfg.n_layers and kept[0][0].shape[:3] == (2, model.cfg.n_kv_heads, 5)
        torch.testing.assert_close(last[:, 0], full[:, 5], atol=1e-5, rtol=1e-5)
    else:
        with pytest.raises(ValueError, match="no key/value cache"):
            model.kv_cache()


def test_adapters_are_registered_by_model_type() -> None:
    from workbench.adapters import REGISTRY

    assert {"gpt2", "gpt_neox", "llama", "mistral", "qwen2", "bert", "vit"} <= set(REGISTRY)
    opt = T.OPTForCausalLM(T.OPTConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, ffn_dim=32,
                                       vocab_size=50, word_embed_proj_dim=16))  # fmt: skip
    with pytest.raises(ModelLoadError, match="no adapter for model_type 'opt'; supported: .*gpt2.*@register"):
        HookedModel.from_hf(opt)


@pytest.mark.parametrize("family", list(TWINS))
def test_unembedding_and_head_output_weights_match_transformer_lens(family: str) -> None:
    """W_U, b_U and per-head W_O as TransformerLens converts them (GPT-2's Conv1D projections included)."""
    hf = TWINS[family]()
    tl = tl_twin(hf, family)
    model, twin = HookedModel.from_hf(hf), HookedModel.from_transformer_lens(tl)
    torch.testing.assert_close(model.unembedding_matrix(), tl.W_U.T)
    torch.testing.assert_close(twin.unembedding_matrix(), tl.W_U.T)
    bias = model.unembedding_bias()
    torch.testing.assert_close(torch.zeros_like(tl.b_U) if bias is None else bias, tl.b_U)
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(
            model.head_output_weights(layer), tl.blocks[layer].attn.W_O, atol=1e-6, rtol=1e-5
        )
    assert HookedModel.from_hf(tiny_bert()).unembedding_matrix() is None
    assert HookedModel.from_hf(tiny_vit()).unembedding_matrix() is None  # a classifier, not an unembedding


@pytest.mark.parametrize("build", [tiny_gpt2, lambda: tl_twin(tiny_gpt2(), "gpt2")])
def test_fresh_copy_has_the_architecture_but_not_the_weights(build) -> None:
    from workbench.references import resolve_model

    model = resolve_model(build())
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    fresh = model.fresh_copy(seed=3)
    torch.testing.assert_close(torch.rand(3), expected_next)  # the global RNG did not move
    again = model.fresh_copy(seed=3)
    assert all(
        torch.equal(p, q) for p, q in zip(fresh.model.parameters(), again.model.parameters(), strict=True)
    )
    assert fresh.hook_names() == model.hook_names() and fresh.cfg == model.cfg
    trained = dict(model.model.named_parameters())
    assert not [
        name
        for name, p in fresh.model.named_parameters()
        if p.ndim > 1 and p.any() and torch.equal(p, trained[name])
    ]


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama, tiny_bert, tiny_vit])
def test_scale_result_and_score_hooks_edit_the_forward(build) -> None:
    """A replaced hook_scale rescales the norm (γ ⊙ centred x / scale + β), a replaced hook_result sets the output
    projection to Σ heads + bias, a replaced hook_attn_scores sets the pattern to its softmax."""
    model = HookedModel.from_hf(build())
    inputs = (torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(6)) if model.capabilities.modality == "image"
              else torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(6)))  # fmt: skip
    with torch.no_grad():
        _, clean = model.run_with_cache(inputs, ["blocks.0.ln2.hook_*", "blocks.0.attn.hook_*"])
        with model.capture("blocks.0.ln2.hook_normalized") as doubled:
            model.run_with_hooks(inputs, fwd_hooks=[("blocks.0.ln2.hook_scale", lambda act, hook: act * 2)])
        ln2 = model.sites[[getattr(s, "prefix", "") for s in model.sites].index("blocks.0.ln2")].module
        bias = 0 if getattr(ln2, "bias", None) is None else ln2.bias
        torch.testing.assert_close(doubled["blocks.0.ln2.hook_normalized"] - bias,
                                   (clean["blocks.0.ln2.hook_normalized"] - bias) / 2)  # fmt: skip

        def zero_head(act, hook):
            act[:, :, 1] = 0
            return act

        def zero_z(act, hook):
            act[:, :, 1] = 0
            return act

        torch.testing.assert_close(model.run_with_hooks(inputs, fwd_hooks=[("blocks.0.attn.hook_result", zero_head)]),
                                   model.run_with_hooks(inputs, fwd_hooks=[("blocks.0.attn.hook_z", zero_z)]))  # fmt: skip
        w_o = model.head_output_weights(0)
        torch.testing.assert_close(clean["blocks.0.attn.hook_result"],
                                   torch.einsum("bphd,hdm->bphm", clean["blocks.0.attn.hook_z"], w_o))  # fmt: skip
        torch.testing.assert_close(clean["blocks.0.attn.hook_pattern"],
                                   clean["blocks.0.attn.hook_attn_scores"].softmax(-1))  # fmt: skip
        with model.capture("blocks.0.attn.hook_pattern") as flat:
            model.run_with_hooks(inputs, fwd_hooks=[("blocks.0.attn.hook_attn_scores",
                                                     lambda act, hook: torch.where(act.isinf(), act, 0.0))])  # fmt: skip
        allowed = clean["blocks.0.attn.hook_attn_scores"].isfinite()
        torch.testing.assert_close(
            flat["blocks.0.attn.hook_pattern"], allowed / allowed.sum(-1, keepdim=True)
        )
