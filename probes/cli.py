"""`workbench probe run|status JOBS.toml` (mounted through the workbench.cli entry points)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from workbench.cli_options import WorkspaceOption, fail

app = typer.Typer(help="Scripted linear-probe batch jobs (see probes/jobs.py for the job file format).",
                  no_args_is_help=True)  # fmt: skip


@app.command()
def run(
    job_file: Annotated[Path, typer.Argument(help="TOML job file.")],
    workspace: WorkspaceOption = None,
    backend: Annotated[str, typer.Option(help="local (process pool) or ray.")] = "local",
    workers: Annotated[int, typer.Option(help="Parallel workers (processes or Ray CPUs).")] = 1,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: start a local one).")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Skip tasks already done.")] = True,
) -> None:
    """Run every pending task of a probe job; each finished task is committed at once."""
    from probes.jobs import ProbeJobError, run_job

    try:
        status = run_job(job_file, workspace=workspace, backend=backend, workers=workers, address=address,
                         resume=resume)  # fmt: skip
    except ProbeJobError as err:
        fail(err)
    counts = status["status"].value_counts().to_dict()
    typer.echo(", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    for row in status[status["status"] == "failed"].itertuples():
        typer.secho(f"failed {row.task}: {row.error}", fg=typer.colors.RED)
    if counts.get("failed"):
        raise typer.Exit(1)


@app.command()
def status(
    job_file: Annotated[Path, typer.Argument(help="TOML job file.")], workspace: WorkspaceOption = None
) -> None:
    """Show every task of the job as done, failed (with its error) or pending."""
    from probes.jobs import ProbeJobError, job_status

    try:
        table = job_status(job_file, workspace)
    except ProbeJobError as err:
        fail(err)
    for row in table.itertuples():
        line = f"{row.status:8} {row.task}"
        typer.echo(line + (f"  ({row.error})" if row.status == "failed" else ""))
    counts = table["status"].value_counts().to_dict()
    typer.echo(", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
