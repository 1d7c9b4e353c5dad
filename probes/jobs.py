"""Scripted probe batch jobs: a TOML file expands to (model, checkpoint, label source) tasks run locally or on Ray.

A job file::

    name = "code-probes"                 # names the job in the results database (required)

    [settings]                           # optional; fields of probes.analysis.ProbeSettings
    n_sequences = 64
    l2 = 1e-3

    [[probe]]                            # one table per model or checkpoint series
    model = "code-tiny"                  # any model reference: a workspace model (code-tiny, code-tiny@300), a
                                         # save_pretrained dir, a dir of step<N>/ folders, ORG/NAME[@REV], minilm
    checkpoints = "all"                  # "all", "last", or a list of steps (a single model has one)
    hooks = ["hook_embed", "blocks.*.hook_resid_post"]
    label_sets = ["bracket_depth", "inside_string"]     # the zoo's label sets, or (and) ...

    [[probe]]
    model = "minilm"
    labels = ["sentiment.csv", "entities.jsonl"]        # any label source of workbench.labels (files, zoo:NAME,
    position = "first"                                  #   FILE.py:FN); position: last | first | mean | N
    data = "reviews.txt"                                # texts for zoo Python label sets / label functions

Relative paths (model directories, label files, data) are looked up next to the job file first, then in the
working directory. Every model is loaded through ``workbench.references`` (the one resolver). A changed label file
changes its tasks' fingerprints, so they run again.

Each finished task is committed at once (its rows to ``probe_results``, its status to ``probe_tasks``), so a
killed job resumes where it stopped: a task whose rows were written but not its status is re-run and its rows
replaced (fault-injection points ``probejob.results_written`` and ``probejob.status_written``). The main process
is the only writer of the results database; workers (processes of a local pool, or Ray tasks) only compute, and
a local pool's workers exit when the main process dies, kill -9 included (``PR_SET_PDEATHSIG`` on Linux, and a
watchdog thread polling the parent pid everywhere), so a resumed job never runs beside stale workers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from workbench.analysis import write_tables
from workbench.checkpoints import CheckpointError
from workbench.datasets import parse_dataset_ref
from workbench.deprecation import renamed_keys
from workbench.executor import BACKENDS, execute, task_outcome
from workbench.faults import crash_point
from workbench.hooks import HookNameError
from workbench.identity import identity_slug, is_path_identity
from workbench.labels import LabelError, label_provider, parse_label_source, parse_position
from workbench.model import ModelLoadError
from workbench.probes.analysis import (
    ANALYSIS,
    RESULTS_TABLE,
    TASKS_TABLE,
    ProbeSettingError,
    ProbeSettings,
    run,
    zoo_fsm,
)
from workbench.references import parse_model_ref, resolve_model, resolve_series
from workbench.workspace import Workspace

STATUS_TABLE = TASKS_TABLE
JOB_KEYS = {"name", "workspace", "settings", "probe"}
PROBE_KEYS = {"model", "checkpoints", "hooks", "label_sets", "labels", "data", "position"}
DEFAULT_HOOKS = ["hook_embed", "blocks.*.hook_resid_post"]


class ProbeJobError(ValueError):
    """A job file that cannot be run: the message names the key (and line) to fix."""


@dataclass(frozen=True)
class ProbeTask:
    """One unit of work: probe every hook of one checkpoint for one label source.

    ``location`` with ``source`` and ``checkpoint`` is a model reference (:meth:`model_ref`); ``labels`` is the
    label source's resolved reference ("" for a zoo label set named by ``label_set``), ``digest`` the hash of its
    file's bytes."""

    job: str
    model: str
    source: str  # "series" | "model" | "hub"
    location: str
    checkpoint: int | None
    label_set: str
    hooks: tuple[str, ...]
    settings: dict[str, Any]
    table: str = ""  # where the task comes from: "job.toml:12 [[probe]] #2"
    labels: str = ""
    data: str | None = None
    position: str | int | None = None
    digest: str = ""

    @property
    def model_ref(self) -> str:
        """The reference ``workbench.references.resolve_model`` loads this task's checkpoint from."""
        if self.source == "series":
            return f"{self.location}@{self.checkpoint}"
        if self.source == "hub":
            return f"{self.location}@step{self.checkpoint}"
        return self.location

    def _label_parts(self) -> list[Any]:
        """What identifies a non-zoo label source (nothing for a plain zoo label set, so their ids stay put)."""
        return (
            [self.labels, self.data, self.position]
            if self.labels or self.data or self.position is not None
            else []
        )

    @property
    def task_id(self) -> str:
        """``model@step:label_set#hash``; the hash covers the checkpoint location, the resolved hooks and the label
        source, so two [[probe]] tables probing other hooks (or another directory of the same name) never share
        an id."""
        step = "final" if self.checkpoint is None else self.checkpoint
        payload = [self.location, list(self.hooks), *self._label_parts()]
        what = hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:8]
        model = identity_slug(self.model) if is_path_identity(self.model) else self.model
        return f"{model}@{step}:{self.label_set}#{what}"

    @property
    def fingerprint(self) -> str:
        """Changes when anything that shapes the result changes (hooks, settings, the label file's bytes), forcing
        a re-run."""
        extra = [*self._label_parts(), self.digest] if self._label_parts() else []
        payload = json.dumps([list(self.hooks), self.settings, self.location, *extra], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class ProbeJob:
    name: str
    path: Path
    workspace: Workspace
    settings: ProbeSettings
    entries: list[dict[str, Any]]  # each [[probe]] table, checked, with "_where" ("job.toml:12 [[probe]] #2")


class _Lines:
    """Line numbers of keys in a TOML text, by table: top level, [settings], and the n-th [[probe]]."""

    HEADER = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.\-\"']+)\s*\]\]?")

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()
        self.sections: dict[str, list[int]] = {}  # table name -> header line numbers (1-based)
        for number, line in enumerate(self.lines, start=1):
            match = self.HEADER.match(line)
            if match:
                self.sections.setdefault(match.group(1).strip("\"'"), []).append(number)

    def _span(self, section: str | None, index: int) -> tuple[int, int]:
        """(first, last) line of the table's body; the top level runs up to the first header."""
        headers = sorted(n for numbers in self.sections.values() for n in numbers)
        if section is None:
            return 1, (headers[0] - 1 if headers else len(self.lines))
        starts = self.sections.get(section, [])
        if index >= len(starts):
            return 0, -1
        begin = starts[index]
        end = next((n - 1 for n in headers if n > begin), len(self.lines))
        return begin, end

    def line(self, key: str | None, section: str | None = None, index: int = 0) -> int | None:
        """The line of ``key`` in the table (or of the table's header when ``key`` is None or not found there;
        None for a key missing from the top level)."""
        begin, end = self._span(section, index)
        if key is not None:
            pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
            for number in range(max(begin, 1), end + 1):
                if pattern.match(self.lines[number - 1]):
                    return number
        return begin if section is not None and begin else None

    def where(self, key: str | None, section: str | None = None, index: int = 0) -> str:
        line = self.line(key, section, index)
        return f"{self.path}:{line}" if line else str(self.path)


def load_job(path: str | Path, workspace: str | Path | Workspace | None = None) -> ProbeJob:
    """Parse and check a job file (keys, types, settings values); errors name the key and the line."""
    path = Path(path)
    if not path.is_file():
        raise ProbeJobError(f"job file {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        encoding = " (it looks like UTF-16)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise ProbeJobError(
            f"{path} is not UTF-8{encoding} (byte {err.start}); TOML files must be UTF-8: re-save it as UTF-8, e.g. "
            f"`iconv -f utf-16 -t utf-8 {path} > {path.stem}.utf8.toml`"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ProbeJobError(f"{path}: not valid TOML: {err}") from None
    lines = _Lines(path, text)
    for key in data:
        if key not in JOB_KEYS:
            raise ProbeJobError(f"{lines.where(key)}: unknown key {key!r}; valid keys: {sorted(JOB_KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ProbeJobError(
            f'{lines.where("name")}: the job needs `name = "..."` (a string naming it in the results database)'
        )
    settings = _load_settings(data.get("settings", {}), lines)
    entries = data.get("probe")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ProbeJobError(
            f"{lines.where('probe')}: the job needs [[probe]] tables, each with model, hooks and label_sets"
        )
    checked = [_check_entry(entry, index, lines) for index, entry in enumerate(entries)]
    if workspace is None and isinstance(data.get("workspace"), str):
        workspace = (path.parent / data["workspace"]).resolve()
    return ProbeJob(name.strip(), path, Workspace(workspace), settings, checked)


def _load_settings(table: Any, lines: _Lines) -> ProbeSettings:
    if not isinstance(table, dict):
        raise ProbeJobError(f"{lines.where('settings')}: settings must be a [settings] table; got {table!r}")
    table = renamed_keys(
        table, {"seq_len": "context_length"}, f"{lines.where('seq_len', 'settings')} [settings]"
    )
    valid = {item.name for item in dataclasses.fields(ProbeSettings)}
    for key in table:
        if key not in valid:
            raise ProbeJobError(
                f"{lines.where(key, 'settings')}: unknown setting {key!r}; valid settings: {sorted(valid)}"
            )
    try:
        return ProbeSettings(**table)
    except ProbeSettingError as err:
        raise ProbeJobError(f"{lines.where(err.key, 'settings')}: {err}") from None


def _check_entry(entry: dict[str, Any], index: int, lines: _Lines) -> dict[str, Any]:
    """One [[probe]] table with defaults filled in and strings promoted to lists; wrong keys or types raise."""
    table = f"[[probe]] #{index + 1}"

    def fail(key: str | None, message: str) -> ProbeJobError:
        return ProbeJobError(f"{lines.where(key, 'probe', index)}: {table}: {message}")

    for key in entry:
        if key not in PROBE_KEYS:
            raise fail(key, f"unknown key {key!r}; valid: {sorted(PROBE_KEYS)}")
    if not isinstance(entry.get("model"), str) or not entry["model"].strip():
        raise fail("model", 'needs `model = "..."` (a zoo model, checkpoint-series dir, model dir or hub id)')
    entry = {**entry, "_where": f"{lines.where(None, 'probe', index)} {table} (model {entry['model']!r})"}
    lists: list[tuple[str, list[str] | None]] = [("hooks", DEFAULT_HOOKS)]
    lists += [("label_sets", None)] if "labels" not in entry or "label_sets" in entry else []
    lists += [("labels", None)] if "labels" in entry else []
    for key, default in lists:
        value = entry.get(key, default)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise fail(key, f"{key} must be a non-empty list of strings (or one string); got {value!r}")
        entry[key] = value
    zoo_sets = label_provider("zoo").names if entry.get("label_sets") else ()
    for label_set in entry.get("label_sets", []):
        if label_set not in zoo_sets:
            raise fail("label_sets", f"unknown label set {label_set!r}; valid: {', '.join(zoo_sets)}")
    base = lines.path.parent
    entry["_labels"] = []
    for reference in entry.get("labels", []):
        try:
            entry["_labels"].append(parse_label_source(reference, base=base))
        except LabelError as err:
            raise fail("labels", str(err)) from None
    for key in ("data", "position"):
        if key in entry and (not isinstance(entry[key], (str, int)) or isinstance(entry[key], bool)):
            raise fail(
                key, f"{key} must be a string{' or an int' if key == 'position' else ''}; got {entry[key]!r}"
            )
    if "data" in entry:
        entry["data"] = _relative(entry["data"], base)
        try:
            parse_dataset_ref(entry["data"])
        except ValueError as err:
            raise fail("data", str(err)) from None
    if "position" in entry:
        try:
            entry["position"] = parse_position(entry["position"])
        except LabelError as err:
            raise fail("position", str(err)) from None
        if not any(s.kind in ("sequence", "function") for s in entry["_labels"]):
            raise fail(
                "position",
                "position applies to per-sequence labels (labels = a text,label file or a "
                "label function); drop it here",
            )
    checkpoints = entry.setdefault("checkpoints", "all")
    steps_ok = (
        isinstance(checkpoints, list)
        and checkpoints
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in checkpoints)
    )
    if checkpoints not in ("all", "last") and not steps_ok:
        raise fail(
            "checkpoints",
            f'checkpoints must be "all", "last" or a non-empty list of steps (ints ≥ 0); got {checkpoints!r}',
        )
    return entry


def _relative(reference: str, base: Path) -> str:
    """``reference`` with its path part looked up next to the job file first (``base``), then as given."""
    if reference.startswith(("zoo:", "tl:", "py:")) or Path(reference).is_absolute():
        return reference
    parts = reference.split(":")
    for cut in range(len(parts), 0, -1):
        head = ":".join(parts[:cut])
        for stem in (head.rsplit("@", 1)[0], head):
            if (base / stem).exists():
                return str((base / head).resolve(strict=False)) + "".join(f":{p}" for p in parts[cut:])
    return reference


def expand_tasks(job: ProbeJob) -> list[ProbeTask]:
    """Resolve every [[probe]] table to its checkpoints (through ``workbench.references``, the one resolver) and
    check hooks and label sources against the model.

    Two tables giving the same task (model directory, checkpoint, label source and hooks) are refused."""
    tasks: dict[str, ProbeTask] = {}
    for entry in job.entries:
        name, where = entry["model"], entry["_where"]
        try:
            ref = parse_model_ref(_relative(name, job.path.parent), job.workspace.root)
            if ref.kind == "series" or (
                ref.kind == "hub" and (ref.at is None or re.fullmatch(r"(step)?\d+", ref.at))
            ):
                series = resolve_series(ref.text, workspace=job.workspace.root)
                source = "hub" if ref.kind == "hub" else "series"
                location = (
                    str(ref.location)
                    if source == "hub"
                    else str(Path(series.location(series.steps[0])).parent)
                )
                steps: list[int | None] = list(_pick_steps(series.steps, entry["checkpoints"], where))
            else:  # one model: a save_pretrained directory, minilm, tl:NAME, ORG/NAME@REVISION
                location = str(Path(ref.location).resolve()) if ref.kind == "directory" else ref.text
                source, steps = "model", [None]
                if entry["checkpoints"] not in ("all", "last"):
                    raise ProbeJobError(
                        f"{where}: {name!r} is a single model, so checkpoints "
                        f"{entry['checkpoints']} do not apply; drop the checkpoints key"
                    )
        except (CheckpointError, ModelLoadError) as err:
            raise ProbeJobError(f"{where}: {err}") from None
        probe_model_name = series.name if source == "series" else ref.name  # the model's identity
        hooks = _check_hooks_and_labels(
            ProbeTask(job.name, name, source, location, steps[-1], "", (), {}), entry
        )
        settings = job.settings.to_dict()
        data, position = entry.get("data"), entry.get("position")
        plain = [(label_set, "", None, "") for label_set in entry.get("label_sets", [])]
        sources = []
        for label_source in entry["_labels"]:
            at = position if label_source.kind in ("sequence", "function") else None
            sources.append((label_source.label_set(at), label_source.reference, at, label_source.digest))
        for step in steps:
            for label_set, labels, at, digest in plain + sources:
                task = ProbeTask(
                    job.name,
                    probe_model_name,
                    source,
                    location,
                    step,
                    label_set,
                    hooks,
                    settings,
                    where,
                    labels=labels,
                    data=data,
                    position=at,
                    digest=digest,
                )
                if task.task_id in tasks:
                    raise ProbeJobError(
                        f"{where}: task {task.task_id} (hooks {', '.join(hooks)}) is already in "
                        f"{tasks[task.task_id].table}; remove the duplicate checkpoint, label set or table"
                    )
                tasks[task.task_id] = task
    return list(tasks.values())


def _pick_steps(steps: list[int], wanted: Any, where: str) -> list[int]:
    if wanted == "all":
        return list(steps)
    if wanted == "last":
        return [steps[-1]]
    missing = sorted(set(wanted) - set(steps))
    if missing:
        raise ProbeJobError(f"{where}: no checkpoints {missing}; available: {steps}")
    return sorted(set(wanted))


def _check_hooks_and_labels(task: ProbeTask, entry: dict) -> tuple:
    """The hooks of ``entry`` resolved on the task's model; label sources the model cannot use are refused."""
    where = entry["_where"]
    model = _load(task)
    try:
        hooks = tuple(model.resolve(entry["hooks"]))
    except HookNameError as err:
        raise ProbeJobError(f"{where}: hooks: {err}") from None
    sources = [
        *(parse_label_source(f"zoo:{name}") for name in entry.get("label_sets", [])),
        *entry["_labels"],
    ]
    for source in sources:
        label_set = source.set_name or source.text
        if source.needs_fsm:
            if str(entry.get("data", "")).startswith("zoo:tokfsm"):
                continue
            try:
                zoo_fsm(task.location)
            except ValueError as err:
                raise ProbeJobError(f"{where}: label set {label_set!r}: {err}") from None
        elif model.tokenizer is None:
            raise ProbeJobError(f"{where}: label set {label_set!r} needs a tokenizer; the model has none")
    return hooks


def _load(task: ProbeTask):
    """The task's checkpoint, through the one resolver (``workbench.references.resolve_model``)."""
    model = resolve_model(task.model_ref)
    model.cfg.checkpoint = task.checkpoint
    return model


def run_task(task: ProbeTask) -> dict[str, Any]:
    """Compute one task (in whichever process runs it): {"status", "rows" (records), "error", "seconds",
    "threads" (torch threads it ran with)}."""
    start = time.perf_counter()
    try:
        model = _load(task)
        model.cfg.name = task.model
        frames = run(
            model,
            task.data,
            labels=task.labels or f"zoo:{task.label_set}",
            hooks=list(task.hooks),
            position=task.position,
            settings=ProbeSettings(**task.settings),
            location=task.location,
        )
        rows = frames[RESULTS_TABLE]
        result = task_outcome("done", start, rows=rows.to_dict("records"))
    except Exception as err:  # noqa: BLE001 — a failed task is reported in the status table, not raised
        result = task_outcome("failed", start, error=err)
    return {**result, "threads": torch.get_num_threads()}


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
        rows.append(
            {
                "task": task.task_id,
                "model": task.model,
                "checkpoint": task.checkpoint,
                "label_set": task.label_set,
                "hooks": len(task.hooks),
                "status": status,
                "error": None if row is None or stale else row.error,
                "seconds": None if row is None else row.seconds,
                "threads": None if row is None else getattr(row, "threads", None),
            }
        )
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
    task_runner: Callable[[ProbeTask], dict[str, Any]] = run_task,
) -> pd.DataFrame:
    """Run the job's pending tasks (all tasks with ``resume=False``); returns :func:`job_status` afterwards.

    ``backend="local"`` uses a process pool of ``workers`` (``workers=1`` runs in this process);
    ``backend="ray"`` submits one Ray task per probe task to the cluster at ``address`` (default: start a local
    one with ``workers`` CPUs). Results are committed as each task finishes. A task whose worker dies (the pool
    breaks, or the Ray task raises) is marked failed with the error and the other tasks still run.
    ``task_runner`` computes one task (default :func:`run_task`; a module-level function, so that it pickles).
    """
    if backend not in BACKENDS:
        raise ProbeJobError(f"backend={backend!r} is not known; use one of {BACKENDS}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ProbeJobError(f"workers={workers!r} must be an int ≥ 1")
    job = load_job(path, workspace)
    tasks = expand_tasks(job)
    if resume:
        status = job_status(path, job.workspace)
        done = set(status.loc[status["status"] == "done", "task"])
        tasks = [task for task in tasks if task.task_id not in done]
    bar = tqdm(total=len(tasks), desc=f"probe job {job.name}", unit="task", disable=not progress)
    failed = 0
    for task, result in execute(tasks, backend, workers, address, task_runner):
        _commit(job.workspace, task, result)
        failed += result["status"] == "failed"
        bar.set_postfix(failed=failed)
        bar.update()
    bar.close()
    return job_status(path, job.workspace)


def _commit(workspace: Workspace, task: ProbeTask, outcome: dict[str, Any]) -> None:
    """Store the task's rows, then its status, each through the one results writer (its own transaction)."""
    if outcome["rows"]:
        rows = pd.DataFrame(outcome["rows"]).assign(job=task.job)
        write_tables(workspace, ANALYSIS, {RESULTS_TABLE: rows})
    crash_point("probejob.results_written")
    status = pd.DataFrame(
        [
            {
                "job": task.job,
                "task": task.task_id,
                "model": task.model,
                "checkpoint": task.checkpoint,
                "label_set": task.label_set,
                "status": outcome["status"],
                "error": outcome["error"],
                "seconds": float(outcome["seconds"]),
                "fingerprint": task.fingerprint,
                "threads": outcome.get("threads"),
                "finished_at": datetime.now(UTC).replace(tzinfo=None),
            }
        ]
    )
    write_tables(workspace, ANALYSIS, {STATUS_TABLE: status})
    crash_point("probejob.status_written")
