"""Crash safety under kill -9: the activation store and probe jobs killed at every write boundary
(``workbench.faults.crash_point`` via ``WORKBENCH_CRASH_AT``) and at seeded random moments, then resumed, end
byte-for-byte (store files) or row-for-row (results) equal to an uninterrupted run.

Everything runs on a random-init tiny GPT-NeoX saved with its tokenizer (no zoo training). A run killed at a named
point is a process forked from the warm forkserver of tests/forked.py (the same code a ``python -c`` capture or
``workbench probe jobs run`` process runs, minus seconds of imports); the random kills are of real ``workbench capture``
processes. torch runs single-threaded everywhere so that a resumed computation is bit-identical to the reference.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import transformers as T

from tests.forked import run_forked
from workbench.fileio import temp_files
from workbench.model import HookedModel
from workbench.store import ActivationStore, capture_to_store

HOOKS = ["blocks.*.hook_resid_post", "blocks.0.hook_mlp_out"]
CAPTURE = dict(batch_size=3, context_length=24, shard_rows=40, dataset="crash-texts", progress=False)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _byte_tokenizer() -> T.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(i) if chr(i).isprintable() else f"<0x{i:02X}>": i for i in range(256)}
    vocab.update({"<pad>": 256, "<eos>": 257})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random-init 2-layer GPT-NeoX (d_model 32) with a byte tokenizer, saved as a model directory."""
    torch.manual_seed(0)
    config = T.GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                             vocab_size=260, max_position_embeddings=64)  # fmt: skip
    path = tmp_path_factory.mktemp("model") / "tiny-neox"
    T.GPTNeoXForCausalLM(config).save_pretrained(path)
    _byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory) -> Path:
    rng = random.Random(0)
    words = ["def", "return", "x", "(y)", "+", "1", "if", "else:", "[0]", "'s'", "for", "in", "range"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 8))) for _ in range(40)]
    path = tmp_path_factory.mktemp("texts") / "crash-texts.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _files(store_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store_dir.iterdir())}


@pytest.fixture(scope="module")
def reference(model_dir, texts_file, tmp_path_factory) -> dict[str, bytes]:
    """Files of an uninterrupted capture (in this process)."""
    out = tmp_path_factory.mktemp("ref") / "store"
    model = HookedModel.from_pretrained(model_dir)
    store = capture_to_store(model, texts_file.read_text().splitlines(), HOOKS, out, **CAPTURE)
    assert len(store.manifest["shards"]) >= 4
    return _files(out)


def _capture(model_dir: str, texts_file: str, out: str) -> None:
    """The capture a killed process runs."""
    model = HookedModel.from_pretrained(model_dir)
    capture_to_store(model, Path(texts_file).read_text().splitlines(), HOOKS, out, **CAPTURE)


def _killed_capture(model_dir: Path, texts_file: Path, out: Path, point: str) -> int:
    """The exit code of a capture process killed at ``point`` (-9)."""
    return run_forked(_capture, str(model_dir), str(texts_file), str(out), crash=point)


STORE_POINTS = [
    "store.first_manifest.before_rename",
    "store.shard.before_rename",
    "store.shard.after_rename#2",
    "store.manifest.before_rename#3",
    "store.manifest.after_rename#2",
]


@pytest.mark.parametrize("point", STORE_POINTS)
def test_capture_killed_at_a_write_boundary_resumes_to_identical_bytes(
    point, model_dir, texts_file, reference, tmp_path
) -> None:
    out = tmp_path / "store"
    assert _killed_capture(model_dir, texts_file, out, point) == -signal.SIGKILL
    if point.endswith("before_rename") or "before_rename#" in point:
        assert temp_files(out), "a kill before the rename leaves the temporary file"
    if point.startswith("store.first_manifest.before"):
        assert not (out / "manifest.json").exists()
    else:
        with pytest.raises(Exception, match="incomplete"):
            ActivationStore.open(out)
    model = HookedModel.from_pretrained(model_dir)
    resumed = capture_to_store(model, texts_file.read_text().splitlines(), HOOKS, out, **CAPTURE)
    assert resumed.manifest["complete"]
    assert _files(out) == reference  # shards and manifest byte for byte; no temporary or orphan file


def _capture_cli(model_dir: Path, texts_file: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "workbench.cli", *_capture_args(model_dir, texts_file, out)]


def _capture_args(model_dir: Path, texts_file: Path, out: Path) -> list[str]:
    return ["capture", str(model_dir), "--hooks", HOOKS[0], "--data", str(texts_file), "--out", str(out),
            "--batch-size", "4"]  # fmt: skip


def _resume_cli(model_dir: Path, texts_file: Path, out: Path) -> None:
    """The same ``workbench capture`` command, run in this process (typer's runner) to spare a start-up."""
    from typer.testing import CliRunner

    from workbench.cli import app

    result = CliRunner().invoke(app, _capture_args(model_dir, texts_file, out))
    assert result.exit_code == 0, result.output


def test_cli_capture_killed_at_random_moments_resumes_to_identical_bytes(
    model_dir, texts_file, tmp_path
) -> None:
    """Five seeded kill -9 trials of a real ``workbench capture``; each kill lands anywhere from start-up to the
    last write, and the resumed store equals an uninterrupted run byte for byte."""
    started = time.perf_counter()
    subprocess.run(_capture_cli(model_dir, texts_file, tmp_path / "ref"), env=ENV, check=True, capture_output=True,
                   timeout=120)  # fmt: skip
    duration = time.perf_counter() - started
    want = _files(tmp_path / "ref")
    rng = random.Random(21)
    outcomes = []
    for trial in range(5):
        out = tmp_path / f"trial{trial}"
        process = subprocess.Popen(_capture_cli(model_dir, texts_file, out), env=ENV, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(rng.uniform(0.3, duration))
        process.send_signal(signal.SIGKILL)
        killed = process.wait(30) == -signal.SIGKILL
        outcomes.append(("killed" if killed else "finished") + (" with files" if out.exists() else ""))
        _resume_cli(model_dir, texts_file, out)
        assert _files(out) == want, (trial, outcomes[-1])
    assert sum(o.startswith("killed") for o in outcomes) >= 3, outcomes


# ---------------------------------------------------------------- probe jobs

JOB = """
name = "crash"
[settings]
n_sequences = 12
context_length = 48
random_init = false
cv_folds = 0

[[probe]]
model = "{model}"
hooks = ["hook_embed", "blocks.*.hook_resid_post"]
label_sets = ["bracket_depth", "inside_string", "next_token_type"]
"""
RESULT_COLUMNS_IGNORED = ["created_at"]


def _job(model_dir: Path, root: Path) -> tuple[Path, Path]:
    from workbench.workspace import Workspace

    workspace = Workspace(root).ensure()
    path = root / "job.toml"
    path.write_text(JOB.format(model=model_dir))
    return path, workspace.root


def _rows(workspace: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    from workbench.workspace import Workspace

    db = Workspace(workspace).results()
    results = db.read("probe_results").drop(columns=RESULT_COLUMNS_IGNORED)
    status = db.read("probe_tasks")[["job", "task", "status", "fingerprint"]]
    keys = ["model", "checkpoint", "hook", "label_set", "dataset"]
    return results.sort_values(keys).reset_index(drop=True), status.sort_values("task").reset_index(drop=True)


@pytest.fixture(scope="module")
def probe_reference(model_dir, tmp_path_factory) -> tuple[pd.DataFrame, pd.DataFrame]:
    from workbench.probes.jobs import run_job

    path, workspace = _job(model_dir, tmp_path_factory.mktemp("probe-ref"))
    status = run_job(path, workspace=workspace, progress=False)
    assert (status["status"] == "done").all() and len(status) == 3
    return _rows(workspace)


def _probe_cli(path: str, workspace: str) -> None:
    """``workbench probe jobs run JOB -w WORKSPACE`` in this (forked) process; exits with the command's code."""
    from workbench.cli import app

    app(["probe", "jobs", "run", path, "-w", workspace], prog_name="workbench")


@pytest.mark.parametrize(
    "point",
    [
        "probejob.results_written#2",  # task 2's rows committed, its status not
        "probejob.status_written#1",  # task 1 fully committed, task 2 never started
        "results.write.before_commit#3",  # inside task 2's results transaction
        "results.write.before_commit#2",  # inside task 1's status transaction (its rows are in)
    ],
)
def test_probe_job_killed_at_a_commit_boundary_resumes_row_for_row(
    point, model_dir, probe_reference, tmp_path
) -> None:
    from workbench.probes.jobs import run_job

    path, workspace = _job(model_dir, tmp_path)
    assert run_forked(_probe_cli, str(path), str(workspace), crash=point) == -signal.SIGKILL
    status = run_job(path, workspace=workspace, progress=False)
    assert (status["status"] == "done").all() and len(status) == 3
    results, tasks = _rows(workspace)
    want_results, want_tasks = probe_reference
    assert not results.duplicated(["model", "checkpoint", "hook", "label_set", "dataset"]).any()
    pd.testing.assert_frame_equal(results, want_results, check_exact=True)
    pd.testing.assert_frame_equal(tasks, want_tasks)
