"""Probe batch jobs: job files, local and Ray backends, resume after a kill, status, errors."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from workbench.probes.jobs import (
    ProbeJobError,
    ProbeTask,
    expand_tasks,
    job_status,
    load_job,
    run_job,
    run_task,
)
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


def _descendants(pid: int) -> list:
    """Live descendant processes of ``pid`` (psutil), zombies excluded."""
    psutil = pytest.importorskip("psutil")
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [c for c in children if _alive(c)]


def _alive(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_kill_9_of_the_job_takes_its_pool_workers_down_and_resume_completes(job_workspace) -> None:
    """kill -9 of the main process only (not its group): the spawn workers and the resource tracker exit within
    seconds; a resume then commits every task exactly once."""
    path = write_job(job_workspace, checkpoints='"all"', n_sequences=8)
    tasks = expand_tasks(load_job(path, job_workspace))
    command = [sys.executable, "-m", "workbench.cli", "probe", "run", str(path), "-w", str(job_workspace.root),
               "--workers", "2"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        workers = []
        while time.time() < deadline and process.poll() is None:
            workers = [p for p in _descendants(process.pid) if "spawn_main" in " ".join(p.cmdline())]
            if len(workers) == 2:
                break
            time.sleep(0.2)
        assert len(workers) == 2, "the pool's two workers never appeared"
        while time.time() < deadline and process.poll() is None:  # workers started up: one task committed
            time.sleep(0.5)
            try:
                if (job_status(path, job_workspace)["status"] == "done").sum() >= 1:
                    break
            except Exception:  # noqa: BLE001, S112 — the database is locked while the job commits
                continue
        helpers = _descendants(process.pid)  # the workers and multiprocessing's resource tracker
        assert process.poll() is None, "the job finished before it could be killed"
        process.kill()
        process.wait(10)
        gone_by = time.time() + 5
        while time.time() < gone_by and any(_alive(p) for p in helpers):
            time.sleep(0.1)
        left = [(p.pid, " ".join(p.cmdline())[:80]) for p in helpers if _alive(p)]
        assert not left, f"still running 5 s after the job was killed: {left}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        for helper in _descendants(process.pid):
            helper.kill()
    final = run_job(path, workspace=job_workspace, progress=False)
    assert (final["status"] == "done").all() and len(final) == len(tasks)
    rows = job_workspace.results().read("probe_results")
    assert not rows.duplicated(["model", "checkpoint", "hook", "label_set", "dataset"]).any()
    code_checkpoints = len([t for t in tasks if t.model == "code-tiny"]) // 2
    assert len(rows) == code_checkpoints * 2 * 3 + 2
    status_rows = job_workspace.results().read("probe_tasks")
    assert not status_rows.duplicated(["job", "task"]).any() and len(status_rows) == len(tasks)


KEYS = ["model", "checkpoint", "label_set", "hook"]
METRICS = ["score", "control_score", "selectivity", "majority_score", "token_identity_score", "n_train", "n_test",
           "n_classes"]  # fmt: skip


def same_results(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Every metric of every (model, checkpoint, label set, hook) row agrees."""
    got, want = got.sort_values(KEYS).reset_index(drop=True), want.sort_values(KEYS).reset_index(drop=True)
    assert got[KEYS].astype(str).equals(want[KEYS].astype(str))
    np.testing.assert_allclose(got[METRICS].to_numpy(float), want[METRICS].to_numpy(float), atol=1e-6)


def serial_reference(path: Path, workspace: Workspace, threads: int) -> pd.DataFrame:
    """The job run in this process with the torch thread count the workers use: float reductions depend on the
    thread count, so only then are the results expected to be identical (not merely within a prediction flip)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_job(path, workspace=workspace, progress=False)
    finally:
        torch.set_num_threads(before)
    return workspace.results().read("probe_results")


def linked_workspace(job_workspace: Workspace, root: Path) -> Workspace:
    other = Workspace(root).ensure()
    for name in ("code-tiny", "fsm-tiny"):
        (other.models_dir / name).symlink_to(job_workspace.models_dir / name, target_is_directory=True)
    return other


def crash_on_fsm(task: ProbeTask) -> dict:
    """A worker that dies (the process exits, as when the OS kills it) on the fsm_state task."""
    if task.label_set == "fsm_state":
        os._exit(3)
    return run_task(task)


def raise_on_fsm(task: ProbeTask) -> dict:
    """A worker whose task raises on the fsm_state task."""
    if task.label_set == "fsm_state":
        raise RuntimeError("worker lost its GPU")
    return run_task(task)


def test_process_pool_gives_the_same_results_and_survives_a_crashed_worker(job_workspace, tmp_path) -> None:
    path = write_job(job_workspace, checkpoints='"last"', n_sequences=12)
    threads = max(1, (os.cpu_count() or 1) // 2)
    serial = serial_reference(path, job_workspace, threads)
    pool = linked_workspace(job_workspace, tmp_path / "pool")
    status = run_job(path, workspace=pool, workers=2, progress=False, task_runner=crash_on_fsm)
    assert dict(zip(status["label_set"], status["status"], strict=True)) == {
        "bracket_depth": "done", "inside_string": "done", "fsm_state": "failed"}, status["error"].tolist()  # fmt: skip
    assert "worker process died" in status.set_index("label_set").loc["fsm_state", "error"]
    same_results(pool.results().read("probe_results"), serial[serial["model"] == "code-tiny"])
    status = run_job(path, workspace=pool, workers=2, progress=False)
    assert (status["status"] == "done").all()
    # the re-run task ran in a two-worker pool, whose workers split the cores
    assert status.set_index("label_set").loc["fsm_state", "threads"] == threads
    same_results(pool.results().read("probe_results"), serial)


def test_ray_backend_gives_the_same_results_as_local(job_workspace, tmp_path) -> None:
    ray = pytest.importorskip("ray")
    path = write_job(job_workspace, checkpoints='"last"', n_sequences=12)
    local = serial_reference(path, job_workspace, threads=1)  # each Ray task reserves one CPU
    other = linked_workspace(job_workspace, tmp_path / "ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # one local cluster for both runs
    try:
        status = run_job(
            path, workspace=other, backend="ray", workers=2, progress=False, task_runner=raise_on_fsm
        )
        failed = status.set_index("label_set").loc["fsm_state"]
        assert failed["status"] == "failed" and failed["error"] == "RuntimeError: worker lost its GPU"
        assert (status.loc[status["status"] == "done", "threads"] == 1).all()
        status = run_job(path, workspace=other, backend="ray", workers=2, progress=False)
    finally:
        ray.shutdown()
    assert (status["status"] == "done").all()
    same_results(other.results().read("probe_results"), local)


def test_failed_task_is_reported_with_its_error(job_workspace, tmp_path) -> None:
    """A checkpoint damaged after the job was planned fails its tasks only; the CLI lists the error."""
    from workbench.cli import app

    damaged = Workspace(tmp_path / "damaged").ensure()
    (damaged.models_dir / "fsm-tiny").symlink_to(
        job_workspace.models_dir / "fsm-tiny", target_is_directory=True
    )
    source, copy = job_workspace.models_dir / "code-tiny", damaged.models_dir / "code-tiny"
    copy.mkdir()
    for item in source.iterdir():
        (copy / item.name).symlink_to(item.resolve(), target_is_directory=item.is_dir())
    (copy / "step0").unlink()
    (copy / "step0").mkdir()
    for item in (source / "step0").iterdir():
        (copy / "step0" / item.name).write_bytes(item.read_bytes()[:100] if item.suffix == ".safetensors" else
                                                 item.read_bytes())  # fmt: skip
    path = write_job(damaged, name="tiny", checkpoints="[0, 300]", n_sequences=8)
    result = CliRunner().invoke(app, ["probe", "run", str(path), "-w", str(damaged.root)])
    assert result.exit_code == 1
    assert result.output.count("failed code-tiny@0:") == 2
    status = CliRunner().invoke(app, ["probe", "status", str(path), "-w", str(damaged.root)])
    assert status.exit_code == 0
    assert len(re.findall(r"failed +code-tiny@0:\S+ +\(.*not a valid safetensors file", status.output)) == 2
    assert len(re.findall(r"done +(code-tiny@300|fsm-tiny@1000):", status.output)) == 3


def test_tables_probing_other_hooks_of_one_model_are_separate_tasks(job_workspace) -> None:
    path = job_workspace.root / "hooks.toml"
    table = '[[probe]]\nmodel = "fsm-tiny"\ncheckpoints = "last"\nlabel_sets = "fsm_state"\nhooks = "{}"\n'
    path.write_text('name = "hooks"\n[settings]\nn_sequences = 8\nseq_len = 32\nrandom_init = false\n'
                    + table.format("hook_embed") + table.format("blocks.*.hook_resid_post"))  # fmt: skip
    status = run_job(path, workspace=job_workspace, progress=False)
    assert list(status["status"]) == ["done", "done"] and status["task"].nunique() == 2
    assert list(status["hooks"]) == [1, 2]
    rows = job_workspace.results().read("probe_results")
    assert sorted(rows["hook"]) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "hook_embed"]
    again = run_job(path, workspace=job_workspace, progress=False)
    assert list(again["status"]) == ["done", "done"]
    assert list(job_workspace.results().read("probe_results")["created_at"]) == list(rows["created_at"])
    path.write_text(path.read_text() + table.format("hook_embed"))
    with pytest.raises(ProbeJobError, match=r"hooks.toml:16 \[\[probe\]\] #3 .*already in .*hooks.toml:6 "
                                            r"\[\[probe\]\] #1"):  # fmt: skip
        expand_tasks(load_job(path, job_workspace))


FSM_TABLE = '[[probe]]\nmodel = "fsm-tiny"\ncheckpoints = "last"\nhooks = "blocks.*.hook_resid_post"\nlabel_sets = ["fsm_state"]\n'
SETTING = "random_init = false"  # the last [settings] line (7); a setting added after it is on line 8


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("seq_len = 32", "seq_lenght = 32", r"demo.toml:6: unknown setting 'seq_lenght'"),
        ('"inside_string"', '"inside_strng"', r"demo.toml:12: \[\[probe\]\] #1: unknown label set .*bracket_depth"),
        ('hooks = "blocks.*', 'hookz = "blocks.*', r"demo.toml:17: .* unknown key 'hookz'"),
        ('model = "fsm-tiny"', 'colour = "red"\nmodel = "fsm-tiny"', r"demo.toml:15: \[\[probe\]\] #2: unknown key 'colour'"),
        ("n_sequences = 16", "n_sequences = 'many'", r"demo.toml:5: .*must be int"),
        ("n_sequences = 16", "n_sequences = true", r"demo.toml:5: .*must be int; got True"),
        ("n_sequences = 16", "n_sequences = 1", r"demo.toml:5: .*n_sequences.* ≥ 2"),
        ("seq_len = 32", "seq_len = 32.0", r"demo.toml:6: .*seq_len.*must be int"),
        (SETTING, "random_init = 0", r"demo.toml:7: .*must be bool"),
        (SETTING, SETTING + "\ntest_fraction = 1.5", r"demo.toml:8: setting 'test_fraction' must be strictly between 0 and 1; got 1.5"),
        (SETTING, SETTING + "\ntask = 'ordinal'", r"demo.toml:8: .*'task' must be one of classification, regression"),
        (SETTING, SETTING + "\nl2 = -1", r"demo.toml:8: .*'l2' must be a finite number ≥ 0"),
        (SETTING, SETTING + "\ncv_folds = 1", r"demo.toml:8: .*'cv_folds' must be 0 .*or ≥ 2"),
        ("[settings]\nn_sequences = 16\nseq_len = 32\n" + SETTING, "settings = 3", r"demo.toml:4: settings must be a \[settings\] table; got 3"),
        ('name = "demo"', "name = 3", r"demo.toml:2: .*needs `name"),
        ("[0, 300]", "[]", r"demo.toml:11: \[\[probe\]\] #1: checkpoints must be"),
        ("[0, 300]", "[0, true]", r"demo.toml:11: .*checkpoints must be"),
        ('hooks = "blocks.*.hook_resid_post"', "hooks = 3", r"demo.toml:17: .*hooks must be a"),
        ('["fsm_state"]', "3", r"demo.toml:18: \[\[probe\]\] #2: label_sets must be a"),
        ('["fsm_state"]', "[]", r"demo.toml:18: .*label_sets must be a non-empty list"),
        ('model = "fsm-tiny"', "model = 3", r"demo.toml:15: .*#2: needs `model"),
        ("[[probe]]", "[[probe]", r"not valid TOML.*line 9"),
        ('"blocks.*.hook_resid_post"', '"blocks.*.hook_resid_pots"', r"demo.toml:14 \[\[probe\]\] #2 \(model 'fsm-tiny'\): hooks: .*hook_resid_post"),
        ('model = "fsm-tiny"', 'model = "fsm-huge"', r"demo.toml:14 .*fsm-huge.*not a model in the workspace"),
        ("[0, 300]", "[0, 7]", r"demo.toml:9 \[\[probe\]\] #1 .*no checkpoints \[7\]"),
        (FSM_TABLE, FSM_TABLE + FSM_TABLE, r"demo.toml:19 \[\[probe\]\] #3 .*already in .*demo.toml:14 \[\[probe\]\] #2"),
    ],
)  # fmt: skip
def test_malformed_job_files_name_the_key_and_line(job_workspace, old, new, message) -> None:
    path = write_job(job_workspace)
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new, 1))
    with pytest.raises(ProbeJobError, match=message):
        expand_tasks(load_job(path, job_workspace))


def test_fsm_labels_on_a_code_model_are_refused(job_workspace) -> None:
    path = write_job(job_workspace)
    path.write_text(path.read_text().replace('["bracket_depth", "inside_string"]', '["fsm_state"]'))
    with pytest.raises(ProbeJobError, match="not a zoo model trained on TokFSM"):
        expand_tasks(load_job(path, job_workspace))
