"""Attribution graphs for many prompts: a resumable batch job on the one task executor (``workbench.executor``: in
this process, a local spawn pool, or Ray), one stored graph per prompt.

1. A job is a :class:`GraphSpec` (model, transcoders, targets and options: everything but the prompt) over token rows
   of a dataset; its id (:func:`job_id`) hashes the spec and the dataset, not the prompt range, so extending a range
   re-uses the graphs already made. ``attribution_jobs`` holds the job's spec and its latest prompt range.
2. Tasks: one per prompt, (job, prompt index, token ids). Workers only compute (:func:`run_graph_task`: the graph's
   four tables as frames, model and transcoders loaded once per worker process); the calling process is the only
   writer: it stores the graph (``store.run``'s tables, keyed by its graph id, so a re-run replaces it),
   then the task's row in ``attribution_batch`` (status, graph id, replacement and completeness scores, seconds).
3. Resume: a task whose ``attribution_batch`` row says done is skipped; one killed after its graph was written but
   before its status (fault points ``attribution.batch.graph_written`` / ``attribution.batch.status_written``) is
   re-run and its rows replaced, so a killed and re-run job holds exactly the graphs of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from workbench.analysis import Analysis, Table, write_tables
from workbench.circuits.attribution.graph import ProbeReadout
from workbench.circuits.attribution.store import ANALYSIS as GRAPH_ANALYSIS
from workbench.circuits.attribution.store import run as graph_tables
from workbench.circuits.attribution.transcoders import AttributionError
from workbench.circuits.sae.analysis import find_sae
from workbench.circuits.sae.clt_analysis import find_transcoders
from workbench.executor import BACKENDS, execute, task_outcome
from workbench.faults import crash_point
from workbench.references import resolve_model
from workbench.workspace import Workspace

JOBS_TABLE, BATCH_TABLE = "attribution_jobs", "attribution_batch"
SCORE_COLUMNS = ("replacement_score", "completeness_score")
ANALYSIS = Analysis(
    name="attribution_batches",
    command="workbench circuits attribute MODEL --transcoders ID ... --data REF --prompts START:STOP",
    tables=(
        Table(
            JOBS_TABLE,
            keys=("model", "checkpoint", "job"),
            columns=("prompts", "n_prompts", "model_ref", "transcoders", "targets", "options"),
            description="one row per batch of attribution graphs: its spec and latest prompt range",
        ),
        Table(
            BATCH_TABLE,
            keys=("model", "checkpoint", "job", "prompt_index"),
            columns=(
                "status",
                "graph",
                "error",
                "seconds",
                *SCORE_COLUMNS,
                "n_features",
                "n_nodes",
                "n_edges",
                "finished_at",
            ),
            description="one row per prompt of a batch: its graph id (attribution_graphs) and scores, or its error",
        ),
    ),
    description="batches of attribution graphs over a dataset's prompts, resumable",
)


@dataclass(frozen=True)
class GraphSpec:
    """Everything that makes a graph but the prompt; picklable, so any worker process can rebuild it.

    ``model``: a reference any process resolves (directories made absolute); ``identity`` / ``checkpoint``: the
    model's identity as the calling process resolved it; ``transcoders``: ids or directories (one cross-layer folder,
    or one per layer); ``targets``: target specs (strings) and :class:`ProbeReadout` s."""

    model: str
    identity: str
    checkpoint: int | None
    workspace: str
    transcoders: tuple[str, ...]
    targets: tuple[Any, ...] = ("logits",)
    max_feature_nodes: int = 7500
    batch_size: int = 64
    position: int = -1
    max_logits: int = 10
    logit_probability: float = 0.95
    heads: bool = True
    device: str = "cpu"
    dataset: str = ""
    context_length: int = 64

    def describe_targets(self) -> list[str]:
        """Targets as text: specs as given, a probe read-out as its label and a digest of its vector."""
        found = []
        for target in self.targets:
            if isinstance(target, ProbeReadout):
                vector = target.vector.detach().double().cpu().numpy().tobytes()
                found.append(
                    f"{target.label} @{target.hook} bias {target.bias!r} "
                    f"sha256:{hashlib.sha256(vector).hexdigest()[:12]}"
                )
            else:
                found.append(str(target))
        return found

    def options(self) -> dict[str, Any]:
        return {
            "max_feature_nodes": self.max_feature_nodes,
            "batch_size": self.batch_size,
            "position": self.position,
            "max_logits": self.max_logits,
            "logit_probability": self.logit_probability,
            "heads": self.heads,
            "dataset": self.dataset,
            "context_length": self.context_length,
        }


def job_id(spec: GraphSpec) -> str:
    """A 12-hex-digit id of the batch: model identity and checkpoint, transcoders, targets, options, dataset."""
    payload = [
        spec.identity,
        spec.checkpoint,
        list(spec.transcoders),
        spec.describe_targets(),
        spec.options(),
    ]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class GraphTask:
    """One prompt of a batch: token row ``prompt_index`` of the spec's dataset, as token ids."""

    job: str
    spec: GraphSpec
    prompt_index: int
    tokens: tuple[int, ...]


def load_transcoders(references: Sequence[str], workspace: Any, device: str = "cpu") -> tuple[list[str], Any]:
    """``references``: one cross-layer transcoder (a workspace id or a folder, ours or circuit-tracer's), one
    circuit-tracer transcoder set, or one saved SAE id / directory per layer → (ids, the transcoders as
    ``attribute`` takes them). Resolved as ``sae eval`` resolves them (``find_transcoders``)."""
    if not references:
        raise AttributionError(
            "no transcoders: pass one transcoder id per layer, or one cross-layer transcoder (id or folder)"
        )
    found = find_transcoders(references, workspace)
    if found is None:  # one plain SAE or per-layer transcoder: as_transcoders says what it lacks
        name, sae = find_sae(references[0], workspace)
        return [name], [sae.to(device)]
    if isinstance(found.transcoders, list):
        return list(found.names or [found.name]), [sae.to(device) for sae in found.transcoders]
    return [found.name], found.transcoders.to(device)


_LOADED: dict[tuple, tuple[Any, list[str], Any]] = {}  # this process's model and transcoders, by spec


def _spec_key(spec: GraphSpec) -> tuple:
    return (spec.model, spec.identity, spec.checkpoint, spec.workspace, spec.transcoders, spec.device)


def preload(spec: GraphSpec, model: Any, ids: list[str], transcoders: Any) -> None:
    """Hand this process's already loaded model and transcoders to the tasks it runs itself (``workers=1``)."""
    _LOADED.clear()
    _LOADED[_spec_key(spec)] = (model, ids, transcoders)


def _loaded(spec: GraphSpec) -> tuple[Any, list[str], Any]:
    key = _spec_key(spec)
    if key not in _LOADED:
        _LOADED.clear()  # one model per worker process at a time
        model = resolve_model(spec.model, workspace=spec.workspace, device=spec.device).eval()
        model.cfg.name, model.cfg.checkpoint = spec.identity, spec.checkpoint
        ids, transcoders = load_transcoders(spec.transcoders, spec.workspace, spec.device)
        _LOADED[key] = (model, ids, transcoders)
    return _LOADED[key]


def run_graph_task(task: GraphTask) -> dict[str, Any]:
    """Compute one prompt's graph (in whichever process runs it): the executor's outcome plus ``frames`` (the four
    graph tables), ``graph`` (its id) and its scores and counts; a failure is an outcome, not an exception."""
    start = time.perf_counter()
    spec = task.spec
    try:
        model, ids, transcoders = _loaded(spec)
        frames = graph_tables(
            model,
            torch.tensor(task.tokens, dtype=torch.long),
            transcoders=transcoders,
            transcoder_ids=ids,
            targets=list(spec.targets),
            max_feature_nodes=spec.max_feature_nodes,
            batch_size=spec.batch_size,
            position=spec.position,
            max_logits=spec.max_logits,
            logit_probability=spec.logit_probability,
            heads=spec.heads,
        )
        summary = frames["attribution_graphs"].iloc[0]
        name = str(summary["graph"])
        outcome = task_outcome("done", start)
        outcome.update(
            frames=frames,
            graph=name,
            **{c: float(summary[c]) for c in SCORE_COLUMNS},
            **{c: int(summary[c]) for c in ("n_features", "n_nodes", "n_edges")},
        )
    except Exception as err:  # noqa: BLE001 — a failed prompt is reported in the batch table, not raised
        outcome = task_outcome("failed", start, error=err)
    return {**outcome, "threads": torch.get_num_threads()}


def _commit(workspace: Workspace, task: GraphTask, outcome: dict[str, Any]) -> None:
    """Store the graph, then the task's status, each through the one results writer."""
    if outcome["status"] == "done":
        write_tables(workspace, GRAPH_ANALYSIS, outcome["frames"])
    crash_point("attribution.batch.graph_written")
    row = {
        "model": task.spec.identity,
        "checkpoint": task.spec.checkpoint,
        "job": task.job,
        "prompt_index": task.prompt_index,
        "status": outcome["status"],
        "graph": outcome.get("graph"),
        "error": outcome["error"],
        "seconds": float(outcome["seconds"]),
        **{c: outcome.get(c) for c in (*SCORE_COLUMNS, "n_features", "n_nodes", "n_edges")},
        "finished_at": datetime.now(UTC).replace(tzinfo=None),
    }
    write_tables(workspace, ANALYSIS, {BATCH_TABLE: pd.DataFrame([row])})
    crash_point("attribution.batch.status_written")


def _prompts_text(indices: Sequence[int]) -> str:
    ordered = sorted(indices)
    contiguous = ordered == list(range(ordered[0], ordered[-1] + 1)) if ordered else True
    return f"{ordered[0]}:{ordered[-1] + 1}" if ordered and contiguous else json.dumps(ordered)


def run_batch(
    spec: GraphSpec,
    rows: Mapping[int, Sequence[int]],
    *,
    backend: str = "local",
    workers: int = 1,
    address: str | None = None,
    progress: bool = True,
) -> tuple[str, pd.DataFrame]:
    """Make the graph of every prompt of ``rows`` ({prompt index: token ids}) not yet done in this job → (job id,
    :func:`batch_status` of the job's prompts). ``workers=1`` runs in this process, more on a local spawn pool
    (``backend="local"``) or as Ray tasks (``backend="ray"``, the cluster at ``address`` or a local one). Each
    graph is committed as it finishes; a prompt that fails is recorded with its error and the others still run."""
    if backend not in BACKENDS:
        raise AttributionError(f"backend {backend!r} is not known; use one of {', '.join(BACKENDS)}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise AttributionError(f"workers={workers!r} must be an int ≥ 1")
    if not rows:
        raise AttributionError("no prompts: pass a non-empty range, e.g. --prompts 0:100")
    workspace = Workspace(spec.workspace)
    job = job_id(spec)
    record = {
        "model": spec.identity,
        "checkpoint": spec.checkpoint,
        "job": job,
        "prompts": _prompts_text(list(rows)),
        "n_prompts": len(rows),
        "model_ref": spec.model,
        "transcoders": json.dumps(list(spec.transcoders)),
        "targets": json.dumps(spec.describe_targets()),
        "options": json.dumps(spec.options()),
    }
    write_tables(workspace, ANALYSIS, {JOBS_TABLE: pd.DataFrame([record])})
    done = _recorded(workspace, job)
    finished = set() if done.empty else set(done.loc[done["status"] == "done", "prompt_index"].astype(int))
    tasks = [
        GraphTask(job, spec, index, tuple(int(t) for t in tokens))
        for index, tokens in sorted(rows.items())
        if index not in finished
    ]
    bar = tqdm(
        total=len(rows),
        initial=len(rows) - len(tasks),
        desc=f"attribution graphs {job}",
        unit="graph",
        disable=not progress,
    )
    failed = 0
    for task, outcome in execute(tasks, backend, workers, address, run_graph_task):
        _commit(workspace, task, outcome)
        failed += outcome["status"] == "failed"
        bar.set_postfix(failed=failed)
        bar.update()
    bar.close()
    return job, batch_status(workspace, job)


def _recorded(workspace: Workspace, job: str) -> pd.DataFrame:
    results = workspace.results()
    if BATCH_TABLE not in results.tables():
        return pd.DataFrame()
    return results.read(BATCH_TABLE, job=job)


def batch_jobs(workspace: Any) -> pd.DataFrame:
    """Every batch job in the workspace: job, model, checkpoint, prompts, n_prompts and its done / failed / pending
    counts."""
    ws = Workspace(workspace)
    results = ws.results()
    if JOBS_TABLE not in results.tables():
        return pd.DataFrame(
            columns=["job", "model", "checkpoint", "prompts", "n_prompts", "done", "failed", "pending"]
        )
    jobs = results.read(JOBS_TABLE).sort_values("created_at")
    rows = []
    for job in jobs.itertuples():
        counts = batch_status(ws, str(job.job))["status"].value_counts()
        rows.append(
            {
                "job": job.job,
                "model": job.model,
                "checkpoint": job.checkpoint,
                "prompts": job.prompts,
                "n_prompts": job.n_prompts,
                **{s: int(counts.get(s, 0)) for s in ("done", "failed", "pending")},
            }
        )
    return pd.DataFrame(rows)


def batch_status(workspace: Any, job: str) -> pd.DataFrame:
    """The prompts of ``job``'s latest range, one row each: prompt_index, status (done, failed or pending), graph,
    replacement and completeness scores, counts, seconds and error. An unknown job raises naming the stored ones."""
    ws = Workspace(workspace)
    results = ws.results()
    jobs = results.read(JOBS_TABLE, job=job) if JOBS_TABLE in results.tables() else pd.DataFrame()
    if jobs.empty:
        known = results.read(JOBS_TABLE)["job"].tolist() if JOBS_TABLE in results.tables() else []
        raise AttributionError(
            f"no attribution batch {job!r} in {ws.root} (batches: {', '.join(known) or 'none'}); "
            "start one with `workbench circuits attribute MODEL --transcoders ... --data REF "
            "--prompts START:STOP`"
        )
    prompts = str(jobs.iloc[-1]["prompts"])
    indices = list(range(*map(int, prompts.split(":")))) if ":" in prompts else json.loads(prompts)
    recorded = _recorded(ws, job)
    latest = {} if recorded.empty else {int(r["prompt_index"]): r for _, r in recorded.iterrows()}
    columns = ["status", "graph", *SCORE_COLUMNS, "n_features", "n_nodes", "n_edges", "seconds", "error"]
    table = []
    for index in indices:
        row = latest.get(index)
        table.append(
            {
                "prompt_index": index,
                **({c: row[c] for c in columns} if row is not None else {"status": "pending"}),
            }
        )
    return pd.DataFrame(table).reindex(columns=["prompt_index", *columns])
