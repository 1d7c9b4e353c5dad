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
context_length = 32
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


def _done(workspace: Workspace, job: str) -> int:
    """How many of the job's tasks the results database holds as done (a cheap poll: no model is loaded);
    -1 while the job's transaction holds the database."""
    try:
        status = workspace.results().read("probe_tasks", job=job)
    except Exception:  # noqa: BLE001 — the database is locked while the job commits
        return -1
    return 0 if status.empty else int(status.loc[status["status"] == "done", "task"].nunique())


def _wait_until(condition, process: subprocess.Popen, seconds: float) -> None:
    """Poll ``condition()`` every 0.2 s until it holds, the process exits or ``seconds`` pass."""
    deadline = time.time() + seconds
    while time.time() < deadline and process.poll() is None and not condition():
        time.sleep(0.2)


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


def test_killed_jobs_resume_without_lost_or_duplicated_results(job_workspace) -> None:
    """One job killed twice, then resumed: (1) a serial ``workbench probe jobs run`` killed (its whole process group)
    after three tasks; (2) its resume with a two-worker pool killed by kill -9 of the main process only, after it
    committed one more task: the spawn workers and the resource tracker exit within seconds; (3) a resume in this
    process commits every remaining task, and every task's rows and status are there exactly once."""
    path = write_job(job_workspace, checkpoints='"all"', n_sequences=8)
    tasks = expand_tasks(load_job(path, job_workspace))
    command = [
        sys.executable,
        "-m",
        "workbench.cli",
        "probe",
        "jobs",
        "run",
        str(path),
        "-w",
        str(job_workspace.root),
    ]
    serial = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # fmt: skip
    try:
        _wait_until(lambda: _done(job_workspace, "demo") >= 3, serial, 240)
        assert serial.poll() is None, "the job finished before it could be killed"
        os.killpg(serial.pid, signal.SIGKILL)
    finally:
        serial.wait(60)
    first = _done(job_workspace, "demo")
    assert 3 <= first < len(tasks)
    assert (job_status(path, job_workspace)["status"] == "done").sum() == first

    pool = subprocess.Popen(
        [*command, "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        workers: list = []

        def two_workers() -> bool:
            workers[:] = [p for p in _descendants(pool.pid) if "spawn_main" in " ".join(p.cmdline())]
            return len(workers) == 2

        _wait_until(two_workers, pool, 240)
        assert len(workers) == 2, "the pool's two workers never appeared"
        _wait_until(lambda: _done(job_workspace, "demo") > first, pool, 300)  # the workers ran a task
        helpers = _descendants(pool.pid)  # the workers and multiprocessing's resource tracker
        assert pool.poll() is None, "the job finished before it could be killed"
        pool.kill()
        pool.wait(10)
        gone_by = time.time() + 5
        while time.time() < gone_by and any(_alive(p) for p in helpers):
            time.sleep(0.1)
        left = [(p.pid, " ".join(p.cmdline())[:80]) for p in helpers if _alive(p)]
        assert not left, f"still running 5 s after the job was killed: {left}"
    finally:
        if pool.poll() is None:
            pool.kill()
            pool.wait(10)
        for helper in _descendants(pool.pid):
            helper.kill()
    status = job_status(path, job_workspace)["status"]
    assert first < (status == "done").sum() < len(tasks), status.value_counts().to_dict()

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


@pytest.fixture(scope="module")
def serial_reference(zoo_workspace, tmp_path_factory):
    """``reference(threads)``: the results of the job ``write_job(checkpoints='"last"', n_sequences=12)`` run in
    this process with the torch thread count the workers use: float reductions depend on the thread count, so only
    then are the results expected to be identical (not merely within a prediction flip). Computed once per thread
    count for this module (the pool and the Ray test share it where their workers' thread counts agree)."""
    import torch

    computed: dict[int, pd.DataFrame] = {}

    def reference(threads: int) -> pd.DataFrame:
        if threads not in computed:
            workspace = Workspace(tmp_path_factory.mktemp(f"serial-{threads}")).ensure()
            for name in ("code-tiny", "fsm-tiny"):
                (workspace.models_dir / name).symlink_to(
                    zoo_workspace.model_dir(name), target_is_directory=True
                )
            path = write_job(workspace, checkpoints='"last"', n_sequences=12)
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                run_job(path, workspace=workspace, progress=False)
            finally:
                torch.set_num_threads(before)
            computed[threads] = workspace.results().read("probe_results")
        return computed[threads]

    return reference


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


def test_process_pool_gives_the_same_results_and_survives_a_crashed_worker(
    job_workspace, serial_reference, tmp_path
) -> None:
    path = write_job(job_workspace, checkpoints='"last"', n_sequences=12)
    threads = max(1, (os.cpu_count() or 1) // 2)
    serial = serial_reference(threads)
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


def test_ray_backend_gives_the_same_results_as_local(job_workspace, serial_reference, tmp_path) -> None:
    ray = pytest.importorskip("ray")
    path = write_job(job_workspace, checkpoints='"last"', n_sequences=12)
    local = serial_reference(1)  # each Ray task reserves one CPU
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
    result = CliRunner().invoke(app, ["probe", "jobs", "run", str(path), "-w", str(damaged.root)])
    assert result.exit_code == 1
    assert result.output.count("failed code-tiny@0:") == 2
    status = CliRunner().invoke(app, ["probe", "jobs", "status", str(path), "-w", str(damaged.root)])
    assert status.exit_code == 0
    assert len(re.findall(r"failed +code-tiny@0:\S+ +\(.*not a valid safetensors file", status.output)) == 2
    assert len(re.findall(r"done +(code-tiny@300|fsm-tiny@1000):", status.output)) == 3


def test_tables_probing_other_hooks_of_one_model_are_separate_tasks(job_workspace) -> None:
    path = job_workspace.root / "hooks.toml"
    table = '[[probe]]\nmodel = "fsm-tiny"\ncheckpoints = "last"\nlabel_sets = "fsm_state"\nhooks = "{}"\n'
    path.write_text('name = "hooks"\n[settings]\nn_sequences = 8\ncontext_length = 32\nrandom_init = false\n'
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


def test_a_job_file_with_the_old_seq_len_setting_still_loads_for_one_release(tmp_path) -> None:
    workspace = Workspace(tmp_path / "ws").ensure()
    path = write_job(workspace)
    path.write_text(path.read_text().replace("context_length = 32", "seq_len = 24"))
    with pytest.warns(
        DeprecationWarning, match=r"'seq_len' in .*demo.toml:6 \[settings\] is deprecated .*'context_length'"
    ):
        assert load_job(path, workspace).settings.context_length == 24
    path.write_text(path.read_text().replace("seq_len = 24", "seq_len = 24\ncontext_length = 16"))
    with pytest.raises(
        ValueError, match="gives both 'seq_len' and 'context_length'; keep 'context_length' only"
    ):
        load_job(path, workspace)


FSM_TABLE = '[[probe]]\nmodel = "fsm-tiny"\ncheckpoints = "last"\nhooks = "blocks.*.hook_resid_post"\nlabel_sets = ["fsm_state"]\n'
SETTING = "random_init = false"  # the last [settings] line (7); a setting added after it is on line 8


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("context_length = 32", "context_lenght = 32", r"demo.toml:6: unknown setting 'context_lenght'"),
        ('"inside_string"', '"inside_strng"', r"demo.toml:12: \[\[probe\]\] #1: unknown label set .*bracket_depth"),
        ('hooks = "blocks.*', 'hookz = "blocks.*', r"demo.toml:17: .* unknown key 'hookz'"),
        ('model = "fsm-tiny"', 'colour = "red"\nmodel = "fsm-tiny"', r"demo.toml:15: \[\[probe\]\] #2: unknown key 'colour'"),
        ("n_sequences = 16", "n_sequences = 'many'", r"demo.toml:5: .*must be int"),
        ("n_sequences = 16", "n_sequences = true", r"demo.toml:5: .*must be int; got True"),
        ("n_sequences = 16", "n_sequences = 1", r"demo.toml:5: .*n_sequences.* ≥ 2"),
        ("context_length = 32", "context_length = 32.0", r"demo.toml:6: .*context_length.*must be int"),
        (SETTING, "random_init = 0", r"demo.toml:7: .*must be bool"),
        (SETTING, SETTING + "\ntest_fraction = 1.5", r"demo.toml:8: setting 'test_fraction' must be strictly between 0 and 1; got 1.5"),
        (SETTING, SETTING + "\ntask = 'ordinal'", r"demo.toml:8: .*'task' must be one of classification, regression"),
        (SETTING, SETTING + "\nl2 = -1", r"demo.toml:8: .*'l2' must be a finite number ≥ 0"),
        (SETTING, SETTING + "\ncv_folds = 1", r"demo.toml:8: .*'cv_folds' must be 0 .*or ≥ 2"),
        ("[settings]\nn_sequences = 16\ncontext_length = 32\n" + SETTING, "settings = 3", r"demo.toml:4: settings must be a \[settings\] table; got 3"),
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
