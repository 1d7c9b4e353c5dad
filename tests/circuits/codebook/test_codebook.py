"""Codebook features: VQ maths against float64 brute force, k-means against sklearn, purity/MI against sklearn
and closed forms, checkpoint/resume, steering, the TokFSM science check (the demo's study), the dashboard
view, and `workbench codebook train|run` on zoo and user models and datasets (MiniLM refused at once)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import transformers
from typer.testing import CliRunner

from workbench.analysis import write_tables
from workbench.circuits.codebook import (
    ANALYSIS,
    CODES_TABLE,
    PURITY_TABLE,
    CodebookConfig,
    CodebookError,
    CodebookSet,
    analyse_codes,
    association,
    codebook_dir,
    collect_codes,
    default_run_name,
    fsm_codebook_study,
    fsm_purity_ceiling,
    fsm_steering_check,
    generate,
    mutual_information,
    read_rows,
    site_config,
    train_codebooks,
)
from workbench.circuits.codebook.kmeans import kmeans
from workbench.circuits.codebook.train import _replace_dead
from workbench.cli import app as cli
from workbench.datasets import load_dataset
from workbench.references import resolve_model, short_name
from workbench.workspace import Workspace

VIEW = Path(__file__).resolve().parents[3] / "app" / "views" / "codebooks.py"


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
    _, idx2, chosen_scores = book.encode(x)
    expected_scores = scores.reshape(20, 2, 10).gather(-1, idx2).float()
    torch.testing.assert_close(chosen_scores, expected_scores, atol=1e-4, rtol=1e-4)
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


def test_fsm_purity_ceiling_in_closed_form() -> None:
    """Tokens shared by m = 2 states and uniform transitions: the posterior is uniform over a token's states, so
    each state's purity is its share of its token's occurrences and the mean over states is exactly V / N = 0.5.
    Distinct tokens per state: the posterior is certain, ceiling 1."""
    from workbench.zoo.corpora import TokFSM

    shared = TokFSM(n_states=10, vocab_size=5, branching=10, seed=0)
    tokens, states = (torch.from_numpy(a) for a in shared.sample(200, 6, seed=1))
    ceiling = fsm_purity_ceiling(shared, tokens, states)
    assert ceiling["purity"] == pytest.approx(0.5, abs=1e-12)
    assert ceiling["map_accuracy"] == pytest.approx(0.5, abs=0.05)
    distinct = TokFSM(n_states=5, vocab_size=5, branching=2, seed=0)
    tokens, states = (torch.from_numpy(a) for a in distinct.sample(20, 6, seed=1))
    assert fsm_purity_ceiling(distinct, tokens, states) == {"purity": 1.0, "map_accuracy": 1.0}


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


def test_same_seed_same_codes_other_seed_other_codes_global_rng_left_alone(fsm_series) -> None:
    from workbench.zoo.corpora import TokFSM
    from workbench.zoo.train import get_spec

    model = fsm_series.load(fsm_series.steps[-1])
    spec = get_spec("fsm-tiny")
    tokens = torch.from_numpy(TokFSM(**spec.fsm, seed=spec.seed).sample(64, 12, seed=3)[0])
    site = "blocks.0.hook_mlp_out"
    before = torch.get_rng_state()
    codes = [
        train_codebooks(
            model, tokens, [site], n_codes=12, steps=4, batch_size=8, dead_every=2, seed=seed, progress=False
        )[0][site].codes
        for seed in (0, 0, 1)
    ]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(codes[0], codes[1]) and not torch.equal(codes[0], codes[2])


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
    assert CodebookSet.metadata(tmp_path / "run")["step"] == 6
    reloaded = CodebookSet.load(tmp_path / "run")
    torch.testing.assert_close(reloaded[site].codes, resumed[site].codes)
    with pytest.raises(CodebookError, match="other settings"):
        train_codebooks(model, tokens, [site], steps=6, **{**kwargs, "n_codes": 8})

    with torch.no_grad(), model.hooks(reloaded.hooks()):
        with reloaded.steer(site, force={3: 5}, group=1, disable=[0, 1]):
            model(tokens[:4])
        steered = reloaded.codes(site)
        assert (steered[:, 3, 1, 0] == 5).all() and (steered[:, 3, 1, 1] == -1).all()  # exactly code 5, once
        assert not torch.isin(steered[:, :, 0], torch.tensor([0, 1])).any()
        model(tokens[:4])
        assert not (reloaded.codes(site)[:, 3, 1] == 5).all()  # forcing ended with the block


def _planted_codebook():
    """4 tight clusters in 8 dims; codes 0-3 sit on the (LayerNorm-ed) centres, codes 4-7 on their negatives, so
    under dot similarity codes 4-7 never win."""
    torch.manual_seed(0)
    centres = torch.nn.functional.layer_norm(torch.randn(4, 8) * 3, (8,))
    x = centres.repeat_interleave(25, 0) + 0.5 * torch.randn(100, 8)
    books = CodebookSet([CodebookConfig("s", d=8, n_codes=8, k=1)])
    with torch.no_grad():
        books["s"].codes[0] = torch.cat([centres, -centres])
    return books, x


def test_dead_codes_are_replaced_by_inputs_and_then_win() -> None:
    books, x = _planted_codebook()
    book = books["s"]
    used = torch.bincount(book.select(x[:, None]).reshape(-1), minlength=8)
    assert (used[:4] > 0).all() and (used[4:] == 0).all()
    books.state["s"].last_input = x
    usage = {"s": used[None].float()}
    live = book.codes.detach()[0, :4].clone()
    replaced = _replace_dead(books, usage, torch.Generator().manual_seed(0))
    assert replaced == 4 and (usage["s"] == 0).all()
    torch.testing.assert_close(book.codes.detach()[0, :4], live)  # live codes untouched
    u = torch.nn.functional.layer_norm(x, (8,))
    distance = torch.cdist(book.codes.detach()[0, 4:], u).min(1).values
    assert (distance < 0.1).all()  # each new code is an input plus 1 % noise
    after = torch.bincount(book.select(x[:, None]).reshape(-1), minlength=8)
    assert (after > 0).all()  # the re-seeded codes now win on the inputs they were seeded from


def test_disabling_and_forcing_rules() -> None:
    books = CodebookSet([CodebookConfig("s", d=8, n_codes=6, k=2)])
    book = books["s"]
    x = torch.randn(5, 7, 8)

    class Hook:
        name = "s"

    with books.steer("s", disable=[0, 1, 2, 3]):  # exactly k codes left: they are the ones chosen
        books._hook(x, Hook())
        assert set(books.codes("s").unique().tolist()) == {4, 5}
    with pytest.raises(CodebookError, match="fewer than k=2"):
        with books.steer("s", disable=[0, 1, 2, 3, 4]):
            pass
    with books.steer("s", disable=[0, 1, 2]), pytest.raises(CodebookError, match="fewer than k=2"):
        with books.steer("s", disable=[3, 4]):  # nested blocks add up
            pass
    with books.steer("s", force={2: 3, -1: 0}):
        out = books._hook(x, Hook())
    codes = book.codes.detach()
    torch.testing.assert_close(out[:, 2], codes[0, 3].expand(5, 8))  # exactly the forced code, once
    torch.testing.assert_close(out[:, -1], codes[0, 0].expand(5, 8))
    assert (books.codes("s")[:, 2, 0, 1] == -1).all() and (books.scores("s")[:, 2, 0, 1] == -torch.inf).all()
    natural = books._hook(x, Hook())
    torch.testing.assert_close(natural[:, 1], codes[0][books.codes("s")[:, 1, 0]].sum(1))


def test_fsm_steering_check_without_candidates_or_with_shared_codes(fsm_series) -> None:
    from workbench.zoo.corpora import TokFSM
    from workbench.zoo.train import get_spec

    model = fsm_series.load(fsm_series.steps[-1])
    spec = get_spec("fsm-tiny")
    fsm = TokFSM(**spec.fsm, seed=spec.seed)
    tokens, states = (torch.from_numpy(a) for a in fsm.sample(6, 8, seed=0))
    site = "blocks.1.hook_resid_post"
    books = CodebookSet([site_config(model, site, 8)])
    legal = [frozenset(fsm.legal_next_tokens(s)) for s in range(fsm.n_states)]
    a, b = next((a, b) for a in range(fsm.n_states) for b in range(a) if legal[a] != legal[b])
    shared = pd.DataFrame({"site": site, "label_set": "fsm_state", "label": [a, b], "best_code": [3, 3]})
    result = fsm_steering_check(model, books, site, fsm, shared, tokens, states)
    assert result["n"] == 0 and result["skipped"] == 6 and np.isnan(result["forced_legal_from_forced"])
    alone = pd.DataFrame({"site": site, "label_set": "fsm_state", "label": [a], "best_code": [3]})
    result = fsm_steering_check(model, books, site, fsm, alone, tokens, states)
    assert result["n"] + result["skipped"] == 6
    assert result["n"] == sum(legal[int(s)] != legal[a] for s in states[:, -1]) > 0


@pytest.mark.parametrize("train_model", [False, True])
def test_resume_equals_an_uninterrupted_run(fsm_series, tmp_path, train_model) -> None:
    """MLP-out site, cosine similarity, dead-code replacement across the interruption; with ``train_model`` the
    model weights are checkpointed too. The caller's requires_grad flags survive."""
    from workbench.zoo.corpora import TokFSM
    from workbench.zoo.train import get_spec

    spec = get_spec("fsm-tiny")
    tokens = torch.from_numpy(TokFSM(**spec.fsm, seed=spec.seed).sample(64, 12, seed=3)[0])
    site = "blocks.0.hook_mlp_out"
    kwargs = dict(n_codes=24, similarity="cosine", batch_size=8, checkpoint_every=3, dead_every=2,
                  train_model=train_model, progress=False)  # fmt: skip

    def fresh():
        model = fsm_series.load(fsm_series.steps[-1])
        for i, p in enumerate(model.model.parameters()):
            p.requires_grad_(i % 2 == 0)
        return model

    full_model = fresh()
    full, full_report = train_codebooks(
        full_model, tokens, [site], steps=6, directory=tmp_path / "a", **kwargs
    )
    assert [p.requires_grad for p in full_model.model.parameters()] == [
        i % 2 == 0 for i, _ in enumerate(full_model.model.parameters())
    ]
    assert full_report.dead_replaced > 0 and full[site].config.similarity == "cosine"
    train_codebooks(fresh(), tokens, [site], steps=3, directory=tmp_path / "b", **kwargs)
    resumed_model = fresh()
    resumed, report = train_codebooks(
        resumed_model, tokens, [site], steps=6, directory=tmp_path / "b", **kwargs
    )
    assert len(report.history) == 3
    np.testing.assert_allclose(report.history, full_report.history[3:], rtol=1e-5)
    torch.testing.assert_close(resumed[site].codes, full[site].codes, atol=1e-6, rtol=1e-5)
    base = fsm_series.load(fsm_series.steps[-1]).model.state_dict()
    full_weights, resumed_weights = full_model.model.state_dict(), resumed_model.model.state_dict()
    for name, value in full_weights.items():
        torch.testing.assert_close(resumed_weights[name], value, atol=1e-6, rtol=1e-5)
    changed = any(not torch.equal(value, base[name]) for name, value in full_weights.items())
    assert changed == train_model
    if train_model:
        assert report.loss_gap == pytest.approx(full_report.loss_gap, abs=1e-5)

    # steps below the saved step train nothing and keep the step
    _, again = train_codebooks(fresh(), tokens, [site], steps=2, directory=tmp_path / "b", **kwargs)
    assert again.steps == 6 and again.history == [] and CodebookSet.metadata(tmp_path / "b")["step"] == 6
    (tmp_path / "b" / "config.json").unlink()  # the safetensors file alone is complete
    torch.testing.assert_close(CodebookSet.load(tmp_path / "b")[site].codes, full[site].codes)
    if not train_model:  # a finished run saved before train_state.pt existed is used as it is, not trained on
        (tmp_path / "b" / "train_state.pt").unlink()
        old, old_report = train_codebooks(
            fresh(), tokens, [site], steps=6, directory=tmp_path / "b", **kwargs
        )
        assert old_report.steps == 6 and old_report.history == []
        torch.testing.assert_close(old[site].codes, full[site].codes)
        with pytest.raises(CodebookError, match="without the training state"):
            train_codebooks(fresh(), tokens, [site], steps=7, directory=tmp_path / "b", **kwargs)
        return
    with pytest.raises(CodebookError, match=r"other settings \(train_model\)"):
        train_codebooks(fresh(), tokens, [site], steps=6, directory=tmp_path / "b",
                        **{**kwargs, "train_model": not train_model})  # fmt: skip


def test_writing_codes_replaces_every_row_of_a_site(tmp_path) -> None:
    workspace = Workspace(tmp_path).ensure()

    def frame(site, codes, dataset="d"):
        return pd.DataFrame({"model": "m", "checkpoint": 5, "dataset": dataset, "run": "r", "site": site,
                             "head": None, "code": codes, "count": 1})  # fmt: skip

    purity = pd.DataFrame({"model": "m", "checkpoint": 5, "dataset": "d", "run": "r", "site": "a", "head": None,
                           "label_set": "s", "label": [0, 1], "purity": 0.5})  # fmt: skip
    write_tables(workspace, ANALYSIS, {CODES_TABLE: pd.concat([frame("a", [1, 2, 3]), frame("b", [7]), frame("a", [9], "e")]),
                              PURITY_TABLE: purity})  # fmt: skip
    write_tables(workspace, ANALYSIS, {CODES_TABLE: frame("a", [1, 2]), PURITY_TABLE: purity.iloc[:1]})
    rows = workspace.results().read("codebook_codes")
    on = rows[rows["dataset"] == "d"]
    assert sorted(on[on["site"] == "a"]["code"]) == [1, 2] and list(on[on["site"] == "b"]["code"]) == [7]
    assert list(rows[rows["dataset"] == "e"]["code"]) == [9]  # another dataset's rows stay
    assert list(workspace.results().read("codebook_purity")["label"]) == [0]
    assert ANALYSIS.table_names == [CODES_TABLE, PURITY_TABLE]
    assert all("dataset" in t.keys and "site" in t.keys for t in ANALYSIS.tables)
    with pytest.raises(ValueError, match="lacks key column"):
        write_tables(workspace, ANALYSIS, {CODES_TABLE: frame("a", [1]).drop(columns="site")})


@pytest.fixture(scope="module")
def codebook_workspace(zoo_workspace, tmp_path_factory):
    """A workspace holding a link to the session's fsm-tiny, after the demo's TokFSM study (run fsm-tiny-demo)."""
    workspace = Workspace(tmp_path_factory.mktemp("codebooks")).ensure()
    workspace.model_dir("fsm-tiny").symlink_to(zoo_workspace.model_dir("fsm-tiny"), target_is_directory=True)
    study = fsm_codebook_study(resolve_model("fsm-tiny", workspace=workspace), load_dataset("zoo:tokfsm"), n_codes=200,
                               steps=100, directory=codebook_dir(workspace, "fsm-tiny-demo"), progress=False)  # fmt: skip
    write_tables(workspace, ANALYSIS, study["frames"])
    return workspace, study


def test_tokfsm_study_state_purity_and_steering(codebook_workspace) -> None:
    from workbench.zoo.corpora import TokFSM
    from workbench.zoo.labels import fsm_label_dataset
    from workbench.zoo.train import get_spec

    workspace, study = codebook_workspace
    assert {"mean_state_purity", "purity_ceiling", "steering", "report", "frames"} <= set(study)
    purity = workspace.results().read("codebook_purity", model="fsm-tiny")
    codes = workspace.results().read("codebook_codes", model="fsm-tiny")
    assert {"best_code", "purity", "mi", "recall", "label_set"} <= set(purity.columns)
    assert {"code", "count", "top_tokens", "top_contexts", "best_label", "purity", "loss_gap"} <= set(
        codes.columns
    )
    assert purity["label"].nunique() >= 90  # states seen in the held-out sample
    trained_purity = purity["purity"].mean()
    assert trained_purity < purity["purity_ceiling"].iloc[0] <= 1

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


def _demo_model_and_books(workspace):
    from workbench.checkpoints import CheckpointSeries
    from workbench.zoo.corpora import TokFSM
    from workbench.zoo.train import get_spec

    series = CheckpointSeries.from_directory(workspace.model_dir("fsm-tiny"))
    spec = get_spec("fsm-tiny")
    books = CodebookSet.load(codebook_dir(workspace, "fsm-tiny-demo"))
    return series.load(series.steps[-1]), books, TokFSM(**spec.fsm, seed=spec.seed)


def test_generation_follows_a_forced_state_code_and_disabled_codes_are_avoided(codebook_workspace) -> None:
    workspace, _ = codebook_workspace
    model, books, fsm = _demo_model_and_books(workspace)
    site = books.sites[0]
    purity = workspace.results().read("codebook_purity", model="fsm-tiny")
    purity = purity[
        purity["best_code"].map(purity["best_code"].value_counts()) == 1
    ]  # codes naming one state
    state, code = (int(v) for v in purity.sort_values("purity").iloc[-1][["label", "best_code"]])
    legal = fsm.legal_next_tokens(state)
    prompts = torch.from_numpy(fsm.sample(16, 8, seed=5)[0])
    plain = generate(model, books, prompts, 6)[:, 8:]
    forced = generate(model, books, prompts, 6, steer={"site": site, "force": {-1: code}})[:, 8:]
    assert (books.codes(site)[:, -1, 0, 0] == code).all()
    forced_rate = np.isin(forced.numpy(), list(legal)).mean()
    plain_rate = np.isin(plain.numpy(), list(legal)).mean()
    assert forced_rate > 0.6 and forced_rate > plain_rate + 0.3

    used = collect_codes(model, books, torch.cat([prompts, plain], 1))[site].unique().tolist()
    avoided = generate(model, books, prompts, 6, steer={"site": site, "disable": used})
    assert not torch.isin(books.codes(site), torch.tensor(used)).any()
    assert not torch.equal(avoided[:, 8:], plain)


def test_top_contexts_are_ranked_by_similarity(codebook_workspace) -> None:
    workspace, _ = codebook_workspace
    model, books, fsm = _demo_model_and_books(workspace)
    site = books.sites[0]
    tokens = torch.from_numpy(fsm.sample(32, 10, seed=7)[0])
    codes, _ = analyse_codes(model, books, tokens, top_contexts=3, context=2)
    chosen, scores = collect_codes(model, books, tokens, return_scores=True)
    brute = books[site].scores(books[site]._grouped(_capture(model, site, tokens)))  # [rows, 1, n_codes]
    torch.testing.assert_close(
        scores[site].reshape(-1), brute[:, 0].gather(1, chosen[site].reshape(-1, 1))[:, 0]
    )
    busy = codes[codes["count"] > 3]
    assert len(busy)
    for row in busy.itertuples():
        where = (chosen[site].reshape(-1) == row.code).nonzero().squeeze(1)
        best = scores[site].reshape(-1)[where].sort(descending=True)
        np.testing.assert_allclose(row.top_context_scores, best.values[:3].numpy(), rtol=1e-6)
        seq, pos = divmod(int(where[best.indices[0]]), tokens.shape[1])
        assert row.top_contexts[0] == " ".join(model.to_str_tokens(tokens[seq, max(0, pos - 2) : pos + 1]))


def _capture(model, site, tokens):
    with torch.no_grad(), model.capture([site]) as cache:
        model(tokens)
    return cache[site]


def test_dashboard_view_renders_codebook_results(codebook_workspace, monkeypatch, tmp_path) -> None:
    from streamlit.testing.v1 import AppTest

    workspace, _ = codebook_workspace
    monkeypatch.setenv("WORKBENCH_WORKSPACE", str(workspace.root))
    app = AppTest.from_file(str(VIEW), default_timeout=60).run()
    assert not app.exception, app.exception
    assert [box.label for box in app.selectbox] == [
        "model",
        "site",
        "label set",
    ]  # one dataset and run: no pickers
    assert len(app.get("plotly_chart")) == 2
    assert len(app.dataframe) == 2 and "best_code" in app.dataframe[0].value.columns
    assert any("purity" in m.label for m in app.metric)

    Workspace(tmp_path).results().write("unrelated", pd.DataFrame({"x": [1]}))
    monkeypatch.setenv("WORKBENCH_WORKSPACE", str(tmp_path))
    empty = AppTest.from_file(str(VIEW), default_timeout=60).run()
    assert not empty.exception and "workbench codebook" in empty.info[0].value


runner = CliRunner()
TINY = ["--steps", "3", "--n-codes", "16", "--context-length", "32", "--batch-size", "8", "--no-progress"]
CODE_LINES = [
    f"def f{i}(x, y):\n    return x * {i} + y  # {'even' if i % 2 else 'odd'} case {i * 7}" for i in range(60)
]


def _codebook(workspace: Workspace, *args: str):
    return runner.invoke(cli, ["codebook", *args, "-w", str(workspace.root)])


def _linked_workspace(zoo_workspace, root: Path) -> Workspace:
    """A fresh workspace whose models/ link to the zoo's, so runs and results land here."""
    workspace = Workspace(root).ensure()
    for name in ("fsm-tiny", "code-tiny"):
        workspace.model_dir(name).symlink_to(zoo_workspace.model_dir(name), target_is_directory=True)
    return workspace


@pytest.fixture(scope="module")
def code_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cb-data") / "snippets.txt"
    path.write_text("\n".join(line.replace("\n", " ") for line in CODE_LINES) + "\n")
    return path


def test_tokfsm_command_runs_the_study_and_refuses_other_data_before_loading(
    zoo_workspace, code_file, tmp_path
) -> None:
    """`codebook tokfsm MODEL` (the demo's step): the study's tables written and its numbers printed; data without a
    TokFSM is refused before the model loads (the model named here does not exist)."""
    workspace = _linked_workspace(zoo_workspace, tmp_path / "ws")
    result = _codebook(workspace, "tokfsm", "fsm-tiny", "--steps", "3", "--n-codes", "16", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "state purity" in result.output and "ceiling" in result.output
    assert (workspace.root / "codebooks" / "fsm-tiny-tokfsm" / "codebooks.safetensors").exists()
    purity = workspace.results().read("codebook_purity", model="fsm-tiny")
    assert set(purity["run"]) == {"fsm-tiny-tokfsm"} and purity["purity_ceiling"].notna().all()
    refused = _codebook(workspace, "tokfsm", "no-such-model", "--data", str(code_file))
    assert refused.exit_code == 2 and "is not a TokFSM dataset" in refused.output, refused.output


def test_default_run_names_are_valid_names(tmp_path) -> None:
    (tmp_path / "my-gpt2").mkdir()
    (tmp_path / "series" / "step300").mkdir(parents=True)
    assert default_run_name("fsm-tiny") == "fsm-tiny-codebooks"
    assert default_run_name("code-tiny@300") == "code-tiny@300-codebooks"
    assert default_run_name("EleutherAI/pythia-70m@step3000") == "EleutherAI--pythia-70m@step3000-codebooks"
    # a directory outside the workspace: its name and a hash of its resolved path (the model's identity)
    model = short_name(tmp_path / "my-gpt2")
    assert (
        model.startswith("my-gpt2-")
        and default_run_name(str(tmp_path / "my-gpt2") + "/") == f"{model}-codebooks"
    )
    series = short_name(tmp_path / "series")
    assert default_run_name(str(tmp_path / "series" / "step300")) == f"{series}@300-codebooks"
    assert default_run_name(f"{tmp_path / 'series'}@300") == f"{series}@300-codebooks"


def test_cli_fsm_tiny_on_zoo_tokfsm_writes_purity_on_the_held_out_rows(zoo_workspace, tmp_path) -> None:
    """`train fsm-tiny --data zoo:tokfsm` then `run`: rows keyed by model, last checkpoint, dataset, run and
    site; counts over exactly the held-out quarter of zoo:tokfsm's rows; FSM-state purity rows; a rerun replaces its
    rows; a missing run or a mistyped site exits 2 naming the fix."""
    workspace = _linked_workspace(zoo_workspace, tmp_path / "ws")
    trained = _codebook(workspace, "train", "fsm-tiny", "--data", "zoo:tokfsm", *TINY)
    assert trained.exit_code == 0, trained.output
    run_dir = tmp_path / "ws" / "codebooks" / "fsm-tiny-codebooks"
    assert "gap" in trained.output and (run_dir / "codebooks.safetensors").exists()
    meta = CodebookSet.metadata(run_dir)
    assert (
        meta["step"] == 3
        and meta["source"]["dataset"] == "zoo:tokfsm"
        and meta["source"]["context_length"] == 32
    )
    more = _codebook(workspace, "train", "fsm-tiny", "--data", "zoo:tokfsm", *TINY[2:], "--steps", "4")
    assert (
        more.exit_code == 0 and "step 4" in more.output and CodebookSet.metadata(run_dir)["step"] == 4
    )  # resumed
    other = _codebook(workspace, "train", "fsm-tiny", "--data", "zoo:tokfsm", *TINY, "--max-tokens", "4096")
    assert other.exit_code == 2 and "other settings (source)" in other.output  # other rows: not this run's
    analysed = _codebook(workspace, "run", "fsm-tiny", "--data", "zoo:tokfsm")
    assert analysed.exit_code == 0, analysed.output
    assert "P(fsm_state | best code)" in analysed.output
    db = workspace.results()
    codes, purity = db.read(CODES_TABLE), db.read(PURITY_TABLE)
    step = max(int(p.name[4:]) for p in workspace.model_dir("fsm-tiny").glob("step*"))
    for rows in (codes, purity):
        assert (rows["model"] == "fsm-tiny").all() and (rows["checkpoint"] == step).all()
        assert (rows["dataset"] == "zoo:tokfsm").all() and (rows["run"] == "fsm-tiny-codebooks").all()
        assert (rows["site"] == "blocks.1.hook_resid_post").all()
    held = read_rows(
        resolve_model("fsm-tiny", workspace=workspace), load_dataset("zoo:tokfsm"), context_length=32
    )
    assert (
        held.eval.shape == (128, 32) and codes["count"].sum() == held.eval.numel()
    )  # k = 1: one code per token
    assert set(codes["code"]) <= set(range(16)) and codes["loss_gap"].notna().all()
    assert (purity["label_set"] == "fsm_state").all()
    assert set(purity["label"]) == set(held.eval_labels["fsm_state"].unique().tolist())
    assert purity["purity"].between(0, 1).all() and (purity["label_count"].sum() == held.eval.numel())
    assert _codebook(workspace, "run", "fsm-tiny", "--data", "zoo:tokfsm").exit_code == 0
    assert len(db.read(CODES_TABLE)) == len(codes) and len(db.read(PURITY_TABLE)) == len(purity)

    missing = _codebook(workspace, "run", "fsm-tiny", "--data", "zoo:tokfsm", "--run", "nope")
    assert missing.exit_code == 2 and "error:" in missing.output and "train them first" in missing.output
    bad_site = _codebook(workspace, "train", "fsm-tiny", "--data", "zoo:tokfsm", "--site", "blocks.1.hook_resid_pots",
                         "--run", "x", *TINY)  # fmt: skip
    assert (
        bad_site.exit_code == 2
        and "hook_resid_post" in bad_site.output
        and "Traceback" not in bad_site.output
    )
    assert not (tmp_path / "ws" / "codebooks" / "x").exists()


def test_cli_code_tiny_checkpoint_on_a_users_text_file(zoo_workspace, code_file, tmp_path) -> None:
    """`code-tiny@300 --data snippets.txt`: packed rows of the file; without labels only counts and contexts (and
    the command says so); a per-character label function as --labels gives purity rows named by their classes."""
    workspace = _linked_workspace(zoo_workspace, tmp_path / "ws")
    trained = _codebook(workspace, "train", "code-tiny@300", "--data", str(code_file), *TINY)
    assert trained.exit_code == 0, trained.output
    assert (tmp_path / "ws" / "codebooks" / "code-tiny@300-codebooks" / "codebooks.safetensors").exists()
    analysed = _codebook(workspace, "run", "code-tiny@300", "--data", str(code_file))
    assert analysed.exit_code == 0, analysed.output
    assert "carries no per-token labels" in analysed.output
    name = load_dataset(code_file).name
    codes = workspace.results().read(CODES_TABLE)
    assert (codes["model"] == "code-tiny").all() and (codes["checkpoint"] == 300).all()
    assert (codes["dataset"] == name).all() and "codebook_purity" not in workspace.results().tables()
    model = resolve_model("code-tiny@300", workspace=workspace)
    held = read_rows(model, load_dataset(code_file), context_length=32)
    assert codes["count"].sum() == held.eval.numel() and held.eval.shape[1] == 32
    contexts = json.loads(codes.sort_values("count").iloc[-1]["top_contexts"])  # the busiest code's
    assert len(contexts) == 5 and all(isinstance(c, str) and c for c in contexts)

    labeller = tmp_path / "digits.py"
    labeller.write_text("def digit(text):\n    return ['digit' if c.isdigit() else 'other' for c in text]\n")
    labelled = _codebook(workspace, "run", "code-tiny@300", "--data", str(code_file), "--labels",
                         f"{labeller}:digit")  # fmt: skip
    assert labelled.exit_code == 0, labelled.output
    purity = workspace.results().read(PURITY_TABLE)
    assert set(purity["label_name"]) == {"digit", "other"} and (purity["dataset"] == name).all()
    assert purity["purity"].between(0, 1).all() and (purity["label_set_mi"] >= 0).all()


def test_cli_on_a_users_gpt2_directory_and_save_to_disk_folder(zoo_workspace, tmp_path) -> None:
    """A GPT-2 saved by the user (random init, the zoo's tokenizer copied next to it) on a datasets.save_to_disk
    folder, with per-head codebooks on attn.hook_z: one row per (head, code), the run named after the directory's
    identity."""
    import datasets

    model_dir = tmp_path / "my-gpt2"
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=512, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(zoo_workspace.model_dir("code-tiny") / name, model_dir / name)
    folder = tmp_path / "hf-snippets"
    datasets.Dataset.from_dict({"text": CODE_LINES}).save_to_disk(str(folder))
    workspace = Workspace(tmp_path / "ws")
    site = "blocks.0.attn.hook_z"
    trained = _codebook(workspace, "train", str(model_dir), "--data", str(folder), "--site", site, "--k", "2",
                        "--similarity", "cosine", *TINY)  # fmt: skip
    assert trained.exit_code == 0, trained.output
    run_dir = tmp_path / "ws" / "codebooks" / f"{short_name(model_dir)}-codebooks"
    books = CodebookSet.load(run_dir)
    assert books[site].config.n_groups == 4 and books[site].config.k == 2 and books[site].config.d == 8
    analysed = _codebook(workspace, "run", str(model_dir), "--data", str(folder))
    assert analysed.exit_code == 0, analysed.output
    codes = workspace.results().read(CODES_TABLE)
    assert set(codes["model"]) == {resolve_model(model_dir).cfg.name} and codes["checkpoint"].isna().all()
    assert (codes["dataset"] == load_dataset(folder).name).all() and set(codes["head"]) == {0, 1, 2, 3}
    held = read_rows(resolve_model(model_dir), load_dataset(folder), context_length=32)
    assert (
        codes.groupby("head")["count"].sum() == 2 * held.eval.numel()
    ).all()  # k = 2 codes per token and head


def test_cli_refuses_minilm_at_once(code_file, tmp_path) -> None:
    """MiniLM is an encoder without next-token logits: train and analyse exit 2 with one `error:` line naming the
    reason, no traceback, nothing written."""
    workspace = Workspace(tmp_path / "ws")
    for command in ("train", "run"):
        result = _codebook(
            workspace, command, "minilm", "--data", str(code_file), *(TINY if command == "train" else ())
        )
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.exit_code == 2, result.output
        assert len(errors) == 1 and "next-token loss" in errors[0] and "causal" in errors[0], result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "ws").exists() or not any((tmp_path / "ws").rglob("*"))
