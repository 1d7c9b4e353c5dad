"""The embedded zoo: real learning, Pythia-style checkpoints, resume, reproducibility, labels, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from workbench.checkpoints import CheckpointError, CheckpointSeries
from workbench.zoo.corpora import CorpusError, TokFSM, python_source_texts
from workbench.zoo.labels import (
    LabelError,
    check_label_set,
    fsm_label_dataset,
    python_char_labels,
    python_token_labels,
)
from workbench.zoo.train import ZooError, checkpoint_steps, get_spec, read_train_log, train_zoo_model


def test_checkpoint_schedule_is_pythia_like() -> None:
    assert checkpoint_steps(1000, 250) == [0, 1, 2, 4, 8, 16, 32, 64, 128, 250, 256, 500, 512, 750, 1000]
    assert checkpoint_steps(10, 250) == [0, 1, 2, 4, 8, 10]


def test_language_models_learn_well_below_unigram_entropy(zoo_workspace) -> None:
    for name in ("code-tiny", "fsm-tiny"):
        model_dir = zoo_workspace.model_dir(name)
        meta = json.loads((model_dir / "meta.json").read_text())
        losses = [entry["loss"] for entry in read_train_log(model_dir)]
        final = float(np.mean(losses[-20:]))
        assert final < 0.75 * meta["unigram_entropy"], (name, final, meta)
        assert losses[0] > final + 1.0


def test_vit_reaches_ninety_percent_on_held_out_digits(zoo_workspace, vit_model_dir) -> None:
    from workbench.model import HookedModel
    from workbench.zoo.corpora import digits_dataset

    _, _, x_test, y_test = digits_dataset()
    model = HookedModel.from_pretrained(vit_model_dir)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
    assert accuracy >= 0.9
    assert read_train_log(zoo_workspace.model_dir("vit-digits"))[-1]["test_accuracy"] == pytest.approx(
        accuracy, abs=1e-6
    )


def test_series_loads_checkpoints_lazily_with_step_and_tokenizer(code_series) -> None:
    assert code_series.steps[:5] == [0, 1, 2, 4, 8] and code_series.steps[-1] == get_spec("code-tiny").steps
    first, last = code_series.load(0), code_series.load(code_series.steps[-1])
    assert first.cfg.checkpoint == 0 and last.cfg.name == "code-tiny"
    text = "def add(a, b):\n    return a + b\n"
    ids = last.to_tokens(text)
    assert last.to_string(ids[0]) == text
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(m(ids)[0, :-1], ids[0, 1:]).item() for m in (first, last)]
    assert losses[1] < losses[0] - 1.0
    steps_seen = [m.cfg.checkpoint for m in code_series.iter(steps=[0, 2, 4], progress=False)]
    assert steps_seen == [0, 2, 4]


def test_training_is_reproducible_and_resumes_after_interruption(tmp_path) -> None:
    full = train_zoo_model("fsm-tiny", tmp_path / "a", steps=40, progress=False)
    interrupted = train_zoo_model("fsm-tiny", tmp_path / "b", steps=40, progress=False, stop_after=20)
    assert not (interrupted / "step40").exists() and (interrupted / "step16").exists()
    resumed = train_zoo_model("fsm-tiny", tmp_path / "b", steps=40, progress=False)
    from safetensors.torch import load_file

    a, b = (
        load_file(str(full / "step40" / "model.safetensors")),
        load_file(str(resumed / "step40" / "model.safetensors")),
    )
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert read_train_log(resumed) == read_train_log(full)
    assert [e["step"] for e in read_train_log(resumed)] == list(range(1, 41))


SMALL = dict(n_layers=1, d_model=16, n_heads=2, d_mlp=32, batch_size=4, context_length=16, progress=False)


def test_same_seed_same_bytes_other_seed_other_weights_and_the_global_rng_is_left_alone(tmp_path) -> None:
    from workbench.fileio import verify_checksums

    torch.manual_seed(123)
    before = torch.get_rng_state()
    runs = [train_zoo_model("fsm-tiny", tmp_path / str(i), steps=3, seed=seed, **SMALL) for i, seed in
            enumerate((0, 0, 1))]  # fmt: skip
    assert torch.equal(torch.get_rng_state(), before)
    for step in (0, 3):
        weights = [(run / f"step{step}" / "model.safetensors").read_bytes() for run in runs]
        assert weights[0] == weights[1] != weights[2]
        sums = json.loads((runs[0] / f"step{step}" / "checksums.json").read_text())["sha256"]
        assert "model.safetensors" in sums and verify_checksums(runs[0] / f"step{step}") == []
    assert read_train_log(runs[0]) == read_train_log(runs[1])


def test_non_positive_steps_are_refused_before_anything_is_written(tmp_path) -> None:
    from workbench.cli import app

    for steps in (0, -5):
        with pytest.raises(ZooError, match=f"steps must be a whole number of at least 1, got {steps}"):
            train_zoo_model("fsm-tiny", tmp_path, steps=steps, progress=False)
        result = CliRunner().invoke(
            app, ["zoo", "train", "fsm-tiny", "--steps", str(steps), "--workspace", str(tmp_path)]
        )
        assert result.exit_code == 2 and "pass --steps N" in result.output, result.output
    with pytest.raises(ZooError, match="checkpoint_every must be .* at least 1, got 0"):
        train_zoo_model("fsm-tiny", tmp_path, steps=4, checkpoint_every=0, progress=False)
    assert not (tmp_path / "models" / "fsm-tiny").exists()


def test_a_run_killed_inside_the_old_resume_replacement_resumes(tmp_path) -> None:
    """The old writer deleted resume/ before renaming the new state in: a kill between left it only in
    .resume.tmp-PID/. That state is put back and the run resumes instead of asking for --restart."""
    import os

    reference = train_zoo_model("fsm-tiny", tmp_path / "a", steps=6, **SMALL)
    model_dir = train_zoo_model("fsm-tiny", tmp_path / "b", steps=6, stop_after=3, **SMALL)  # resume at 2
    legacy = model_dir / ".resume.tmp-4242"
    legacy.mkdir()
    os.replace(model_dir / "resume" / "optimizer.pt", legacy / "optimizer.pt")
    (model_dir / "resume").rmdir()
    train_zoo_model("fsm-tiny", tmp_path / "b", steps=6, **SMALL)
    assert not legacy.exists()
    assert read_train_log(model_dir) == read_train_log(reference)
    assert (model_dir / "step6" / "model.safetensors").read_bytes() == (
        reference / "step6" / "model.safetensors"
    ).read_bytes()


def test_resume_into_a_workspace_with_another_config_is_refused(tmp_path) -> None:
    train_zoo_model("fsm-tiny", tmp_path, steps=4, progress=False)
    with pytest.raises(ZooError, match="different config.*steps: stored 4, requested 8"):
        train_zoo_model("fsm-tiny", tmp_path, steps=8, progress=False)


def test_unknown_size_lists_valid_names() -> None:
    with pytest.raises(ZooError, match="valid names: code-tiny, code-small, code-medium"):
        get_spec("code-huge")
    result = CliRunner().invoke(
        __import__("workbench.cli", fromlist=["app"]).app, ["zoo", "train", "code-huge"]
    )
    assert result.exit_code == 2 and "valid names" in result.output


def test_empty_corpus_directory_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(CorpusError, match="no .py files under"):
        python_source_texts(tmp_path)


def test_damaged_checkpoints_are_reported_or_skipped(tmp_path, code_series) -> None:
    import shutil

    source = code_series.location(code_series.steps[-1]).parent
    copy = tmp_path / "series"
    for step in (0, 1, 2):
        shutil.copytree(source / f"step{step}", copy / f"step{step}")
    shutil.copy(source / "tokenizer.json", copy / "tokenizer.json")
    shutil.copy(source / "tokenizer_config.json", copy / "tokenizer_config.json")
    weights = copy / "step1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    series = CheckpointSeries.from_directory(copy)
    with pytest.raises(CheckpointError, match=r"step 1: .*step1/model.safetensors is truncated"):
        series.load(1)
    tolerant = CheckpointSeries.from_directory(copy, skip_damaged=True)
    assert [m.cfg.checkpoint for m in tolerant.iter(progress=False)] == [0, 2]
    assert 1 in tolerant.skipped
    with pytest.raises(CheckpointError, match="no step<N>/"):
        CheckpointSeries.from_directory(tmp_path / "series" / "step0")


def test_tokfsm_ground_truth_and_labels() -> None:
    fsm = TokFSM(n_states=100, vocab_size=20, branching=3, seed=0)
    tokens, labels = fsm_label_dataset(fsm, 8, 30, seed=1)
    states, next_states = labels["fsm_state"], labels["fsm_next_state"]
    assert torch.equal(torch.from_numpy(fsm.emission)[states], tokens)
    for row in range(8):
        for t in range(29):
            assert int(next_states[row, t]) in fsm.successors[int(states[row, t])]
            assert fsm.is_legal(int(states[row, t]), int(tokens[row, t + 1]))
    assert 0 < fsm.entropy_rate() < np.log(3) + 1e-9


def test_python_labels_follow_the_source_structure(code_series) -> None:
    source = 'def f(x, y=(1, 2)):\n    s = "a(b"\n    if x:\n        return [x]\n'
    chars = python_char_labels(source)
    at = source.index
    assert (
        chars.bracket_depth[at("1")] == 2
        and chars.bracket_depth[at("x,")] == 1
        and chars.bracket_depth[at("def")] == 0
    )
    assert (
        chars.inside_string[at("a(b")] == 1 and chars.bracket_depth[at("if x")] == 0
    )  # "(" in a string opens nothing
    assert chars.indent_level[at("return")] == 2 and chars.indent_level[at("s =")] == 1
    tokenizer = code_series.load(0).tokenizer
    ids, labels = python_token_labels([source], tokenizer, context_length=64)
    n = int((ids[0] != tokenizer.pad_token_id).sum())
    assert (labels["inside_string"][0, :n] >= 0).all() and labels["inside_string"][0, n:].eq(-1).all()
    assert labels["inside_string"][0, :n].sum() >= 1
    with pytest.raises(LabelError, match="valid: bracket_depth"):
        check_label_set("brackets")


def test_prepend_bos_starts_every_training_window_with_bos(tmp_path) -> None:
    from workbench.zoo.train import _CodeData

    spec = get_spec("code-tiny", prepend_bos=True, max_files=5)
    data = _CodeData(spec, tmp_path)
    batch = data.batch(spec, step=3)
    assert batch.shape == (spec.batch_size, spec.context_length)
    assert (batch[:, 0] == data.tokenizer.bos_token_id).all()
    plain = data.batch(get_spec("code-tiny", max_files=5), step=3)
    assert torch.equal(batch[:, 1:], plain[:, :-1])


def test_runs_written_before_a_spec_field_existed_still_resume(tmp_path) -> None:
    model_dir = train_zoo_model("fsm-tiny", tmp_path, steps=4, progress=False)
    spec_file = model_dir / "spec.json"
    stored = json.loads(spec_file.read_text())
    del stored["prepend_bos"]  # as written by an older workbench
    spec_file.write_text(json.dumps(stored))
    assert train_zoo_model("fsm-tiny", tmp_path, steps=4, progress=False) == model_dir


def test_runs_written_when_the_context_was_seq_len_still_resume(tmp_path) -> None:
    """spec.json of an older workbench names the context ``seq_len``; ``get_spec(seq_len=)`` still works for one
    release, with a DeprecationWarning."""
    model_dir = train_zoo_model("fsm-tiny", tmp_path, steps=4, context_length=32, progress=False)
    spec_file = model_dir / "spec.json"
    stored = json.loads(spec_file.read_text())
    stored["seq_len"] = stored.pop("context_length")
    spec_file.write_text(json.dumps(stored))
    assert train_zoo_model("fsm-tiny", tmp_path, steps=4, context_length=32, progress=False) == model_dir
    with pytest.warns(
        DeprecationWarning, match=r"seq_len= in get_spec\(\) is deprecated .*use context_length="
    ):
        assert get_spec("fsm-tiny", seq_len=32).context_length == 32
