"""Cross-layer transcoders (circuits/sae/clt.py): the forward against a direct float64 sum over (source, target)
decoders, circuit-tracer's layout both ways, training on a tiny model's MLPs, resume and reproducibility."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import transformers

from workbench.circuits.sae.base import SAEInputError
from workbench.circuits.sae.clt import (
    CLTConfig,
    CrossLayerTranscoder,
    clt_parameter_count,
    load_clt_dir,
)
from workbench.circuits.sae.formats.circuit_tracer import load_clt
from workbench.circuits.sae.train import TrainConfig, live_batches, seeded_clt, train_saes
from workbench.model import HookedModel

N_LAYERS, D_MODEL, D_TC = 3, 8, 12


def random_clt(skip: bool, dtype=torch.float64, seed: int = 0) -> CrossLayerTranscoder:
    """A JumpReLU CLT with every tensor random (thresholds in [0, 0.5): some latents fire, some do not)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    cfg = CLTConfig(N_LAYERS, D_MODEL, D_TC, skip=skip)
    decoders = [r(D_TC, N_LAYERS - i, D_MODEL) for i in range(N_LAYERS)]
    threshold = torch.rand(N_LAYERS, D_TC, generator=g, dtype=dtype) * 0.5
    return CrossLayerTranscoder(r(N_LAYERS, D_MODEL, D_TC), r(N_LAYERS, D_TC), threshold, decoders,
                                r(N_LAYERS, D_MODEL), cfg.hook_in, cfg.hook_out,
                                r(N_LAYERS, D_MODEL, D_MODEL) if skip else None, cfg)  # fmt: skip


def reference_forward(clt: CrossLayerTranscoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, outputs) by the definition, in float64, one (source i, target j ≥ i) decoder at a time."""
    x = x.double()
    features = []
    for i in range(clt.n_layers):
        pre = x[i] @ clt.W_enc[i].double() + clt.b_enc[i].double()
        features.append(torch.where(pre > clt.threshold[i].double(), pre, torch.zeros_like(pre)).relu())
    out = []
    for j in range(clt.n_layers):
        total = clt.b_dec[j].double().expand(x.shape[1], -1).clone()
        for i in range(j + 1):
            total += features[i] @ clt.W_dec[i][:, j - i].double()
        if clt.W_skip is not None:
            total += x[j] @ clt.W_skip[j].double()
        out.append(total)
    return torch.stack(features), torch.stack(out)


@pytest.mark.parametrize("skip", [False, True])
def test_forward_equals_the_float64_sum_over_source_and_target_decoders(skip) -> None:
    clt = random_clt(skip)
    x = torch.randn(N_LAYERS, 40, D_MODEL, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    features, out = reference_forward(clt, x)
    assert 0 < int((features > 0).sum()) < features.numel()  # thresholds cut some latents, not all
    with torch.no_grad():
        torch.testing.assert_close(clt.encode(x), features, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(clt(x), out, atol=1e-10, rtol=1e-10)
        single = copy.deepcopy(clt).float()  # float32 weights and input: float32 rounding only
        torch.testing.assert_close(single(x.float()).double(), out, atol=1e-3, rtol=1e-4)
    if skip:
        with pytest.raises(SAEInputError, match="decode needs its input x"):
            clt.decode(features)


@pytest.mark.parametrize("skip", [False, True])
def test_sparse_topk_training_gradients_equal_the_dense_formulation(skip) -> None:
    """A TopK CLT's training step (sparse: gradient only at the chosen latents, embedding_bag decoders) and its AuxK
    term give every parameter the gradient that autograd gives through the dense definition in float64: f_i =
    topk_k(x_i W_enc[i] + b_enc[i]), out_j = Σ_{i≤j} f_i W_dec[i][:, j−i] + b_dec[j] (+ x_j W_skip[j]), and AuxK's
    dead-latent top-aux_k reconstructing the residual through every decoder, encoders included."""
    from workbench.circuits.sae.topk import topk_activation

    base, cfg = random_clt(skip), CLTConfig(N_LAYERS, D_MODEL, D_TC, activation="topk", k=3, skip=skip)
    clt = CrossLayerTranscoder(base.W_enc.data, base.b_enc.data, torch.zeros(N_LAYERS, D_TC),
                               [w.data for w in base.W_dec], base.b_dec.data, cfg.hook_in, cfg.hook_out,
                               base.W_skip.data if skip else None, cfg)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_LAYERS, 40, D_MODEL, generator=g, dtype=torch.float64)
    y = torch.randn(N_LAYERS, 40, D_MODEL, generator=g, dtype=torch.float64)
    dead = torch.rand(N_LAYERS, D_TC, generator=g) < 0.3
    dead[0, :6] = True  # layers with different numbers of dead latents (aux_k: the most of any layer)

    def grads(loss):
        clt.zero_grad()
        loss.backward(retain_graph=True)
        return {name: p.grad.clone() for name, p in clt.named_parameters()}

    f, prediction, pre, _ = clt.training_forward(x, dead)
    assert f.is_sparse and f._nnz() == N_LAYERS * 40 * 3
    residual = (y - prediction).detach()
    sparse = grads((y - prediction).pow(2).sum() + clt.aux_loss(x, pre.detach(), residual, dead))

    dense_pre = torch.stack([x[i] @ clt.W_enc[i] + clt.b_enc[i] for i in range(N_LAYERS)])
    dense_f = topk_activation(dense_pre, 3)
    torch.testing.assert_close(f.to_dense(), dense_f.detach())

    def through_decoders(latents: torch.Tensor) -> torch.Tensor:  # Σ_{i≤j} latents_i W_dec[i][:, j − i]
        return torch.stack(
            [sum(latents[i] @ clt.W_dec[i][:, j - i] for i in range(j + 1)) for j in range(N_LAYERS)]
        )

    out = through_decoders(dense_f) + clt.b_dec[:, None]
    if skip:
        out = out + torch.stack([x[j] @ clt.W_skip[j] for j in range(N_LAYERS)])
    torch.testing.assert_close(prediction, out)
    aux_k = min(D_MODEL // 2, int(dead.sum(-1).max()))
    f_dead = topk_activation(
        torch.where(dead[:, None], dense_pre, torch.full_like(dense_pre, -torch.inf)), aux_k
    )
    variance = (residual - residual.mean(1, keepdim=True)).pow(2).sum((0, 2)).mean()
    aux = (through_decoders(f_dead.nan_to_num(0.0)) - residual).pow(2).sum((0, 2)).mean() / variance
    dense = grads((y - out).pow(2).sum() + clt.cfg.aux_k_coefficient * aux)
    without_aux = grads((y - out).pow(2).sum())
    assert not torch.allclose(dense["W_enc"], without_aux["W_enc"])  # AuxK reaches the dead latents' encoders
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], rtol=1e-9, atol=1e-10, msg=name)


def test_circuit_tracer_layout_round_trip_and_our_layout(tmp_path) -> None:
    clt = random_clt(skip=False, dtype=torch.float32)
    folder = clt.save_circuit_tracer(tmp_path / "ct")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["config.yaml"] + [f"W_{kind}_{i}.safetensors" for kind in ("enc", "dec") for i in range(N_LAYERS)]
    )
    from safetensors.torch import load_file

    encoder = load_file(str(folder / "W_enc_1.safetensors"))  # circuit-tracer's key names and shapes
    assert sorted(encoder) == ["W_enc_1", "b_dec_1", "b_enc_1", "threshold_1"]
    assert list(encoder["W_enc_1"].shape) == [D_TC, D_MODEL]
    assert list(load_file(str(folder / "W_dec_1.safetensors"))["W_dec_1"].shape) == [
        D_TC,
        N_LAYERS - 1,
        D_MODEL,
    ]
    back = load_clt(folder)
    assert (back.hook_in, back.hook_out) == (clt.hook_in, clt.hook_out) and back.cfg.activation == "jumprelu"
    for name, value in clt.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], value, atol=1e-6, rtol=1e-6, msg=name)
    x = torch.randn(N_LAYERS, 16, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(back(x), clt(x), atol=1e-6, rtol=1e-6)
    ours = load_clt_dir(clt.save(tmp_path / "ours"))
    for name, value in clt.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
    with pytest.raises(
        SAEInputError, match="circuit-tracer's CLT layout holds JumpReLU / ReLU CLTs without skip"
    ):
        random_clt(skip=True, dtype=torch.float32).save_circuit_tracer(tmp_path / "skip")


def test_config_and_input_errors() -> None:
    with pytest.raises(SAEInputError, match="unknown CLT activation 'gelu'"):
        CLTConfig(2, 4, 8, activation="gelu")
    with pytest.raises(SAEInputError, match="k=None is invalid"):
        CLTConfig(2, 4, 8, activation="topk")
    cfg = CLTConfig(4, 16, 32, skip=True)
    assert clt_parameter_count(cfg) == 4 * 16 * 32 + 10 * 32 * 16 + 2 * 4 * 32 + 4 * 16 + 4 * 16 * 16
    clt = random_clt(skip=False)
    with pytest.raises(SAEInputError, match=r"shape \[2, 5, 8\].*n_layers=3"):
        clt.check_input(torch.zeros(2, 5, 8))
    bad = torch.zeros(N_LAYERS, 5, D_MODEL)
    bad[2, 3, 0] = float("nan")
    with pytest.raises(SAEInputError, match="NaN/inf values in row 3 of layer 2"):
        clt.check_input(bad)


# ------------------------------------------------------------------------------------------ training on a model
@pytest.fixture(scope="module")
def tiny_llama() -> HookedModel:
    """A 3-layer random Llama (d_model 16, d_mlp 48)."""
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=48, num_hidden_layers=3,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=64)  # fmt: skip
    torch.manual_seed(0)
    return HookedModel.from_hf(transformers.AutoModelForCausalLM.from_config(config).eval())


@pytest.fixture(scope="module")
def mlp_batches(tiny_llama) -> list[dict[str, torch.Tensor]]:
    """80 batches of 64 tokens: every layer's MLP input (ln2.hook_normalized) and output, from one capture each."""
    tokens = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(0))
    hooks = ["blocks.*.ln2.hook_normalized", "blocks.*.hook_mlp_out"]
    stream = live_batches(tiny_llama, tokens, hooks, batch_size=64, buffer_rows=512, sequences_per_forward=16)
    return list(itertools.islice(stream, 80))


def clt_config(activation: str = "jumprelu", **options) -> CLTConfig:
    return CLTConfig(3, 16, 48, activation=activation, **options)


TRAIN = dict(steps=80, lr=3e-3, warmup_steps=5, progress=False)


@pytest.mark.parametrize(
    "activation, options",
    [("jumprelu", {}), ("jumprelu", {"sparsity": "l0", "decoder_norm": "concat"}), ("topk", {"k": 6}),
     ("batchtopk", {"k": 6}), ("relu", {"skip": True})],
)  # fmt: skip
def test_training_on_a_models_mlps_reduces_every_layers_fvu(mlp_batches, activation, options) -> None:
    clt = seeded_clt(clt_config(activation, **options), seed=0)
    result = train_saes({"clt": clt}, mlp_batches, TrainConfig(**TRAIN))
    history = result.history["clt"]
    assert len(history) == 80 and {"fvu.0", "fvu.1", "fvu.2", "l0.0", "l0.1", "l0.2"} <= set(history[-1])
    for layer in range(3):
        first = sum(h[f"fvu.{layer}"] for h in history[:5]) / 5
        last = sum(h[f"fvu.{layer}"] for h in history[-5:]) / 5
        assert last < 0.7 * first, (layer, first, last)
    if activation in ("topk", "batchtopk"):
        assert history[-1]["l0"] == pytest.approx(6, abs=0.5 if activation == "batchtopk" else 1e-6)
    # the saved scale is folded in: the trained CLT predicts raw MLP outputs from raw MLP inputs
    batch = mlp_batches[-1]
    x = torch.stack([batch[f"blocks.{i}.ln2.hook_normalized"] for i in range(3)])
    y = torch.stack([batch[f"blocks.{i}.hook_mlp_out"] for i in range(3)])
    with torch.no_grad():
        fvu = (clt(x) - y).pow(2).sum((1, 2)) / (y - y.mean(1, keepdim=True)).pow(2).sum((1, 2))
    assert float(fvu.max()) < 0.7 * history[0]["fvu"] + 0.3, fvu


def test_resume_after_an_interruption_equals_uninterrupted_and_same_seed_same_bytes(
    mlp_batches, tmp_path
) -> None:
    cfg = clt_config("jumprelu")
    straight = train_saes({"clt": seeded_clt(cfg, 0)}, mlp_batches, TrainConfig(**TRAIN)).saes["clt"]
    partial = TrainConfig(**TRAIN | {"checkpoint_dir": tmp_path / "state", "checkpoint_every": 30})
    # the stream ends at step 45, the last checkpoint is step 30's
    train_saes({"clt": seeded_clt(cfg, 0)}, mlp_batches[:45], partial)
    resumed = train_saes({"clt": seeded_clt(cfg, 0)}, mlp_batches, partial)
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.saes["clt"].state_dict()[name], value), name
    assert len(resumed.history["clt"]) == 80
    again = train_saes({"clt": seeded_clt(cfg, 0)}, mlp_batches, TrainConfig(**TRAIN)).saes["clt"]
    files = [
        m.save(tmp_path / name) / "clt_weights.safetensors" for name, m in (("a", straight), ("b", again))
    ]
    assert files[0].read_bytes() == files[1].read_bytes()
    other = seeded_clt(cfg, 1)
    assert not torch.equal(other.W_enc, seeded_clt(cfg, 0).W_enc)


def test_training_refuses_batches_without_every_layer(mlp_batches) -> None:
    batch = {k: v for k, v in mlp_batches[0].items() if k != "blocks.2.hook_mlp_out"}
    with pytest.raises(SAEInputError, match=r"no activations for hook\(s\) \['blocks.2.hook_mlp_out'\]"):
        train_saes({"clt": seeded_clt(clt_config(), 0)}, [batch], TrainConfig(**TRAIN | {"steps": 1}))


# ------------------------------------------------------------------------------------------ run and evaluate
@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    import numpy as np

    path = tmp_path_factory.mktemp("data") / "ids.npy"
    np.save(path, np.random.default_rng(0).integers(0, 64, size=(48, 16)))
    return path


def test_run_clt_trains_saves_and_scores_the_replacement_model(tiny_llama, token_file, tmp_path) -> None:
    from workbench.analysis import write_tables
    from workbench.circuits.sae.clt_analysis import ANALYSIS, REPLACEMENT, run_clt
    from workbench.datasets import load_dataset

    lines: list[str] = []
    frames = run_clt(tiny_llama, load_dataset(str(token_file)), sae_id="llama-clt", hook="blocks.*.ln2.hook_normalized",
                     hook_out="blocks.*.hook_mlp_out", d_sae=32, workspace=tmp_path, steps=40, progress=False,
                     max_tokens=None, context_length=16, announce=lines.append)  # fmt: skip
    assert "CLT over 3 layers × 32 latents" in lines[0] and "free" in lines[0]
    evals = frames["sae_evals"]
    assert list(evals["hook"]) == [f"blocks.{i}.ln2.hook_normalized" for i in range(3)]
    assert (evals["FVU"] < 1).all() and (evals["L0"] > 0).all() and evals["dead_fraction"].between(0, 1).all()
    row = frames["transcoder_replacement"].iloc[0]
    assert row["n_tokens"] == 12 * 15 and row["kl"] >= 0 and row["ce_replacement"] > 0
    assert row["gain_kept"] == pytest.approx(
        (row["ce_unigram"] - row["ce_replacement"]) / (row["ce_unigram"] - row["ce_clean"])
    )
    assert write_tables(tmp_path, (ANALYSIS, REPLACEMENT), frames) == {
        "sae_evals": 3,
        "transcoder_replacement": 1,
    }
    saved = load_clt_dir(tmp_path / "saes" / "llama-clt")
    assert saved.layers == [0, 1, 2] and saved.hooks(2) == (
        "blocks.2.ln2.hook_normalized",
        "blocks.2.hook_mlp_out",
    )


def test_replacement_hooks_at_layer_zero_equal_the_clt_forward(tiny_llama) -> None:
    """Layer 0's replaced MLP output (resid_post − resid_mid) is the CLT's own prediction from the model's layer-0
    MLP input."""
    from workbench.circuits.sae.clt_analysis import replacement_hooks

    clt = random_clt(skip=True, dtype=torch.float32)
    clt = CrossLayerTranscoder(torch.randn(3, 16, 12), torch.randn(3, 12), torch.rand(3, 12) * 0.3,
                               [torch.randn(12, 3 - i, 16) for i in range(3)], torch.randn(3, 16),
                               clt.hook_in, clt.hook_out)  # fmt: skip
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    with (
        torch.no_grad(),
        tiny_llama.capture(["blocks.0.ln2.hook_normalized", "blocks.0.hook_resid_mid"]) as clean,
    ):
        tiny_llama({"input_ids": tokens, "attention_mask": torch.ones_like(tokens)})
    seen = {}
    with torch.no_grad(), tiny_llama.capture(["blocks.0.hook_resid_post"]) as replaced:
        tiny_llama.run_with_hooks({"input_ids": tokens, "attention_mask": torch.ones_like(tokens)},
                                  fwd_hooks=replacement_hooks(clt))  # fmt: skip
        seen["out"] = replaced["blocks.0.hook_resid_post"] - clean["blocks.0.hook_resid_mid"]
    x = clean["blocks.0.ln2.hook_normalized"].reshape(-1, 16)
    expected = clt.encode_layer(x, 0) @ clt.W_dec[0][:, 0] + clt.b_dec[0]
    torch.testing.assert_close(seen["out"].reshape(-1, 16), expected.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "hook, hook_out, d_sae, message",
    [("blocks.*.hook_nope", "blocks.*.hook_mlp_out", 32, "--hook 'blocks.\\*.hook_nope' matches no hook"),
     ("blocks.*.ln2.hook_normalized", "blocks.[01].hook_mlp_out", 32, r"matches layers \[0, 1, 2\] but --hook-out"),
     ("blocks.*.ln2.hook_normalized", "blocks.*.hook_mlp_out", 10**9, "too large; use fewer layers")],
)  # fmt: skip
def test_run_clt_refuses_bad_input_and_writes_nothing(tiny_llama, token_file, tmp_path, hook, hook_out, d_sae,
                                                      message) -> None:  # fmt: skip
    from workbench.circuits.sae.clt_analysis import run_clt
    from workbench.datasets import load_dataset

    with pytest.raises(SAEInputError, match=message):
        run_clt(tiny_llama, load_dataset(str(token_file)), sae_id=None, hook=hook, hook_out=hook_out, d_sae=d_sae,
                workspace=tmp_path / "ws", steps=5, progress=False)  # fmt: skip
    assert not (tmp_path / "ws").exists()
