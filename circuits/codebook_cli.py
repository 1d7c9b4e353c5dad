"""`workbench codebook train|analyse`: fine-tune codebooks on a zoo model and write the analysis tables."""

from __future__ import annotations

import typer

from workbench.cli_options import WorkspaceOption, fail

app = typer.Typer(help="Codebook features: VQ bottlenecks on hook sites, code analysis and steering.")


def _load(workspace, model_name: str, step: int | None):
    from workbench.checkpoints import CheckpointSeries
    from workbench.workspace import Workspace

    ws = Workspace(workspace).ensure()
    series = CheckpointSeries.from_directory(ws.model_dir(model_name))
    return ws, series.load(series.steps[-1] if step is None else step)


def _fsm_data(model_name: str, n_sequences: int, seq_len: int, seed: int):
    from workbench.zoo.corpora import TokFSM
    from workbench.zoo.labels import fsm_label_dataset
    from workbench.zoo.train import get_spec

    spec = get_spec(model_name)
    if spec.corpus != "fsm":
        raise ValueError(f"{model_name} is not an FSM zoo model; use fsm-tiny or fsm-small")
    return fsm_label_dataset(TokFSM(**spec.fsm, seed=spec.seed), n_sequences, seq_len, seed=seed)


def _errors() -> tuple[type[Exception], ...]:
    from workbench.checkpoints import CheckpointError
    from workbench.hooks import HookNameError

    return (ValueError, CheckpointError, HookNameError)


@app.command()
def train(
    model: str = typer.Argument("fsm-tiny", help="zoo model in the workspace"),
    site: list[str] = typer.Option(["blocks.1.hook_resid_post"], help="hook site(s) for codebooks"),
    n_codes: int = typer.Option(200), k: int = typer.Option(1), steps: int = typer.Option(150),
    similarity: str = typer.Option("dot", help="dot or cosine"),
    run: str = typer.Option("", help="run name under workspace/codebooks (default: MODEL-codebooks)"),
    step: int | None = typer.Option(None, help="checkpoint step (default: last)"),
    workspace: WorkspaceOption = None,
    seed: int = typer.Option(0, help="seed of the k-means init, batches and dead-code re-seeding"),
) -> None:  # fmt: skip
    """Fine-tune codebooks (checkpointed and resumable under workspace/codebooks/RUN) and print the loss gap."""
    from circuits.codebook import codebook_dir, train_codebooks

    try:
        ws, hooked = _load(workspace, model, step)
        tokens, _ = _fsm_data(model, 256, 32, 0)
        held_out, _ = _fsm_data(model, 128, 32, 1)
        _, report = train_codebooks(hooked, tokens, site, n_codes=n_codes, k=k, similarity=similarity,
                                    steps=steps, eval_tokens=held_out, seed=seed,
                                    directory=codebook_dir(ws, run or f"{model}-codebooks"))  # fmt: skip
    except _errors() as err:
        fail(err)
    typer.echo(f"loss {report.base_loss:.4f} -> {report.codebook_loss:.4f} with codebooks "
               f"(gap {report.loss_gap:+.4f}); saved in {report.directory}")  # fmt: skip


@app.command()
def analyse(
    model: str = typer.Argument("fsm-tiny"), run: str = typer.Option(""),
    step: int | None = typer.Option(None), workspace: WorkspaceOption = None,
) -> None:  # fmt: skip
    """Per-code counts, top contexts and FSM-state purity / MI of a trained run -> results tables."""
    from circuits.codebook import CodebookSet, analyse_codes, codebook_dir, write_results

    try:
        ws, hooked = _load(workspace, model, step)
        books = CodebookSet.load(codebook_dir(ws, run or f"{model}-codebooks"))
        books.check_sites(hooked)
        tokens, labels = _fsm_data(model, 128, 32, 1)
    except _errors() as err:
        fail(err)
    codes, purity = analyse_codes(hooked, books, tokens, {"fsm_state": labels["fsm_state"]}, model_name=model)
    write_results(codes, purity, ws)
    for site, rows in purity.groupby("site"):
        typer.echo(f"{site}: mean purity P(state | best code) over FSM states {rows['purity'].mean():.3f}, "
                   f"I(code; state) {rows['label_set_mi'].iloc[0]:.3f} nats")  # fmt: skip
