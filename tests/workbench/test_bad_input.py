"""Every command, bad input: exit 2, one line `error: …` naming the problem and the fix, no traceback, and nothing
left behind that reads as complete. Table-driven: each case is (command line, words the message must contain)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from workbench.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def bad(zoo_workspace, tmp_path_factory):
    """A workspace with code-tiny, a truncated checkpoint series, and a few bad files."""
    root = tmp_path_factory.mktemp("bad-input")
    ws = root / "ws"
    shutil.copytree(zoo_workspace.model_dir("code-tiny"), ws / "models" / "code-tiny")
    truncated = root / "truncated-run"
    shutil.copytree(zoo_workspace.model_dir("code-tiny") / "step0", truncated / "step0")
    shutil.copy(zoo_workspace.model_dir("code-tiny") / "tokenizer.json", truncated / "tokenizer.json")
    weights = truncated / "step0" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    (root / "notes.txt").write_text("def f(x):\n    return x\n", encoding="utf-8")
    (root / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (root / "empty.txt").write_text("\n")
    (root / "a-file").write_text("not a directory")
    (root / "rows.jsonl").write_text('{"body": "x"}\n')
    (root / "utf16.toml").write_bytes('[job]\nname = "x"\n'.encode("utf-16"))
    (root / "corrupt-ws").mkdir()
    (root / "corrupt-ws" / "results.duckdb").write_bytes(b"\x00garbage" * 512)
    return {"root": root, "ws": str(ws)}


CASES = [
    # (id, args with {ws} / {root} placeholders, words the one-line message contains)
    ("unknown model", ["info", "no-such-model", "-w", "{ws}"], ["not a directory", "Forms:"]),
    ("non-integer step", ["info", "code-tiny@abc", "-w", "{ws}"], ["not a checkpoint step", "@300"]),
    ("missing step", ["info", "code-tiny@999", "-w", "{ws}"], ["no checkpoint at step 999", "steps:"]),
    ("truncated checkpoint", ["info", "{root}/truncated-run@0"], ["truncated or corrupt", "re-save"]),
    ("uncached hub model", ["info", "someone/not-cached"], ["not in the hub cache", "HF_HUB_OFFLINE"]),
    ("unknown hook", ["info", "code-tiny", "-w", "{ws}", "--hooks", "blocks.0.hook_resid_psot"],
     ["closest valid names"]),
    ("capture out is a file", ["capture", "code-tiny", "-w", "{ws}", "--hooks", "blocks.0.hook_resid_post",
                               "--data", "{root}/notes.txt", "--out", "{root}/a-file"], ["is a file"]),
    ("capture non-UTF-8", ["capture", "code-tiny", "-w", "{ws}", "--hooks", "blocks.0.hook_resid_post", "--data",
                           "{root}/latin1.txt", "--out", "{root}/store-latin1"], ["not UTF-8", "iconv"]),
    ("capture empty file", ["capture", "code-tiny", "-w", "{ws}", "--hooks", "blocks.0.hook_resid_post", "--data",
                            "{root}/empty.txt", "--out", "{root}/store-empty"], ["holds no text"]),
    ("capture missing column", ["capture", "code-tiny", "-w", "{ws}", "--hooks", "blocks.0.hook_resid_post",
                                "--data", "{root}/rows.jsonl:text", "--out", "{root}/store-col"],
     ["no column 'text'", "it has body"]),
    ("capture bad dtype", ["capture", "code-tiny", "-w", "{ws}", "--hooks", "blocks.0.hook_resid_post", "--data",
                           "{root}/notes.txt", "--out", "{root}/store-dtype", "--dtype", "float64"],
     ["not one of float32"]),
    ("massive missing step", ["massive", "run", "code-tiny", "-w", "{ws}", "--step", "7"], ["no checkpoint at step(s) [7]"]),
    ("massive unknown family", ["massive", "run", "code-tiny", "-w", "{ws}", "--family", "cubic"], ["unknown curve family"]),
    ("massive missing data", ["massive", "run", "code-tiny", "-w", "{ws}", "--data", "{root}/nope.txt"],
     ["no such file or directory", "Forms:"]),
    ("attention missing step", ["attention", "run", "code-tiny", "-w", "{ws}", "--step", "7"], ["no checkpoint at step(s)"]),
    ("zoo unknown name", ["zoo", "train", "code-huge", "-w", "{ws}"], ["code-tiny"]),
    ("zoo zero steps", ["zoo", "train", "code-tiny", "-w", "{root}/zoo-zero", "--steps", "0"], ["--steps"]),
    ("neuron path encoder", ["neuron-path", "run", "minilm", "--data", "{root}/notes.txt", "-w", "{ws}"],
     ["minilm"]),
    ("probe job UTF-16", ["probe", "jobs", "run", "{root}/utf16.toml", "-w", "{ws}"], ["UTF-8"]),
    ("probe job missing", ["probe", "jobs", "status", "{root}/nope.toml", "-w", "{ws}"], ["nope.toml"]),
    ("corrupt results database", ["massive", "run", "minilm", "-w", "{root}/corrupt-ws"],
     ["results.duckdb"]),
    ("sae import not a layout", ["sae", "import", "{root}/notes.txt", "-w", "{ws}"],
     ["notes.txt", "not a file any SAE layout starts from"]),
    ("sae import unknown format", ["sae", "import", "{root}", "--format", "onnx", "-w", "{ws}"],
     ["unknown SAE format 'onnx'", "sparsify"]),
    ("sae export unknown SAE", ["sae", "export", "nope", "--out", "{root}/exported", "-w", "{ws}"],
     ["no SAE 'nope'", "sae train"]),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(bad, case) -> None:
    _, args, words = case
    args = [a.format(**bad) for a in args]
    result = runner.invoke(app, args)
    lines = [
        line for line in result.output.splitlines() if line.strip() and not line.startswith("Loading weights")
    ]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and lines, result.output
    assert lines[-1].startswith("error: "), result.output
    for word in words:
        assert word in lines[-1], (word, lines[-1])
    for path in ("store-latin1", "store-empty", "store-col", "store-dtype"):
        assert not (bad["root"] / path / "manifest.json").exists()


def test_nothing_reads_as_complete_after_refused_zoo_training(bad) -> None:
    assert not any((bad["root"] / "zoo-zero").rglob("step*"))


def test_busy_dashboard_port_is_refused_at_once(bad) -> None:
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        result = runner.invoke(app, ["dashboard", "-w", bad["ws"], "--port", str(port)])
    assert result.exit_code == 2 and "pass --port N" in result.output, result.output


def test_the_installed_command_prints_no_traceback(bad) -> None:
    """The real executable (not the test runner): a foreign error deep in a command is still one line."""
    result = subprocess.run([sys.executable, "-m", "workbench.cli", "info", "code-tiny@abc", "-w", bad["ws"]],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: '@abc'")
