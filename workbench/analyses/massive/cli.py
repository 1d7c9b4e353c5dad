"""`workbench massive MODEL --data DATA`: detect (one model) or track and fit (a checkpoint series)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from workbench.cli_options import (
    BatchSizeOption,
    ContextOption,
    DataOption,
    DeviceOption,
    MaxTokensOption,
    ModelArgument,
    ProgressOption,
    StepsOption,
    TrustRemoteCodeOption,
    WorkspaceOption,
    budget_inputs,
    default_prompts,
    open_data,
    open_series,
)
from workbench.workspace import Workspace


def massive_command(
    model: ModelArgument,
    data: DataOption = None,
    hooks: Annotated[list[str] | None, typer.Option("--hooks", help="Hooks or globs (repeatable).")] = None,
    steps: StepsOption = None,
    family: Annotated[str, typer.Option(help="Emergence curve family for series fits.")] = "exp_log",
    abs_threshold: Annotated[float, typer.Option(help="Absolute magnitude threshold.")] = 100.0,
    ratio_threshold: Annotated[float, typer.Option(help="Top-1 / median threshold.")] = 1000.0,
    batch_size: BatchSizeOption = 8,
    context_length: ContextOption = 128,
    max_tokens: MaxTokensOption = None,
    device: DeviceOption = "cpu",
    dtype: Annotated[str, typer.Option(help="Model dtype.")] = "float32",
    workspace: WorkspaceOption = None,
    progress: ProgressOption = True,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Find massive activations per layer; over a checkpoint series, also fit their emergence curves."""
    # imported here: the analysis imports torch, and `workbench --help` loads this module
    from workbench.analyses.dynamics.emergence import FAMILIES, FitError
    from workbench.analyses.massive.analysis import (
        ANALYSIS,
        MassiveCriteria,
        detect_massive,
        fit_emergence,
        track_massive,
    )
    from workbench.analysis import write_tables

    if family not in FAMILIES:
        raise FitError(f"unknown curve family {family!r}; registered: {', '.join(FAMILIES)}")
    criteria = MassiveCriteria(abs_threshold=abs_threshold, ratio_threshold=ratio_threshold)
    names = hooks or ["blocks.*.hook_resid_post"]
    dataset = open_data(data) if data else default_prompts()
    ANALYSIS.check(data=dataset)
    series = open_series(model, workspace, steps, device, dtype, trust_remote_code)
    options: dict[str, Any] = {
        "batch_size": batch_size,
        "max_length": context_length,
        "dataset": dataset.name,
    }
    inputs = budget_inputs(dataset, series, context_length, max_tokens)
    fits = None
    if len(series) > 1:
        report = track_massive(series, inputs, names, criteria=criteria, progress=progress, **options)
        distinct = report.layers["checkpoint"].nunique()
        needed = len(FAMILIES[family].params) + 1
        if distinct >= needed:
            fits = fit_emergence(report.layers, metric="top1", family=family)
        else:
            available = len(
                open_series(model, workspace, None, device, dtype, trust_remote_code) if steps else ()
            )
            report.notes.append(_no_fit_note(family, needed, distinct, available, FAMILIES))
    else:
        report = detect_massive(series.load(series.steps[0]), inputs, names, criteria=criteria, progress=progress,
                                **options)  # fmt: skip
    written = write_tables(workspace, ANALYSIS, report.frames(fits))
    for note in report.notes:
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW)
    layers = report.layers
    columns = ["hook", "top1", "top1_dim", "top1_token", "median", "ratio", "top1_spread", "massive"]
    if layers["checkpoint"].isna().all() or layers["checkpoint"].nunique() == 1:
        step = "" if layers["checkpoint"].isna().iloc[0] else f" at step {int(layers['checkpoint'].iloc[0])}"
        typer.echo(f"{layers['model'].iloc[0]}{step}:")
        typer.echo(layers[columns].to_string(index=False))
    else:
        typer.echo(f"{layers['model'].iloc[0]}: per checkpoint (largest top-1 over the {layers['hook'].nunique()} "
                   "hooks):")  # fmt: skip
        for step, group in layers.groupby("checkpoint", sort=True):
            top = group.loc[group["top1"].idxmax()]
            typer.echo(f"  step {int(step)}: massive at {int(group['massive'].sum())} of {len(group)} hooks; top-1 "
                       f"{top['top1']:.4g} at {top['hook']} dim {top['top1_dim']} (token {top['top1_token']!r}), "
                       f"{top['ratio']:.3g}× the median")  # fmt: skip
        last = layers["checkpoint"].max()
        typer.echo(f"at step {int(last)} (the last checkpoint):")
        typer.echo(layers[layers["checkpoint"] == last][columns].to_string(index=False))
    if fits is not None:
        typer.echo(
            fits[["hook", "family", "status", "r2", "peak_step", "emergence_step"]].to_string(index=False)
        )
    tables = ", ".join(f"{name} ({rows} rows)" for name, rows in written.items())
    typer.echo(f"wrote {tables} to {Workspace(workspace).results_path}")


def _no_fit_note(family: str, needed: int, distinct: int, available: int, families: dict) -> str:
    """Why no emergence fit was made, suggesting only what the user has not done: more --step values when they
    restricted the steps and the series has enough (``available``: its checkpoint count, 0 when not restricted),
    a family with fewer parameters other than the one they chose, else more checkpoints."""
    fixes = []
    if available >= needed:
        fixes.append(f"pass more --step values or drop --step (the series has {available} checkpoints)")
    fewer = [name for name, f in families.items() if name != family and len(f.params) + 1 <= distinct]
    if fewer:
        fixes.append(" or ".join(f"--family {name}" for name in fewer) + f" (fits {distinct} checkpoints)")
    if not fixes:
        fixes.append("save more checkpoints of the run (every family needs at least "
                     f"{min(len(f.params) + 1 for f in families.values())})")  # fmt: skip
    return (f"no {family} emergence fit: it needs {needed} distinct checkpoints, this run has {distinct}; "
            + "; or ".join(fixes))  # fmt: skip
