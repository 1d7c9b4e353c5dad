"""The ``workbench`` command line.

Core commands live here; the analysis packages and the zoo contribute theirs through the ``workbench.cli``
entry-point group (pyproject.toml), so ``workbench`` never imports ``probes``, ``circuits``, ``app`` or the zoo
directly.
"""

from __future__ import annotations

import importlib.metadata
import logging
import pickle
import re
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from workbench import __version__
from workbench.cli_options import (
    BatchSizeOption,
    ContextOption,
    DataOption,
    DeviceOption,
    MaxTokensOption,
    ModelArgument,
    ProgressOption,
    TrustRemoteCodeOption,
    WorkspaceOption,
    fail,
    open_data,
    open_model,
    parse_dtype,
)
from workbench.deprecation import WHEN

# pickle.UnpicklingError: a checkpoint torch.load(weights_only=True) refuses to unpickle (it holds Python objects)
USER_ERRORS = (ValueError, KeyError, IndexError, LookupError, OSError, pickle.UnpicklingError)
OWN_PACKAGES = ("workbench", "probes", "circuits", "app")  # their error classes name the problem and the fix


class _OneLineErrors(TyperGroup):
    """The top-level command group: every error a command raises becomes one line on stderr, never a traceback.

    Bad input (the workbench's own error classes, whose messages name the fix, ValueError / KeyError / IndexError,
    and OS errors such as a missing file) and running out of memory exit 2; anything else is an internal
    error (exit 1). ``workbench --verbose ...`` re-raises, so the traceback is there when wanted.
    """

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as err:  # noqa: BLE001 - the one place errors meet the user
            if ctx.params.get("verbose") or type(err).__module__.startswith("typer"):  # usage errors, Exit
                raise
            if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
                message, code = (
                    (
                        f"not enough memory for this request ({err or 'MemoryError'}); ask for less "
                        "(e.g. a smaller --d-sae, --batch-size or --context-length)"
                    ),
                    2,
                )
            elif isinstance(err, USER_ERRORS) or type(err).__module__.split(".")[0] in OWN_PACKAGES:
                message, code = str(err.args[0] if isinstance(err, KeyError) and err.args else err), 2
            else:
                message, code = (
                    (
                        f"internal error ({type(err).__name__}: {err}); rerun as `workbench --verbose "
                        "...` for the traceback and report it"
                    ),
                    1,
                )
            typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code) from None


app = typer.Typer(
    name="workbench",
    cls=_OneLineErrors,
    help="Mechanistic-interpretability workbench: hooked models, activation stores, analyses and a dashboard.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log what runs (attention path, files).")
    ] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    # a renamed keyword or settings key still works for one release; say so (Python hides DeprecationWarning)
    warnings.filterwarnings("default", message=f".*{re.escape(WHEN)}", category=DeprecationWarning)


@app.command()
def version() -> None:
    """Print the workbench version."""
    typer.echo(__version__)


@app.command()
def info(
    model: ModelArgument,
    pattern: Annotated[str, typer.Option("--hooks", help="Only hook names matching this glob.")] = "*",
    workspace: WorkspaceOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Describe a model and list its hook names."""
    hooked = open_model(model, workspace, trust_remote_code=trust_remote_code)
    names = hooked.resolve(pattern)
    typer.echo(repr(hooked))
    for key, value in hooked.cfg.to_dict().items():
        typer.echo(f"  {key}: {value}")
    typer.echo(f"{len(names)} hook points:")
    for name in names:
        typer.echo(f"  {name}")


@app.command()
def capture(
    model: ModelArgument,
    hooks: Annotated[list[str], typer.Option("--hooks", help="Hook names or globs (repeatable).")],
    data: DataOption,
    out: Annotated[Path, typer.Option("--out", help="Activation store directory to create or resume.")],
    batch_size: BatchSizeOption = 16,
    context_length: ContextOption = 128,
    max_tokens: MaxTokensOption = None,
    packing: Annotated[
        bool, typer.Option("--packing/--no-packing", help="Pack documents into full rows.")
    ] = False,
    dtype: Annotated[str, typer.Option(help="Stored dtype: float32, float16 or bfloat16.")] = "float32",
    device: DeviceOption = "cpu",
    workspace: WorkspaceOption = None,
    progress: ProgressOption = True,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Stream activations of HOOKS over --data into a sharded, checksummed activation store (resumable)."""
    from workbench.capture import capture_to_store  # deferred: CLI start-up (torch)

    stored = parse_dtype(dtype)
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; name a directory for the activation store")
    dataset = open_data(data)
    hooked = open_model(model, workspace, device=device, trust_remote_code=trust_remote_code)
    rows = dataset.token_row_stream(
        hooked.tokenizer,
        context_length=context_length,
        batch_size=batch_size,
        packing=packing,
        max_tokens=max_tokens,
    )
    typer.echo(f"capture: {rows.n_rows:,} sequences, {rows.n_tokens:,} tokens of {dataset.name} → {out}")
    store = capture_to_store(
        hooked,
        rows,
        hooks,
        out,
        batch_size=batch_size,
        context_length=context_length,
        dtype=stored,
        dataset=dataset.name,
        progress=progress,
    )
    hooks_text = f"{len(store.hooks)} hook{'s' if len(store.hooks) != 1 else ''}"
    if store.rows_written == 0:
        typer.echo(
            f"store complete: 0 new rows ({store.n_rows} rows × {hooks_text} already in {out}, checksums "
            "verified)"
        )
    elif store.rows_at_open:
        typer.echo(
            f"resumed {out}: wrote {store.rows_written} new rows × {hooks_text} ({store.n_rows} rows in "
            f"all, {store.rows_at_open} were already there)"
        )
    else:
        typer.echo(f"wrote {store.rows_written} rows × {hooks_text} to {out}")


def _mount_plugins() -> None:
    """Add the commands that installed packages declare in the ``workbench.cli`` entry-point group."""
    for entry in importlib.metadata.entry_points(group="workbench.cli"):
        try:
            target = entry.load()
        except ImportError as err:
            logging.getLogger(__name__).warning("command %r unavailable: %s", entry.name, err)
            continue
        if isinstance(target, typer.Typer):
            app.add_typer(target, name=entry.name)
        else:
            app.command(name=entry.name)(target)


_mount_plugins()

if __name__ == "__main__":
    app()
