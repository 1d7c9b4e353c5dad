"""Codebook features: VQ maths against float64 brute force, k-means against sklearn, purity/MI against sklearn
and closed forms, checkpoint/resume, steering, the TokFSM science check, demo_step and the dashboard view."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from circuits.codebook import (
    CodebookConfig,
    CodebookError,
    CodebookSet,
    analyse_codes,
    association,
    codebook_dir,
    demo_step,
    fsm_steering_check,
    kmeans,
    mutual_information,
    site_config,
    train_codebooks,
)

VIEW = Path(__file__).resolve().parents[1] / "app" / "views" / "codebooks.py"


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_forward_is_sum_of_top_k_codes_with_straight_through_gradient(similarity) -> None:
    torch.manual_seed(0)
    books = CodebookSet([CodebookConfig("s", d=6, n_codes=10, k=3, n_groups=2, similarity=similarity)])
    book = books["s"]
    x = torch.randn(4, 5, 2, 6, requires_grad=True)
    out, idx = book(x)
    u = x.detach().double()
    u = (u - u.mean(-1, keepdim=True)) / torch.sqrt(u.var(-1, unbiased=False, keepdim=True) + 1e-5)
    codes = book.codes.detach().double()
    if similarity == "cosine":
        u, codes = u / u.norm(dim=-1, keepdim=True), codes / codes.norm(dim=-1, keepdim=True)
    scores = torch.einsum("bpgd,gcd->bpgc", u, codes)
    expected_idx = scores.topk(3, dim=-1).indices.sort(-1).values
    assert torch.equal(idx.reshape(4, 5, 2, 3).sort(-1).values, expected_idx)
    gathered = book.codes.detach().double()[torch.arange(2)[None, None, :, None], expected_idx].sum(-2)
    torch.testing.assert_close(out.detach().double(), gathered, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    torch.testing.assert_close(x.grad, upstream)
    assert book.codes.grad is not None and book.codes.grad.abs().sum() > 0


def test_kmeans_recovers_planted_centres_like_sklearn() -> None:
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 4)) * 10
    x = torch.tensor(np.repeat(centres, 40, axis=0) + rng.normal(size=(200, 4)) * 0.1, dtype=torch.float32)
    ours = kmeans(x, 5).double().numpy()
    reference = KMeans(5, n_init=5, random_state=0).fit(x.numpy())
    inertia = ((x.numpy()[:, None] - ours[None]) ** 2).sum(-1).min(1).sum()
    assert inertia == pytest.approx(reference.inertia_, rel=1e-3)
    assert np.abs(np.sort(ours, 0) - np.sort(centres, 0)).max() < 0.1
    with pytest.raises(CodebookError, match="capture more tokens"):
        kmeans(x[:3], 5)


def test_purity_and_mutual_information_on_planted_codes() -> None:
    from sklearn.metrics import mutual_info_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=2000)
    codes = labels * 2 + rng.integers(0, 2, size=2000)  # every code fires on exactly one label
    codes[:100] = 9  # code 9 mixes labels
    table = association(codes, labels, n_codes=10).set_index("label")
    for label in range(4):
        best = table.loc[label, "best_code"]
        assert best // 2 == label and table.loc[label, "purity"] == 1.0
        indicator_codes, indicator_labels = codes == best, labels == label
        assert table.loc[label, "mi"] == pytest.approx(mutual_info_score(indicator_codes, indicator_labels))
    labels_with_ignore = labels.copy()
    labels_with_ignore[:10] = -1
    keep = labels_with_ignore >= 0
    assert mutual_information(codes, labels_with_ignore) == pytest.approx(
        mutual_info_score(codes[keep], labels_with_ignore[keep])
    )


def test_bad_sites_and_codes_raise_clear_errors(fsm_series) -> None:
    from workbench.hooks import HookNameError

    model = fsm_series.load(fsm_series.steps[-1])
    with pytest.raises(HookNameError):
        site_config(model, "blocks.1.hook_resid_pots", 8)
    with pytest.raises(CodebookError, match="not a codebook site"):
        site_config(model, "blocks.0.attn.hook_pattern", 8)
    config = site_config(model, "blocks.0.attn.hook_z", 8)
    assert (config.n_groups, config.d) == (model.cfg.n_heads, model.cfg.d_head)
    books = CodebookSet([config])
    with pytest.raises(CodebookError, match=r"out of range .*valid codes: 0\.\.7"):
        with books.steer("blocks.0.attn.hook_z", force={0: 8}):
            pass
    with pytest.raises(CodebookError, match="no codebook on site"):
        books.codes("blocks.1.attn.hook_z")
    with pytest.raises(CodebookError, match="between 1 and n_codes"):
        CodebookConfig("s", d=4, n_codes=3, k=4)
    with pytest.raises(CodebookError, match="plain name"):
        codebook_dir(None, "../elsewhere")


def test_per_head_training_checkpoints_resumes_and_steers(fsm_series, tmp_path) -> None:
    from workbench.zoo.corpora import TokFSM
    from workbench.zoo.train import get_spec

    model = fsm_series.load(fsm_series.steps[-1])
    spec = get_spec("fsm-tiny")
    tokens = torch.from_numpy(TokFSM(**spec.fsm, seed=spec.seed).sample(64, 16, seed=3)[0])
    site = "blocks.0.attn.hook_z"
    kwargs = dict(
        n_codes=16, k=2, batch_size=8, checkpoint_every=2, progress=False, directory=tmp_path / "run"
    )
    books, report = train_codebooks(model, tokens, [site], steps=4, **kwargs)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["step"] == 4
    assert np.isfinite(report.loss_gap) and report.codebook_loss > 0
    resumed, report2 = train_codebooks(model, tokens, [site], steps=6, **kwargs)
    assert len(report2.history) == 2  # steps 4 and 5 only
    reloaded = CodebookSet.load(tmp_path / "run")
    torch.testing.assert_close(reloaded[site].codes, resumed[site].codes)
    with pytest.raises(CodebookError, match="other settings"):
        train_codebooks(model, tokens, [site], steps=6, **{**kwargs, "n_codes": 8})

    with torch.no_grad(), model.hooks(reloaded.hooks()):
        with reloaded.steer(site, force={3: 5}, group=1, disable=[0, 1]):
            model(tokens[:4])
        steered = reloaded.codes(site)
        assert (steered[:, 3, 1] == 5).all()
        assert not torch.isin(steered[:, :, 0], torch.tensor([0, 1])).any()
        model(tokens[:4])
        assert not (reloaded.codes(site)[:, 3, 1] == 5).all()  # forcing ended with the block


@pytest.fixture(scope="module")
def codebook_workspace(zoo_workspace, tmp_path_factory):
    """A workspace holding a link to the session's fsm-tiny, after demo_step."""
    from workbench.workspace import Workspace

    workspace = Workspace(tmp_path_factory.mktemp("codebooks")).ensure()
    workspace.model_dir("fsm-tiny").symlink_to(zoo_workspace.model_dir("fsm-tiny"), target_is_directory=True)
    summary = demo_step(workspace, progress=False, model_name="fsm-tiny", n_codes=200, steps=100)
    return workspace, summary


def test_demo_step_fsm_state_purity_and_steering(codebook_workspace) -> None:
    from workbench.zoo.corpora import TokFSM
    from workbench.zoo.labels import fsm_label_dataset
    from workbench.zoo.train import get_spec

    workspace, summary = codebook_workspace
    assert "state purity" in summary and "loss gap" in summary
    purity = workspace.results().read("codebook_purity", model="fsm-tiny")
    codes = workspace.results().read("codebook_codes", model="fsm-tiny")
    assert {"best_code", "purity", "mi", "recall", "label_set"} <= set(purity.columns)
    assert {"code", "count", "top_tokens", "top_contexts", "best_label", "purity", "loss_gap"} <= set(
        codes.columns
    )
    assert purity["label"].nunique() >= 90  # states seen in the held-out sample
    trained_purity = purity["purity"].mean()

    from workbench.checkpoints import CheckpointSeries

    series = CheckpointSeries.from_directory(workspace.model_dir("fsm-tiny"))
    model = series.load(series.steps[-1])
    spec = get_spec("fsm-tiny")
    fsm = TokFSM(**spec.fsm, seed=spec.seed)
    tokens, labels = fsm_label_dataset(fsm, 128, 32, seed=1)
    site = purity["site"].iloc[0]
    torch.manual_seed(0)
    control = CodebookSet([site_config(model, site, 200)])
    _, control_purity = analyse_codes(model, control, tokens, {"fsm_state": labels["fsm_state"]})
    assert trained_purity > 0.3  # chance is 1/100
    assert trained_purity > control_purity["purity"].mean() + 0.1

    books = CodebookSet.load(codebook_dir(workspace, "fsm-tiny-demo"))
    effect = fsm_steering_check(model, books, site, fsm, purity, tokens[:48], labels["fsm_state"][:48])
    assert effect["forced_legal_from_forced"] > 0.5
    assert effect["forced_legal_from_forced"] > effect["plain_legal_from_forced"] + 0.3
    assert effect["forced_legal_from_true"] < effect["plain_legal_from_true"]


def test_dashboard_view_renders_codebook_results(codebook_workspace, monkeypatch, tmp_path) -> None:
    from streamlit.testing.v1 import AppTest

    workspace, _ = codebook_workspace
    monkeypatch.setenv("WORKBENCH_WORKSPACE", str(workspace.root))
    app = AppTest.from_file(str(VIEW), default_timeout=60).run()
    assert not app.exception, app.exception
    assert len(app.get("plotly_chart")) == 2
    assert len(app.dataframe) == 2 and "best_code" in app.dataframe[0].value.columns
    assert any("purity" in m.label for m in app.metric)

    from workbench.workspace import Workspace

    Workspace(tmp_path).results().write("unrelated", pd.DataFrame({"x": [1]}))
    monkeypatch.setenv("WORKBENCH_WORKSPACE", str(tmp_path))
    empty = AppTest.from_file(str(VIEW), default_timeout=60).run()
    assert not empty.exception and "workbench codebook" in empty.info[0].value


def test_cli_train_then_analyse_writes_tables(zoo_workspace, tmp_path) -> None:
    from typer.testing import CliRunner

    from circuits.codebook_cli import app
    from workbench.workspace import Workspace

    workspace = Workspace(tmp_path).ensure()
    workspace.model_dir("fsm-tiny").symlink_to(zoo_workspace.model_dir("fsm-tiny"), target_is_directory=True)
    runner = CliRunner()
    args = ["--workspace", str(tmp_path), "--run", "cli"]
    trained = runner.invoke(app, ["train", "fsm-tiny", "--steps", "3", "--n-codes", "16", *args])
    assert trained.exit_code == 0, trained.output
    assert "gap" in trained.output and (tmp_path / "codebooks" / "cli" / "codebooks.safetensors").exists()
    analysed = runner.invoke(app, ["analyse", "fsm-tiny", *args])
    assert analysed.exit_code == 0, analysed.output
    assert "purity" in analysed.output
    assert set(workspace.results().read("codebook_codes")["code"]) <= set(range(16))
    missing = runner.invoke(app, ["analyse", "fsm-tiny", "--workspace", str(tmp_path), "--run", "nope"])
    assert missing.exit_code != 0 and "train them" in str(missing.exception)
