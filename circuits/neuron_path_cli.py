"""`workbench neuron-path run`: neuron paths of a zoo model in a workspace, written to the results database."""

from __future__ import annotations

import typer

from workbench.cli_options import WorkspaceOption, fail

app = typer.Typer(help="Neuron-path attribution (joint integrated gradients over MLP neurons).")


def _corpus(model: str) -> str | None:
    from workbench.zoo.train import ZooError, get_spec

    try:
        return get_spec(model).corpus
    except ZooError:
        return None


@app.command()
def run(
    model: str = typer.Argument("vit-digits", help="zoo model name in the workspace"),
    steps: int = typer.Option(20, help="Riemann steps m"),
    top_k: int = typer.Option(1, help="neurons per layer"),
    per_class: int = typer.Option(8, help="ViT: test images per class"),
    position: int = typer.Option(8, help="LM: token position analysed (the target is the token after it)"),
    n_targets: int = typer.Option(3, help="LM: number of most frequent next tokens analysed"),
    n_sequences: int = typer.Option(64, help="FSM models: sampled sequences (split among the targets)"),
    workspace: WorkspaceOption = None,
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Locate paths (ours and both baselines) for every class / target token and write the results tables."""
    import torch

    from circuits.neuron_path import NeuronPathError, analyse, fsm_tokens, lm_tasks, vit_tasks, write_results
    from workbench.checkpoints import CheckpointError, CheckpointSeries
    from workbench.workspace import Workspace
    from workbench.zoo.train import ZooError

    ws = Workspace(workspace)
    try:
        series = CheckpointSeries.from_directory(ws.model_dir(model))
        hooked = series.load(series.steps[-1]).eval()
        if hooked.cfg.family == "vit":
            tasks = vit_tasks(per_class)
        elif _corpus(model) == "fsm":  # TokFSM zoo models: analyse sequences sampled from their FSM
            tasks = lm_tasks(hooked, fsm_tokens(model, position + 2, n_sequences), position, n_targets)
        else:
            from workbench.zoo.corpora import python_source_texts

            batch = hooked.tokenize(python_source_texts(max_files=128), max_length=position + 2)
            full = batch["attention_mask"].bool().all(1)
            tasks = lm_tasks(hooked, torch.as_tensor(batch["input_ids"])[full], position, n_targets)
        paths, metrics = analyse(hooked, model, tasks, steps, top_k, progress=progress)
    except (NeuronPathError, CheckpointError, ZooError) as err:
        fail(err)
    write_results(ws, paths, metrics)
    typer.echo(metrics.to_string(index=False))
