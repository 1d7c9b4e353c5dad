"""`workbench dynamics run SERIES --data DATA` (track every metric over a checkpoint series, fit, order) and
`workbench dynamics sweep SWEEP.toml` (train a zoo architecture sweep, track each, fit the architecture →
parameter predictor with leave-one-architecture-out R²). The last release's spelling, `workbench dynamics SERIES
--data DATA`, still runs `run` for one release, after a one-line deprecation note."""

from __future__ import annotations

from pathlib import Path
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
    SeedOption,
    StepsOption,
    TrustRemoteCodeOption,
    WorkspaceOption,
    open_data,
    open_series,
    run_group,
)

app = run_group(
    "Training dynamics over checkpoints: what emerges when, and the architecture sweep.",
    "dynamics SERIES --data DATA",
    "dynamics run SERIES --data DATA",
)


@app.command("run")
def run_command(
    model: ModelArgument,
    data: DataOption = None,
    steps: StepsOption = None,
    family: Annotated[
        list[str] | None,
        typer.Option(
            "--family",
            help="Curve families (repeatable; the lowest "
            "AIC among identifiable fits is used). Default exp_log.",
        ),
    ] = None,
    max_sequences: Annotated[
        int, typer.Option("--max-sequences", min=1, help="Prompts (token rows) per checkpoint.")
    ] = 32,
    context_length: ContextOption = 64,
    max_tokens: MaxTokensOption = None,
    batch_size: BatchSizeOption = 8,
    bos: Annotated[
        bool | None,
        typer.Option("--bos/--no-bos", help="Start every row with BOS (default: what the tokenizer adds)."),
    ] = None,
    sparsity_threshold: Annotated[
        float, typer.Option(help="Near-zero MLP activation: |a| <= this × RMS.")
    ] = 0.1,
    n_boot: Annotated[
        int, typer.Option("--n-boot", min=0, help="Bootstrap replicates over prompts per fit.")
    ] = 100,
    level: Annotated[float, typer.Option(min=0.5, max=0.999, help="Bootstrap interval coverage.")] = 0.9,
    kernel: Annotated[
        bool,
        typer.Option(
            "--kernel/--no-kernel",
            help="Attention statistics from the fused Triton kernel (needs a GPU, or TRITON_INTERPRET=1).",
        ),
    ] = False,
    labels: Annotated[
        str | None,
        typer.Option(
            "--labels",
            "-l",
            help="Also track probe accuracy per layer for this label source (as `workbench probe run --labels`: "
            "zoo:NAME, FILE.csv:TEXT:LABEL, spans .jsonl, FILE.py:FUNCTION); texts for label functions come "
            "from --data.",
        ),
    ] = None,
    run_name: Annotated[
        str | None, typer.Option("--run", help="Run name (default: SERIES--DATA); a rerun resumes it.")
    ] = None,
    device: DeviceOption = "cpu",
    dtype: Annotated[str, typer.Option(help="Model dtype.")] = "float32",
    seed: SeedOption = 0,
    workspace: WorkspaceOption = None,
    progress: ProgressOption = True,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Track massive activations, attention sinks and entropy, MLP sparsity and residual norm growth over the
    checkpoints of SERIES (any model reference with checkpoints), fit each metric × layer (× head), and say what
    emerges when."""
    # imported here: the analysis imports torch, and `workbench --help` loads this module
    from workbench.analyses.dynamics.analysis import ANALYSIS, DynamicsSettings, describe_order, run
    from workbench.analysis import write_tables  # deferred: CLI start-up (pandas)

    dataset = open_data(data)
    ANALYSIS.check(data=dataset)
    series = open_series(model, workspace, None, device, dtype, trust_remote_code)
    settings = DynamicsSettings(
        context_length=context_length,
        max_sequences=max_sequences,
        max_tokens=max_tokens,
        batch_size=batch_size,
        bos=bos,
        sparsity_threshold=sparsity_threshold,
    )
    frames = run(
        series,
        dataset,
        labels=labels,
        report=_print_note,
        settings=settings,
        workspace=workspace,
        run=run_name,
        families=tuple(family or ("exp_log",)),
        n_boot=n_boot,
        level=level,
        steps=steps,
        attention_path="kernel" if kernel else None,
        seed=seed,
        progress=progress,
    )
    write_tables(workspace, ANALYSIS, frames)
    fits = frames["dynamics_fits"]
    counts = fits[fits["selected"] | ~fits["status"].isin(["ok", "non_identifiable"])]
    table = counts.groupby(["metric", "status"]).size().unstack(fill_value=0)
    typer.echo(
        f"{series.name}: {frames['dynamics_metrics']['checkpoint'].nunique()} checkpoints analysed on "
        f"{dataset.name}"
    )
    typer.echo("fits per metric (series × status):")
    typer.echo(table.to_string())
    typer.echo("emergence order:")
    typer.echo(describe_order(frames["dynamics_order"]))
    typer.echo(f"results written to the workspace (tables {', '.join(frames)})")


def _print_note(note: str) -> None:
    typer.secho(f"note: {note}", fg=typer.colors.YELLOW)


@app.command("sweep")
def sweep_command(
    sweep_file: Annotated[
        Path, typer.Argument(help="The sweep file (TOML; format: workbench/analyses/dynamics/sweep.py).")
    ],
    workspace: WorkspaceOption = None,
    progress: ProgressOption = True,
) -> None:
    """Train the zoo architectures of SWEEP_FILE (and track its existing series), fit each per layer, and score the
    architecture → curve parameter predictor with leave-one-architecture-out R²."""
    # imported here: the sweep imports torch and scikit-learn, and `workbench --help` loads this module
    from workbench.analyses.dynamics.analysis import ANALYSIS
    from workbench.analyses.dynamics.sweep import describe_sweep, run_sweep  # deferred: CLI start-up (torch)
    from workbench.analysis import write_tables  # deferred: CLI start-up (pandas)

    result = run_sweep(sweep_file, workspace, write=False, progress=progress)
    write_tables(workspace, ANALYSIS, result.frames())
    typer.echo(describe_sweep(result))
