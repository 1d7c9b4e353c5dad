"""Training dynamics: fits on planted curves (identifiability, bootstrap coverage), the one-capture metrics against
independent computations on a zoo series, crash-safe resume through the CLI, the hub cache, the sweep, the view."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from workbench.analyses.dynamics.analysis import (
    ANALYSIS,
    DynamicsError,
    DynamicsSettings,
    checkpoint_metrics,
    describe_order,
    run,
    run_dir,
    track_dynamics,
)
from workbench.analyses.dynamics.emergence import FAMILIES, bootstrap_fit, derived_quantities, fit_curve
from workbench.analyses.dynamics.figures import metric_curves, order_chart, sink_vs_massive
from workbench.analyses.dynamics.sweep import SweepError, describe_sweep, load_sweep, run_sweep
from workbench.attention.kernel import kernel_available
from workbench.datasets import load_dataset
from workbench.workspace import Workspace

PYTHIA_LIKE = np.array([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, *range(1000, 10001, 1000)], dtype=float)
PLANTED = [5.0, 1e-4, 0.05, 1.0, 1.0]  # A, lambda, gamma, t0, K: rise to a peak near step 2000, then decay
STEPS = [0, 4, 16, 64, 128, 300]  # six code-tiny checkpoints: the fewest a five-parameter fit accepts
CLI_STEPS = [0, 4, 64, 300]  # enough for the three-parameter log curve
SETTINGS = DynamicsSettings(context_length=32, max_sequences=6, batch_size=6)
TEXTS = "\n".join(
    [
        "def add(a, b):",
        "    return a + b",
        "import os",
        "print(os.path.join('a', 'b'))",
        "class A:",
        "    pass",
    ]
    * 2
)


# ---------------------------------------------------------------------------------------------- fits
def test_bootstrap_intervals_over_prompts_cover_the_planted_curve() -> None:
    truth = dict(zip(FAMILIES["exp_log"].params, PLANTED, strict=True))
    clean = FAMILIES["exp_log"].fn(PYTHIA_LIKE, *PLANTED)
    planted_fit = fit_curve(PYTHIA_LIKE, clean)
    true_emergence = derived_quantities(planted_fit, PYTHIA_LIKE.max())["emergence_step"]
    rng = np.random.default_rng(0)
    hits: dict[str, list[bool]] = {"A": [], "gamma": [], "K": [], "emergence_step": [], "peak_value": []}
    true_peak = float(clean.max())
    for trial in range(20):
        prompts = clean + rng.normal(0, 1.5, (12, len(PYTHIA_LIKE)))  # 12 prompts; noise 0.43 on their mean
        fit = bootstrap_fit(PYTHIA_LIKE, samples=prompts, n_boot=25, level=0.9, seed=trial)
        assert fit.status in ("ok", "non_identifiable")
        for name in hits:
            low, high = fit.intervals[name]
            value = {"emergence_step": true_emergence, "peak_value": true_peak}.get(name) or truth[name]
            hits[name].append(low <= value <= high)
    coverage = {name: float(np.mean(h)) for name, h in hits.items()}
    # nominal 90 %; over 20 trials a true 90 % reaches >= 0.7 with probability 0.99
    assert all(c >= 0.7 for c in coverage.values()), coverage


def test_planted_curve_is_identifiable_with_errors_that_match_the_scatter() -> None:
    rng = np.random.default_rng(1)
    clean = FAMILIES["exp_log"].fn(PYTHIA_LIKE, *PLANTED)
    estimates, errors = [], []
    for _ in range(20):
        fit = fit_curve(PYTHIA_LIKE, clean + rng.normal(0, 0.05, len(clean)))
        assert fit.status == "ok", fit.message
        assert fit.params["A"] > 0 and fit.direction == 1 and fit.condition_number < 1e6
        estimates.append(fit.params["A"])
        errors.append(fit.stderr["A"])
    # the delta-method error of A is the spread of A over noise draws (within a factor 2), not 1e-11
    assert 0.5 < np.mean(errors) / np.std(estimates) < 2.0


def test_a_linearised_log_term_is_reported_non_identifiable_not_ok() -> None:
    """The demo's degenerate case: a metric rising linearly over the steps (A·γ determined, A and γ not)."""
    steps = np.array([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600], dtype=float)
    rng = np.random.default_rng(2)
    values = 0.25 + 0.007 * steps + rng.normal(0, 0.02, len(steps))
    fit = bootstrap_fit(steps, values, n_boot=30)
    assert fit.status == "non_identifiable"
    assert "gamma at its lower bound" in fit.message and "A·γ is determined" in fit.message
    assert fit.params["A"] > 0, "positive amplitude: the paper's regime, not A = -4361"
    low, high = fit.intervals["final_value"]
    assert low < values[-1] < high + 0.1, "the curve itself is still well determined"


def test_a_falling_metric_is_fitted_as_its_mirror() -> None:
    clean = 3.0 - FAMILIES["exp_log"].fn(PYTHIA_LIKE, 1.0, 0.0, 0.01, 1.0, 0.0)
    fit = fit_curve(PYTHIA_LIKE, clean + np.random.default_rng(3).normal(0, 0.01, len(clean)))
    assert fit.direction == -1 and fit.params["A"] < 0 and fit.status == "ok", fit.message
    assert fit.params["gamma"] == pytest.approx(0.01, rel=0.1)
    assert fit.params["K"] == pytest.approx(3.0, abs=0.05)


# ---------------------------------------------------------------------------------------------- tracking
@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dyn-data") / "code.txt"
    path.write_text(TEXTS + "\n")
    return path


@pytest.fixture(scope="module")
def tracked(zoo_workspace, text_file, tmp_path_factory):
    from workbench.references import resolve_series

    workspace = tmp_path_factory.mktemp("dyn-ws")
    series = resolve_series(str(zoo_workspace.model_dir("code-tiny")))
    result = track_dynamics(series, load_dataset(str(text_file)), settings=SETTINGS, workspace=workspace,
                            steps=STEPS, n_boot=10, progress=False)  # fmt: skip
    return result, workspace, series


def test_one_capture_metrics_match_independent_computations(tracked, text_file) -> None:
    result, _, series = tracked
    assert result.steps == STEPS
    metrics = result.metrics
    final = metrics[metrics["checkpoint"] == 300].set_index(["metric", "layer", "head"])["value"]
    model = series.load(300)
    ids, mask = load_dataset(str(text_file)).token_tensor(model.tokenizer, context_length=32, max_rows=6)
    hf = model.model.eval()
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    real = mask.bool()
    for column in (
        0,
        1,
    ):  # embedding and block 0 output (HF's last hidden state is after the final LayerNorm)
        hidden = out.hidden_states[column].double()
        top = torch.stack([hidden[b][real[b]].abs().max() for b in range(len(ids))])
        median = torch.stack([hidden[b][real[b]].abs().median() for b in range(len(ids))])
        assert final["massive_top1", column - 1, -1] == pytest.approx(float(top.mean()), rel=1e-4)
        assert final["massive_ratio", column - 1, -1] == pytest.approx(float((top / median).mean()), rel=1e-3)
    later = real.clone()
    later[:, 0] = False
    for layer, pattern in enumerate(
        out.attentions
    ):  # eager attention probabilities [batch, head, query, key]
        p = pattern.double()
        sink = (p[..., 0] * later[:, None]).sum(-1) / later.sum(-1)[:, None]
        entropy = (-(p * p.clamp_min(1e-30).log()).sum(-1) * later[:, None]).sum(-1) / later.sum(-1)[:, None]
        for head in range(p.shape[1]):
            assert final["sink_mass", layer, head] == pytest.approx(float(sink[:, head].mean()), abs=1e-5)
            assert final["attention_entropy", layer, head] == pytest.approx(
                float(entropy[:, head].mean()), abs=1e-4
            )
    acts = []
    handle = hf.gpt_neox.layers[1].mlp.act.register_forward_hook(lambda m, i, o: acts.append(o.double()))
    with torch.no_grad():
        hf(input_ids=ids, attention_mask=mask)
    handle.remove()
    post = acts[0]
    rms = post[real].pow(2).mean().sqrt()
    small = ((post.abs() <= 0.1 * rms) & real[..., None]).sum((1, 2)) / (real.sum(1) * post.shape[-1])
    assert final["mlp_sparsity", 1, -1] == pytest.approx(float(small.mean()), abs=1e-6)
    norms = [(out.hidden_states[i].double().norm(dim=-1) * later).sum(1) / later.sum(1) for i in (0, 1)]
    assert final["resid_norm_growth", 0, -1] == pytest.approx(float((norms[1] / norms[0]).mean()), rel=1e-4)


def test_fits_order_and_figures(tracked) -> None:
    result, workspace, _ = tracked
    fits = result.fits
    n_series = (
        2 * 3 + 2 * 2 * 4 + 2 + 2
    )  # massive (embedding + 2 layers) ×2, sink/entropy per head, sparsity, norm
    assert len(fits) == n_series and fits["selected"].sum() <= n_series
    assert set(fits["status"]) <= {"ok", "non_identifiable", "no_emergence", "failed"}
    usable = fits[fits["status"].isin(["ok", "non_identifiable"])]
    assert ((usable["low_emergence_step"] <= usable["emergence_step"] + 1e-9)
            & (usable["emergence_step"] <= usable["high_emergence_step"] + 1e-9)).all()  # fmt: skip
    assert set(result.order["metric"]) == set(fits["metric"]) and list(result.order["rank"]) == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]
    steps = result.order["emergence_step"].dropna().to_numpy()
    assert (np.diff(steps) >= 0).all() and "half-way at step" in describe_order(result.order)
    undetermined = result.order[result.order["status"] != "ok"]
    assert undetermined["steady_state"].isna().all()  # no extrapolated level from a non-identifiable curve
    db = Path(workspace) / "results.duckdb"
    assert db.exists()
    stored = Workspace(workspace).results()
    assert len(stored.read("dynamics_metrics")) == len(result.metrics)
    assert len(stored.read("dynamics_fits")) == len(fits)
    assert len(metric_curves(result.metrics, fits, "massive_top1").data) >= 3
    assert len(metric_curves(result.metrics, fits, "sink_mass", head=0).data) >= 2
    assert len(order_chart(result.order).data) == 1 and len(sink_vs_massive(result.metrics).data) >= 1


def test_run_gives_the_tables_the_library_stored(tracked, text_file) -> None:
    """Equivalence across the move to analyses/dynamics/: the frames of ``run`` (what `workbench dynamics run`
    stores) are the tables ``track_dynamics`` stored (the library's write path), row for row. The rerun resumes
    from the run's checkpoint files, so only the fits are computed again."""
    _, workspace, series = tracked
    frames = run(series, load_dataset(str(text_file)), settings=SETTINGS, workspace=workspace, steps=STEPS,
                 n_boot=10, progress=False)  # fmt: skip
    assert list(frames) == ANALYSIS.table_names[:3]
    stored = Workspace(workspace).results()
    for name, frame in frames.items():
        keys = list(ANALYSIS.table(name).keys)
        rows = stored.read(name)[list(frame.columns)].sort_values(keys).reset_index(drop=True)
        expected = frame.sort_values(keys).reset_index(drop=True)
        pd.testing.assert_frame_equal(rows, expected, check_dtype=False, obj=name)


def test_a_run_with_other_settings_is_refused(tracked, text_file) -> None:
    _, workspace, series = tracked
    other = DynamicsSettings(context_length=16, max_sequences=6, batch_size=6)
    with pytest.raises(DynamicsError, match="other settings"):
        track_dynamics(series, load_dataset(str(text_file)), settings=other, workspace=workspace, steps=STEPS,
                       progress=False)  # fmt: skip


def test_one_checkpoint_records_metrics_with_a_note_and_bad_requests_fail_clearly(tracked, text_file,
                                                                                   tmp_path) -> None:  # fmt: skip
    _, _, series = tracked
    single = track_dynamics(series.restrict([300]), load_dataset(str(text_file)), settings=SETTINGS,
                            workspace=tmp_path, n_boot=5, progress=False)  # fmt: skip
    assert set(single.metrics["checkpoint"]) == {300} and set(single.fits["status"]) == {"refused"}
    assert "an emergence fit needs at least 6" in single.notes[0]
    from workbench.cli import app

    runner = CliRunner()
    workspace = str(series.location(0).parent.parent.parent)
    args = ["code-tiny", "--data", str(text_file), "--family", "cubic", "-w", workspace]
    bad = runner.invoke(app, ["dynamics", "run", *args])
    assert bad.exit_code == 2 and "unknown curve family 'cubic'; registered: exp_log" in bad.output
    assert "deprecated" not in bad.output
    # the last release's spelling `workbench dynamics SERIES ...` runs `run` after a one-line note
    old_spelling = runner.invoke(app, ["dynamics", *args])
    assert old_spelling.exit_code == 2 and "unknown curve family 'cubic'" in old_spelling.output
    note = [line for line in old_spelling.output.splitlines() if "deprecated" in line]
    assert len(note) == 1 and "use `workbench dynamics run SERIES --data DATA`" in note[0]
    missing = runner.invoke(app, ["dynamics", "sweep"])
    assert missing.exit_code == 2 and "Missing argument 'sweep_file'" in missing.output


def test_cli_run_killed_mid_series_resumes_to_the_same_result(
    tracked, zoo_workspace, text_file, tmp_path
) -> None:
    result, _, _ = tracked
    args = ["dynamics", "run", str(zoo_workspace.model_dir("code-tiny")), "--data", str(text_file),
            "--context-length", "32", "--max-sequences", "6", "--batch-size", "6", "--n-boot", "10", "--workspace",
            str(tmp_path), "--no-progress", "--family", "log", *[a for s in CLI_STEPS for a in ("--step", str(s))]]  # fmt: skip
    env = {**os.environ, "WORKBENCH_CRASH_AT": "dynamics.checkpoint_written#2"}
    killed = subprocess.run([sys.executable, "-m", "workbench.cli", *args], env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    files = run_dir(tmp_path, "code-tiny--code.txt").glob("step*.safetensors")
    assert sorted(p.name for p in files) == ["step0.safetensors", "step4.safetensors"]
    from workbench.cli import app

    resumed = CliRunner().invoke(app, args)
    assert resumed.exit_code == 0, resumed.output
    assert "emergence order" in resumed.output and "half-way at step" in resumed.output
    stored = Workspace(tmp_path).results().read("dynamics_metrics")
    keys = ["checkpoint", "metric", "layer", "head"]
    reference = result.metrics[result.metrics["checkpoint"].isin(CLI_STEPS)]
    merged = stored.merge(reference, on=keys, suffixes=("", "_ref"))
    assert len(merged) == len(reference) == len(stored)
    np.testing.assert_allclose(merged["value"], merged["value_ref"], rtol=1e-6)


def test_cli_labels_track_probe_accuracy_equal_to_a_probe_fit(zoo_workspace, tmp_path) -> None:
    """--labels adds the probes package's metric (workbench.dynamics_metrics entry point): per checkpoint and layer,
    the held-out score of the same probe fit made directly."""
    from workbench.cli import app
    from workbench.probes.analysis import ProbeSettings, labels_for_model
    from workbench.probes.analysis import run as run_probes
    from workbench.references import resolve_series

    model_dir = str(zoo_workspace.model_dir("code-tiny"))
    args = ["dynamics", "run", model_dir, "--data", "zoo:python-stdlib", "--labels", "zoo:bracket_depth",
            "--context-length", "32", "--max-sequences", "6", "--batch-size", "6", "--n-boot", "0", "--workspace",
            str(tmp_path), "--no-progress", "--step", "0", "--step", "300"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    stored = Workspace(tmp_path).results().read("dynamics_metrics")
    stored = stored[stored["metric"] == "probe_accuracy"].sort_values(["checkpoint", "layer"])
    series = resolve_series(model_dir)
    settings = ProbeSettings(random_init=False, control=False)
    labels = labels_for_model(
        "zoo:bracket_depth", series.load(0), data="zoo:python-stdlib", settings=settings
    )
    expected = [
        run_probes(series.load(step), labels=labels, settings=settings)["probe_results"]["score"].to_numpy()
        for step in (0, 300)
    ]
    np.testing.assert_allclose(stored["value"].to_numpy(), np.concatenate(expected), rtol=1e-6)
    assert stored["value"].between(0, 0.999).all() and len(stored) == 2 * series.load(0).cfg.n_layers


def test_hub_series_with_a_duplicate_branch_and_a_micro_sweep(hub_repo, zoo_workspace, tmp_path) -> None:
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(f"""
name = "micro"
data = "zoo:python-stdlib"
metrics = ["massive_top1", "resid_norm_growth"]
family = "log"
[track]
max_sequences = 4
context_length = 24
n_boot = 5
[[config]]
name = "micro-l1"
n_layers = 1
d_model = 16
d_mlp = 32
n_heads = 2
steps = 4
checkpoint_every = 4
max_files = 4
context_length = 24
batch_size = 4
[[series]]
model = "{hub_repo}"
name = "hub-code-tiny"
lr = 3e-3
""")
    result = run_sweep(sweep, tmp_path / "ws", progress=False)
    assert any("step 3 = step 2" in note for note in result.notes), result.notes
    assert set(result.fits["architecture"]) == {"micro-l1", "hub-code-tiny"}
    assert set(result.fits["layer"]) == {0, 1} and set(result.fits["metric"]) == {
        "massive_top1",
        "resid_norm_growth",
    }
    scores = result.scores
    assert set(scores["target"]) == {"A", "gamma", "K", "emergence_step", "final_value", "steady_state"}
    assert scores["claim"].str.len().gt(0).all()
    assert (scores["r2"].notna() | scores["note"].str.len().gt(0)).all()
    assert "leave-one-architecture-out" in describe_sweep(result)
    assert (tmp_path / "ws" / "models" / "micro-l1" / "step4").is_dir(), (
        "the trained model lands in the workspace"
    )
    stored = (tmp_path / "ws").joinpath("results.duckdb")
    assert stored.exists()
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[track]\nmax_seqs = 3\n')
    with pytest.raises(SweepError, match=r"\[track\] has unknown key\(s\) \['max_seqs'\]; allowed"):
        load_sweep(bad)
    bad.write_text('[[config]]\nname = "a"\nn_layer = 2\n[[config]]\nname = "b"\n')
    with pytest.raises(SweepError, match="n_layer"):
        load_sweep(bad)


def test_view_shows_order_curves_sink_scatter_and_predictions(tracked, monkeypatch) -> None:
    from streamlit.testing.v1 import AppTest

    _, workspace, _ = tracked
    predictions = pd.DataFrame({"sweep": "s", "metric": "massive_top1", "target": ["K", "K", "A", "A"],
                                "model": ["m1", "m2", "m1", "m2"], "layer": 0, "fitted": [1.0, 2.0, 0.1, 0.2],
                                "predicted": [1.1, 1.8, 0.2, 0.1]})  # fmt: skip
    scores = pd.DataFrame({"sweep": "s", "metric": "massive_top1", "target": ["K", "A"], "r2": [0.9, -0.5],
                           "n_rows": 2, "n_architectures": 2, "learnt_as": "value", "claim": "c", "note": ""})  # fmt: skip
    from workbench.analysis import write_tables

    write_tables(
        Workspace(workspace), ANALYSIS, {"dynamics_predictor": scores, "dynamics_predictions": predictions}
    )
    monkeypatch.setenv("WORKBENCH_WORKSPACE", str(workspace))
    view = Path(__file__).resolve().parents[3] / "app" / "views" / "dynamics.py"
    app = AppTest.from_file(str(view), default_timeout=60).run()
    assert not app.exception, app.exception
    assert app.title[0].value == "Training dynamics"
    assert len(app.get("plotly_chart")) >= 4  # order, metric curves, sink vs massive, predicted vs fitted
    assert len(app.dataframe) >= 2


def test_view_without_data_names_the_command(tmp_path, monkeypatch) -> None:
    from streamlit.testing.v1 import AppTest

    from workbench.cli import app as cli

    Workspace(tmp_path).results().write("unrelated", pd.DataFrame({"x": [1]}))
    monkeypatch.setenv("WORKBENCH_WORKSPACE", str(tmp_path))
    view = Path(__file__).resolve().parents[3] / "app" / "views" / "dynamics.py"
    app = AppTest.from_file(str(view), default_timeout=60).run()
    assert not app.exception and "workbench dynamics run SERIES --data DATA" in app.info[0].value
    assert CliRunner().invoke(cli, ["dynamics", "--help"]).exit_code == 0


@pytest.mark.skipif(
    not kernel_available(torch.device("cpu"))[0], reason="needs TRITON_INTERPRET=1 before import"
)
def test_kernel_statistics_give_the_same_metrics(tracked, text_file) -> None:
    _, _, series = tracked
    model = series.load(300)
    ids, mask = load_dataset(str(text_file)).token_tensor(model.tokenizer, context_length=16, max_rows=2)
    reference = checkpoint_metrics(model, ids, mask, DynamicsSettings(batch_size=2))
    model.set_attention_path("kernel")  # the fused Triton kernel (interpreted on CPU: TRITON_INTERPRET=1)
    fused = checkpoint_metrics(model, ids, mask, DynamicsSettings(batch_size=2))
    for metric in ("sink_mass", "attention_entropy", "massive_top1", "mlp_sparsity", "resid_norm_growth"):
        np.testing.assert_allclose(fused[metric], reference[metric], atol=1e-5, err_msg=metric)
