"""`workbench probe run MODEL --labels LABELS` (the analysis) and `workbench probe jobs run|status JOBS.toml` (job
files), mounted through the workbench.cli entry points. The spellings before issue 30 (`probe fit`, `probe run
JOBS.toml`, `probe status JOBS.toml`) are hidden aliases for one release."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from workbench.cli_options import (
    BatchSizeOption,
    ContextOption,
    DataOption,
    DeviceOption,
    DtypeOption,
    ModelArgument,
    ProgressOption,
    SeedOption,
    TrustRemoteCodeOption,
    WorkspaceOption,
    add_deprecated_alias,
    deprecation_note,
    fail,
    open_data,
    open_model,
)


class _ProbeCommands(TyperGroup):
    """The `probe` group, which reads the old job spelling `probe run JOBS.toml` (no --labels, a .toml argument) as
    `probe jobs run JOBS.toml` with a deprecation line, for one release."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        labelled = any(a in ("--labels", "-l") or a.startswith("--labels=") for a in args)
        if args[:1] == ["run"] and not labelled and any(a.endswith(".toml") for a in args[1:]):
            deprecation_note("probe run JOBS.toml", "probe jobs run JOBS.toml")
            args = ["jobs", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_ProbeCommands,
    no_args_is_help=True,
    help="Linear probes: run them on a model for a label source, or run scripted batch jobs (`probe jobs`; "
    "see probes/jobs.py for the job file format).",
)
jobs_app = typer.Typer(
    help="Probe job files: run every pending task, or show each task's status.", no_args_is_help=True
)
app.add_typer(jobs_app, name="jobs")
TABLE_COLUMNS = {
    "hook": "hook",
    "score": "score",
    "control_score": "control",
    "selectivity": "selectivity",
    "majority_score": "majority",
    "token_identity_score": "token id",
    "random_init_score": "random init",
}


@app.command("run")
def run_probes(
    model: ModelArgument,
    labels: Annotated[
        str,
        typer.Option(
            "--labels",
            "-l",
            help="Label source: FILE.csv[:TEXT[:LABEL]] / .tsv / .jsonl / .parquet with one label per "
            'text, a .jsonl of {"text", "spans"} or {"tokens", "labels"} records, zoo:NAME (bracket_depth, '
            "inside_string, indent_level, next_token_type, fsm_state, fsm_next_state) or FILE.py:FUNCTION.",
        ),
    ],
    data: DataOption = None,
    hooks: Annotated[
        list[str] | None, typer.Option("--hooks", help="Hooks or globs (repeatable, or comma-separated).")
    ] = None,
    position: Annotated[
        str | None,
        typer.Option(
            "--position",
            help="Where a per-sequence label is probed: last (default), first (e.g. [CLS]), mean "
            "(mean-pooled over the real tokens) or a token index N.",
        ),
    ] = None,
    task: Annotated[str, typer.Option("--task", help="classification or regression (numeric labels).")] = (
        "classification"
    ),
    n_sequences: Annotated[
        int,
        typer.Option(
            "--n-sequences", min=2, help="Sequences of a zoo label set / documents a label function labels."
        ),
    ] = 64,
    context_length: ContextOption = 128,
    batch_size: BatchSizeOption = 16,
    seed: SeedOption = 0,
    random_init: Annotated[
        bool,
        typer.Option(
            "--random-init/--no-random-init", help="Also probe a randomly initialised copy (a baseline)."
        ),
    ] = True,
    save: Annotated[
        str | None,
        typer.Option(
            "--save",
            help="Also keep the fitted probes as workspace/probes/NAME (the prompt lab's probe overlay and "
            "steering; probes.readout.load_probe_for).",
        ),
    ] = None,
    workspace: WorkspaceOption = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    trust_remote_code: TrustRemoteCodeOption = False,
    progress: ProgressOption = True,
) -> None:
    """Probe every hook of MODEL for a label source; prints a score table and writes probe_results (and, with
    --save, the fitted probes)."""
    # imported here: the analysis imports torch, and `workbench --help` loads this module
    from workbench.analysis import write_tables
    from workbench.labels import parse_label_source, parse_position
    from workbench.probes.analysis import ANALYSIS, RESULTS_TABLE, ProbeSettings, run
    from workbench.probes.readout import save_probe
    from workbench.references import parse_model_ref
    from workbench.workspace import Workspace, safe_name

    settings = ProbeSettings(
        task=task,
        context_length=context_length,
        batch_size=batch_size,
        seed=seed,
        n_sequences=n_sequences,
        random_init=random_init,
    )
    source = parse_label_source(labels)  # a bad label file fails before the model loads
    if save is not None:
        safe_name(save, "for a probe")
    dataset = open_data(data) if data is not None else None
    where = parse_model_ref(model, workspace)
    hooked = open_model(model, workspace, device, dtype, trust_remote_code)
    ANALYSIS.check(hooked, dataset)
    root = Workspace(workspace).root
    patterns = [
        p.strip() for item in hooks or ["blocks.*.hook_resid_post"] for p in item.split(",") if p.strip()
    ]
    fitted: list[tuple[Any, Any, Any]] = []  # (model, label dataset, probes), kept with --save
    frames = run(
        hooked,
        dataset,
        labels=source,
        hooks=patterns,
        position=parse_position(position) if position is not None else None,
        settings=settings,
        location=where.location if where.kind in ("directory", "series") else None,
        on_fit=(lambda *fit: fitted.append(fit)) if save is not None else None,
        progress=progress,
    )
    written = write_tables(root, ANALYSIS, frames)
    rows = frames[RESULTS_TABLE]
    first = rows.iloc[0]
    shown = rows[list(TABLE_COLUMNS)].rename(columns=TABLE_COLUMNS)
    typer.echo(
        f"{first['model']} · {first['label_set']} on {first['dataset']} · {first['metric']} "
        f"(n_train {first['n_train']}, n_test {first['n_test']}, classes "
        f"{', '.join(json.loads(first['label_names'])) or first['n_classes']})"
    )
    typer.echo(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-"))
    typer.echo(f"wrote {written.get(RESULTS_TABLE, 0)} rows to {RESULTS_TABLE} in {root}")
    for fitted_model, labelled, probes in fitted if save is not None else []:
        saved = save_probe(
            root,
            save,
            probes,
            model=fitted_model,
            label_set=labelled.name,
            label_names=list(labelled.label_names),
        )
        typer.echo(f"saved the probes ({len(probes.sites)} hooks) to {saved}")


@jobs_app.command("run")
def run_job_file(
    job_file: Annotated[Path, typer.Argument(help="TOML job file.")],
    workspace: WorkspaceOption = None,
    backend: Annotated[str, typer.Option(help="local (process pool) or ray.")] = "local",
    workers: Annotated[int, typer.Option(help="Parallel workers (processes or Ray CPUs).")] = 1,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: start a local one).")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Skip tasks already done.")] = True,
    progress: ProgressOption = True,
) -> None:
    """Run every pending task of a probe job; each finished task is committed at once."""
    from workbench.probes.jobs import ProbeJobError, run_job  # deferred: CLI start-up (torch)

    try:
        status = run_job(
            job_file,
            workspace=workspace,
            backend=backend,
            workers=workers,
            address=address,
            resume=resume,
            progress=progress,
        )
    except ProbeJobError as err:
        fail(err)
    counts = status["status"].value_counts().to_dict()
    typer.echo(", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    for row in status[status["status"] == "failed"].itertuples():
        typer.secho(f"failed {row.task}: {row.error}", fg=typer.colors.RED)
    if counts.get("failed"):
        raise typer.Exit(1)


@jobs_app.command("status")
def job_file_status(
    job_file: Annotated[Path, typer.Argument(help="TOML job file.")], workspace: WorkspaceOption = None
) -> None:
    """Show every task of the job as done, failed (with its error) or pending."""
    from workbench.probes.jobs import ProbeJobError, job_status  # deferred: CLI start-up (torch)

    try:
        table = job_status(job_file, workspace)
    except ProbeJobError as err:
        fail(err)
    for row in table.itertuples():
        line = f"{row.status:8} {row.task}"
        typer.echo(line + (f"  ({row.error})" if row.status == "failed" else ""))
    counts = table["status"].value_counts().to_dict()
    typer.echo(", ".join(f"{n} {state}" for state, n in sorted(counts.items())))


add_deprecated_alias(app, "fit", "probe fit", "probe run", run_probes)
add_deprecated_alias(app, "status", "probe status JOBS.toml", "probe jobs status JOBS.toml", job_file_status)
