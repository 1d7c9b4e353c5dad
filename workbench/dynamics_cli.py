"""`workbench dynamics SERIES --data DATA` (track every metric over a checkpoint series, fit, order) and
`workbench dynamics sweep SWEEP.toml` (train a zoo architecture sweep, track each, fit the architecture →
parameter predictor with leave-one-architecture-out R²)."""

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
    TrustRemoteCodeOption,
    WorkspaceOption,
    fail,
    open_data,
    open_series,
)

SweepArgument = Annotated[
    Path | None, typer.Argument(help="With SERIES = sweep: the sweep file (format: dynamics_sweep.py).")
]


def dynamics_command(
    model: ModelArgument,
    sweep_file: SweepArgument = None,
    data: DataOption = None,
    steps: Annotated[
        list[int] | None, typer.Option("--step", help="Only these checkpoint steps (repeatable).")
    ] = None,
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
    run: Annotated[
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
    emerges when. `workbench dynamics sweep SWEEP.toml` runs the architecture study instead."""
    from workbench.dynamics import (
        ANALYSIS,
        DynamicsSettings,
        describe_order,
        metric_providers,
        track_dynamics,
    )

    if model == "sweep":
        if sweep_file is None:
            fail("workbench dynamics sweep needs the sweep file: workbench dynamics sweep SWEEP.toml")
        from workbench.dynamics_sweep import describe_sweep, run_sweep

        typer.echo(describe_sweep(run_sweep(sweep_file, workspace, progress=progress)))
        return
    if sweep_file is not None:
        fail(f"unexpected argument {sweep_file}; `workbench dynamics SERIES --data DATA` takes one SERIES "
             "(for the architecture study: `workbench dynamics sweep SWEEP.toml`)")  # fmt: skip
    dataset = open_data(data)
    ANALYSIS.check(data=dataset)
    extra = {}
    if labels is not None:
        providers = metric_providers()
        if "probe_accuracy" not in providers:
            fail("--labels needs the probes package's probe_accuracy metric (workbench.dynamics_metrics entry "
                 "point); reinstall the workbench (pip install -e .)")  # fmt: skip
        extra["probe_accuracy"] = providers["probe_accuracy"](labels, data=dataset)
    series = open_series(model, workspace, None, device, dtype, trust_remote_code)
    settings = DynamicsSettings(context_length=context_length, max_sequences=max_sequences, max_tokens=max_tokens,
                                batch_size=batch_size, bos=bos, sparsity_threshold=sparsity_threshold)  # fmt: skip
    result = track_dynamics(series, dataset, settings=settings, workspace=workspace, run=run,
                            extra_metrics=extra, families=tuple(family or ("exp_log",)), n_boot=n_boot, level=level, steps=steps,
                            attention_path="kernel" if kernel else None, seed=seed, progress=progress)  # fmt: skip
    for note in result.notes:
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW)
    counts = result.fits[result.fits["selected"] | ~result.fits["status"].isin(["ok", "non_identifiable"])]
    table = counts.groupby(["metric", "status"]).size().unstack(fill_value=0)
    typer.echo(f"{series.name}: {len(result.steps)} checkpoints analysed on {dataset.name}")
    typer.echo("fits per metric (series × status):")
    typer.echo(table.to_string())
    typer.echo("emergence order:")
    typer.echo(describe_order(result.order))
    typer.echo(f"results written to the workspace (tables {', '.join(ANALYSIS.table_names[:3])})")
