"""`workbench neuron-path run MODEL --data DATA`: neuron paths of any causal LM or ViT classifier on any dataset,
written to the workspace results database."""

from __future__ import annotations

from typing import Annotated

import typer

from workbench.cli_options import (
    DataOption,
    DeviceOption,
    ModelArgument,
    ProgressOption,
    SeedOption,
    TrustRemoteCodeOption,
    WorkspaceOption,
    open_data,
    open_model,
    require_data,
)

app = typer.Typer(help="Neuron-path attribution (joint integrated gradients over MLP neurons).")


@app.command()
def run(
    model: ModelArgument,
    data: DataOption = None,
    position: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="LM: position analysed, the target is the token after it (default 8); ViT: default 0 (CLS).",
        ),
    ] = None,
    n_targets: Annotated[
        int | None,
        typer.Option(
            min=1, help="LM: most frequent next tokens analysed (default 3); ViT: classes (default all)."
        ),
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="Riemann steps m of the integrated gradients.")] = 20,
    top_k: Annotated[int, typer.Option(min=1, help="Neurons per layer.")] = 1,
    max_sequences: Annotated[
        int,
        typer.Option(
            min=1,
            help="LM: token rows read from --data (split among the targets); ViT: images, split "
            "evenly among the classes.",
        ),
    ] = 64,
    label: Annotated[
        str | None,
        typer.Option(help="ViT: the label array of --data holding the classes (default: its only one)."),
    ] = None,
    chunk_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Forward/backward rows (neuron × input × α-step) per chunk; bounds the working memory "
            "(default: as many as fit in 512 MiB).",
        ),
    ] = None,
    seed: SeedOption = 0,
    device: DeviceOption = "cpu",
    workspace: WorkspaceOption = None,
    progress: ProgressOption = True,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Locate paths (ours and both baselines) for each target token / class and write the results tables; a model
    or dataset the analysis cannot use is refused before any work."""
    from workbench.analysis import write_tables  # deferred: CLI start-up (pandas)
    from workbench.circuits.neuron_path.analysis import ANALYSIS  # deferred: CLI start-up (torch)
    from workbench.circuits.neuron_path.analysis import run as run_paths  # deferred: CLI start-up (torch)

    require_data(
        data,
        "the dataset the paths are traced on: text or token ids for a causal LM, inputs with a class "
        "label array for an image classifier (zoo:digits)",
    )
    hooked = open_model(model, workspace, device, "float32", trust_remote_code).eval()
    dataset = open_data(data)
    frames = run_paths(
        hooked,
        dataset,
        position=position,
        n_targets=n_targets,
        steps=steps,
        top_k=top_k,
        max_sequences=max_sequences,
        label=label,
        seed=seed,
        chunk_rows=chunk_size,
        progress=progress,
        report=typer.echo,
    )
    write_tables(workspace, ANALYSIS, frames)
    metrics = frames["neuron_path_metrics"]
    typer.echo(
        metrics[
            [
                "method",
                "joint_score",
                "remove_prob_ratio",
                "remove_accuracy_change",
                "enhance_prob_ratio",
                "enhance_accuracy_change",
            ]
        ].to_string(index=False)
    )
    typer.echo(
        f"{len(frames['neuron_paths'])} path rows of {hooked.cfg.name} on {dataset.name!r} written to the "
        f"workspace (tables {', '.join(ANALYSIS.table_names)})"
    )
