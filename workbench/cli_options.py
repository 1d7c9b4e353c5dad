"""What every `workbench` command shares: the options every analysis takes (model reference, --data, workspace,
device, dtype, batch size, context length, token budget, seed, progress), opening them, and the one way to fail."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from workbench.workspace import Workspace

if TYPE_CHECKING:
    import torch

    from workbench.checkpoints import CheckpointSeries
    from workbench.datasets import Dataset
    from workbench.model import HookedModel

WorkspaceOption = Annotated[
    Path | None,
    typer.Option(
        "--workspace", "-w", help="Workspace directory (default: $WORKBENCH_WORKSPACE or ./workspace)."
    ),
]
ModelArgument = Annotated[
    str,
    typer.Argument(
        help="Model reference: DIR (save_pretrained), DIR or DIR@STEP (step<N>/ folders), a workspace model "
        "NAME[@STEP], minilm, ORG/NAME[@REVISION] (hub or its cache), tl:NAME (TransformerLens)."
    ),
]
DataOption = Annotated[
    str | None,
    typer.Option(
        "--data",
        "-d",
        help="Dataset reference: FILE.txt (a document per line), FILE.jsonl:FIELD / .csv / .parquet, a directory "
        "of text files, a save_to_disk folder, ids.npy / .safetensors, an activation store, zoo:python-stdlib, "
        "zoo:tokfsm, zoo:digits.",
    ),
]
DeviceOption = Annotated[str, typer.Option("--device", help="torch device: cpu, cuda, cuda:1, mps.")]
DtypeOption = Annotated[str, typer.Option("--dtype", help="Model dtype: float32, float16 or bfloat16.")]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", min=1, help="Sequences per forward pass.")]
ContextOption = Annotated[int, typer.Option("--context-length", min=1, help="Tokens per sequence.")]
MaxTokensOption = Annotated[
    int | None, typer.Option("--max-tokens", min=1, help="Token budget read from --data (default: all).")
]
SeedOption = Annotated[
    int, typer.Option("--seed", help="Seed of every random choice (same seed, same result).")
]
ProgressOption = Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars.")]
TrustRemoteCodeOption = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code", help="Allow a model whose config runs its own Python code (auto_map)."
    ),
]
StepsOption = Annotated[
    list[int] | None, typer.Option("--step", help="Only these checkpoint steps (repeatable).")
]
# A transcoder circuit's target and prompt (`workbench circuits attribute|qk`, and the hidden `sae circuit` /
# `circuits export` aliases).
LayerOption = Annotated[int | None, typer.Option(help="Target layer (default: the highest transcoder's).")]
FeatureOption = Annotated[
    int | None, typer.Option(help="Target feature (default: the most active at --position).")
]
PromptIndexOption = Annotated[int, typer.Option(min=0, help="Which token row of --data is the prompt.")]
PositionOption = Annotated[int, typer.Option(help="Target position in the prompt (negative: from the end).")]
TopKOption = Annotated[int, typer.Option(min=1, help="Contributors kept per node.")]
DepthOption = Annotated[int, typer.Option(min=1, help="Levels of the greedy path search.")]
RootOption = Annotated[
    str,
    typer.Option(
        help="logit: rooted at the most probable next tokens at --position (circuit-tracer's graphs; needs a "
        "transcoder on every layer); feature: at a transcoder feature (--layer / --feature)."
    ),
]
MaxLogitsOption = Annotated[int, typer.Option(min=1, help="Logit roots at most (--root logit).")]
LogitProbabilityOption = Annotated[
    float,
    typer.Option(
        min=0.0, max=1.0, help="Logit roots until their total probability reaches this (--root logit)."
    ),
]
DTYPES = ("float32", "float16", "bfloat16")
# The prompts an analysis reads when --data is not given (massive activations, attention statistics).
DEFAULT_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "def add(a, b):\n    return a + b\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
    "Massive activations act as fixed biases in the residual stream.",
]


def fail(message: object) -> NoReturn:
    """Print ``error: message`` in red on stderr and exit with status 2 (bad input, nothing was written)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def deprecation_note(old: str, new: str) -> None:
    """The one line on stderr an old command spelling prints before it runs: ``workbench OLD`` goes in the next
    release, ``workbench NEW`` is its spelling now."""
    typer.echo(
        f"warning: `workbench {old}` is deprecated (it goes in the next release); use `workbench {new}`",
        err=True,
    )


def add_deprecated_alias(
    group: typer.Typer, name: str, old: str, new: str, command: Callable[..., Any]
) -> None:
    """Register ``name`` in ``group`` as a hidden alias of ``command`` for one release: the same arguments and
    options, one :func:`deprecation_note` (``old`` -> ``new``, whole spellings after ``workbench``), then
    ``command``."""

    @functools.wraps(command)
    def alias(*args: Any, **kwargs: Any) -> Any:
        deprecation_note(old, new)
        return command(*args, **kwargs)

    group.command(name, hidden=True, help=f"Deprecated spelling of `workbench {new}`.")(alias)


def run_group(help: str, old: str, new: str) -> typer.Typer:
    """The command group of an analysis whose ``run`` command was the whole command in the last release: a first
    argument that is no command name (``workbench GROUP MODEL ...``) runs ``run`` with the same arguments after one
    :func:`deprecation_note` (``old`` -> ``new``), for one release."""

    class RunsByDefault(TyperGroup):
        def resolve_command(self, ctx: Any, args: list[str]) -> tuple[str | None, Any, list[str]]:
            if (
                args
                and args[0] not in self.commands
                and not args[0].startswith("-")
                and not ctx.resilient_parsing
            ):
                deprecation_note(old, new)
                return "run", self.commands["run"], args
            return super().resolve_command(ctx, args)

    # the callback keeps a group of one command a group (`workbench GROUP run`), not that command
    return typer.Typer(cls=RunsByDefault, help=help, no_args_is_help=True, callback=lambda: None)


def parse_dtype(name: str) -> torch.dtype:
    """``"float32"`` / ``"float16"`` / ``"bfloat16"`` -> the torch dtype; anything else fails naming the choices."""
    import torch  # deferred: CLI start-up (torch)

    if name not in DTYPES:
        fail(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def open_model(
    model: str,
    workspace: Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
) -> HookedModel:
    """Resolve a MODEL argument through the one resolver (``workbench.references.resolve_model``).

    The workspace's results database is opened first, so a corrupt or locked one fails before any model work.
    """
    from workbench.references import resolve_model  # deferred: CLI start-up (torch)

    check_results(workspace)

    return resolve_model(
        model,
        workspace=workspace,
        device=device,
        dtype=parse_dtype(dtype),
        trust_remote_code=trust_remote_code,
    )


def open_series(
    model: str,
    workspace: Path | None = None,
    steps: list[int] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
) -> CheckpointSeries:
    """Resolve a MODEL argument as a checkpoint series (``workbench.references.resolve_series``), after
    :func:`check_results`."""
    from workbench.references import resolve_series  # deferred: CLI start-up (torch)

    check_results(workspace)
    return resolve_series(
        model,
        workspace=workspace,
        steps=steps,
        device=device,
        dtype=parse_dtype(dtype),
        trust_remote_code=trust_remote_code,
    )


def check_results(workspace: Path | None) -> None:
    """Open the workspace's results database if it exists: a corrupt or locked one raises its clear error now,
    before a command spends time on models and data."""
    ws = Workspace(workspace)
    if ws.results_path.exists():
        ws.results().tables()


DATA_REFERENCES = "a text file, FILE.jsonl:FIELD, a directory, a save_to_disk folder, ids.npy, an activation store or zoo:NAME"


def require_data(data: str | None, reads: str = "the dataset this command reads") -> str:
    """``--data`` when given; otherwise exit 2 before any work, saying what the command ``reads`` from it and which
    references it takes (the one place a command requires ``--data``)."""
    if data is None:
        fail(f"--data is required: {reads} ({DATA_REFERENCES})")
    return data


def open_data(data: str | None, default: str | None = None, limit: int | None = None) -> Dataset:
    """Load ``--data`` (or ``default`` when it is not given) through ``workbench.datasets.load_dataset``."""
    from workbench.datasets import load_dataset  # deferred: CLI start-up (torch)

    return load_dataset(data or require_data(default), limit=limit)


def default_prompts() -> Dataset:
    """The built-in prompt set used when ``--data`` is not given (a Dataset named builtin-prompts)."""
    from workbench.datasets import Dataset  # deferred: CLI start-up (torch)

    return Dataset("builtin-prompts", texts=lambda: DEFAULT_TEXTS)


def budget_inputs(
    dataset: Dataset, series: CheckpointSeries, context_length: int, max_tokens: int | None
) -> Any:
    """``dataset`` itself (streamed), or its first ``max_tokens`` tokens as token rows [n, context_length]
    (tokenized with the series' tokenizer); prints how much of it the command will read, at how many checkpoints."""
    checkpoints = f" at each of {len(series)} checkpoints" if len(series) > 1 else ""
    if max_tokens is None:
        size = dataset.meta.get("documents")
        if size is None and dataset.token_ids is not None:
            size = len(dataset.token_ids)
        unit = "documents" if dataset.modality == "text" else "rows"
        amount = f"{size:,} {unit}" if size is not None else f"every {unit[:-1]}"
        typer.echo(f"reading all of {dataset.name}: {amount}{checkpoints} (--max-tokens N reads less)")
        return dataset
    rows = dataset.token_rows(series.tokenizer(), context_length=context_length, max_tokens=max_tokens)
    tokens = sum(len(row) for row in rows)
    typer.echo(f"reading the first {tokens:,} tokens of {dataset.name} ({len(rows):,} rows){checkpoints}")
    return rows
