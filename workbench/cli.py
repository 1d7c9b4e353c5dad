"""The ``workbench`` command line.

Core commands live here; the analysis packages contribute theirs through the ``workbench.cli`` entry-point
group (pyproject.toml), so ``workbench`` never imports ``probes``, ``circuits`` or ``app`` directly.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path
from typing import Annotated

import typer

from workbench import __version__
from workbench.cli_options import WorkspaceOption, fail

app = typer.Typer(
    name="workbench",
    help="Mechanistic-interpretability workbench: hooked models, activation stores, analyses and a dashboard.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


def load_model_argument(model: str, workspace: Path | None = None):
    """Resolve a MODEL argument: a directory, a zoo model name in the workspace (``name`` or ``name@step``),
    a packaged model (``minilm``), or a hub name."""
    from workbench.model import HookedModel

    name, _, step = model.partition("@")
    if Path(model).exists():
        return HookedModel.from_pretrained(model)
    from workbench.workspace import Workspace

    zoo_dir = Workspace(workspace).model_dir(name)
    if zoo_dir.is_dir():
        from workbench.checkpoints import CheckpointSeries

        series = CheckpointSeries.from_directory(zoo_dir)
        return series.load(int(step) if step else series.steps[-1])
    return HookedModel.from_pretrained(model)


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log what runs (attention path, files).")
    ] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


@app.command()
def version() -> None:
    """Print the workbench version."""
    typer.echo(__version__)


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="Model directory, zoo name[@step], 'minilm', or hub name.")],
    pattern: Annotated[str, typer.Option("--hooks", help="Only hook names matching this glob.")] = "*",
    workspace: WorkspaceOption = None,
) -> None:
    """Describe a model and list its hook names."""
    from workbench.model import ModelLoadError

    try:
        hooked = load_model_argument(model, workspace)
        names = hooked.resolve(pattern)
    except (ModelLoadError, KeyError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    typer.echo(repr(hooked))
    for key, value in hooked.cfg.to_dict().items():
        typer.echo(f"  {key}: {value}")
    typer.echo(f"{len(names)} hook points:")
    for name in names:
        typer.echo(f"  {name}")


@app.command()
def capture(
    model: Annotated[str, typer.Argument(help="Model directory, zoo name[@step], 'minilm', or hub name.")],
    hooks: Annotated[list[str], typer.Option("--hooks", help="Hook names or globs (repeatable).")],
    texts: Annotated[
        Path, typer.Option("--texts", help="UTF-8 file, one text per line (or .jsonl with 'text').")
    ],
    out: Annotated[Path, typer.Option("--out", help="Activation store directory to create or resume.")],
    batch_size: Annotated[int, typer.Option(help="Texts per forward pass.")] = 16,
    max_length: Annotated[int, typer.Option(help="Truncate texts to this many tokens.")] = 128,
    dtype: Annotated[str, typer.Option(help="Stored dtype: float32, float16 or bfloat16.")] = "float32",
    dataset: Annotated[str | None, typer.Option(help="Dataset name recorded in the manifest.")] = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Stream activations of HOOKS over TEXTS into a sharded, checksummed activation store (resumable)."""
    import torch

    from workbench.model import ModelLoadError
    from workbench.store import StoreError, capture_to_store
    from workbench.texts import TextFileError, load_texts

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        fail(f"--dtype {dtype!r} is not one of {', '.join(dtypes)}")
    try:
        corpus = load_texts(texts)
        hooked = load_model_argument(model, workspace)
        store = capture_to_store(
            hooked,
            corpus,
            hooks,
            out,
            batch_size=batch_size,
            max_length=max_length,
            dtype=dtypes[dtype],
            dataset=dataset or texts.stem,
        )
    except (TextFileError, ModelLoadError, StoreError, KeyError, ValueError, IndexError) as err:
        fail(str(err))
    typer.echo(f"wrote {store.n_rows} rows × {len(store.hooks)} hooks to {out}")


def _mount_core() -> None:
    from workbench.attention.cli import attention_command
    from workbench.massive_cli import massive_command
    from workbench.zoo.cli import app as zoo_app

    app.add_typer(zoo_app, name="zoo")
    app.command(name="massive")(massive_command)
    app.command(name="attention")(attention_command)


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


_mount_core()
_mount_plugins()

if __name__ == "__main__":
    app()
