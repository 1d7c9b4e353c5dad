"""`workbench attention run MODEL --data DATA`: per-layer × head attention statistics, written to the workspace. The
last release's spelling, `workbench attention MODEL ...`, still runs `run` for one release, after a one-line
deprecation note."""

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

app = run_group(
    "Attention statistics per layer × head (× checkpoint): entropy, sink mass, log-sum-exp, max logit.",
    "attention MODEL --data DATA",
    "attention run MODEL --data DATA",
)


@app.command("run")
def attention_command(
    model: ModelArgument,
    data: DataOption = None,
    steps: StepsOption = None,
    kernel: Annotated[
        bool,
        typer.Option("--kernel/--eager", help="Statistics from the fused Triton kernel or the eager path."),
    ] = False,
    sink_k: Annotated[int, typer.Option(min=1, help="Sink mass = attention on the first k keys.")] = 1,
    batch_size: BatchSizeOption = 16,
    context_length: ContextOption = 128,
    max_tokens: MaxTokensOption = None,
    device: DeviceOption = "cpu",
    dtype: Annotated[str, typer.Option(help="Model dtype.")] = "float32",
    workspace: WorkspaceOption = None,
    progress: ProgressOption = True,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Mean attention entropy, sink mass, log-sum-exp and max logit per layer × head (× checkpoint)."""
    # imported here: the analysis imports torch, and `workbench --help` loads this module
    from workbench.analyses.attention.analysis import ANALYSIS, AttentionSettings, run
    from workbench.analysis import write_tables  # deferred: CLI start-up (pandas)

    dataset = open_data(data) if data else default_prompts()
    ANALYSIS.check(data=dataset)
    series = open_series(model, workspace, steps, device, dtype, trust_remote_code)
    inputs = budget_inputs(dataset, series, context_length, max_tokens)
    frames = run(
        series,
        inputs,
        AttentionSettings(kernel=kernel, sink_k=sink_k, batch_size=batch_size, context_length=context_length),
        dataset=dataset.name,
        progress=progress,
    )
    write_tables(workspace, ANALYSIS, frames)
    frame = frames["attention_stats"]
    latest = (
        frame[frame["checkpoint"] == frame["checkpoint"].max()]
        if frame["checkpoint"].notna().any()
        else frame
    )
    typer.echo(latest.groupby("layer")[["entropy", "sink", "max_logit"]].mean().round(3).to_string())
    typer.echo(
        f"{len(frame)} rows written to the workspace (table attention_stats, dataset {dataset.name!r})"
    )
