"""Massive activations: real MiniLM, a planted model, emergence fits on planted curves, zoo tracking, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as T

from workbench.analyses.dynamics.emergence import (
    FAMILIES,
    FitError,
    compare_families,
    derived_quantities,
    fit_curve,
)
from workbench.analyses.dynamics.predictor import ParameterPredictor
from workbench.analyses.massive.analysis import (
    ANALYSIS,
    MassiveCriteria,
    MassiveError,
    detect_massive,
    fit_emergence,
    run,
    track_massive,
)
from workbench.analysis import write_tables
from workbench.model import HookedModel

TEXTS = ["The cat sat on the mat.", "Massive activations act as biases.", "Paris is the capital of France.",
         "I like tea, and coffee.", "Numbers: 1, 2, 3 and 4."]  # fmt: skip
PYTHIA_LIKE = np.array([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, *range(1000, 10001, 1000)], dtype=float)


@pytest.mark.parametrize(
    ("family", "params"),
    [
        ("exp_log", [5.0, 1e-4, 0.05, 1.0, 1.0]),
        ("logistic", [10.0, 2.0, 5.0, 1.0]),
        ("log", [3.0, 0.01, 2.0]),
    ],
)
def test_fit_recovers_planted_parameters_from_noisy_samples(family, params) -> None:
    rng = np.random.default_rng(0)
    clean = FAMILIES[family].fn(PYTHIA_LIKE, *params)
    noisy = clean + rng.normal(0, 0.01 * np.abs(clean).max(), len(clean))
    fit = fit_curve(PYTHIA_LIKE, noisy, family)
    assert fit.status == "ok" and fit.r2 > 0.99
    recovered = np.array(list(fit.params.values()))
    np.testing.assert_allclose(recovered, params, rtol=0.15, atol=0.02)
    assert all(np.isfinite(v) for v in fit.stderr.values())
    ranking = compare_families(PYTHIA_LIKE, noisy)
    assert (
        ranking.iloc[0]["family"] == family
        or ranking.iloc[0]["aic"] <= ranking[ranking.family == family]["aic"].item() + 2
    )


def test_derived_quantities_of_a_rise_and_decay() -> None:
    fit = fit_curve(PYTHIA_LIKE, FAMILIES["exp_log"].fn(PYTHIA_LIKE, 5.0, 1e-4, 0.05, 1.0, 1.0), "exp_log")
    derived = derived_quantities(fit, PYTHIA_LIKE.max())
    assert 1000 < derived["peak_step"] < 5000 and derived["peak_value"] > 15
    assert 10 < derived["emergence_step"] < derived["peak_step"]
    assert derived["steady_state"] == pytest.approx(1.0, abs=0.05)


def test_fit_refuses_too_few_checkpoints_and_reports_no_emergence() -> None:
    with pytest.raises(FitError, match="needs at least 6 checkpoints; got 1"):
        fit_curve([100], [3.0])
    flat = fit_curve(PYTHIA_LIKE, np.full(len(PYTHIA_LIKE), 7.0) + 1e-3 * np.sin(PYTHIA_LIKE))
    assert flat.status == "no_emergence" and not flat.params
    one = pd.DataFrame(
        {"model": ["m"], "hook": ["blocks.0.hook_resid_post"], "layer": [0], "checkpoint": [5], "top1": [1.0]}
    )
    with pytest.raises(FitError, match="needs a checkpoint series; got 1 checkpoint"):
        fit_emergence(one)


def test_predictor_learns_a_planted_architecture_relation() -> None:
    rows = []
    for n_layers, d_model in [(2, 64), (4, 128), (6, 256), (8, 512), (3, 96), (5, 192)]:
        for layer in range(n_layers):
            frac = layer / (n_layers - 1)
            rows.append({"n_layers": n_layers, "d_model": d_model, "n_heads": 4, "d_mlp": 4 * d_model, "layer": layer,
                         "param_A": 2.0 * frac + np.log2(d_model), "param_gamma": 0.01 * n_layers})  # fmt: skip
    predictor = ParameterPredictor().fit(pd.DataFrame(rows))
    assert set(predictor.cv_scores) == {"A", "gamma"} and predictor.cv_scores["A"] > 0.5
    predicted = predictor.predict({"n_layers": 4, "d_model": 128, "n_heads": 4, "d_mlp": 512})
    truth = 2.0 * np.arange(4) / 3 + 7.0
    assert np.abs(predicted["param_A"].to_numpy() - truth).max() < 1.0


def test_minilm_reports_the_cls_outlier_dimension_and_matches_plain_transformers() -> None:
    from workbench.model import packaged_model_dir

    model = HookedModel.from_pretrained("minilm")
    report = detect_massive(model, TEXTS)
    layers = report.layers
    assert (layers["top1_token"] == "[CLS]").all() and (layers["top1_position"] == 0).all()
    assert layers["top1_dim"].nunique() == 1
    dim = int(layers["top1_dim"].iloc[0])
    assert (layers["top1_spread"] < 0.1).all(), "the [CLS] outlier is nearly input-invariant"
    assert not layers["passes_abs"].any(), "post-LN MiniLM stays below |a| > 100"
    hf = T.AutoModel.from_pretrained(packaged_model_dir("minilm")).eval()
    batch = model.tokenize(TEXTS)
    with torch.no_grad():
        hidden = hf(**batch, output_hidden_states=True).hidden_states
    real = batch["attention_mask"].bool()
    for layer in range(6):
        h = hidden[layer + 1]
        top = h.abs()[real].max().item()
        median = h.abs()[real].median().item()
        row = layers[layers["layer"] == layer].iloc[0]
        assert row["top1"] == pytest.approx(top, rel=1e-5)
        assert row["ratio"] == pytest.approx(top / median, rel=0.02)
        assert h[:, 0, dim].abs().min() > 0.5 * top


def _planted_model(token: int, dim: int, value: float) -> HookedModel:
    torch.manual_seed(0)
    cfg = T.GPTNeoXConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                          vocab_size=50, max_position_embeddings=64)  # fmt: skip
    hf = T.GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():
        hf.gpt_neox.embed_in.weight[token, dim] = value
    return HookedModel.from_hf(hf, name="planted")


def test_planted_massive_activation_is_found_exactly() -> None:
    model = _planted_model(token=7, dim=13, value=600.0)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(8, 50, (6, 12), generator=gen)
    ids[:, 0] = 7
    ids[2, 5] = 7
    report = detect_massive(model, ids)
    assert (report.layers["top1_dim"] == 13).all() and (report.layers["top1_token_id"] == 7).all()
    assert report.layers["massive"].all() and (report.layers["n_massive"] == 1).all()
    massive = report.top[report.top["massive"]]
    assert set(zip(massive["dim"], massive["token_id"], strict=True)) == {(13, 7)}
    assert (report.top[report.top["massive"]]["occurrences"] == 7).all()
    assert (report.layers["top1_spread"] < 0.05).all()


def test_nan_activations_are_reported_with_hook_and_position() -> None:
    model = _planted_model(token=7, dim=13, value=float("nan"))
    ids = torch.full((2, 5), 9)
    ids[1, 3] = 7
    with pytest.raises(MassiveError, match=r"hook_embed holds NaN/inf at sequence 1, position 3"):
        detect_massive(model, ids, hooks="hook_embed")


def test_run_on_one_model_detects_and_notes_why_a_series_fit_is_missing(code_series) -> None:
    """run() on a HookedModel is detection (no fits); on two checkpoints with a 5-parameter family it names the
    families that fit two checkpoints instead, and an unknown family is refused naming the registered ones."""
    model = _planted_model(token=3, dim=5, value=500.0)
    ids = torch.tensor([[3, 1, 2, 3], [4, 3, 2, 1]])
    frames = run(model, ids, hooks="blocks.*.hook_resid_post", progress=False)
    expected = detect_massive(model, ids, "blocks.*.hook_resid_post").frames()
    assert set(frames) == {"massive_layers", "massive_top"}
    pd.testing.assert_frame_equal(frames["massive_layers"], expected["massive_layers"])
    notes: list[str] = []
    two = code_series.restrict(code_series.steps[:2])
    frames = run(two, ["def f(x):\n    return x\n"], report=notes.append, progress=False)
    assert "massive_fits" not in frames
    assert any(
        n.startswith("no exp_log emergence fit: it needs 6 distinct checkpoints, this run has 2")
        for n in notes
    )
    with pytest.raises(FitError, match="unknown curve family 'cubic'; registered"):
        run(model, ids, family="cubic")


def test_non_residual_hook_is_allowed_with_a_note() -> None:
    model = _planted_model(token=7, dim=13, value=600.0)
    report = detect_massive(model, torch.randint(0, 50, (2, 6)), hooks="blocks.0.hook_mlp_out")
    assert report.notes and "not a residual-stream hook" in report.notes[0]
    with pytest.raises(MassiveError, match="need \\[batch, pos, d\\]"):
        detect_massive(model, torch.randint(0, 50, (2, 6)), hooks="blocks.0.attn.hook_q")


def test_tracking_over_zoo_checkpoints_and_results(code_series, zoo_workspace) -> None:
    texts = [
        "def f(x):\n    return x\n",
        "import os\nprint(os.path.join('a', 'b'))\n",
        "class A:\n    pass\n",
    ]
    report = track_massive(
        code_series, texts, progress=False, criteria=MassiveCriteria(top_k=5), dataset="tracking-test"
    )
    layers = report.layers
    assert sorted(layers["checkpoint"].unique()) == code_series.steps
    assert len(layers) == len(code_series.steps) * 2
    fits = fit_emergence(layers, metric="top1")
    assert set(fits["status"]) <= {"ok", "non_identifiable", "no_emergence", "failed"} and len(fits) == 2
    write_tables(zoo_workspace, ANALYSIS, report.frames(fits))
    db = zoo_workspace.results()
    assert {"massive_layers", "massive_top", "massive_fits"} <= set(db.tables())
    mine = {"model": "code-tiny", "dataset": "tracking-test"}
    assert len(db.read("massive_layers", **mine)) == len(layers)
    write_tables(zoo_workspace, ANALYSIS, report.frames(fits))
    assert len(db.read("massive_layers", **mine)) == len(layers), "re-running replaces, never duplicates"
    notes: list[str] = []
    frames = run(code_series, texts, criteria=MassiveCriteria(top_k=5), dataset="tracking-test", report=notes.append,
                 progress=False)  # fmt: skip
    for name, frame in report.frames(fits).items():  # the contract's run() gives what the parts give
        pd.testing.assert_frame_equal(frames[name], frame)
    assert notes == report.notes


def test_magnitude_map_and_ratio_figures_show_the_planted_dimension() -> None:
    from workbench.analyses.massive.figures import magnitude_map, ratio_by_layer

    model = _planted_model(token=7, dim=13, value=600.0)
    ids = torch.tensor([[7, 9, 10, 11]])
    fig = magnitude_map(model, ids)
    grid = np.asarray(fig.data[0].z)
    assert grid.shape == (3, 32) and (grid.argmax(axis=1) == 13).all()
    report = detect_massive(model, ids)
    assert len(ratio_by_layer(report.layers).data) == 1


def test_the_median_sample_is_uniform_over_every_batch_and_bounded() -> None:
    """The random-key sample keeps every value while fewer than its size have been offered (an exact median) and
    afterwards a sample of exactly that size, uniform over all batches: batches of very different sizes and ranges
    are represented in proportion to their counts (the old size/seen rule over-weighted the early ones)."""
    from workbench.analyses.massive.analysis import _keep_smallest_keys

    rng = np.random.default_rng(0)
    kept = (np.empty(0, np.float32), np.empty(0, np.float64))
    small = [np.arange(10, dtype=np.float32), np.arange(10, 30, dtype=np.float32)]
    for values in small:
        kept = _keep_smallest_keys(kept, values, rng, 100)
    assert sorted(kept[0].tolist()) == list(range(30))
    kept = (np.empty(0, np.float32), np.empty(0, np.float64))
    batches = [np.zeros(1_000, np.float32), np.ones(9_000, np.float32), np.full(90_000, 2.0, np.float32)]
    for values in batches:
        kept = _keep_smallest_keys(kept, values, rng, 5_000)
    assert kept[0].size == 5_000
    shares = [float(np.mean(kept[0] == v)) for v in (0.0, 1.0, 2.0)]
    np.testing.assert_allclose(shares, [0.01, 0.09, 0.90], atol=0.015)
