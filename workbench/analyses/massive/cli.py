"""`workbench massive run MODEL --data DATA`: detect (one model) or track and fit (a checkpoint series). The last
release's spelling, `workbench massive MODEL ...`, still runs `run` for one release, after a one-line deprecation
note."""

from __future__ import annotations

from typing import Annotated

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
    run_group,
)
from workbench.workspace import Workspace

app = run_group(
    "Massive activations: detect them in a model, or track and fit them over a checkpoint series.",
    "massive MODEL --data DATA",
    "massive run MODEL --data DATA",
)


@app.command("run")
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
    from workbench.analyses.massive.analysis import ANALYSIS, MassiveCriteria, MassiveSettings, run
    from workbench.analysis import write_tables  # deferred: CLI start-up (pandas)

    dataset = open_data(data) if data else default_prompts()
    ANALYSIS.check(data=dataset)
    series = open_series(model, workspace, steps, device, dtype, trust_remote_code)
    frames = run(
        series,
        budget_inputs(dataset, series, context_length, max_tokens),
        MassiveSettings(
            hooks=tuple(hooks or ["blocks.*.hook_resid_post"]),
            family=family,
            criteria=MassiveCriteria(abs_threshold=abs_threshold, ratio_threshold=ratio_threshold),
            batch_size=batch_size,
            context_length=context_length,
        ),
        dataset=dataset.name,
        count_all_checkpoints=(
            (lambda: len(open_series(model, workspace, None, device, dtype, trust_remote_code)))
            if steps
            else None
        ),
        report=lambda note: typer.secho(f"note: {note}", fg=typer.colors.YELLOW),
        progress=progress,
    )
    written = write_tables(workspace, ANALYSIS, frames)
    fits = frames.get("massive_fits")
    layers = frames["massive_layers"]
    columns = ["hook", "top1", "top1_dim", "top1_token", "median", "ratio", "top1_spread", "massive"]
    if layers["checkpoint"].isna().all() or layers["checkpoint"].nunique() == 1:
        step = "" if layers["checkpoint"].isna().iloc[0] else f" at step {int(layers['checkpoint'].iloc[0])}"
        typer.echo(f"{layers['model'].iloc[0]}{step}:")
        typer.echo(layers[columns].to_string(index=False))
    else:
        typer.echo(
            f"{layers['model'].iloc[0]}: per checkpoint (largest top-1 over the {layers['hook'].nunique()} "
            "hooks):"
        )
        for step, group in layers.groupby("checkpoint", sort=True):
            top = group.loc[group["top1"].idxmax()]
            typer.echo(
                f"  step {int(step)}: massive at {int(group['massive'].sum())} of {len(group)} hooks; top-1 "
                f"{top['top1']:.4g} at {top['hook']} dim {top['top1_dim']} (token {top['top1_token']!r}), "
                f"{top['ratio']:.3g}× the median"
            )
        last = layers["checkpoint"].max()
        typer.echo(f"at step {int(last)} (the last checkpoint):")
        typer.echo(layers[layers["checkpoint"] == last][columns].to_string(index=False))
    if fits is not None:
        typer.echo(
            fits[["hook", "family", "status", "r2", "peak_step", "emergence_step"]].to_string(index=False)
        )
    tables = ", ".join(f"{name} ({rows} rows)" for name, rows in written.items())
    typer.echo(f"wrote {tables} to {Workspace(workspace).results_path}")
