"""SAE architectures, trainer, SAELens interop, evals, feature pages, CLI and dashboard view."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from workbench.circuits.sae import SAEConfig, SAEInputError, create_sae, load_sae
from workbench.circuits.sae.flat_parameters import flat_parameters
from workbench.circuits.sae.topk import largest_k, topk_activation
from workbench.circuits.sae.train import TRAINER_STATE, TrainConfig, seeded_sae, train_sae, train_saes


def planted(n_atoms=32, d=16, n=4096, active=3, seed=0, d_out=None):
    """x = sum of `active` random unit atoms with positive coefficients; y = x @ M when d_out given."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d, generator=g)
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    idx = torch.rand(n, n_atoms, generator=g).argsort(1)[:, :active]
    coef = torch.zeros(n, n_atoms).scatter(1, idx, 1 + torch.rand(n, active, generator=g))
    x = coef @ atoms
    if d_out is None:
        return atoms, coef, x
    out_atoms = torch.randn(n_atoms, d_out, generator=g)
    out_atoms = out_atoms / out_atoms.norm(dim=1, keepdim=True)
    return out_atoms, coef, x, coef @ out_atoms


def batches(*tensors, batch=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = tensors[0].shape[0]
    while True:
        order = torch.randperm(n, generator=g)
        for i in range(0, n - batch + 1, batch):
            rows = order[i : i + batch]
            yield tensors[0][rows] if len(tensors) == 1 else tuple(t[rows] for t in tensors)


def recovered(atoms, W_dec):
    """Per true atom, the best cosine with any decoder row."""
    a = atoms / atoms.norm(dim=1, keepdim=True)
    w = W_dec / W_dec.norm(dim=1, keepdim=True)
    return (a @ w.T).max(1).values


VIEW = Path(__file__).resolve().parents[3] / "app" / "views" / "sae.py"
FAST = TrainConfig(steps=250, lr=3e-3, warmup_steps=20, progress=False, dead_after_tokens=5000)


@pytest.mark.parametrize(
    "architecture,extra",
    [
        ("topk", {"k": 3}),
        ("batchtopk", {"k": 3}),
        ("relu", {"l1_coefficient": 0.05}),
        ("jumprelu", {"l0_coefficient": 0.02, "init_threshold": 0.1}),
    ],  # fmt: skip
)
def test_recovers_planted_dictionary(architecture, extra):
    torch.manual_seed(0)
    atoms, _, x = planted()
    sae = create_sae(SAEConfig(architecture, d_in=16, d_sae=64, **extra))
    sae = train_sae(sae, batches(x), FAST)
    cos = recovered(atoms, sae.W_dec.detach())
    assert (cos > 0.9).float().mean() >= 0.8, cos
    with torch.no_grad():
        fvu = ((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert fvu < 0.2


def _saelens_encode(path, x):
    from sae_lens import SAE as LensSAE

    lens = LensSAE.load_from_disk(str(path))
    with torch.no_grad():
        return lens.encode(x), lens.decode(lens.encode(x))


@pytest.mark.parametrize(
    "architecture,extra",
    [
        ("relu", {}),
        ("topk", {"k": 4}),
        ("jumprelu", {}),
        ("batchtopk", {"k": 4}),
        ("relu", {"d_out": 6, "hook_out": "out"}),
        ("relu", {"d_out": 6, "skip": True, "hook_out": "out"}),
        ("jumprelu", {"d_out": 6, "skip": True, "hook_out": "out"}),
    ],  # fmt: skip
)
def test_saelens_round_trip(tmp_path, architecture, extra):
    from workbench.circuits.sae.formats.saelens import load_saelens, save_saelens

    torch.manual_seed(1)
    sae = create_sae(SAEConfig(architecture, d_in=8, d_sae=32, hook_in="blocks.0.hook_resid_post", **extra))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
        if architecture == "batchtopk":
            sae.threshold.fill_(0.2)
    x = torch.randn(50, 8)
    save_saelens(sae, tmp_path)
    lens_f, lens_out = _saelens_encode(tmp_path, x)
    ours_f = sae.encode(x).detach()
    torch.testing.assert_close(lens_f, ours_f, atol=1e-5, rtol=1e-5)
    if sae.W_skip is None:
        torch.testing.assert_close(lens_out, sae(x).detach(), atol=1e-5, rtol=1e-5)
    back = load_saelens(tmp_path)
    torch.testing.assert_close(back.encode(x), ours_f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(back(x), sae(x).detach(), atol=1e-5, rtol=1e-5)


def test_load_saelens_trained_format(tmp_path):
    """An SAE written by sae_lens itself (with b_dec input centering) gives the same encodings here."""
    from sae_lens import StandardSAE, StandardSAEConfig

    from workbench.circuits.sae.formats.saelens import load_saelens

    torch.manual_seed(2)
    lens = StandardSAE(StandardSAEConfig(d_in=8, d_sae=16, apply_b_dec_to_input=True))
    with torch.no_grad():
        for p in lens.parameters():
            p.add_(0.2 * torch.randn_like(p))
    lens.save_model(tmp_path)
    x = torch.randn(20, 8)
    ours = load_sae(tmp_path)
    torch.testing.assert_close(ours.encode(x), lens.encode(x).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(x), lens(x).detach(), atol=1e-5, rtol=1e-5)
    cfg = (tmp_path / "cfg.json").read_text().replace('"standard"', '"temporal"')
    (tmp_path / "cfg.json").write_text(cfg)
    with pytest.raises(SAEInputError, match="temporal"):
        load_saelens(tmp_path)


@pytest.mark.parametrize(
    "kind,options",
    [("topk", {"k": 5}), ("topk", {"k": 5, "rescale_acts_by_decoder_norm": True}), ("jumprelu", {})],
)
def test_load_saelens_built_topk_and_jumprelu(tmp_path, kind, options):
    """TopK (with and without decoder-norm rescaling) and JumpReLU SAEs built and saved by sae_lens itself, with
    b_dec input centering and non-unit decoder rows: our encodings and reconstructions equal sae_lens's own."""
    import sae_lens

    config, module = {
        "topk": (sae_lens.TopKSAEConfig, sae_lens.TopKSAE),
        "jumprelu": (sae_lens.JumpReLUSAEConfig, sae_lens.JumpReLUSAE),
    }[kind]
    torch.manual_seed(4)
    lens = module(config(d_in=12, d_sae=48, apply_b_dec_to_input=True, **options))
    with torch.no_grad():
        for name, p in lens.named_parameters():
            p.copy_(0.3 * torch.randn_like(p).abs() if name == "threshold" else p + 0.3 * torch.randn_like(p))
        lens.W_dec.mul_(torch.rand(48, 1) + 0.5)
    lens.save_model(tmp_path)
    x = torch.randn(64, 12)
    with torch.no_grad():
        lens_f = lens.encode(x)
        lens_f = lens_f.to_dense() if lens_f.is_sparse else lens_f
        lens_out = lens.decode(lens.encode(x))
    ours = load_sae(tmp_path)
    assert ours.cfg.architecture == kind and ours.cfg.k == options.get("k")
    assert bool((lens_f > 0).any()) and bool((lens_f == 0).any())
    torch.testing.assert_close(ours.encode(x), lens_f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(x), lens_out, atol=1e-5, rtol=1e-5)


def test_bad_input():
    from workbench.circuits.sae.evals import splice_hooks

    with pytest.raises(SAEInputError, match="k=40"):
        SAEConfig("topk", d_in=8, d_sae=16, k=40)
    sae = create_sae(SAEConfig("topk", d_in=8, d_sae=16, k=2, hook_in="blocks.1.hook_resid_post"))
    x = torch.randn(10, 8)
    x[7, 3] = float("nan")
    with pytest.raises(SAEInputError, match=r"blocks.1.hook_resid_post.*row 7"):
        train_sae(sae, iter([x]), TrainConfig(steps=1, progress=False))
    with pytest.raises(SAEInputError, match="d_in=8"):
        sae.check_input(torch.randn(3, 5))
    named = create_sae(SAEConfig("topk", d_in=8, d_sae=16, k=2, hook_in="h"))
    with pytest.raises(SAEInputError, match=r"no activations for hook\(s\) \['h'\].*holds \['g'\]"):
        train_saes({"a": named}, iter([{"g": torch.randn(4, 8), "token_ids": torch.zeros(4)}]),
                   TrainConfig(steps=1, progress=False))  # fmt: skip
    for bad in ("../escape", "a/b", ".."):
        with pytest.raises(ValueError, match="cannot name a checkpoint file"):
            train_saes({bad: named}, iter([torch.randn(4, 8)]), TrainConfig(steps=1, progress=False))
    replace = dict(splice_hooks(sae))
    with pytest.raises(SAEInputError, match=r"blocks.1.hook_resid_post.*last dimension 5.*d_in=8"):
        replace["blocks.1.hook_resid_post"](torch.randn(2, 3, 5), None)


def test_untrained_batchtopk_is_not_saved_as_jumprelu(tmp_path):
    from workbench.circuits.sae.formats.saelens import save_saelens

    sae = create_sae(SAEConfig("batchtopk", d_in=8, d_sae=16, k=2))
    for save in (sae.save, lambda path: save_saelens(sae, path)):
        with pytest.raises(SAEInputError, match="has not been trained.*train it first"):
            save(tmp_path / "out")
    assert not (tmp_path / "out" / "sae_weights.safetensors").exists()


def test_saelens_file_missing_a_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    from workbench.circuits.sae.formats.saelens import load_saelens, save_saelens

    save_saelens(create_sae(SAEConfig("topk", d_in=8, d_sae=16, k=2)), tmp_path)
    tensors = load_file(str(tmp_path / "sae_weights.safetensors"))
    save_file({k: v for k, v in tensors.items() if k != "b_enc"}, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(SAEInputError, match=r"lacks tensor\(s\) \['b_enc'\].*'topk'"):
        load_saelens(tmp_path)


def test_transcoder_recovers_planted_map():
    torch.manual_seed(0)
    out_atoms, _, x, y = planted(d_out=24)
    sae = create_sae(SAEConfig("topk", d_in=16, d_sae=64, d_out=24, k=3, hook_in="in", hook_out="out"))
    sae = train_sae(sae, batches(x, y), TrainConfig(**{**FAST.__dict__, "steps": 500}))
    cos = recovered(out_atoms, sae.W_dec.detach())
    assert cos.median() > 0.9 and (cos > 0.9).float().mean() >= 0.75
    with torch.no_grad():
        fvu = ((sae(x) - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()).item()
    assert fvu < 0.3


def test_checkpoint_resume_matches_uninterrupted(tmp_path):
    _, _, x = planted(n=1024)
    cfg = dict(steps=40, lr=3e-3, warmup_steps=5, progress=False, normalize_activations=True)

    def fresh():
        torch.manual_seed(3)
        return create_sae(SAEConfig("topk", d_in=16, d_sae=32, k=3))

    straight = train_sae(fresh(), batches(x, batch=64), TrainConfig(**cfg))
    partial = TrainConfig(**cfg | {"steps": 40, "checkpoint_dir": tmp_path, "checkpoint_every": 20})
    train_sae(fresh(), itertools.islice(batches(x, batch=64), 20), partial)
    resumed = train_sae(fresh(), batches(x, batch=64), partial)
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trainer_state.pt"]  # weights and state: one file
    short = TrainConfig(**cfg | {"checkpoint_dir": tmp_path, "checkpoint_every": 20})
    with pytest.raises(ValueError, match="stream ended after 3 batches, but the checkpoint .* is at step 40"):
        train_sae(fresh(), itertools.islice(batches(x, batch=64), 3), short)
    with pytest.raises(ValueError, match=r"holds SAEs \['sae'\] but these are \['other'\]"):
        train_saes({"other": fresh()}, batches(x, batch=64), short)


def test_same_seed_same_bytes_and_the_global_rng_is_left_alone(tmp_path):
    _, _, x = planted(n=512)
    cfg = SAEConfig("topk", d_in=16, d_sae=32, k=3)
    before = torch.get_rng_state()
    saes = [seeded_sae(cfg, seed) for seed in (0, 0, 1)]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(saes[0].W_dec, saes[1].W_dec) and not torch.equal(saes[0].W_dec, saes[2].W_dec)
    for i, sae in enumerate(saes):
        train_sae(sae, batches(x, batch=64), TrainConfig(steps=15, warmup_steps=2, progress=False)).save(
            tmp_path / str(i)
        )
    assert torch.equal(torch.get_rng_state(), before)
    weights = [(tmp_path / str(i) / "sae_weights.safetensors").read_bytes() for i in range(3)]
    assert weights[0] == weights[1] != weights[2]


def test_bad_training_input_is_refused_naming_the_step():
    sae = seeded_sae(SAEConfig("topk", d_in=8, d_sae=16, k=2, hook_in="h"))
    good = torch.randn(32, 8)
    for steps in (0, -5):
        with pytest.raises(ValueError, match=f"steps must be a whole number of at least 1, got {steps}"):
            train_sae(sae, iter([good]), TrainConfig(steps=steps, progress=False))
    with pytest.raises(ValueError, match="yielded no batches"):
        train_sae(sae, iter([]), TrainConfig(steps=3, progress=False))
    with pytest.raises(ValueError, match="needs .* a checkpoint_dir"):
        train_sae(sae, iter([good]), TrainConfig(steps=3, checkpoint_every=2, progress=False))
    bad = good.clone()
    bad[5, 2] = float("inf")
    with pytest.raises(SAEInputError, match=r"at step 2 .*'h'.*NaN/inf values in row 5"):
        train_sae(sae, iter([good, good, bad]), TrainConfig(steps=3, progress=False))
    huge = good * 1e30  # finite, but the loss overflows: refused instead of training into NaN weights
    with pytest.raises(ValueError, match="loss became (inf|nan) at step 1"):
        train_sae(seeded_sae(SAEConfig("relu", d_in=8, d_sae=16)), iter([good, huge]),
                  TrainConfig(steps=2, progress=False))  # fmt: skip


def test_several_saes_from_one_stream_and_batchtopk_saved_as_jumprelu(tmp_path):
    _, _, x = planted(n=1024)
    saes = {
        "narrow": create_sae(SAEConfig("topk", d_in=16, d_sae=32, k=3, hook_in="h")),
        "wide": create_sae(SAEConfig("batchtopk", d_in=16, d_sae=64, k=3, hook_in="h")),
    }
    stream = ({"h": b} for b in batches(x, batch=128))
    result = train_saes(saes, stream, TrainConfig(steps=60, lr=3e-3, progress=False))
    assert set(result.history) == {"narrow", "wide"} and len(result.history["wide"]) == 60
    wide = result.saes["wide"]
    wide.save(tmp_path)
    loaded = load_sae(tmp_path)
    assert loaded.cfg.architecture == "jumprelu"
    torch.testing.assert_close(loaded.encode(x), wide.encode(x).detach())


def test_splice_metrics_against_closed_form(code_series):
    """A skip transcoder whose W_skip copies its input exactly recovers all CE (KL 0); zero-ablation CE matches
    an independent ablation through workbench.interventions."""
    import torch.nn.functional as F

    from workbench.circuits.sae.evals import splice_metrics
    from workbench.interventions import zero_ablation

    model = code_series.load(code_series.steps[-1])
    hook = "blocks.1.hook_mlp_out"
    sae = create_sae(SAEConfig("relu", d_in=64, d_sae=8, d_out=64, skip=True, hook_in=hook, hook_out=hook))
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.W_skip.copy_(torch.eye(64))
    tokens = torch.randint(0, model.cfg.d_vocab, (3, 24), generator=torch.Generator().manual_seed(0))
    out = splice_metrics(model, sae, tokens)
    assert out["ce_recovered"] == pytest.approx(1.0, abs=1e-4) and out["kl"] == pytest.approx(0.0, abs=1e-5)
    narrow = create_sae(SAEConfig("topk", d_in=32, d_sae=8, k=2, hook_in=hook))
    with pytest.raises(SAEInputError, match=r"blocks.1.hook_mlp_out.*last dimension 64.*d_in=32"):
        splice_metrics(model, narrow, tokens, progress=False)
    logits = model.run_with_hooks(tokens, fwd_hooks=[(hook, zero_ablation())])[:, :-1]
    ce_zero = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), tokens[:, 1:].reshape(-1))
    assert out["ce_zero"] == pytest.approx(float(ce_zero.detach()), rel=1e-4)
    clean = model(tokens)[:, :-1]
    per_token = [F.cross_entropy(x.reshape(-1, x.shape[-1]).double(), tokens[:, 1:].reshape(-1), reduction="none")
                 for x in (logits, clean)]  # fmt: skip
    gap = (per_token[0] - per_token[1]).detach()
    assert out["ce_gap_se"] == pytest.approx(float(gap.std() / math.sqrt(gap.numel())), rel=1e-3)


def test_demo_features_and_view(zoo_workspace, tmp_path, monkeypatch):
    """The demo's `sae train` command on the session zoo, checked against brute force; its transcoders trace an
    attribution graph; the dashboard renders the results."""
    import json
    import shutil

    from streamlit.testing.v1 import AppTest

    from tests.conftest import workbench_cli
    from workbench.app.demo import recipes
    from workbench.circuits.sae.evals import sae_dir
    from workbench.store import ActivationStore
    from workbench.workspace import Workspace

    workspace = Workspace(tmp_path / "ws").ensure()
    shutil.copytree(zoo_workspace.model_dir("code-tiny"), workspace.model_dir("code-tiny"))
    (train,) = [r for r in recipes() if r.command[:2] == ("sae", "train")]
    assert "CE recovered" in workbench_cli(*train.argv(workspace), "--no-progress")
    traced = workbench_cli("circuits", "attribute", "code-tiny", "--transcoders", "code-tiny.L0-mlp-transcoder",
                           "--transcoders", "code-tiny.L1-mlp-transcoder", "--data", "zoo:python-stdlib",
                           "--context-length", "32", "--max-feature-nodes", "500", "--no-progress", "-w",
                           str(workspace.root))  # fmt: skip
    assert "graph " in traced and "replacement" in traced  # the demo's transcoders fit
    graphs = workspace.results().read("attribution_graphs")
    assert set(graphs["model"]) == {"code-tiny"} and len(graphs) == 1
    evals = workspace.results().read("sae_evals")
    assert set(evals["sae_id"]) == {
        "code-tiny.L0-resid-topk",
        "code-tiny.L0-mlp-transcoder",
        "code-tiny.L1-mlp-transcoder",
    }
    assert (evals["L0"] <= 8).all() and (evals["FVU"] < 0.6).all() and (evals["ce_recovered"] > 0.5).all()
    features = workspace.results().read("sae_features", sae_id="code-tiny.L0-resid-topk")
    assert len(features) == 256
    sae = load_sae(sae_dir(workspace, "code-tiny.L0-resid-topk"))
    store = ActivationStore.open(next(workspace.stores_dir.iterdir()))
    acts = sae.encode(store.read(sae.hook_in).float()).detach()
    torch.testing.assert_close(torch.tensor(features.sort_values("latent")["max_activation"].to_numpy()).float(),
                               acts.max(0).values, atol=1e-5, rtol=1e-5)  # fmt: skip
    torch.testing.assert_close(torch.tensor(features.sort_values("latent")["density"].to_numpy()).float(),
                               (acts > 0).float().mean(0), atol=1e-6, rtol=0)  # fmt: skip
    best = features.sort_values("max_activation").iloc[-1]
    top = json.loads(best["top_contexts"])[0]
    assert top["acts"][top["focus"]] == pytest.approx(best["max_activation"], rel=1e-4)

    monkeypatch.setenv("WORKBENCH_WORKSPACE", str(workspace.root))
    view = AppTest.from_file(str(VIEW), default_timeout=60).run()
    assert not view.exception
    assert len(view.dataframe) >= 2 and any("Latent" in m.value for m in view.markdown)
    assert any("Quantile samples" in m.value for m in view.markdown) and len(view.expander) == 4
    monkeypatch.setenv("WORKBENCH_WORKSPACE", str(tmp_path / "empty"))
    Workspace(tmp_path / "empty").results().write("unrelated", __import__("pandas").DataFrame({"x": [1]}))
    empty = AppTest.from_file(str(VIEW), default_timeout=60).run()
    assert not empty.exception and "workbench sae train" in empty.info[0].value


def test_live_model_batches_shuffle_across_sequences_and_train_a_transcoder(code_series) -> None:
    from workbench.circuits.sae.base import SAEConfig, create_sae
    from workbench.circuits.sae.train import TrainConfig, live_batches, train_saes
    from workbench.datasets import load_dataset

    model = code_series.load(code_series.steps[-1])
    tokens, _ = load_dataset("zoo:python-stdlib").token_tensor(model.tokenizer, context_length=32, packing=True,
                                                               max_rows=24)  # fmt: skip
    hooks = ["blocks.0.hook_resid_pre", "blocks.0.hook_mlp_out"]
    stream = live_batches(model, tokens, hooks, batch_size=64, buffer_rows=512, sequences_per_forward=4)
    first = next(stream)
    assert set(first) == set(hooks) and first[hooks[0]].shape == (64, 64)
    with torch.no_grad(), model.capture(hooks) as cache:
        model(tokens)
    every = cache[hooks[0]].reshape(-1, 64)
    match = torch.cdist(first[hooks[0]], every).argmin(1)
    assert torch.cdist(first[hooks[0]], every).min(1).values.max() < 1e-3  # each row is a real token
    assert len(set((match // 32).tolist())) >= 8, "a batch should mix many sequences"
    transcoder = create_sae(
        SAEConfig(architecture="topk", d_in=64, d_sae=128, k=8, hook_in=hooks[0], hook_out=hooks[1])
    )
    history = train_saes(
        {"t": transcoder}, stream, TrainConfig(steps=60, lr=3e-3, warmup_steps=5, progress=False)
    )
    fvu = [h["fvu"] for h in history.history["t"]]
    assert sum(fvu[-10:]) / 10 < 0.6 * sum(fvu[:5]) / 5


@pytest.mark.parametrize("skip", [False, True])
def test_sparse_topk_training_gradients_equal_the_dense_formulation(skip) -> None:
    """TopK training uses sparse encoder gradients and an embedding_bag decoder; both must match autograd through
    the dense f = topk(x W_enc + b_enc), f W_dec + b_dec (+ x W_skip), including the AuxK term."""
    from workbench.circuits.sae.base import SAEConfig, create_sae
    from workbench.circuits.sae.topk import topk_activation

    torch.manual_seed(0)
    sae = create_sae(
        SAEConfig(architecture="topk", d_in=24, d_sae=96, d_out=16 if skip else 24, k=5, skip=skip)
    )
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
        if skip:
            sae.W_skip.normal_()
    x, y = torch.randn(40, 24), torch.randn(40, sae.d_out)
    dead = torch.rand(96) < 0.3

    def grads(loss):
        sae.zero_grad()
        loss.backward()
        return {name: p.grad.clone() for name, p in sae.named_parameters()}

    f, prediction, pre, _ = sae.training_forward(x, dead)
    residual = (y - prediction).detach()
    sparse = grads((y - prediction).pow(2).sum() + sae.aux_loss(x, pre, residual, dead))
    dense_pre = sae.pre_activation(x)
    dense_f = topk_activation(dense_pre, 5)
    torch.testing.assert_close(f.to_dense(), dense_f.detach())
    aux_k = min(sae.d_out // 2, int(dead.sum()))
    f_dead = topk_activation(torch.where(dead, dense_pre, torch.full_like(dense_pre, -torch.inf)), aux_k)
    aux = (f_dead.nan_to_num(0.0) @ sae.W_dec - residual).pow(2).sum(-1).mean()
    aux = sae.cfg.aux_k_coefficient * aux / (residual - residual.mean(0)).pow(2).sum(-1).mean()
    dense = grads((y - sae.decode(dense_f, x)).pow(2).sum() + aux)
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka_batchtopk"])
@pytest.mark.parametrize("skewed", [False, True])
def test_sparse_batchtopk_training_equals_the_dense_formulation(architecture, skewed) -> None:
    """BatchTopK / Matryoshka training backpropagates through the k · batch kept entries only (laid out per row);
    latents, threshold, losses (Matryoshka's prefix losses included) and every gradient must match autograd through
    the dense f = batch_topk(x W_enc + b_enc). A skewed batch (one row keeping most latents) takes the dense path."""
    import copy

    torch.manual_seed(0)
    extra = {"matryoshka_widths": [12, 40]} if architecture == "matryoshka_batchtopk" else {}
    sae = create_sae(SAEConfig(architecture, d_in=24, d_sae=96, k=5, **extra))
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(40, 24)
    if skewed:
        x[0] *= 100
    dense_sae = copy.deepcopy(sae)

    def step(model, f, prediction, pre):
        model.zero_grad()
        losses = model.auxiliary_losses(x, x, f, pre)
        loss = (x - prediction).pow(2).sum(-1).mean() + sum(losses.values(), torch.zeros(()))
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    f, prediction, pre, _ = sae.training_forward(x)
    assert f.is_sparse != skewed
    loss, grads = step(sae, f, prediction, pre)
    dense_f = dense_sae.batch_activation(dense_sae.pre_activation(x))
    dense_loss, dense_grads = step(dense_sae, dense_f, dense_sae.decode(dense_f, x), None)
    torch.testing.assert_close(f.to_dense() if f.is_sparse else f.detach(), dense_f.detach())
    torch.testing.assert_close(float(sae.threshold), float(dense_f.detach()[dense_f > 0].min()))
    torch.testing.assert_close(loss, dense_loss)
    for name in dense_grads:
        torch.testing.assert_close(grads[name], dense_grads[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("dense", [False, True])
def test_sparse_jumprelu_training_equals_the_dense_formulation(skip, dense) -> None:
    """JumpReLU training backpropagates through the active entries only (their threshold gradient within the
    rectangle window) and counts the window per latent for the L0 term's; latents, losses and every gradient must
    match autograd through the dense f = JumpReLU(x W_enc + b_enc). Thresholds low enough that a row fires on more
    than a quarter of the latents take the dense path."""
    import copy

    torch.manual_seed(0)
    sae = create_sae(SAEConfig("jumprelu", d_in=24, d_sae=96, d_out=16 if skip else 24, skip=skip,
                               l0_coefficient=0.1, bandwidth=0.5))  # fmt: skip
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
        sae.threshold.uniform_(0.01, 0.3) if dense else sae.threshold.uniform_(1.0, 2.5)
        if skip:
            sae.W_skip.normal_()
    x, y = torch.randn(40, 24), torch.randn(40, sae.d_out)
    dense_sae = copy.deepcopy(sae)

    def step(model, f, prediction, pre):
        model.zero_grad()
        loss = (y - prediction).pow(2).sum(-1).mean() + model.sparsity_loss(f, pre)["l0"]
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    f, prediction, pre, _ = sae.training_forward(x)
    assert f.is_sparse != dense
    loss, grads = step(sae, f, prediction, pre)
    dense_pre = dense_sae.pre_activation(x)
    dense_f = dense_sae.activation(dense_pre)
    dense_loss, dense_grads = step(dense_sae, dense_f, dense_sae.decode(dense_f, x), dense_pre)
    torch.testing.assert_close(f.to_dense() if f.is_sparse else f.detach(), dense_f.detach())
    assert int((dense_f > 0).sum()) > 0 and float(grads["threshold"].abs().sum()) > 0
    torch.testing.assert_close(loss, dense_loss)
    for name in dense_grads:
        torch.testing.assert_close(grads[name], dense_grads[name], rtol=1e-4, atol=1e-5)


def test_feature_pages_streaming_against_brute_force(tmp_path) -> None:
    """Planted store (rows in shuffled order, several shards and batches): top contexts are exactly the top
    activations, windows hold the right tokens and activations, quantile samples lie in their bands, band edges
    are the activation quantiles to one fine bin, band counts, density, max and histogram match brute force."""
    import json

    from workbench.circuits.sae.features import FINE_EDGES, HIST_EDGES, feature_pages
    from workbench.store import ActivationStore

    torch.manual_seed(0)
    n_seq, n_pos, d_in = 40, 15, 12
    sae = create_sae(SAEConfig(architecture="topk", d_in=d_in, d_sae=10, k=4, hook_in="h"))
    with torch.no_grad():
        sae.b_enc.fill_(0.3)
    seq, pos = torch.arange(n_seq).repeat_interleave(n_pos), torch.arange(n_pos).repeat(n_seq)
    order = torch.randperm(len(seq))
    seq, pos = seq[order], pos[order]
    x = torch.randn(len(seq), d_in) * torch.rand(len(seq), 1) * 3
    tokens = torch.randint(1000, (len(seq),))
    store = ActivationStore.create(tmp_path / "s", model="m", hooks=["h"], dataset="d", shard_rows=128)
    store.append({"h": x}, token_ids=tokens, sequence=seq, position=pos)
    store.finalize()
    top_k, n_q, m, window = 5, 4, 3, 3
    frame = feature_pages(sae, ActivationStore.open(tmp_path / "s"), "t", top_k=top_k, n_quantiles=n_q,
                          samples_per_quantile=m, window=window, batch_size=50, progress=False)  # fmt: skip
    acts = sae.encode(x).detach()

    def window_rows(row):
        same = (seq == seq[row]) & (pos >= pos[row] - window) & (pos <= pos[row] + 2)
        rows = same.nonzero().flatten()
        return rows[pos[rows].argsort()].tolist()

    def check_context(context, latent):
        row = context["row"]
        rows = window_rows(row)
        assert context["tokens"] == [str(int(tokens[r])) for r in rows] and rows[context["focus"]] == row
        assert context["acts"] == pytest.approx(acts[rows, latent].tolist(), abs=1e-4)
        assert context["activation"] == pytest.approx(float(acts[row, latent]), abs=1e-4)

    checked_bands = 0
    for latent in range(sae.d_sae):
        page = frame[frame["latent"] == latent].iloc[0]
        column = acts[:, latent]
        positive = column[column > 0]
        assert page["density"] == pytest.approx(len(positive) / len(x))
        assert page["max_activation"] == pytest.approx(float(column.max()), abs=1e-5)
        counts = torch.histc(torch.bucketize(positive, HIST_EDGES).clamp(1, len(HIST_EDGES) - 1).float() - 1,
                             bins=len(HIST_EDGES) - 1, min=0, max=len(HIST_EDGES) - 2)  # fmt: skip
        assert json.loads(page["histogram"])["counts"] == counts.long().tolist()
        contexts = json.loads(page["top_contexts"])
        expected = column.topk(min(top_k, len(positive)))
        assert [c["row"] for c in contexts] == expected.indices.tolist()
        for context in contexts:
            check_context(context, latent)
        bands = json.loads(page["quantile_samples"])
        assert len(bands) == (n_q if len(positive) else 0)
        for j, band in enumerate(bands):
            low, high = band["low"], band["high"] if band["high"] is not None else float("inf")
            in_band = (positive > low) & (positive <= high)
            assert band["count"] == int(in_band.sum())
            assert len(band["contexts"]) == min(m, band["count"])
            assert len({c["row"] for c in band["contexts"]}) == len(band["contexts"])
            for context in band["contexts"]:
                assert low < context["activation"] <= high or context["activation"] == pytest.approx(high)
                check_context(context, latent)
            if j and math.isfinite(low):  # inner edge: the j/n_q quantile, rounded up to a fine-bin edge
                below = FINE_EDGES[(FINE_EDGES - low).abs().argmin() - 1]
                assert (positive <= low).float().mean() >= j / n_q - 1e-6 > (positive <= below).float().mean()
                checked_bands += 1
    assert checked_bands >= 10


def test_feature_pages_over_a_store_union_equal_one_store_of_the_same_rows(tmp_path) -> None:
    """A distributed run's pages read its ranks' stores as one StoreUnion: two stores (the second's sequences
    numbered from 0 again) give the pages of one store holding the same rows with distinct sequences — density,
    max, histogram, top contexts (rows, windows, tokens), band edges and counts, n_prompts; mismatched hooks and a
    shuffled read are refused."""
    import json

    from workbench.circuits.sae.features import feature_pages
    from workbench.store import ActivationStore, StoreError, StoreUnion

    torch.manual_seed(1)
    n_seq, n_pos, d_in = 30, 9, 8
    sae = create_sae(SAEConfig(architecture="topk", d_in=d_in, d_sae=12, k=3, hook_in="h"))
    seq, pos = torch.arange(n_seq).repeat_interleave(n_pos), torch.arange(n_pos).repeat(n_seq)
    x, tokens = torch.randn(len(seq), d_in), torch.randint(500, (len(seq),))
    first = seq < 17

    def stored(name, rows, sequence):
        store = ActivationStore.create(tmp_path / name, model="m", hooks=["h"], dataset="d", shard_rows=40)
        store.append({"h": x[rows]}, token_ids=tokens[rows], sequence=sequence, position=pos[rows])
        return store.finalize()

    one = stored("one", torch.ones_like(first), seq)
    union = StoreUnion([stored("rank0", first, seq[first]), stored("rank1", ~first, seq[~first] - 17)])
    assert union.n_rows == one.n_rows and torch.equal(union.locations(), one.locations())
    assert torch.equal(union.token_ids(), one.token_ids())
    options = {"top_k": 4, "n_quantiles": 3, "samples_per_quantile": 2, "window": 2, "batch_size": 32,
               "progress": False}  # fmt: skip
    got, want = feature_pages(sae, union, "u", **options), feature_pages(sae, one, "u", **options)
    for column in ("latent", "density", "max_activation", "histogram", "top_contexts", "quantile_activations",
                   "n_prompts", "n_tokens_in_prompt"):  # fmt: skip
        assert got[column].tolist() == want[column].tolist(), column
    assert got["n_prompts"].iloc[0] == n_seq

    def band_counts(frame):
        return [[(b["low"], b["high"], b["count"]) for b in json.loads(v)] for v in frame["quantile_samples"]]

    assert band_counts(got) == band_counts(want)
    other = ActivationStore.create(tmp_path / "other", model="m", hooks=["g"], dataset="d")
    other.append({"g": x[:3]}, token_ids=tokens[:3], sequence=seq[:3], position=pos[:3])
    with pytest.raises(StoreError, match="same hooks and shapes"):
        StoreUnion([one, other.finalize()])
    with pytest.raises(StoreError, match="in order only"):
        next(union.iter_batches("h", 8, shuffle=True))


@pytest.mark.parametrize("architecture,extra", [("topk", {"k": 12}), ("jumprelu", {"init_threshold": 0.05})])
def test_data_init_is_the_least_squares_scale(architecture, extra) -> None:
    """initialize_from_batch (float64): b_dec = mean target, encoder centred, and the scale c is the least-squares
    optimum (residual ⟂ reconstruction, so FVU ≤ 1); a JumpReLU keeps exactly the latents that fired."""
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(architecture, d_in=16, d_sae=64, **extra)).double()
    x = torch.randn(256, 16, dtype=torch.float64) * 3 + 2
    with torch.no_grad():
        centred = (x - x.mean(0)) @ sae.W_enc
        fired_before = centred > (sae.threshold if architecture == "jumprelu" else 0)
        sae.initialize_from_batch(x, x)
        f = sae.encode(x)
        pred = f @ sae.W_dec
        residual = x - sae.b_dec - pred
    torch.testing.assert_close(sae.b_dec.detach(), x.mean(0))
    assert abs(float((pred * residual).sum())) < 1e-9 * float(pred.pow(2).sum())
    assert float(residual.pow(2).sum()) < float((x - x.mean(0)).pow(2).sum())
    if architecture == "jumprelu":
        assert torch.equal(f > 0, fired_before)


def test_cli_train_same_seed_same_sae_bytes(zoo_workspace, tmp_path):
    workspace = tmp_path / "ws"
    (workspace / "models").mkdir(parents=True)
    (workspace / "models" / "code-tiny").symlink_to(zoo_workspace.model_dir("code-tiny"))
    for sae_id, seed in (("a", 0), ("b", 0), ("c", 1)):
        result = sae_cli(workspace, "train", "code-tiny", "--data", "zoo:python-stdlib", "--hook",
                         "blocks.0.hook_resid_post", "--d-sae", "32", "--k", "4", "--steps", "10", "--max-tokens",
                         "512", "--context-length", "64", "--seed", str(seed), "--sae-id", sae_id, "--no-progress")  # fmt: skip
        assert result.exit_code == 0, result.output
    weights = {i: (workspace / "saes" / i / "sae_weights.safetensors").read_bytes() for i in "abc"}
    assert weights["a"] == weights["b"] != weights["c"]


# ---------------------------------------------------------------------------------------------------- any model, any data
NOTE_LINES = [
    "def add(first, second):    return first + second",
    "for index in range(10):    print(index * index)",
    "the quick brown fox jumps over the lazy dog again and again",
    "class Point:    def __init__(self, x, y):        self.x = x",
    "with open(path) as handle:    text = handle.read()",
    "seven wizards quietly judge the boxing match in the old hall",
    "if value is None:    raise ValueError('value is required')",
] * 12
FAST_SAE = ["--d-sae", "64", "--k", "4", "--steps", "40", "--max-tokens", "2000", "--context-length", "64",
            "--train-batch-size", "128", "--no-progress"]  # fmt: skip


def sae_cli(workspace, *args: str):
    """`workbench sae ARGS -w WORKSPACE` through the top-level CLI (its one-line errors)."""
    from typer.testing import CliRunner

    from workbench.cli import app

    return CliRunner().invoke(app, ["sae", *args, "--workspace", str(workspace)])


def refused(result, reason: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and reason in lines[-1], result.output
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def user_data(tmp_path_factory):
    """A user's text file, a jsonl file with a `body` column and a datasets.save_to_disk folder of the same lines."""
    import datasets

    root = tmp_path_factory.mktemp("sae-data")
    (root / "notes.txt").write_text("\n".join(NOTE_LINES) + "\n")
    (root / "rows.jsonl").write_text("".join(json.dumps({"id": i, "body": line}) + "\n"
                                             for i, line in enumerate(NOTE_LINES)))  # fmt: skip
    datasets.Dataset.from_dict({"text": NOTE_LINES}).save_to_disk(str(root / "hf_notes"))
    return root


@pytest.fixture()
def zoo_ws(zoo_workspace, tmp_path):
    """A fresh workspace whose models/code-tiny links to the zoo's (results land here, not in the shared zoo)."""
    from workbench.workspace import Workspace

    workspace = Workspace(tmp_path / "ws").ensure()
    workspace.model_dir("code-tiny").symlink_to(
        zoo_workspace.model_dir("code-tiny"), target_is_directory=True
    )
    return workspace


def heldout_reference(model, sae, data_ref, context_length=64, max_tokens=2000):
    """Independent metrics on the held-out quarter of the rows: each row run alone, unpadded, FVU and CE summed
    by hand (no masks, no batching)."""
    import torch.nn.functional as F

    from workbench.circuits.sae.analysis import EVAL_FRACTION
    from workbench.datasets import load_dataset

    ids, mask = load_dataset(data_ref).token_tensor(model.tokenizer, context_length=context_length, batch_size=16,
                                                    packing=True, shuffle_seed=0, max_tokens=max_tokens)  # fmt: skip
    split = round(len(ids) * (1 - EVAL_FRACTION))
    xs, ys, nll, count = [], [], 0.0, 0
    for row, m in zip(ids[split:], mask[split:], strict=True):
        tokens = row[m.bool()][None]
        with torch.no_grad(), model.capture([sae.hook_in, sae.hook_out]) as cache:
            logits = model(tokens)
        xs.append(cache[sae.hook_in][0])
        ys.append(cache[sae.hook_out][0])
        if model.cfg.causal:
            nll += float(F.cross_entropy(logits[0, :-1].double(), tokens[0, 1:], reduction="sum"))
            count += tokens.shape[1] - 1
    x, y = torch.cat(xs), torch.cat(ys)
    with torch.no_grad():
        out = sae(x)
    fvu = float((out - y).double().pow(2).sum() / (y.double() - y.double().mean(0)).pow(2).sum())
    return {"FVU": fvu, "ce_clean": nll / count if count else float("nan"), "n_tokens": len(x)}


def test_short_names_of_model_and_dataset_references(tmp_path):
    from workbench.circuits.sae.analysis import default_sae_id
    from workbench.references import short_name

    for exp in ("exp-a", "exp-b"):
        (tmp_path / exp / "my-gpt2").mkdir(parents=True)
        (tmp_path / exp / "series" / "step200").mkdir(parents=True)
    slug = short_name(tmp_path / "exp-a" / "my-gpt2")
    assert re.fullmatch(r"my-gpt2-[0-9a-f]{8}", slug)  # the base name and a hash of the resolved path
    assert short_name(f"{tmp_path}/exp-a/../exp-a/my-gpt2/") == slug  # one directory, two spellings: one name
    assert short_name(tmp_path / "exp-b" / "my-gpt2") != slug  # same base name, another directory
    series = short_name(tmp_path / "exp-a" / "series")
    assert (
        short_name(f"{tmp_path}/exp-a/series@200")
        == short_name(tmp_path / "exp-a/series/step200")
        == f"{series}@200"
    )
    assert short_name("EleutherAI/pythia-70m@step3000") == "EleutherAI--pythia-70m@step3000"
    assert short_name("tl:gpt2") == "tl-gpt2" and short_name("code-tiny@300") == "code-tiny@300"
    assert (
        short_name("data.jsonl:text") == "data.jsonl-text"
        and short_name("zoo:python-stdlib") == "zoo-python-stdlib"
    )
    assert default_sae_id("org/m", "blocks.0.hook_resid_pre", "topk", "blocks.0.hook_mlp_out") == (
        "org--m.blocks.0.hook_resid_pre.blocks.0.hook_mlp_out.topk"
    )


def test_cli_train_and_eval_on_a_zoo_checkpoint_with_a_users_text_file(zoo_ws, user_data):
    """`sae train code-tiny@300 --data notes.txt`: the SAE and its feature pages come from the user's text (not the
    stdlib corpus), rows keyed by model, checkpoint 300 and dataset; FVU and clean CE equal a per-row, unpadded
    recomputation; `sae eval` on a jsonl column adds a row beside it instead of replacing it."""
    from workbench.circuits.sae.evals import sae_dir
    from workbench.references import resolve_model

    notes = str(user_data / "notes.txt")
    result = sae_cli(zoo_ws.root, "train", "code-tiny@300", "--data", notes, "--hook", "blocks.0.hook_resid_post",
                     *FAST_SAE)  # fmt: skip
    assert result.exit_code == 0, result.output
    sae_id = "code-tiny@300.blocks.0.hook_resid_post.topk"
    row = zoo_ws.results().read("sae_evals", sae_id=sae_id).iloc[0]
    assert (row["model"], row["checkpoint"], row["dataset"], row["ce_note"]) == (
        "code-tiny",
        300,
        "notes.txt",
        "",
    )
    sae = load_sae(sae_dir(zoo_ws, sae_id))
    assert sae.cfg.dataset == "notes.txt" and sae.cfg.checkpoint == 300
    reference = heldout_reference(resolve_model("code-tiny@300", workspace=zoo_ws), sae, notes)
    assert row["n_tokens"] == reference["n_tokens"] and row["L0"] <= 4
    assert row["FVU"] == pytest.approx(reference["FVU"], rel=1e-4)
    assert row["ce_clean"] == pytest.approx(reference["ce_clean"], rel=1e-4)
    assert row["ce_zero"] > row["ce_spliced"] and 0 < row["ce_recovered"] <= 1.05
    assert row["ce_zero"] - row["ce_clean"] > 3 * row["ce_gap_se"] and row["ce_recovered_note"] == ""
    assert f"CE recovered {row['ce_recovered']:.3f}" in result.output
    pages = zoo_ws.results().read("sae_features", sae_id=sae_id)
    assert (
        len(pages) == 64 and set(pages["dataset"]) == {"notes.txt"} and set(pages["model"]) == {"code-tiny"}
    )
    text = "\n".join(NOTE_LINES)
    focus = [c["tokens"][c["focus"]] for p in pages["top_contexts"] for c in json.loads(p)]
    assert focus and all(token.strip() in text or "endoftext" in token for token in focus)

    result = sae_cli(zoo_ws.root, "eval", sae_id, "code-tiny@300", "--data", f"{user_data / 'rows.jsonl'}:body",
                     "--max-tokens", "1000", "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = zoo_ws.results().read("sae_evals", sae_id=sae_id)
    assert sorted(rows["dataset"]) == ["notes.txt", "rows.jsonl:body"] and (rows["checkpoint"] == 300).all()


def test_cli_on_minilm_with_a_jsonl_column_reports_reconstruction_and_marks_ce_not_applicable(
    zoo_ws, user_data
):
    """MiniLM (a BERT encoder, no LM head): train and eval work, reconstruction metrics match the independent
    recomputation, the CE columns are NaN with a note saying why; no promoted tokens without an unembedding."""
    from workbench.circuits.sae.evals import sae_dir
    from workbench.references import resolve_model

    data = f"{user_data / 'rows.jsonl'}:body"
    result = sae_cli(
        zoo_ws.root, "train", "minilm", "--data", data, "--hook", "blocks.1.hook_resid_post", *FAST_SAE
    )
    assert result.exit_code == 0, result.output
    assert "CE metrics do not apply" in result.output
    sae_id = "minilm.blocks.1.hook_resid_post.topk"
    row = zoo_ws.results().read("sae_evals", sae_id=sae_id).iloc[0]
    assert (row["model"], row["dataset"], row["d_in"]) == ("minilm", "rows.jsonl:body", 384)
    assert "encoder" in row["ce_note"] and "not next-token logits" in row["ce_note"]
    assert all(math.isnan(row[c]) for c in ("ce_clean", "ce_spliced", "ce_zero", "ce_recovered", "kl"))
    reference = heldout_reference(resolve_model("minilm"), load_sae(sae_dir(zoo_ws, sae_id)), data)
    assert row["FVU"] == pytest.approx(reference["FVU"], rel=1e-4) and 0 < row["FVU"] < 1
    pages = zoo_ws.results().read("sae_features", sae_id=sae_id)
    assert len(pages) == 64 and set(pages["dataset"]) == {"rows.jsonl:body"}
    assert "promoted_tokens" not in pages or pages["promoted_tokens"].isna().all()

    result = sae_cli(zoo_ws.root, "eval", str(sae_dir(zoo_ws, sae_id)), "minilm", "--data",
                     str(user_data / "notes.txt"), "--max-tokens", "800", "--no-progress")  # fmt: skip
    assert result.exit_code == 0 and "CE metrics do not apply" in result.output, result.output
    assert sorted(zoo_ws.results().read("sae_evals", sae_id=sae_id)["dataset"]) == [
        "notes.txt",
        "rows.jsonl:body",
    ]


@pytest.fixture(scope="module")
def gpt2_dir(zoo_workspace, tmp_path_factory):
    """A tiny random GPT-2 saved with save_pretrained (not from the zoo), the zoo tokenizer copied beside it."""
    import shutil

    import transformers

    path = tmp_path_factory.mktemp("user-models") / "my-gpt2"
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=512, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(zoo_workspace.model_dir("code-tiny") / name, path / name)
    return path


def test_cli_transcoder_on_a_users_gpt2_directory_with_a_save_to_disk_folder(tmp_path, gpt2_dir, user_data):
    """A save_pretrained GPT-2 directory + a datasets folder: the default SAE id comes from the directory's identity
    (its name and a hash of its path), the transcoder row records the model as every analysis names it (its resolved
    path; no checkpoint) and the folder's dataset name; `sae eval` of the saved directory on the same model writes a
    second row."""
    from workbench.circuits.sae.evals import sae_dir
    from workbench.references import short_name
    from workbench.workspace import Workspace

    workspace = Workspace(tmp_path / "ws")
    result = sae_cli(workspace.root, "train", str(gpt2_dir), "--data", str(user_data / "hf_notes"), "--hook",
                     "blocks.1.hook_resid_mid", "--hook-out", "blocks.1.hook_mlp_out", "--architecture", "relu",
                     *FAST_SAE[2:], "--context-length", "32", "--d-sae", "48")  # fmt: skip
    assert result.exit_code == 0, result.output
    sae_id = f"{short_name(gpt2_dir)}.blocks.1.hook_resid_mid.blocks.1.hook_mlp_out.relu"
    assert re.fullmatch(r"my-gpt2-[0-9a-f]{8}\..*", sae_id)
    row = workspace.results().read("sae_evals", sae_id=sae_id).iloc[0]
    assert (row["model"], row["dataset"], row["transcoder"], row["d_sae"]) == (
        gpt2_dir.resolve().as_posix(),
        "hf_notes",
        True,
        48,
    )
    assert pd.isna(row["checkpoint"]) and row["ce_note"] == "" and math.isfinite(row["ce_recovered"])
    assert row["ce_clean"] > 5.5  # a random 512-token model is near log(512) = 6.24
    assert workspace.results().read("sae_features").empty  # no feature pages for transcoders
    result = sae_cli(workspace.root, "eval", str(sae_dir(workspace, sae_id)), str(gpt2_dir), "--data",
                     str(user_data / "notes.txt"), "--max-tokens", "600", "--context-length", "32",
                     "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(workspace.results().read("sae_evals")["dataset"]) == ["hf_notes", "notes.txt"]


def test_cli_train_summary_reports_dead_latents_and_marks_ce_recovered_within_noise(
    tmp_path, gpt2_dir, user_data
):
    """A random GPT-2's MLP barely matters to its loss, and 1024 latents with k=1 over a few hundred held-out tokens
    leave most of them dead: the summary prints the dead and dense fractions, warns with what to change, and prints
    CE spliced and KL instead of a CE recovered that divides by noise (the row says why)."""
    from workbench.circuits.sae.evals import CE_MIN_GAP
    from workbench.workspace import Workspace

    workspace = Workspace(tmp_path / "ws")
    result = sae_cli(workspace.root, "train", str(gpt2_dir), "--data", str(user_data / "notes.txt"), "--hook",
                     "blocks.1.hook_mlp_out", *FAST_SAE[4:], "--context-length", "32", "--d-sae", "1024", "--k",
                     "1")  # fmt: skip
    assert result.exit_code == 0, result.output
    row = workspace.results().read("sae_evals").iloc[0]
    sae_id = row["sae_id"]
    assert (
        row["n_tokens"] < 0.75 * 1024 and row["dead_fraction"] > 0.25
    )  # at most n_tokens latents fire at k=1
    assert f"dead {row['dead_fraction']:.1%}  dense {row['dense_fraction']:.1%}" in result.output
    assert (f"warning: {row['dead_fraction']:.0%} of the 1024 latents of {sae_id} are dead (never active on the "
            f"{row['n_tokens']} evaluation tokens); AuxK already feeds them gradient in topk") in result.output  # fmt: skip
    gap = row["ce_zero"] - row["ce_clean"]
    assert abs(gap) < CE_MIN_GAP and 0 < row["ce_gap_se"] < 1
    assert row["ce_recovered_note"].startswith(
        f"CE recovered not meaningful: zero-ablating blocks.1.hook_mlp_out moves the loss by only {gap:.3f} nats"
    )
    assert (
        row["ce_recovered_note"] in result.output and f"CE spliced {row['ce_spliced']:.3f}" in result.output
    )
    assert f"CE recovered {row['ce_recovered']:.3f}" not in result.output and row["ce_note"] == ""


def test_cli_train_from_an_activation_store_made_by_workbench_capture(zoo_ws, user_data, tmp_path):
    """`--data STORE` holding the hook trains on the store's own rows (no new capture): the training rows are the
    store's rows of the first three quarters of its sequences, the rows record the store's dataset; a store of
    another checkpoint is refused before any work."""
    from typer.testing import CliRunner

    from workbench.cli import app
    from workbench.store import ActivationStore

    store_dir = tmp_path / "my-store"
    result = CliRunner().invoke(app, ["capture", "code-tiny@300", "--hooks", "blocks.1.hook_resid_post", "--data",
                                      str(user_data / "notes.txt"), "--out", str(store_dir), "--max-tokens", "2000",
                                      "--context-length", "64", "-w", str(zoo_ws.root), "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    result = sae_cli(zoo_ws.root, "train", "code-tiny@300", "--data", str(store_dir), "--hook",
                     "blocks.1.hook_resid_post", "--sae-id", "from-store", *FAST_SAE)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not zoo_ws.stores_dir.exists() or not any(zoo_ws.stores_dir.iterdir())
    store = ActivationStore.open(store_dir)
    sequences = store.locations()[:, 0]
    kept = sequences.unique(sorted=True)
    below = kept[round(len(kept) * 0.75)]
    row = zoo_ws.results().read("sae_evals", sae_id="from-store").iloc[0]
    assert row["n_train_rows"] == int((sequences < below).sum()) < store.n_rows
    assert (row["model"], row["checkpoint"], row["dataset"]) == ("code-tiny", 300, "notes.txt")
    assert len(zoo_ws.results().read("sae_features", sae_id="from-store")) == 64
    refused(sae_cli(zoo_ws.root, "train", "code-tiny@250", "--data", str(store_dir), "--hook",
                    "blocks.1.hook_resid_post", "--sae-id", "other", *FAST_SAE),
            "captured from 'code-tiny' at checkpoint 300, not 'code-tiny' at checkpoint 250")  # fmt: skip
    assert not (zoo_ws.root / "saes" / "other").exists()


def test_cli_bad_inputs_exit_2_with_one_line_and_write_nothing(zoo_ws, user_data, tmp_path):
    from workbench.circuits.sae.formats.saelens import save_saelens

    notes = str(user_data / "notes.txt")
    base = ["train", "code-tiny@300", "--data", notes, "--hook", "blocks.0.hook_resid_post", "--no-progress"]
    cases = [
        ([*base, "--steps", "0"], "steps=0: train at least one step"),
        ([*base, "--max-tokens", "0"], "max_tokens=0"),
        ([*base, "--hook", "blocks.0.hook_resid_pots"], "closest valid names: blocks.0.hook_resid_post"),
        ([*base, "--hook", "blocks.0.attn.hook_pattern"], "not [batch, pos, d]"),
        ([*base, "--d-sae", str(10**11)], "d_sae=100000000000 is too large to train"),
        ([*base, "--sae-id", "../escape"], "cannot name a checkpoint file"),
        ([*base, "--architecture", "sparsemax"], "unknown SAE architecture 'sparsemax'"),
        ([*base, "--k", "500", "--d-sae", "64"], "k=500 is invalid for d_sae=64"),
        ([*base, "--data", str(tmp_path / "missing.txt")], "no such file or directory"),
        (["train", "code-tiny@300", "--hook", "blocks.0.hook_resid_post"], "--data is required"),
        (["train", "code-tiny@999", "--data", notes, "--hook", "blocks.0.hook_resid_post"], "999"),
        (["eval", "no-such-sae", "code-tiny", "--data", notes], "no SAE 'no-such-sae'"),
    ]
    for args, reason in cases:
        refused(sae_cli(zoo_ws.root, *args), reason)
    narrow = create_sae(SAEConfig("topk", d_in=32, d_sae=32, k=4, hook_in="blocks.0.hook_resid_post"))
    save_saelens(narrow, tmp_path / "narrow")
    refused(sae_cli(zoo_ws.root, "eval", str(tmp_path / "narrow"), "code-tiny", "--data", notes),
            "has d_in=32, but blocks.0.hook_resid_post of code-tiny has width 64")  # fmt: skip
    refused(sae_cli(zoo_ws.root, "eval", str(tmp_path / "narrow"), "minilm", "--data", notes), "width 384")
    assert not (zoo_ws.root / "saes").exists() and not any(zoo_ws.stores_dir.iterdir())
    assert "sae_evals" not in zoo_ws.results().tables()


def test_flat_parameter_training_equals_per_parameter_adam_and_restores_layout(tmp_path) -> None:
    """The trainer steps one flat buffer (W_enc latent-major inside it): a TopK SAE trained 5 steps must equal the
    same SAE trained by a plain per-parameter torch Adam loop on the dense formulation (rtol 1e-5), come back
    with contiguous parameters and no gradients, and a checkpoint of an older trainer format is refused by name."""
    cfg = SAEConfig("topk", d_in=12, d_sae=40, k=3)
    torch.manual_seed(0)
    batches = [torch.randn(32, 12) for _ in range(5)]
    train_cfg = TrainConfig(steps=5, lr=1e-2, warmup_steps=0, decay_fraction=0.0, normalize_activations=False,
                            data_init=False, progress=False, dead_after_tokens=10**9)  # fmt: skip
    ours = train_saes({"sae": seeded_sae(cfg)}, batches, train_cfg).saes["sae"]
    assert all(p.is_contiguous() and p.grad is None for p in ours.parameters())

    reference = seeded_sae(cfg)
    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-2, foreach=False)
    for x in batches:
        f = topk_activation(reference.pre_activation(x), cfg.k)
        loss = (x - reference.decode(f)).pow(2).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        reference.normalize_decoder()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value, rtol=1e-5, atol=1e-6)

    fresh = seeded_sae(cfg)
    flat = flat_parameters([fresh])
    w_enc = fresh.W_enc
    assert w_enc.shape == (12, 40) and w_enc.T.is_contiguous() and len(flat.buffers) == 1
    flat.restore()
    assert w_enc.is_contiguous() and torch.equal(w_enc, seeded_sae(cfg).W_enc)

    torch.save({"version": 2, "step": 1}, tmp_path / TRAINER_STATE)
    with pytest.raises(ValueError, match=r"older SAE trainer \(format 2, this one reads 3\).*delete"):
        train_saes({"sae": seeded_sae(cfg)}, batches, TrainConfig(steps=2, checkpoint_dir=str(tmp_path),
                                                                   progress=False))  # fmt: skip


@pytest.mark.parametrize("shape, k", [((64, 8192), 16), ((3, 5, 4096), 8), ((16, 100), 4)])
def test_two_level_largest_k_equals_topk(shape, k) -> None:
    """largest_k (block maxima, then candidates) returns exactly the values torch.topk returns, at distinct
    indices that hold them — on continuous data, on heavily tied integers, with masked (-inf) latents, and through
    the plain-topk fallback (a width not divisible into blocks)."""
    torch.manual_seed(0)
    continuous = torch.randn(shape)
    tied = torch.randint(0, 3, shape).float()
    masked = continuous.masked_fill(torch.rand(shape[-1]) < 0.7, -torch.inf)
    for pre in (continuous, tied, masked):
        values, indices = largest_k(pre, k)
        reference = pre.topk(k, dim=-1, sorted=False).values
        assert torch.equal(values.sort(-1).values, reference.sort(-1).values)
        assert torch.equal(pre.gather(-1, indices), values)
        assert bool((indices.sort(-1).values.diff(dim=-1) > 0).all())
