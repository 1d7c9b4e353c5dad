"""`workbench circuits attribute MODEL --data REF --prompts START:STOP`: one stored graph per prompt as a resumable
batch job. A real CLI process killed (SIGKILL at the job's named fault points: after a graph is written but before
its status, and inside a graph's table writes) and re-run (in process, and on a local pool of two workers) holds
exactly the graphs of an uninterrupted run — same graph ids, same node and edge rows, none duplicated — and
`circuits jobs status` reports it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from tests.circuits.attribution.test_attribution import _model, _per_layer, save_user_files
from workbench.cli import app
from workbench.workspace import Workspace

N_PROMPTS = 4
GRAPH_TABLES = ("attribution_graphs", "attribution_nodes", "attribution_edges")


@pytest.fixture(scope="module")
def user_files(tmp_path_factory) -> dict[str, Path]:
    """A user's random-init GPT-2 directory, two skip transcoders on ln2.hook_normalized and five token rows."""
    root = tmp_path_factory.mktemp("batch")
    rows = torch.randint(1, 40, (N_PROMPTS + 1, 7), generator=torch.Generator().manual_seed(0))
    save_user_files(_model("gpt2"), _per_layer("ln2.hook_normalized", skip=True), root, "my-gpt2", rows)
    return {"root": root, "model": root / "my-gpt2", "data": root / "ids.npy"}


def _command(files: dict[str, Path], workspace: Path, *extra: str) -> list[str]:
    root = files["root"]
    return ["circuits", "attribute", str(files["model"]), "--transcoders", str(root / "tc0"), "--transcoders",
            str(root / "tc1"), "--data", str(files["data"]), "--prompts", f"0:{N_PROMPTS}", "--workspace",
            str(workspace), "--no-progress", "--no-heads", "--max-feature-nodes", "20", *extra]  # fmt: skip


def _graph_rows(workspace: Path) -> dict[str, pd.DataFrame]:
    db = Workspace(workspace).results()
    frames = {}
    for table in GRAPH_TABLES:
        frame = db.read(table).drop(columns=["created_at", "workbench_version"])
        keys = [c for c in ("graph", "node", "target", "source") if c in frame]
        frames[table] = frame.sort_values(keys).reset_index(drop=True)
    return frames


def _cli(args: list[str], crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WORKBENCH_CRASH_AT": crash_at or ""}
    script = "from workbench.cli import app; app()"
    return subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=600
    )


def test_killed_batch_resumes_to_the_graphs_of_an_uninterrupted_run(user_files, tmp_path) -> None:
    runner = CliRunner()
    reference = tmp_path / "reference"
    whole = runner.invoke(app, _command(user_files, reference))
    assert whole.exit_code == 0, whole.output
    assert f"{N_PROMPTS} done" in whole.output
    expected = _graph_rows(reference)
    assert len(expected["attribution_graphs"]) == N_PROMPTS
    job = re.search(r"batch ([0-9a-f]{12}):", whole.output)
    assert job, whole.output
    # killed after the 2nd prompt's graph was written, before its status; then killed between a graph's own table
    # writes (commit 7 is the 2nd graph's node table: 1 job row, then 3 graph tables + 1 status row per prompt).
    # The second resumes on a local pool of two worker processes.
    for crash, workers in (
        ("attribution.batch.graph_written#2", "1"),
        ("results.write.before_commit#7", "2"),
    ):
        workspace = tmp_path / crash.split("#")[0]
        killed = _cli(_command(user_files, workspace), crash)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        status = runner.invoke(
            app, ["circuits", "jobs", "status", job.group(1), "--workspace", str(workspace)]
        )
        assert status.exit_code == 0, status.output
        assert "1 done" in status.output and f"{N_PROMPTS - 1} pending" in status.output, status.output
        resumed = runner.invoke(app, _command(user_files, workspace, "--workers", workers))
        assert resumed.exit_code == 0, resumed.output
        assert f"batch {job.group(1)}: {N_PROMPTS} done" in resumed.output
        found = _graph_rows(workspace)
        for table in GRAPH_TABLES:
            numeric = found[table].select_dtypes("number").columns
            pd.testing.assert_frame_equal(
                found[table].drop(columns=numeric), expected[table].drop(columns=numeric)
            )
            assert np.allclose(found[table][numeric].to_numpy(float), expected[table][numeric].to_numpy(float),
                               atol=1e-5, equal_nan=True)  # fmt: skip
        batch = Workspace(workspace).results().read("attribution_batch")
        assert len(batch) == N_PROMPTS and set(batch["graph"]) == set(expected["attribution_graphs"]["graph"])
    # a finished batch re-run computes nothing and still reports every prompt; status lists the job
    again = runner.invoke(app, _command(user_files, reference))
    assert again.exit_code == 0 and f"{N_PROMPTS} done" in again.output
    listed = runner.invoke(app, ["circuits", "jobs", "status", "--workspace", str(reference)])
    assert job.group(1) in listed.output
    assert re.search(rf"0:{N_PROMPTS}\s+{N_PROMPTS}\s+{N_PROMPTS}\s+0\s+0", listed.output), listed.output


def test_batch_bad_input_exits_2_and_writes_nothing(user_files, tmp_path) -> None:
    runner = CliRunner()
    workspace = tmp_path / "ws"
    command = _command(user_files, workspace)
    at = command.index("--prompts") + 1
    for prompts, message in (
        ("0:9", "has 5 token row(s)"),
        ("3:1", "is not a range"),
        ("a:b", "is not a range"),
    ):
        bad = runner.invoke(app, [*command[:at], prompts, *command[at + 1 :]])
        assert bad.exit_code == 2 and message in bad.output, bad.output
        errors = [line for line in bad.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and bad.output.rstrip().endswith(errors[0]), bad.output
    bad = runner.invoke(app, [*command, "--out", str(tmp_path / "out")])
    assert bad.exit_code == 2 and "--prompt-index N --out DIR" in bad.output
    bad = runner.invoke(app, ["circuits", "jobs", "status", "feedfacecafe", "--workspace", str(workspace)])
    assert bad.exit_code == 2 and "no attribution batch 'feedfacecafe'" in bad.output
    assert not (tmp_path / "out").exists()
    assert (
        not Workspace(workspace).results_path.exists()
        or "attribution_graphs" not in Workspace(workspace).results().tables()
    )
