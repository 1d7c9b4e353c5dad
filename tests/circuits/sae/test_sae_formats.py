"""Foreign SAE layouts in and out: the real sae_lens and sparsify packages on both sides, Gemma Scope and
dictionary_learning fixtures with their exact key names and shapes (references computed in float64 from the
formats' documented formulas), circuit-tracer transcoder sets and CLTs, workspace import / export and bad input.

Tolerance: encodings equal the package's own to atol = rtol = 1e-5 (float32 matmuls in another order).
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from workbench.circuits.sae import SAEConfig, SAEInputError, create_sae, load_sae
from workbench.circuits.sae.formats import detect_format, read_saes

TOL = 1e-5  # atol and rtol of every encoding comparison


def perturbed(module: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------------------------- SAELens
def test_saelens_names_are_the_installed_registry() -> None:
    import sae_lens  # noqa: F401  (registers the architectures)
    from sae_lens.registry import SAE_CLASS_REGISTRY

    from workbench.circuits.sae.formats.saelens import SAELENS_ARCHITECTURES

    assert set(SAELENS_ARCHITECTURES) <= set(SAE_CLASS_REGISTRY), set(SAELENS_ARCHITECTURES) - set(
        SAE_CLASS_REGISTRY
    )


@pytest.mark.parametrize("normalize", ["expected_average_only_in", "layer_norm", "constant_norm_rescale"])
def test_saelens_normalize_activations(tmp_path, normalize) -> None:
    """Identity-at-inference normalisations load with sae_lens's own encodings; per-token ones are refused."""
    from sae_lens import StandardSAE, StandardSAEConfig

    lens = StandardSAE(StandardSAEConfig(d_in=8, d_sae=24, normalize_activations=normalize))
    perturbed(lens, 1)
    lens.save_model(tmp_path)
    x = torch.randn(30, 8)
    if normalize != "expected_average_only_in":
        with pytest.raises(SAEInputError, match=rf"cfg.json: normalize_activations='{normalize}'"):
            load_sae(tmp_path)
        return
    torch.testing.assert_close(load_sae(tmp_path).encode(x), lens.encode(x).detach(), atol=TOL, rtol=TOL)


def test_saelens_hook_z_and_head_index(tmp_path) -> None:
    """A hook_z SAE reads attn.hook_z flattened over heads (sae_lens reshapes [.., head, d_head] itself); an SAE
    on one head's slice is refused naming hook_head_index."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    cfg = StandardSAEConfig(d_in=12, d_sae=20, reshape_activations="hook_z",
                            metadata=SAEMetadata(hook_name="blocks.0.attn.hook_z"))  # fmt: skip
    lens = StandardSAE(cfg)
    perturbed(lens, 2)
    lens.save_model(tmp_path / "z")
    z = torch.randn(7, 3, 4)  # [pos, head, d_head]
    ours = load_sae(tmp_path / "z")
    assert ours.hook_in == "blocks.0.attn.hook_z"
    torch.testing.assert_close(ours.encode(z.flatten(-2)), lens.encode(z).detach(), atol=TOL, rtol=TOL)
    raw = json.loads((tmp_path / "z" / "cfg.json").read_text())
    raw["metadata"]["hook_head_index"] = 1
    (tmp_path / "z" / "cfg.json").write_text(json.dumps(raw))
    with pytest.raises(SAEInputError, match="hook_head_index=1"):
        load_sae(tmp_path / "z")


# ----------------------------------------------------------------------------------------------- sparsify
@pytest.fixture()
def eager_sparsify(monkeypatch):
    """sparsify with its eager decoder (its Triton decoder needs a GPU driver)."""
    import sparsify.sparse_coder
    from sparsify.utils import eager_decode

    monkeypatch.setattr(sparsify.sparse_coder, "decoder_impl", eager_decode)
    return sparsify


def dense(encoded, d_sae: int) -> torch.Tensor:
    return torch.zeros(encoded.top_acts.shape[0], d_sae).scatter(1, encoded.top_indices, encoded.top_acts)


SPARSIFY_RUN = {  # hookpoint folder -> SparseCoderConfig options
    "layers.1": {"num_latents": 48, "k": 5, "multi_topk": True},
    "layers.0.mlp/seed0": {"num_latents": 48, "k": 4, "transcode": True, "skip_connection": True},
    "layers.0.mlp/seed1": {"num_latents": 48, "k": 4, "transcode": True},
}


def test_sparsify_run_folder_loads_with_the_package_encodings(tmp_path, eager_sparsify) -> None:
    from sparsify import SparseCoder, SparseCoderConfig

    coders = {}
    for number, (name, options) in enumerate(SPARSIFY_RUN.items()):
        torch.manual_seed(number)
        coder = SparseCoder(16, SparseCoderConfig(**options))
        perturbed(coder, number)
        coder.save_to_disk(tmp_path / name)
        coders[name.replace("/", ".")] = coder
    (tmp_path / "config.json").write_text(
        json.dumps({"model": "EleutherAI/pythia-14m", "hookpoints": ["layers.1"]})
    )
    assert detect_format(tmp_path) == "sparsify"
    saes = dict(read_saes(tmp_path))
    assert sorted(saes) == sorted(coders)
    assert (saes["layers.1"].hook_in, saes["layers.1"].hook_out) == ("blocks.1.hook_resid_post",) * 2
    skip = saes["layers.0.mlp.seed0"]
    assert (skip.hook_in, skip.hook_out, skip.cfg.k) == (
        "blocks.0.ln2.hook_normalized",
        "blocks.0.hook_mlp_out",
        4,
    )
    assert skip.W_skip is not None and saes["layers.1"].cfg.model == "EleutherAI/pythia-14m"
    x = torch.randn(40, 16)
    with torch.no_grad():
        for name, coder in coders.items():
            torch.testing.assert_close(saes[name].encode(x), dense(coder.encode(x), 48), atol=TOL, rtol=TOL)
            # multi_topk's forward returns the 4k-latent reconstruction of its training loss; inference decodes k
            expected = coder.decode(*coder.encode(x)[:2]) if coder.cfg.multi_topk else coder(x).sae_out
            torch.testing.assert_close(saes[name](x), expected, atol=TOL, rtol=TOL)
    assert load_sae(tmp_path / "layers.1").cfg.k == 5
    (tmp_path / "layers.1").rename(tmp_path / "my-coder")
    with pytest.raises(SAEInputError, match="hookpoint 'my-coder' is no module.*pass --hook"):
        load_sae(tmp_path / "my-coder")
    named = dict(read_saes(tmp_path / "my-coder", hook="blocks.4.hook_resid_post"))["my-coder"]
    assert (named.hook_in, named.hook_out) == ("blocks.4.hook_resid_post",) * 2


@pytest.mark.parametrize("family", ["gpt_neox", "gpt2", "llama"])
def test_module_names_map_both_ways(family) -> None:
    from workbench.adapters.module_names import FAMILY_MODULES, hook_for_module, module_for_hook

    hooks = ["hook_embed", "ln_final.hook_normalized"] + [
        f"blocks.3.{h}" for h in ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
                                  "ln2.hook_normalized")
    ]  # fmt: skip
    for hook in hooks:
        module, side = module_for_hook(family, hook)
        assert hook_for_module(family, module, side) == hook
        assert hook_for_module(family, f"{FAMILY_MODULES[family].base}.{module}", side) == hook


def test_ours_saved_as_sparsify_loads_in_sparsify(tmp_path, eager_sparsify) -> None:
    from sparsify import SparseCoder

    from workbench.circuits.sae.formats.sparsify import save_sparsify

    torch.manual_seed(3)
    sae = create_sae(SAEConfig("topk", d_in=16, d_sae=40, k=6, hook_in="blocks.2.hook_resid_post", model="m"))
    tc = create_sae(SAEConfig("topk", d_in=16, d_sae=40, k=3, skip=True, hook_in="blocks.0.ln2.hook_normalized",
                              hook_out="blocks.0.hook_mlp_out"))  # fmt: skip
    x = torch.randn(50, 16)
    for module, family, folder in ((sae, "gpt2", "h.2"), (tc, "llama", "layers.0.mlp")):
        perturbed(module, 5)
        written = save_sparsify(module, tmp_path / family, family=family)
        assert written == tmp_path / family / folder
        coder = SparseCoder.load_from_disk(written)
        with torch.no_grad():
            torch.testing.assert_close(dense(coder.encode(x), 40), module.encode(x), atol=TOL, rtol=TOL)
            torch.testing.assert_close(coder(x).sae_out, module(x), atol=TOL, rtol=TOL)
        assert set(SparseCoder.load_many(str(tmp_path / family), local=True)) == {folder}
        back = load_sae(written)
        assert (back.hook_in, back.hook_out) == (module.hook_in, module.hook_out)
    with pytest.raises(SAEInputError, match="only TopK"):
        save_sparsify(create_sae(SAEConfig("relu", d_in=4, d_sae=8, hook_in="blocks.0.hook_resid_post")), tmp_path,
                      family="gpt2")  # fmt: skip


# ----------------------------------------------------------------------------------------------- Gemma Scope
def test_gemmascope_params_npz(tmp_path) -> None:
    g = np.random.default_rng(0)
    d_in, d_sae = 8, 32
    params = {"W_enc": g.normal(size=(d_in, d_sae)), "W_dec": g.normal(size=(d_sae, d_in)),
              "b_enc": g.normal(size=d_sae), "b_dec": g.normal(size=d_in), "threshold": g.uniform(0, 1, d_sae)}  # fmt: skip
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_3" / "width_16k" / "average_l0_50"
    folder.mkdir(parents=True)
    arrays: dict[str, Any] = {k: v.astype(np.float32) for k, v in params.items()}
    np.savez(folder / "params.npz", **arrays)
    assert detect_format(folder) == "gemmascope"
    sae = load_sae(folder)
    assert (sae.cfg.architecture, sae.hook_in, sae.hook_out) == ("jumprelu",) + (
        "blocks.3.hook_resid_post",
    ) * 2
    x = g.normal(size=(20, d_in))
    pre = x @ params["W_enc"] + params["b_enc"]
    expected = pre * (pre > params["threshold"])
    torch.testing.assert_close(sae.encode(torch.tensor(x, dtype=torch.float32)).double(), torch.tensor(expected),
                               atol=1e-4, rtol=1e-4)  # fmt: skip
    recon = expected @ params["W_dec"] + params["b_dec"]
    torch.testing.assert_close(sae(torch.tensor(x, dtype=torch.float32)).double(), torch.tensor(recon), atol=1e-4,
                               rtol=1e-4)  # fmt: skip
    transcoder = tmp_path / "gemma-scope-2b-pt-transcoders" / "layer_5" / "width_16k" / "average_l0_9"
    transcoder.mkdir(parents=True)
    (transcoder / "params.npz").write_bytes((folder / "params.npz").read_bytes())
    tc = load_sae(transcoder / "params.npz")
    assert (tc.hook_in, tc.hook_out) == ("blocks.5.ln2.hook_normalized", "blocks.5.hook_mlp_out")
    arrays = {k: v for k, v in params.items() if k != "threshold"}
    np.savez(folder / "params.npz", **arrays)
    with pytest.raises(SAEInputError, match=r"params.npz lacks tensor\(s\) \['threshold'\]"):
        load_sae(folder)


# ----------------------------------------------------------------------------------------------- dictionary_learning
def _dictionary_learning(folder: Path, dict_class: str, state: dict, **trainer) -> Path:
    folder.mkdir(parents=True)
    torch.save(state, folder / "ae.pt")
    trainer = {"dict_class": dict_class, "activation_dim": 8, "dict_size": 24, "layer": 2, "lm_name": "EleutherAI/pythia-70m",
               "submodule_name": "resid_post_layer_2", **trainer}  # fmt: skip
    (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"d_submodule": 8}}))
    return folder


def test_dictionary_learning_classes(tmp_path) -> None:
    """Each dictionary class's state dict (exact keys and shapes) loads with latents equal to its encode formula."""
    g = torch.Generator().manual_seed(0)
    d, n = 8, 24
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    enc_w, enc_b, dec_w, b_dec = rnd(n, d), rnd(n), rnd(d, n), rnd(d)
    x = rnd(30, d)
    relu_pre = x - b_dec
    post = torch.relu(relu_pre @ enc_w.T + enc_b)
    threshold = float(post[post > 0].quantile(0.6))
    topk = torch.zeros_like(post).scatter(1, post.topk(4, dim=1).indices, post.topk(4, dim=1).values)
    w_enc, b_enc, w_dec, thr = (
        rnd(d, n),
        rnd(n),
        rnd(n, d) * (torch.rand(n, 1, generator=g, dtype=torch.float64) + 0.5),
        rnd(n).abs(),
    )
    jump_pre = x @ w_enc + b_enc
    jump = torch.relu(jump_pre * (jump_pre > thr)) * w_dec.norm(dim=1)
    cases = {
        "AutoEncoder": ({"bias": b_dec, "encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w},
                        "relu", post),
        "AutoEncoderTopK": ({"encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w, "b_dec": b_dec,
                             "k": torch.tensor(4, dtype=torch.int), "threshold": torch.tensor(-1.0)}, "topk", topk),
        "BatchTopKSAE": ({"encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w, "b_dec": b_dec,
                          "k": torch.tensor(4, dtype=torch.int), "threshold": torch.tensor(threshold)}, "jumprelu",
                         post * (post > threshold)),
        "JumpReluAutoEncoder": ({"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec, "threshold": thr},
                                "jumprelu", jump),
    }  # fmt: skip
    for dict_class, (state, architecture, expected) in cases.items():
        folder = _dictionary_learning(
            tmp_path / dict_class, dict_class, {k: v.float() for k, v in state.items()}
        )
        assert detect_format(folder) == "dictionary_learning"
        sae = load_sae(folder)
        assert (sae.cfg.architecture, sae.hook_in, sae.cfg.model) == (architecture, "blocks.2.hook_resid_post",
                                                                      "EleutherAI/pythia-70m"), dict_class  # fmt: skip
        assert bool((expected > 0).any()) and bool((expected == 0).any())
        torch.testing.assert_close(
            sae.encode(x.float()).double(), expected, atol=1e-4, rtol=1e-4, msg=dict_class
        )
    r_mag, gate_bias, mag_bias = 0.3 * rnd(n), rnd(n), rnd(n)
    x_enc = (x - b_dec) @ enc_w.T
    gated_expected = (x_enc + gate_bias > 0) * torch.relu(r_mag.exp() * x_enc + mag_bias) * dec_w.norm(dim=0)
    gated = {"encoder.weight": enc_w, "decoder.weight": dec_w, "decoder_bias": b_dec, "r_mag": r_mag,
             "gate_bias": gate_bias, "mag_bias": mag_bias}  # fmt: skip
    sae = load_sae(
        _dictionary_learning(tmp_path / "gated", "GatedAutoEncoder", {k: v.float() for k, v in gated.items()})
    )
    assert (
        sae.cfg.architecture == "gated"
        and bool((gated_expected > 0).any())
        and bool((gated_expected == 0).any())
    )
    torch.testing.assert_close(sae.encode(x.float()).double(), gated_expected, atol=1e-4, rtol=1e-4)
    recon = gated_expected / dec_w.norm(dim=0) @ dec_w.T + b_dec  # dictionary_learning's decode
    torch.testing.assert_close(sae(x.float()).double(), recon, atol=1e-4, rtol=1e-4)


class _Pickled:  # an object torch.load(weights_only=True) must refuse to rebuild
    def __init__(self) -> None:
        self.weights = torch.zeros(2)


def test_dictionary_learning_pickle_is_refused(tmp_path) -> None:
    folder = _dictionary_learning(tmp_path / "ae", "AutoEncoder", {"model": _Pickled()})
    with pytest.raises(SAEInputError, match=r"ae.pt needs unpickling beyond tensors.*weights_only=True"):
        load_sae(folder)


# ----------------------------------------------------------------------------------------------- circuit-tracer
def _transcoder_set(folder: Path, n_layers: int = 2, d: int = 8, n: int = 16) -> dict[int, dict]:
    g = torch.Generator().manual_seed(7)
    folder.mkdir(parents=True)
    layers = {}
    for layer in range(n_layers):
        tensors = {"W_enc": torch.randn(n, d, generator=g), "W_dec": torch.randn(n, d, generator=g),
                   "b_enc": torch.randn(n, generator=g), "b_dec": torch.randn(d, generator=g),
                   "activation_function.threshold": torch.rand(n, generator=g), "W_skip": torch.randn(d, d, generator=g)}  # fmt: skip
        save_file(tensors, str(folder / f"layer_{layer}.safetensors"))
        layers[layer] = tensors
    (folder / "config.yaml").write_text(
        "model_kind: transcoder_set\nfeature_input_hook: mlp.hook_in\nfeature_output_hook: mlp.hook_out\n"
    )
    return layers


def test_circuit_tracer_transcoder_set(tmp_path) -> None:
    layers = _transcoder_set(tmp_path / "set")
    assert detect_format(tmp_path / "set") == "circuit_tracer"
    saes = dict(read_saes(tmp_path / "set"))
    assert sorted(saes) == ["layer_0", "layer_1"]
    x = torch.randn(12, 8)
    for layer, tensors in layers.items():
        sae = saes[f"layer_{layer}"]
        assert (sae.hook_in, sae.hook_out) == (
            f"blocks.{layer}.ln2.hook_normalized",
            f"blocks.{layer}.hook_mlp_out",
        )
        pre = torch.nn.functional.linear(x, tensors["W_enc"], tensors["b_enc"])
        acts = pre * (pre > tensors["activation_function.threshold"])
        torch.testing.assert_close(sae.encode(x), acts, atol=TOL, rtol=TOL)
        torch.testing.assert_close(
            sae(x), acts @ tensors["W_dec"] + tensors["b_dec"] + x @ tensors["W_skip"].T, atol=TOL, rtol=TOL
        )


def test_cross_layer_transcoder_loads_and_evaluates(tmp_path) -> None:
    import transformers

    from workbench.circuits.sae.formats.circuit_tracer import evaluate_clt, load_clt
    from workbench.datasets import load_dataset
    from workbench.model import HookedModel

    n_layers, d, n = 2, 16, 12
    g = torch.Generator().manual_seed(9)
    folder = tmp_path / "clt"
    folder.mkdir()
    (folder / "config.yaml").write_text("model_kind: cross_layer_transcoder\nfeature_input_hook: hook_resid_mid\n"
                                        "feature_output_hook: hook_mlp_out\n")  # fmt: skip
    enc, dec = [], []
    for i in range(n_layers):
        enc.append({f"W_enc_{i}": torch.randn(n, d, generator=g), f"b_enc_{i}": torch.randn(n, generator=g),
                    f"b_dec_{i}": torch.randn(d, generator=g), f"threshold_{i}": torch.rand(n, generator=g)})  # fmt: skip
        dec.append({f"W_dec_{i}": torch.randn(n, n_layers - i, d, generator=g)})
        save_file(enc[i], str(folder / f"W_enc_{i}.safetensors"))
        save_file(dec[i], str(folder / f"W_dec_{i}.safetensors"))
    clt = load_clt(folder)
    x = torch.randn(n_layers, 5, d, dtype=torch.float64)
    features, out = [], torch.stack([enc[j][f"b_dec_{j}"].double().expand(5, d) for j in range(n_layers)])
    for i in range(n_layers):
        pre = x[i] @ enc[i][f"W_enc_{i}"].double().T + enc[i][f"b_enc_{i}"].double()
        features.append(pre * (pre > enc[i][f"threshold_{i}"].double()))
        for j in range(i, n_layers):
            out[j] = out[j] + features[i] @ dec[i][f"W_dec_{i}"][:, j - i].double()
    torch.testing.assert_close(clt.decode(clt.encode(x.float())).double(), out, atol=1e-4, rtol=1e-4)
    with pytest.raises(SAEInputError, match="cross-layer transcoder.*evaluate_clt"):
        read_saes(folder)
    config = transformers.LlamaConfig(hidden_size=d, intermediate_size=32, num_hidden_layers=n_layers,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=64)  # fmt: skip
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    model = HookedModel.from_hf(hf)
    text = tmp_path / "ids.npy"
    np.save(text, np.random.default_rng(0).integers(0, 64, size=(4, 16)))
    frame = evaluate_clt(model, load_dataset(str(text)), clt, max_tokens=64)
    assert list(frame["hook_in"]) == ["blocks.0.hook_resid_mid", "blocks.1.hook_resid_mid"]
    assert (frame["n_tokens"] == 64).all() and np.isfinite(frame["FVU"]).all() and (frame["L0"] > 0).all()
    from tests.circuits.sae.test_sae import sae_cli

    result = sae_cli(tmp_path / "ws", "import", str(folder))  # one CLT in our layout (issue 32)
    assert result.exit_code == 0, result.output
    assert "imported clt: cross-layer transcoder (jumprelu) over 2 layers" in result.output
    from typer.testing import CliRunner

    from workbench.cli import app

    hf.save_pretrained(tmp_path / "llama")
    result = CliRunner().invoke(app, ["circuits", "clt-eval", str(folder), str(tmp_path / "llama"), "--data",
                                      str(text), "--max-tokens", "32", "--workspace", str(tmp_path / "ws")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (
        "warning: `workbench circuits clt-eval PATH MODEL` is deprecated (it goes in the next release); use "
        "`workbench sae eval PATH MODEL`" in result.stderr
    )
    assert (
        "clt blocks.1.hook_resid_mid -> blocks.1.hook_mlp_out: L0" in result.stdout and "FVU" in result.stdout
    )
    assert "written to the workspace (sae_evals 2 rows, transcoder_replacement 1 rows)" in result.stdout


# ----------------------------------------------------------------------------------------------- workspace, bad input
def _sparsify_coder(folder: Path, seed: int = 0) -> None:
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(seed)
    SparseCoder(16, SparseCoderConfig(num_latents=32, k=4)).save_to_disk(folder)


def test_import_registers_atomically_and_exports(tmp_path) -> None:
    from tests.circuits.sae.test_sae import sae_cli

    run = tmp_path / "run"
    _sparsify_coder(run / "layers.0")
    _sparsify_coder(run / "layers.1", seed=1)
    ws = tmp_path / "ws"
    result = sae_cli(ws, "import", str(run), "--id", "tiny")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (ws / "saes").iterdir()) == ["tiny.layers.0", "tiny.layers.1"]
    assert json.loads((ws / "saes" / "tiny.layers.1" / "source.json").read_text())["format"] == "sparsify"
    sae = load_sae(ws / "saes" / "tiny.layers.1")
    assert sae.hook_in == "blocks.1.hook_resid_post"
    result = sae_cli(ws, "export", "tiny.layers.1", "--format", "saelens", "--out", str(tmp_path / "lens"))
    assert result.exit_code == 0, result.output
    from sae_lens import SAE as LensSAE

    x = torch.randn(9, 16)
    lens = LensSAE.load_from_disk(str(tmp_path / "lens"))
    torch.testing.assert_close(lens.encode(x).detach(), sae.encode(x), atol=TOL, rtol=TOL)
    result = sae_cli(ws, "export", "tiny.layers.1", "--format", "sparsify", "--out", str(tmp_path / "sp"),
                     "--family", "gpt_neox")  # fmt: skip
    assert result.exit_code == 0 and (tmp_path / "sp" / "layers.1" / "sae.safetensors").is_file(), (
        result.output
    )
    result = sae_cli(ws, "export", "tiny.layers.1", "--format", "neuronpedia", "--out", str(tmp_path / "np"))
    assert result.exit_code == 2 and "no feature pages" in result.output
    result = sae_cli(ws, "export", "tiny.layers.1", "--format", "sparsify", "--out", str(tmp_path / "sp2"))
    assert result.exit_code == 2, result.output
    assert "tiny.layers.1 records no model: pass --family" in result.output


def test_dashboard_lists_imported_saes(tmp_path, monkeypatch) -> None:
    from tests.app.test_app import _run
    from tests.circuits.sae.test_sae import sae_cli
    from workbench.workspace import Workspace

    _sparsify_coder(tmp_path / "run" / "layers.2")
    ws = Workspace(tmp_path / "ws")
    ws.results().write("unrelated", pd.DataFrame({"x": [1]}))
    assert sae_cli(ws.root, "import", str(tmp_path / "run"), "--id", "mine").exit_code == 0
    app = _run("sae", ws.root, monkeypatch)
    assert not app.exception, app.exception
    listed = app.dataframe[0].value
    assert list(listed["sae_id"]) == ["mine"] and list(listed["format"]) == ["sparsify"]
    assert list(listed["hook_in"]) == ["blocks.2.hook_resid_post"]


def _assert_refused(result, *reasons: str) -> None:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and lines[-1].startswith("error: "), result.output
    assert all(reason in lines[-1] for reason in reasons), result.output
    assert "Traceback" not in result.output


def test_bad_layouts_are_refused_and_nothing_is_registered(tmp_path) -> None:
    from tests.circuits.sae.test_sae import sae_cli

    ws = tmp_path / "ws"
    run = tmp_path / "run"
    _sparsify_coder(run / "layers.0")
    _sparsify_coder(run / "layers.1")
    weights = run / "layers.1" / "sae.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(str(weights))
    save_file({k: v for k, v in tensors.items() if k != "encoder.bias"}, str(weights))
    _assert_refused(sae_cli(ws, "import", str(run)), "layers.1/sae.safetensors", "'encoder.bias'")
    assert not (ws / "saes").exists() or not any(
        (ws / "saes").iterdir()
    )  # layers.0 was fine: still not registered
    torch.save(tensors, weights)
    _assert_refused(sae_cli(ws, "import", str(run)), "sae.safetensors is a pickle", "never unpickles")
    save_file({**tensors, "encoder.weight": tensors["encoder.weight"][:, :8].contiguous()}, str(weights))
    _assert_refused(sae_cli(ws, "import", str(run)), "encoder.weight", "d_in=16")
    cfg = json.loads((run / "layers.1" / "cfg.json").read_text()) | {"activation": "groupmax"}
    (run / "layers.1" / "cfg.json").write_text(json.dumps(cfg))
    _assert_refused(sae_cli(ws, "import", str(run)), "activation 'groupmax' is not supported")
    lens = tmp_path / "lens"
    create_sae(SAEConfig("relu", d_in=8, d_sae=16, hook_in="blocks.0.hook_resid_post")).save(
        tmp_path / "ours"
    )
    from workbench.circuits.sae.formats.saelens import save_saelens

    save_saelens(load_sae(tmp_path / "ours"), lens)
    raw = json.loads((lens / "cfg.json").read_text()) | {"architecture": "temporal"}
    (lens / "cfg.json").write_text(json.dumps(raw))
    _assert_refused(sae_cli(ws, "import", str(lens)), "architecture 'temporal'", "cfg.json")
    _assert_refused(sae_cli(ws, "import", str(tmp_path / "nothing-here")), "does not exist")
    assert not (ws / "saes").exists() or not list((ws / "saes").iterdir())
    assert not [p for p in ws.rglob(".import-*")]


@pytest.fixture()
def code_ws(zoo_workspace, tmp_path):
    """A fresh workspace whose models/code-tiny links to the zoo's (results land here, not in the shared zoo)."""
    from workbench.workspace import Workspace

    workspace = Workspace(tmp_path / "ws").ensure()
    workspace.model_dir("code-tiny").symlink_to(
        zoo_workspace.model_dir("code-tiny"), target_is_directory=True
    )
    return workspace


def test_imported_sae_with_another_width_is_refused_at_eval(tmp_path, code_ws) -> None:
    """An SAE for another model (d_in 16): refused at import when checked against code-tiny, and (imported unchecked)
    refused by sae eval on code-tiny, the hook width named both times."""
    from tests.circuits.sae.test_sae import sae_cli

    _sparsify_coder(tmp_path / "layers.0")
    ws = code_ws.root
    result = sae_cli(ws, "import", str(tmp_path / "layers.0"), "--id", "other-model", "code-tiny")
    _assert_refused(result, "d_in=16", "blocks.0.hook_resid_post", "another model or hook")
    assert not (ws / "saes" / "other-model").exists()
    result = sae_cli(ws, "import", str(tmp_path / "layers.0"), "--id", "other-model", "--overwrite")
    assert result.exit_code == 0, result.output
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x\n")
    result = sae_cli(ws, "eval", "other-model", "code-tiny", "--data", str(text), "--no-progress")
    _assert_refused(result, "d_in=16", "blocks.0.hook_resid_post", "another model or hook")


def test_neuronpedia_export_from_feature_pages(tmp_path, code_ws) -> None:
    """`sae features` on an imported SAE, then `sae export --format neuronpedia`: the batch JSON and the bulk-import
    folder carry SAEDashboard's fields (neuronpedia_dashboard.py / neuronpedia_export.py), values from the pages."""
    from tests.circuits.sae.test_sae import sae_cli
    from workbench.references import resolve_model

    model = resolve_model("code-tiny", workspace=code_ws)
    d = model.cfg.d_model
    torch.manual_seed(0)
    sae = create_sae(
        SAEConfig("topk", d_in=d, d_sae=24, k=3, hook_in="blocks.1.hook_resid_post", model="code-tiny")
    )
    from workbench.circuits.sae.formats.saelens import save_saelens

    save_saelens(sae, tmp_path / "lens")
    ws = code_ws.root
    assert sae_cli(ws, "import", str(tmp_path / "lens"), "--id", "np-sae", "--overwrite").exit_code == 0
    text = tmp_path / "code.txt"
    text.write_text("\n".join(f"def f{i}(x):    return x + {i}" for i in range(40)))
    result = sae_cli(ws, "features", "np-sae", "code-tiny", "--data", str(text), "--max-tokens", "1500",
                     "--context-length", "32", "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    result = sae_cli(
        ws, "export", "np-sae", "code-tiny", "--format", "neuronpedia", "--out", str(tmp_path / "np")
    )
    assert result.exit_code == 0, result.output
    # no MODEL / --family: the SAE's recorded model gives the family
    result = sae_cli(ws, "export", "np-sae", "--format", "sparsify", "--out", str(tmp_path / "sp"))
    assert result.exit_code == 0, result.output
    assert "model family gpt_neox, from the model np-sae records (code-tiny)" in result.output
    from sparsify import SparseCoder

    coder = SparseCoder.load_from_disk(next((tmp_path / "sp").glob("*/sae.safetensors")).parent)
    assert coder.cfg.num_latents == 24 and coder.cfg.k == 3
    batch = json.loads((tmp_path / "np" / "batch-0.json").read_text())
    assert set(batch) == {"model_id", "layer", "sae_set", "features"} and batch["layer"] == 1
    feature_keys = {"feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                    "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
                    "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson", "neg_str",
                    "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_values",
                    "freq_hist_data_bar_heights", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
                    "n_prompts_total", "n_tokens_in_prompt", "dataset", "decoder_weights_dist", "activations"}  # fmt: skip
    pages = code_ws.results().read("sae_features", sae_id="np-sae")
    assert len(batch["features"]) == 24 == len(pages)
    from workbench.datasets import load_dataset

    ids, mask = load_dataset(text).token_tensor(
        model.tokenizer, context_length=32, batch_size=16, packing=True, shuffle_seed=0, max_tokens=1500
    )  # the rows `sae features` read
    lengths = mask.sum(1)
    counts = {"n_prompts_total": int((lengths > 0).sum()), "n_tokens_in_prompt": int(lengths.max())}
    assert counts["n_prompts_total"] > 1 and counts["n_tokens_in_prompt"] == 32
    assert all({k: f[k] for k in counts} == counts for f in batch["features"])
    for feature in batch["features"]:
        assert set(feature) == feature_keys
        page = pages[pages["latent"] == feature["feature_index"]].iloc[0]
        assert feature["frac_nonzero"] == pytest.approx(page["density"])
        assert len(feature["pos_str"]) == len(feature["pos_values"]) == 10
        assert feature["pos_values"] == sorted(feature["pos_values"], reverse=True)
        assert sum(feature["logits_hist_data_bar_heights"]) == model.cfg.d_vocab
        for act in feature["activations"]:
            assert {
                "bin_min",
                "bin_max",
                "bin_contains",
                "tokens",
                "values",
                "qualifying_token_index",
            } <= set(act)
            assert len(act["tokens"]) == len(act["values"])
        top = json.loads(page["top_contexts"])
        assert [a["values"] for a in feature["activations"][: len(top)]] == [c["acts"] for c in top]
    source = tmp_path / "np" / "code-tiny" / "1-np-sae"
    for name, keys in (("release", {"name", "creatorId"}), ("model", {"id", "instruct"}),
                       ("sourceset", {"modelId", "name"}), ("source", {"id", "modelId", "setName"})):  # fmt: skip
        row = json.loads((source / f"{name}.jsonl").read_text())
        assert keys <= set(row), name
    features = [json.loads(line) for line in gzip.decompress((source / "features" / "batch-0.jsonl.gz").read_bytes())
                .decode().splitlines()]  # fmt: skip
    activations = [json.loads(line) for line in gzip.decompress((source / "activations" / "batch-0.jsonl.gz")
                   .read_bytes()).decode().splitlines()]  # fmt: skip
    assert len(features) == 24 and {
        "modelId",
        "layer",
        "index",
        "maxActApprox",
        "pos_str",
        "frac_nonzero",
    } <= set(features[0])
    assert activations and {"id", "tokens", "modelId", "layer", "index", "maxValue", "maxValueTokenIndex", "minValue",
                            "values", "binMin", "binMax", "binContains", "qualifyingTokenIndex"} <= set(activations[0])  # fmt: skip
    assert all(a["maxValue"] == max(a["values"]) for a in activations)
    assert os.path.exists(source / "features" / "batch-0.jsonl.gz")


def test_hook_z_sae_trains_splices_steers_and_round_trips_through_sae_lens(
    tmp_path, code_ws, monkeypatch
) -> None:
    """An SAE on attn.hook_z (heads flattened, as sae_lens's reshape_activations="hook_z"): `sae train` evaluates it
    spliced in and writes feature pages whose promoted tokens go through W_O; exported, sae_lens reads it as a hook_z
    SAE and its forward on the [.., head, d_head] activation equals our splice; steering hook_z along a latent moves
    hook_attn_out by scale × the latent's residual write (Σ_h W_dec[l, h] @ W_O[h], closed form); the pages' head
    shares are the decoder norm² per head, drawn by the SAE view."""
    from sae_lens import SAE as LensSAE
    from streamlit.testing.v1 import AppTest

    from tests.circuits.sae.test_sae import sae_cli
    from workbench.circuits.sae.evals import splice_hooks
    from workbench.circuits.sae.features import residual_writes
    from workbench.circuits.sae.readout import latent_steering
    from workbench.interventions import intervention_hooks
    from workbench.references import resolve_model

    text = tmp_path / "code.txt"
    text.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 3}\n" for i in range(120)))
    ws, sae_id, hook = code_ws.root, "tiny-z", "blocks.0.attn.hook_z"
    result = sae_cli(ws, "train", "code-tiny", "--data", str(text), "--hook", hook, "--d-sae", "32", "--k", "4",
                     "--steps", "20", "--max-tokens", "1500", "--context-length", "32", "--sae-id", sae_id,
                     "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    results = code_ws.results()
    row = results.read("sae_evals", sae_id=sae_id).iloc[0]
    model = resolve_model("code-tiny", workspace=ws).eval()
    n_heads, d_head = model.cfg.n_heads, model.cfg.d_model // model.cfg.n_heads
    assert (row["d_in"], row["L0"]) == (n_heads * d_head, 4.0) and np.isfinite(row["ce_spliced"]), row
    assert row["ce_spliced"] != row["ce_clean"]  # the SAE really replaced hook_z
    pages = results.read("sae_features", sae_id=sae_id)
    assert len(pages) == 32 and pages["promoted_tokens"].notna().all()
    w_dec = load_sae(ws / "saes" / sae_id).W_dec.detach().view(32, n_heads, d_head)
    shares = w_dec.pow(2).sum(-1) / w_dec.pow(2).sum((1, 2))[:, None]  # decoder norm² per head
    got = torch.tensor([json.loads(v) for v in pages.sort_values("latent")["head_shares"]])
    torch.testing.assert_close(got, shares, atol=1e-4, rtol=0)

    out = tmp_path / "lens"
    assert sae_cli(ws, "export", sae_id, "--out", str(out)).exit_code == 0
    lens = LensSAE.load_from_disk(str(out))
    assert lens.cfg.reshape_activations == "hook_z"
    tokens = model.to_tokens("def f(x):\n    return x + 1")
    with torch.no_grad(), model.capture([hook], device=None) as cache:
        model(tokens)
    z = cache[hook]  # [1, pos, n_heads, d_head]
    assert z.shape[-2:] == (n_heads, d_head)
    ours_sae = load_sae(ws / "saes" / sae_id)
    (_, replace), = splice_hooks(ours_sae)  # fmt: skip
    spliced = replace(z, None)
    assert spliced.shape == z.shape
    torch.testing.assert_close(spliced, lens(z).detach(), atol=TOL, rtol=TOL)

    latent, scale = int(pages.sort_values("density").iloc[-1]["latent"]), 3.0
    steer = latent_steering(ours_sae, sae_id, latent, scale)
    with torch.no_grad():
        with model.capture(["blocks.0.hook_attn_out"], device=None) as clean:
            model(tokens)
        with model.capture(["blocks.0.hook_attn_out"], device=None) as steered:
            model.run_with_hooks(tokens, fwd_hooks=intervention_hooks(model, [steer], tokens))
    delta = steered["blocks.0.hook_attn_out"] - clean["blocks.0.hook_attn_out"]  # [1, pos, d_model]
    expected = scale * residual_writes(ours_sae, model)[latent]
    torch.testing.assert_close(delta[0], expected.expand_as(delta[0]), atol=1e-4, rtol=1e-4)

    monkeypatch.setenv("WORKBENCH_WORKSPACE", str(ws))
    view = AppTest.from_file(
        str(Path(__file__).parents[3] / "app" / "views" / "sae.py"), default_timeout=60
    ).run()
    assert not view.exception
    titles = [json.loads(chart.proto.spec)["layout"]["title"]["text"] for chart in view.get("plotly_chart")]
    assert "Decoder norm share per head" in titles, titles
