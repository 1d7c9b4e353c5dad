"""`workbench attention MODEL_OR_SERIES`: per-layer × head attention statistics, written to the workspace."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from workbench.cli_options import WorkspaceOption, fail


def attention_command(
    model: Annotated[
        str,
        typer.Argument(
            help="Zoo name (its whole checkpoint series), name@STEP, a directory, 'minilm' or hub id."
        ),
    ],
    texts: Annotated[
        Path | None,
        typer.Option("--texts", help="UTF-8 file, one text per line (default: built-in prompts)."),
    ] = None,
    steps: Annotated[
        list[int] | None, typer.Option("--step", help="Only these checkpoint steps (repeatable).")
    ] = None,
    kernel: Annotated[
        bool,
        typer.Option("--kernel/--eager", help="Statistics from the fused Triton kernel or the eager path."),
    ] = False,
    sink_k: Annotated[int, typer.Option(help="Sink mass = attention on the first k keys.")] = 1,
    workspace: WorkspaceOption = None,
) -> None:
    """Mean attention entropy, sink mass, log-sum-exp and max logit per layer × head (× checkpoint)."""
    from workbench.attention.summary import write_attention_statistics
    from workbench.checkpoints import CheckpointError, load_series
    from workbench.massive_cli import DEFAULT_TEXTS
    from workbench.model import ModelLoadError
    from workbench.texts import TextFileError, load_texts

    try:
        corpus = load_texts(texts) if texts else DEFAULT_TEXTS
        dataset = texts.stem if texts else "builtin-prompts"
        try:
            series = load_series(model, workspace=workspace)
        except CheckpointError:  # one model: name@STEP, a model directory, 'minilm', a hub id
            from workbench.cli import load_model_argument

            models = [load_model_argument(model, workspace)]
        else:
            unknown = sorted(set(steps or []) - set(series.steps))
            if unknown:
                fail(f"--step {unknown} not in the series of {model}; its steps are {series.steps}")
            models = series.iter(steps=steps, progress=True)
        frame = write_attention_statistics(
            models, corpus, workspace, dataset=dataset, kernel=kernel, sink_k=sink_k
        )
    except (TextFileError, ModelLoadError, CheckpointError, KeyError, ValueError) as err:
        fail(err)
    latest = (
        frame[frame["checkpoint"] == frame["checkpoint"].max()]
        if frame["checkpoint"].notna().any()
        else frame
    )
    typer.echo(latest.groupby("layer")[["entropy", "sink", "max_logit"]].mean().round(3).to_string())
    typer.echo(f"{len(frame)} rows written to the workspace (table attention_stats, dataset {dataset!r})")
