"""`workbench sae train|eval` (mounted through the workbench.cli entry points)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from workbench.cli_options import WorkspaceOption, fail

app = typer.Typer(help="Sparse autoencoders and transcoders on zoo models.", no_args_is_help=True)


@app.command()
def train(
    model: Annotated[str, typer.Argument(help="Zoo model name in the workspace, e.g. code-tiny.")],
    hook: Annotated[str, typer.Option(help="Input hook, e.g. blocks.0.hook_resid_post.")],
    hook_out: Annotated[
        str | None, typer.Option(help="Output hook for a transcoder (e.g. blocks.0.hook_mlp_out).")
    ] = None,
    architecture: Annotated[str, typer.Option(help="relu, topk, batchtopk or jumprelu.")] = "topk",
    d_sae: Annotated[int, typer.Option(help="Number of latents.")] = 256,
    k: Annotated[int, typer.Option(help="Active latents per token (topk / batchtopk).")] = 8,
    skip: Annotated[bool, typer.Option(help="Skip transcoder (adds x @ W_skip).")] = False,
    step: Annotated[int | None, typer.Option(help="Checkpoint step (default: the last).")] = None,
    steps: Annotated[int, typer.Option(help="Training steps.")] = 300,
    sequences: Annotated[
        int, typer.Option(help="Token sequences of 64 tokens captured from the corpus.")
    ] = 48,
    sae_id: Annotated[
        str | None, typer.Option(help="Name of the SAE (default from model, hook, architecture).")
    ] = None,
    workspace: WorkspaceOption = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the SAE's initialisation (same seed, same SAE).")] = 0,
) -> None:
    """Train one SAE / transcoder on a zoo model, save it under the workspace and write sae_evals + sae_features."""
    from circuits.sae.evals import train_and_evaluate
    from circuits.sae.train import check_sae_name
    from workbench.workspace import Workspace

    spec = {
        "architecture": architecture,
        "d_sae": d_sae,
        "hook_in": hook,
        "hook_out": hook_out or hook,
        "skip": skip,
    }
    if architecture in ("topk", "batchtopk"):
        spec["k"] = k
    name = sae_id or f"{model}.{hook}.{architecture}"
    try:
        check_sae_name(name)  # before the capture: a bad name fails at once
        frame = train_and_evaluate(
            Workspace(workspace).ensure(), model, {name: spec}, step=step, n_sequences=sequences,
            train_steps=steps, progress=progress, seed=seed,
        )  # fmt: skip
    except (ValueError, KeyError) as err:
        fail(err)
    row = frame.iloc[0]
    typer.echo(
        f"{name}: L0 {row.L0:.2f}  FVU {row.FVU:.4f}  CE recovered {row.ce_recovered:.3f}  KL {row.kl:.4f}"
    )


@app.command("eval")
def evaluate(
    sae_path: Annotated[Path, typer.Argument(help="SAE directory (ours or SAELens cfg.json format).")],
    model: Annotated[str, typer.Argument(help="Zoo model name in the workspace.")],
    step: Annotated[int | None, typer.Option(help="Checkpoint step (default: the last).")] = None,
    sequences: Annotated[int, typer.Option(help="Evaluation sequences of 64 tokens.")] = 16,
    sae_id: Annotated[
        str | None, typer.Option(help="Name in sae_evals (default: the directory name).")
    ] = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Evaluate a saved SAE spliced into a zoo model and write its sae_evals row."""
    from circuits.sae import load_sae
    from circuits.sae.evals import code_token_sequences, evaluate_sae, write_evals
    from workbench.checkpoints import CheckpointSeries
    from workbench.workspace import Workspace

    ws = Workspace(workspace).ensure()
    try:
        sae = load_sae(sae_path)
        series = CheckpointSeries.from_directory(ws.model_dir(model))
        hooked = series.load(series.steps[-1] if step is None else step)
        tokens = code_token_sequences(hooked.tokenizer, sequences, 64, seed=1)
        frame = evaluate_sae(hooked, sae, tokens, sae_id or sae_path.name, dataset="python-stdlib")
    except (ValueError, KeyError) as err:
        fail(err)
    write_evals(frame, ws)
    row = frame.iloc[0]
    typer.echo(f"L0 {row.L0:.2f}  FVU {row.FVU:.4f}  CE recovered {row.ce_recovered:.3f}  KL {row.kl:.4f}")
