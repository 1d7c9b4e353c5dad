"""Probe batch jobs: job files, local and Ray backends, resume after a kill, status, errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from probes.jobs import ProbeJobError, expand_tasks, job_status, load_job, run_job
from workbench.workspace import Workspace

JOB = """
name = "{name}"

[settings]
n_sequences = {n_sequences}
seq_len = 32
random_init = false

[[probe]]
model = "code-tiny"
checkpoints = {checkpoints}
label_sets = ["bracket_depth", "inside_string"]

[[probe]]
model = "fsm-tiny"
checkpoints = "last"
hooks = "blocks.*.hook_resid_post"
label_sets = ["fsm_state"]
"""


@pytest.fixture()
def job_workspace(zoo_workspace, tmp_path) -> Workspace:
    """A fresh workspace whose models are the session zoo's (linked, not copied)."""
    workspace = Workspace(tmp_path / "ws").ensure()
    for name in ("code-tiny", "fsm-tiny"):
        (workspace.models_dir / name).symlink_to(zoo_workspace.model_dir(name), target_is_directory=True)
    return workspace


def write_job(workspace: Workspace, name="demo", checkpoints="[0, 300]", n_sequences=16) -> Path:
    path = workspace.root / f"{name}.toml"
    path.write_text(JOB.format(name=name, checkpoints=checkpoints, n_sequences=n_sequences))
    return path


def test_local_job_commits_every_task_and_resume_skips_done_ones(job_workspace) -> None:
    path = write_job(job_workspace, checkpoints="[0]")
    status = run_job(path, workspace=job_workspace, progress=False)
    assert list(status["status"]) == ["done"] * 3
    db = job_workspace.results()
    first = db.read("probe_results")
    assert len(first) == 2 * 3 + 2  # code-tiny: 2 label sets × 3 hooks; fsm-tiny: 2 hooks
    assert set(first["job"]) == {"demo"}
    write_job(job_workspace, checkpoints="[0, 300]")
    assert list(job_status(path, job_workspace)["status"]) == ["done", "done", "pending", "pending", "done"]
    run_job(path, workspace=job_workspace, progress=False)
    second = db.read("probe_results")
    assert len(second) == 4 * 3 + 2
    kept = second[second["checkpoint"] == 0].sort_values(["label_set", "hook"])
    assert list(kept["created_at"]) == list(first[first["checkpoint"] == 0].sort_values(["label_set", "hook"])[
        "created_at"])  # fmt: skip


def test_killed_job_resumes_without_lost_or_duplicated_results(job_workspace) -> None:
    path = write_job(job_workspace, checkpoints='"all"', n_sequences=8)
    tasks = expand_tasks(load_job(path, job_workspace))
    command = [
        sys.executable,
        "-m",
        "workbench.cli",
        "probe",
        "run",
        str(path),
        "-w",
        str(job_workspace.root),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            time.sleep(0.5)
            try:
                done = (job_status(path, job_workspace)["status"] == "done").sum()
            except Exception:  # noqa: BLE001 — the database is locked while the job commits
                continue
            if done >= 3:
                break
        assert process.poll() is None, "the job finished before it could be killed"
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait(60)
    interrupted = job_status(path, job_workspace)
    assert 3 <= (interrupted["status"] == "done").sum() < len(tasks)
    final = run_job(path, workspace=job_workspace, progress=False)
    assert (final["status"] == "done").all()
    rows = job_workspace.results().read("probe_results")
    keys = ["model", "checkpoint", "hook", "label_set", "dataset"]
    assert not rows.duplicated(keys).any()
    code_checkpoints = len([t for t in tasks if t.model == "code-tiny"]) // 2
    assert len(rows) == code_checkpoints * 2 * 3 + 2


def test_ray_backend_gives_the_same_results_as_local(job_workspace, tmp_path) -> None:
    path = write_job(job_workspace, checkpoints='"last"')
    run_job(path, workspace=job_workspace, progress=False)
    local = job_workspace.results().read("probe_results").sort_values(["model", "label_set", "hook"])
    other = Workspace(tmp_path / "ray").ensure()
    for name in ("code-tiny", "fsm-tiny"):
        (other.models_dir / name).symlink_to(job_workspace.models_dir / name, target_is_directory=True)
    status = run_job(path, workspace=other, backend="ray", workers=2, progress=False)
    assert (status["status"] == "done").all()
    remote = other.results().read("probe_results").sort_values(["model", "label_set", "hook"])
    assert list(remote["hook"]) == list(local["hook"])
    assert remote["score"].to_numpy() == pytest.approx(local["score"].to_numpy(), abs=1e-6)


def test_failed_task_is_reported_with_its_error(job_workspace) -> None:
    from workbench.cli import app

    path = write_job(job_workspace, name="tiny", checkpoints='"last"', n_sequences=1)
    result = CliRunner().invoke(app, ["probe", "run", str(path), "-w", str(job_workspace.root)])
    assert result.exit_code == 1
    assert "at least two sequences" in result.output
    status = CliRunner().invoke(app, ["probe", "status", str(path), "-w", str(job_workspace.root)])
    assert status.exit_code == 0 and "failed" in status.output and "raise n_sequences" in status.output


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.replace("seq_len = 32", "seq_lenght = 32"),
            r"demo.toml:6: unknown setting 'seq_lenght'",
        ),
        (
            lambda t: t.replace('"inside_string"', '"inside_strng"'),
            r"demo.toml:12: unknown label set .*bracket_depth",
        ),
        (lambda t: t.replace('hooks = "blocks.*', 'hookz = "blocks.*'), r"demo.toml:17: unknown key 'hookz'"),
        (lambda t: t.replace("n_sequences = 16", "n_sequences = 'many'"), r"demo.toml:5: .*must be int"),
        (lambda t: t.replace("[[probe]]", "[[probe]", 1), r"not valid TOML.*line 9"),
        (lambda t: t.replace('"blocks.*.hook_resid_post"', '"blocks.*.hook_resid_pots"'), r"hook_resid_post"),
        (lambda t: t.replace('model = "fsm-tiny"', 'model = "fsm-huge"'), r"fsm-huge.*zoo train"),
        (lambda t: t.replace("[0, 300]", "[0, 7]"), r"no checkpoints \[7\]"),
    ],
)
def test_malformed_job_files_name_the_key_and_line(job_workspace, edit, message) -> None:
    path = write_job(job_workspace)
    path.write_text(edit(path.read_text()))
    with pytest.raises(ProbeJobError, match=message):
        expand_tasks(load_job(path, job_workspace))


def test_fsm_labels_on_a_code_model_are_refused(job_workspace) -> None:
    path = write_job(job_workspace)
    path.write_text(path.read_text().replace('["bracket_depth", "inside_string"]', '["fsm_state"]'))
    with pytest.raises(ProbeJobError, match="not a zoo model trained on TokFSM"):
        expand_tasks(load_job(path, job_workspace))
