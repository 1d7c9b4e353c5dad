"""`workbench zoo ...`: train and list the embedded model suite."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from workbench.cli_options import fail
from workbench.workspace import Workspace

app = typer.Typer(
    help="Train the embedded model suite (offline) with Pythia-style checkpoints.", no_args_is_help=True
)


@app.command("list")
def list_models(workspace: Annotated[Path | None, typer.Option("--workspace", "-w")] = None) -> None:
    """List the zoo specs and which are trained in the workspace."""
    from workbench.zoo.train import SPECS  # deferred: CLI start-up (torch)

    ws = Workspace(workspace)
    for name, spec in SPECS.items():
        trained = sorted(int(p.name[4:]) for p in ws.model_dir(name).glob("step*") if p.name[4:].isdigit())
        state = f"trained to step {trained[-1]} ({len(trained)} checkpoints)" if trained else "not trained"
        typer.echo(
            f"{name:12s} {spec.corpus:6s} L{spec.n_layers} d{spec.d_model} h{spec.n_heads} {spec.steps} steps  {state}"
        )


@app.command()
def train(
    name: Annotated[str, typer.Argument(help="Zoo model name (see `workbench zoo list`).")],
    workspace: Annotated[Path | None, typer.Option("--workspace", "-w")] = None,
    steps: Annotated[int | None, typer.Option(help="Override the number of training steps.")] = None,
    seed: Annotated[int | None, typer.Option(help="Override the seed.")] = None,
    restart: Annotated[bool, typer.Option(help="Delete an existing run and train from scratch.")] = False,
) -> None:
    """Train NAME into the workspace (resumes an interrupted run; a finished run is left as it is)."""
    # deferred: CLI start-up (torch)
    from workbench.zoo.train import ZooError, read_train_log, train_zoo_model

    overrides: dict[str, Any] = {k: v for k, v in {"steps": steps, "seed": seed}.items() if v is not None}
    try:
        model_dir = train_zoo_model(name, workspace, restart=restart, **overrides)
    except ZooError as err:
        fail(err)
    log = read_train_log(model_dir)
    typer.echo(f"{name}: {len(log)} steps, final loss {log[-1]['loss']:.3f} → {model_dir}")
