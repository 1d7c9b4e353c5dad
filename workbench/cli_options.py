"""What every `workbench` sub-command shares: the --workspace option and the one way to fail with a message."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer

WorkspaceOption = Annotated[
    Path | None,
    typer.Option(
        "--workspace", "-w", help="Workspace directory (default: $WORKBENCH_WORKSPACE or ./workspace)."
    ),
]


def fail(message: object) -> NoReturn:
    """Print ``error: message`` in red on stderr and exit with status 2 (bad input, nothing was written)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)
