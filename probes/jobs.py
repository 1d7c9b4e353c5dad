"""Scripted probe batch jobs: a TOML file expands to (model, checkpoint, label set) tasks run locally or on Ray.

A job file::

    name = "code-probes"                 # names the job in the results database (required)

    [settings]                           # optional; fields of probes.analysis.ProbeSettings
    n_sequences = 64
    l2 = 1e-3

    [[probe]]                            # one table per model or checkpoint series
    model = "code-tiny"                  # zoo model in the workspace, checkpoint-series dir, model dir, hub id
    checkpoints = "all"                  # "all", "last", or a list of steps
    hooks = ["hook_embed", "blocks.*.hook_resid_post"]
    label_sets = ["bracket_depth", "inside_string"]

Each finished task is committed at once (its rows to ``probe_results``, its status to ``probe_tasks``), so a
killed job resumes where it stopped. The main process is the only writer of the results database; workers
(processes of a local pool, or Ray tasks) only compute.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
import tomllib
import traceback
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from probes.analysis import RESULTS_TABLE, ProbeSettings
from workbench.workspace import Workspace

STATUS_TABLE = "probe_tasks"
BACKENDS = ("local", "ray")
JOB_KEYS = {"name", "workspace", "settings", "probe"}
PROBE_KEYS = {"model", "checkpoints", "hooks", "label_sets"}
DEFAULT_HOOKS = ["hook_embed", "blocks.*.hook_resid_post"]


class ProbeJobError(ValueError):
    """A job file that cannot be run: the message names the key (and line) to fix."""


@dataclass(frozen=True)
class ProbeTask:
    """One unit of work: probe every hook of one checkpoint for one label set."""

    job: str
    model: str
    source: str  # "series" | "model" | "hub"
    location: str
    checkpoint: int | None
    label_set: str
    hooks: tuple[str, ...]
    settings: dict[str, Any]

    @property
    def task_id(self) -> str:
        step = "final" if self.checkpoint is None else self.checkpoint
        return f"{self.model}@{step}:{self.label_set}"

    @property
    def fingerprint(self) -> str:
        """Changes when anything that shapes the result changes (hooks, settings), forcing a re-run."""
        payload = json.dumps([list(self.hooks), self.settings, self.location], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class ProbeJob:
    name: str
    path: Path
    workspace: Workspace
    settings: ProbeSettings
    entries: list[dict[str, Any]]


def _line_of(text: str, key: str, after: int = 0) -> int | None:
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
    for number, line in enumerate(text.splitlines(), start=1):
        if number > after and pattern.match(line):
            return number
    return None


def _where(path: Path, text: str, key: str, after: int = 0) -> str:
    line = _line_of(text, key, after)
    return f"{path}:{line}" if line else str(path)


def load_job(path: str | Path, workspace: str | Path | Workspace | None = None) -> ProbeJob:
    """Parse and check a job file; errors name the key and the line."""
    from workbench.zoo.labels import LABEL_SETS

    path = Path(path)
    if not path.is_file():
        raise ProbeJobError(f"job file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ProbeJobError(f"{path}: not valid TOML: {err}") from None
    for key in data:
        if key not in JOB_KEYS:
            raise ProbeJobError(
                f"{_where(path, text, key)}: unknown key {key!r}; valid keys: {sorted(JOB_KEYS)}"
            )
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ProbeJobError(
            f'{path}: the job needs `name = "..."` (a string naming it in the results database)'
        )
    fields = {f.name: f for f in dataclasses.fields(ProbeSettings)}
    settings_table = data.get("settings", {})
    for key, value in settings_table.items():
        if key not in fields:
            raise ProbeJobError(
                f"{_where(path, text, key)}: unknown setting {key!r}; valid settings: {sorted(fields)}"
            )
        expected = type(getattr(ProbeSettings(), key))
        if not isinstance(value, expected) and not (expected is float and isinstance(value, int)):
            raise ProbeJobError(
                f"{_where(path, text, key)}: setting {key!r} must be {expected.__name__}; got {value!r}"
            )
    settings = ProbeSettings(
        **{k: (float(v) if fields[k].type == "float" else v) for k, v in settings_table.items()}
    )
    entries = data.get("probe")
    if not isinstance(entries, list) or not entries:
        raise ProbeJobError(
            f"{path}: the job has no [[probe]] tables; add one with model, hooks and label_sets"
        )
    after = 0
    for index, entry in enumerate(entries):
        where = f"[[probe]] #{index + 1}"
        after = _line_of(text, "model", after) or after
        for key in entry:
            if key not in PROBE_KEYS:
                raise ProbeJobError(
                    f"{_where(path, text, key, after - 1)}: unknown key {key!r} in {where}; valid: {sorted(PROBE_KEYS)}"
                )
        if not isinstance(entry.get("model"), str):
            raise ProbeJobError(f'{path}: {where} needs `model = "..."`')
        label_sets = entry.get("label_sets")
        if isinstance(label_sets, str):
            label_sets = entry["label_sets"] = [label_sets]
        if not label_sets:
            raise ProbeJobError(f"{_where(path, text, 'model', after - 1)}: {where} needs label_sets = [...]")
        for label_set in label_sets:
            if label_set not in LABEL_SETS:
                raise ProbeJobError(
                    f"{_where(path, text, 'label_sets', after - 1)}: unknown label set {label_set!r}; "
                    f"valid: {', '.join(LABEL_SETS)}"
                )
        hooks = entry.setdefault("hooks", DEFAULT_HOOKS)
        if isinstance(hooks, str):
            entry["hooks"] = [hooks]
        checkpoints = entry.setdefault("checkpoints", "all")
        if not (checkpoints in ("all", "last") or (
            isinstance(checkpoints, list) and all(isinstance(s, int) for s in checkpoints)
        )):  # fmt: skip
            raise ProbeJobError(
                f'{_where(path, text, "checkpoints", after - 1)}: checkpoints must be "all", "last" or a list '
                f"of steps; got {checkpoints!r}"
            )
    if workspace is None and isinstance(data.get("workspace"), str):
        workspace = (path.parent / data["workspace"]).resolve()
    return ProbeJob(name.strip(), path, Workspace(workspace), settings, entries)


def expand_tasks(job: ProbeJob) -> list[ProbeTask]:
    """Resolve every [[probe]] table to its checkpoints and check hooks and label sets against the model."""
    from workbench.checkpoints import CheckpointError, load_series

    tasks = []
    for entry in job.entries:
        name = entry["model"]
        model_dir = Path(name)
        if (model_dir / "config.json").is_file():
            source, location, steps = "model", str(model_dir.resolve()), [None]
        else:
            try:
                series = load_series(name, workspace=job.workspace.root)
            except CheckpointError as err:
                raise ProbeJobError(f"{job.path}: model {name!r}: {err}") from None
            source = "hub" if series.revision_format else "series"
            location = name if source == "hub" else str(Path(series.location(series.steps[0])).parent)
            steps = _pick_steps(series.steps, entry["checkpoints"], name, job.path)
        probe_model_name = Path(location).name if source == "series" else name
        hooks = _check_hooks_and_labels(source, location, steps[-1], entry, job.path)
        settings = job.settings.to_dict()
        tasks += [
            ProbeTask(job.name, probe_model_name, source, location, step, label_set, hooks, settings)
            for step in steps
            for label_set in entry["label_sets"]
        ]
    return tasks


def _pick_steps(steps: list[int], wanted: Any, name: str, path: Path) -> list[int]:
    if wanted == "all":
        return list(steps)
    if wanted == "last":
        return [steps[-1]]
    missing = sorted(set(wanted) - set(steps))
    if missing:
        raise ProbeJobError(f"{path}: model {name!r} has no checkpoints {missing}; available: {steps}")
    return sorted(set(wanted))


def _check_hooks_and_labels(source: str, location: str, step: int | None, entry: dict, path: Path) -> tuple:
    from probes.analysis import zoo_fsm
    from workbench.hooks import HookNameError
    from workbench.zoo.labels import FSM_LABELS

    model = _load(source, location, step)
    try:
        hooks = tuple(model.resolve(entry["hooks"]))
    except HookNameError as err:
        raise ProbeJobError(f"{path}: model {entry['model']!r}: {err}") from None
    for label_set in entry["label_sets"]:
        if label_set in FSM_LABELS:
            try:
                zoo_fsm(location)
            except ValueError as err:
                raise ProbeJobError(
                    f"{path}: model {entry['model']!r}, label set {label_set!r}: {err}"
                ) from None
        elif model.tokenizer is None:
            raise ProbeJobError(
                f"{path}: label set {label_set!r} needs a tokenizer; {entry['model']!r} has none"
            )
    return hooks


def _load(source: str, location: str, step: int | None):
    from workbench.checkpoints import CheckpointSeries
    from workbench.model import HookedModel

    if source == "model":
        return HookedModel.from_pretrained(location)
    if source == "hub":
        return CheckpointSeries.from_hub(location, [step]).load(step)
    return CheckpointSeries.from_directory(location).load(step)


def run_task(task: ProbeTask) -> dict[str, Any]:
    """Compute one task (in whichever process runs it): {"status", "rows" (records), "error", "seconds"}."""
    from probes.analysis import label_dataset, probe_model, zoo_fsm
    from workbench.zoo.labels import FSM_LABELS

    start = time.perf_counter()
    try:
        settings = ProbeSettings(**task.settings)
        model = _load(task.source, task.location, task.checkpoint)
        model.cfg.name = task.model
        fsm = zoo_fsm(task.location) if task.label_set in FSM_LABELS else None
        dataset = label_dataset(
            task.label_set, tokenizer=model.tokenizer, fsm=fsm, n_sequences=settings.n_sequences,
            seq_len=settings.seq_len, seed=settings.seed,
        )  # fmt: skip
        rows = probe_model(model, dataset, list(task.hooks), settings)
        return {"status": "done", "rows": rows.to_dict("records"), "error": None,
                "seconds": time.perf_counter() - start}  # fmt: skip
    except Exception as err:  # noqa: BLE001 — a failed task is reported in the status table, not raised
        last = traceback.format_exception_only(err)[-1].strip()
        return {"status": "failed", "rows": [], "error": last, "seconds": time.perf_counter() - start}


def _status_rows(job: ProbeJob) -> pd.DataFrame:
    return job.workspace.results().read(STATUS_TABLE, job=job.name)


def job_status(path: str | Path, workspace: str | Path | Workspace | None = None) -> pd.DataFrame:
    """Every task of the job with its state: done, failed (with the error) or pending."""
    job = load_job(path, workspace)
    tasks = expand_tasks(job)
    recorded = _status_rows(job)
    latest = {}
    if not recorded.empty:
        for row in recorded.sort_values("finished_at").itertuples():
            latest[row.task] = row
    rows = []
    for task in tasks:
        row = latest.get(task.task_id)
        stale = row is not None and row.fingerprint != task.fingerprint
        status = "pending" if row is None or stale else row.status
        rows.append({
            "task": task.task_id, "model": task.model, "checkpoint": task.checkpoint, "label_set": task.label_set,
            "status": status, "error": None if row is None or stale else row.error,
            "seconds": None if row is None else row.seconds,
        })  # fmt: skip
    return pd.DataFrame(rows)


def run_job(
    path: str | Path,
    *,
    workspace: str | Path | Workspace | None = None,
    backend: str = "local",
    workers: int = 1,
    address: str | None = None,
    resume: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """Run the job's pending tasks (all tasks with ``resume=False``); returns :func:`job_status` afterwards.

    ``backend="local"`` uses a process pool of ``workers`` (``workers=1`` runs in this process);
    ``backend="ray"`` submits one Ray task per probe task to the cluster at ``address`` (default: start a local
    one with ``workers`` CPUs). Results are committed as each task finishes.
    """
    from tqdm.auto import tqdm

    if backend not in BACKENDS:
        raise ProbeJobError(f"backend={backend!r} is not known; use one of {BACKENDS}")
    if workers < 1:
        raise ProbeJobError(f"workers={workers} must be ≥ 1")
    job = load_job(path, workspace)
    tasks = expand_tasks(job)
    if resume:
        status = job_status(path, job.workspace)
        done = set(status.loc[status["status"] == "done", "task"])
        tasks = [task for task in tasks if task.task_id not in done]
    db = job.workspace.results()
    bar = tqdm(total=len(tasks), desc=f"probe job {job.name}", unit="task", disable=not progress)
    failed = 0
    for task, outcome in _execute(tasks, backend, workers, address):
        _commit(db, task, outcome)
        failed += outcome["status"] == "failed"
        bar.set_postfix(failed=failed)
        bar.update()
    bar.close()
    return job_status(path, job.workspace)


def _commit(db, task: ProbeTask, outcome: dict[str, Any]) -> None:
    from probes.analysis import RESULT_KEYS

    if outcome["rows"]:
        rows = pd.DataFrame(outcome["rows"]).assign(job=task.job)
        db.write(RESULTS_TABLE, rows, replace_keys=RESULT_KEYS)
    status = pd.DataFrame([{
        "job": task.job, "task": task.task_id, "model": task.model, "checkpoint": task.checkpoint,
        "label_set": task.label_set, "status": outcome["status"], "error": outcome["error"],
        "seconds": float(outcome["seconds"]), "fingerprint": task.fingerprint,
        "finished_at": datetime.now(UTC).replace(tzinfo=None),
    }])  # fmt: skip
    db.write(STATUS_TABLE, status, replace_keys=["job", "task"])


def _execute(
    tasks: list[ProbeTask], backend: str, workers: int, address: str | None
) -> Iterator[tuple[ProbeTask, dict[str, Any]]]:
    if not tasks:
        return
    if backend == "ray":
        yield from _execute_ray(tasks, workers, address)
    elif workers == 1:
        for task in tasks:
            yield task, run_task(task)
    else:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            workers, mp_context=context, initializer=_init_worker, initargs=(workers,)
        ) as pool:
            pending = {pool.submit(run_task, task): task for task in tasks}
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield pending.pop(future), future.result()


def _init_worker(workers: int) -> None:
    import os

    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def _execute_ray(
    tasks: list[ProbeTask], workers: int, address: str | None
) -> Iterator[tuple[ProbeTask, dict[str, Any]]]:
    import ray

    started = not ray.is_initialized()
    if started:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=1)(run_task)
        pending = {remote.remote(task): task for task in tasks}
        while pending:
            finished, _ = ray.wait(list(pending), num_returns=1)
            for reference in finished:
                yield pending.pop(reference), ray.get(reference)
    finally:
        if started:
            ray.shutdown()
