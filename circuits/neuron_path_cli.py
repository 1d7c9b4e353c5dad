"""`workbench neuron-path run`: neuron paths of a zoo model in a workspace, written to the results database."""

from __future__ import annotations

import typer

app = typer.Typer(help="Neuron-path attribution (joint integrated gradients over MLP neurons).")


@app.command()
def run(
    model: str = typer.Argument("vit-digits", help="zoo model name in the workspace"),
    workspace: str = typer.Option(None, help="workspace directory (default: WORKBENCH_WORKSPACE)"),
    steps: int = typer.Option(20, help="Riemann steps m"),
    top_k: int = typer.Option(1, help="neurons per layer"),
    per_class: int = typer.Option(8, help="ViT: test images per class"),
    position: int = typer.Option(8, help="LM: token position analysed"),
    n_targets: int = typer.Option(3, help="LM: number of most frequent next tokens analysed"),
) -> None:
    """Locate paths (ours and both baselines) for every class / target token and write the results tables."""
    import torch

    from circuits.neuron_path import analyse, lm_tasks, vit_tasks, write_results
    from workbench.checkpoints import CheckpointSeries
    from workbench.workspace import Workspace

    ws = Workspace(workspace)
    series = CheckpointSeries.from_directory(ws.model_dir(model))
    hooked = series.load(series.steps[-1]).eval()
    if hooked.cfg.family == "vit":
        tasks = vit_tasks(per_class)
    else:
        from workbench.zoo.corpora import python_source_texts

        batch = hooked.tokenize(python_source_texts(max_files=128), max_length=position + 2)
        full = batch["attention_mask"].bool().all(1)
        tasks = lm_tasks(hooked, torch.as_tensor(batch["input_ids"])[full], position, n_targets)
    paths, metrics = analyse(hooked, model, tasks, steps, top_k)
    write_results(ws, paths, metrics)
    typer.echo(metrics.to_string(index=False))
