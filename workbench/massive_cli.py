"""`workbench massive MODEL_OR_SERIES`: detect (one model) or track and fit (a checkpoint series)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from workbench.cli_options import fail

DEFAULT_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "def add(a, b):\n    return a + b\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
    "Massive activations act as fixed biases in the residual stream.",
]


def massive_command(
    model: Annotated[
        str, typer.Argument(help="Zoo name, checkpoint directory, model directory, 'minilm' or hub id.")
    ],
    texts: Annotated[
        Path | None, typer.Option("--texts", help="UTF-8 file, one text per line (default: built-in).")
    ] = None,
    hooks: Annotated[list[str] | None, typer.Option("--hooks", help="Hooks or globs (repeatable).")] = None,
    steps: Annotated[
        list[int] | None, typer.Option("--step", help="Only these checkpoint steps (repeatable).")
    ] = None,
    family: Annotated[str, typer.Option(help="Emergence curve family for series fits.")] = "exp_log",
    abs_threshold: Annotated[float, typer.Option(help="Absolute magnitude threshold.")] = 100.0,
    ratio_threshold: Annotated[float, typer.Option(help="Top-1 / median threshold.")] = 1000.0,
    workspace: Annotated[Path | None, typer.Option("--workspace", "-w")] = None,
) -> None:
    """Find massive activations per layer; over a checkpoint series, also fit their emergence curves."""
    from workbench.checkpoints import CheckpointError, CheckpointSeries, load_series
    from workbench.emergence import FitError
    from workbench.massive import (
        MassiveCriteria,
        MassiveError,
        detect_massive,
        fit_emergence,
        track_massive,
        write_results,
    )
    from workbench.model import ModelLoadError
    from workbench.texts import TextFileError, load_texts

    criteria = MassiveCriteria(abs_threshold=abs_threshold, ratio_threshold=ratio_threshold)
    names = hooks or ["blocks.*.hook_resid_post"]
    try:
        corpus = load_texts(texts) if texts else DEFAULT_TEXTS
        dataset = texts.stem if texts else "builtin-prompts"
        series: CheckpointSeries | None = None
        try:
            series = load_series(model, workspace=workspace)
        except CheckpointError:
            series = None
        fits = None
        if series is not None and len(series.steps if steps is None else steps) > 1:
            report = track_massive(series, corpus, names, criteria=criteria, steps=steps, dataset=dataset)
            fits = fit_emergence(report.layers, metric="top1", family=family)
        else:
            from workbench.cli import load_model_argument

            hooked = (
                series.load(steps[0] if steps else series.steps[-1])
                if series
                else load_model_argument(model, workspace)
            )
            report = detect_massive(hooked, corpus, names, criteria=criteria, dataset=dataset, progress=True)
        write_results(report, fits, workspace)
    except (
        TextFileError,
        ModelLoadError,
        CheckpointError,
        MassiveError,
        FitError,
        KeyError,
        ValueError,
    ) as err:
        fail(err)
    for note in report.notes:
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW)
    latest = report.layers if report.layers["checkpoint"].isna().all() else report.layers[
        report.layers["checkpoint"] == report.layers["checkpoint"].max()]  # fmt: skip
    columns = ["hook", "top1", "top1_dim", "top1_token", "median", "ratio", "top1_spread", "massive"]
    typer.echo(latest[columns].to_string(index=False))
    if fits is not None:
        typer.echo(
            fits[["hook", "family", "status", "r2", "peak_step", "emergence_step"]].to_string(index=False)
        )
    typer.echo("results written to the workspace (tables massive_layers, massive_top, massive_fits)")
