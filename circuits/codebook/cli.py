"""`workbench codebook train|run MODEL --data DATA`: codebooks on any causal LM, trained (checkpointed and resumable
under workspace/codebooks/RUN) and analysed on any dataset (`run`, the codebook analysis), written to the workspace
results database; `workbench codebook tokfsm MODEL` runs the TokFSM science check (tokfsm.py) on a TokFSM model.
`codebook analyse` is the hidden spelling of `codebook run` for one release."""

from __future__ import annotations

from typing import Annotated

import typer

from workbench.cli_options import (
    BatchSizeOption,
    ContextOption,
    DataOption,
    DeviceOption,
    MaxTokensOption,
    ModelArgument,
    ProgressOption,
    SeedOption,
    TrustRemoteCodeOption,
    WorkspaceOption,
    add_deprecated_alias,
    fail,
    open_data,
    open_model,
    require_data,
)
from workbench.workspace import Workspace

app = typer.Typer(
    help="Codebook features: VQ bottlenecks on hook sites of a causal LM, code analysis and steering."
)

RunOption = Annotated[
    str | None,
    typer.Option(
        "--run",
        help="Run name under workspace/codebooks (default: the model's short name + -codebooks; -tokfsm for the "
        "TokFSM study).",
    ),
]
NCodesOption = Annotated[int, typer.Option("--n-codes", min=1, help="Codes per codebook.")]
TrainStepsOption = Annotated[int, typer.Option("--steps", min=1, help="Training steps.")]
SimilarityOption = Annotated[str, typer.Option("--similarity", help="dot or cosine.")]


@app.command()
def train(
    model: ModelArgument,
    data: DataOption = None,
    site: Annotated[
        list[str] | None,
        typer.Option(
            "--site",
            help="Hook site of a codebook (repeatable): blocks.L.hook_resid_post|mlp_out|attn_out "
            "or blocks.L.attn.hook_z (one per head); default the last block's hook_resid_post.",
        ),
    ] = None,
    n_codes: NCodesOption = 200,
    k: Annotated[int, typer.Option("--k", min=1, help="Codes chosen per token.")] = 1,
    steps: TrainStepsOption = 150,
    similarity: SimilarityOption = "dot",
    run: RunOption = None,
    seed: SeedOption = 0,
    context_length: ContextOption = 128,
    max_tokens: MaxTokensOption = None,
    batch_size: BatchSizeOption = 32,
    device: DeviceOption = "cpu",
    workspace: WorkspaceOption = None,
    progress: ProgressOption = True,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Fine-tune codebooks with next-token loss on --data (a seeded quarter of its rows held out for the loss gap);
    a model or dataset codebooks cannot use (an encoder such as minilm, a missing site) is refused before any work."""
    from workbench.circuits.codebook import (  # deferred: CLI start-up (torch)
        CodebookConfig,
        check,
        codebook_dir,
        default_run_name,
        default_site,
    )
    from workbench.circuits.codebook.train import train as train_codebooks  # deferred: CLI start-up (torch)

    require_data(data, "the text or token ids the codebooks are trained on")
    CodebookConfig("--site", d=1, n_codes=n_codes, k=k, similarity=similarity)  # refuses bad settings at once
    hooked = open_model(model, workspace, device, "float32", trust_remote_code)
    dataset = open_data(data)
    sites = site or [default_site(hooked)]
    check(hooked, dataset, sites, context_length)
    directory = codebook_dir(Workspace(workspace).ensure(), run or default_run_name(model))
    _, report = train_codebooks(
        hooked,
        dataset,
        sites,
        n_codes=n_codes,
        k=k,
        similarity=similarity,
        steps=steps,
        batch_size=batch_size,
        context_length=context_length,
        max_tokens=max_tokens,
        directory=directory,
        seed=seed,
        progress=progress,
    )
    typer.echo(
        f"held-out loss {report.base_loss:.4f} -> {report.codebook_loss:.4f} with codebooks on "
        f"{', '.join(sites)} (gap {report.loss_gap:+.4f} nats, step {report.steps}); saved in "
        f"{report.directory}; next: workbench codebook run {model} --data {data} --run "
        f"{directory.name}"
    )


@app.command("run")
def run_analysis(
    model: ModelArgument,
    data: DataOption = None,
    run: RunOption = None,
    labels: Annotated[
        list[str] | None,
        typer.Option(
            "--labels",
            help="Per-token labels for purity / MI (repeatable): a label array of --data "
            "(zoo:tokfsm: fsm_state; default: all it carries) or a label source (spans .jsonl, "
            "FILE.py:FN).",
        ),
    ] = None,
    context_length: Annotated[
        int | None, typer.Option("--context-length", min=1, help="Tokens per row (default: the training's).")
    ] = None,
    max_tokens: MaxTokensOption = None,
    device: DeviceOption = "cpu",
    workspace: WorkspaceOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Per-code counts and top contexts of a trained run on --data (its held-out rows when it is the training
    data), and code ↔ label purity / MI when --data carries per-token labels or --labels names a source."""
    from workbench.analysis import write_tables  # deferred: CLI start-up (pandas)
    from workbench.circuits.codebook import (  # deferred: CLI start-up (torch)
        ANALYSIS,
        PURITY_TABLE,
        check,
        codebook_dir,
        default_run_name,
    )
    from workbench.circuits.codebook import run as analyse_codebooks  # deferred: CLI start-up (torch)

    require_data(data, "the text or token ids the codebooks are analysed on")
    hooked = open_model(model, workspace, device, "float32", trust_remote_code)
    dataset = open_data(data)
    check(hooked, dataset, context_length=context_length)
    ws = Workspace(workspace)
    directory = codebook_dir(ws, run or default_run_name(model))
    if not (directory / "codebooks.safetensors").exists():
        fail(
            f"no codebook run {directory.name!r} in {directory.parent}; train them first: workbench codebook "
            f"train {model} --data {data} --run {directory.name}"
        )
    frames = analyse_codebooks(
        hooked, dataset, directory, labels=labels, context_length=context_length, max_tokens=max_tokens
    )
    written = write_tables(ws.ensure(), ANALYSIS, frames)
    purity = frames[PURITY_TABLE]
    if len(purity):
        for (site, label_set), rows in purity.groupby(["site", "label_set"]):
            typer.echo(
                f"{site}: mean purity P({label_set} | best code) over {len(rows)} labels "
                f"{rows['purity'].mean():.3f}, I(code; {label_set}) {rows['label_set_mi'].iloc[0]:.3f} nats"
            )
    else:
        typer.echo(
            f"dataset {dataset.name!r} carries no per-token labels: wrote code counts and contexts only "
            "(pass --labels SOURCE for purity / MI)"
        )
    typer.echo(
        f"{written.get(ANALYSIS.tables[0].name, 0)} code rows of run {directory.name} on {dataset.name!r} "
        f"written (tables {', '.join(ANALYSIS.table_names)})"
    )


@app.command("tokfsm")
def tokfsm_study(
    model: ModelArgument,
    data: DataOption = "zoo:tokfsm",
    site: Annotated[
        str | None,
        typer.Option(
            "--site", help="Hook site of the k=1 codebook (default: the last block's hook_resid_post)."
        ),
    ] = None,
    n_codes: NCodesOption = 200,
    steps: TrainStepsOption = 100,
    similarity: SimilarityOption = "dot",
    run: RunOption = None,
    seed: SeedOption = 0,
    context_length: ContextOption = 32,
    device: DeviceOption = "cpu",
    workspace: WorkspaceOption = None,
    progress: ProgressOption = True,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """The TokFSM science check: train a k=1 codebook on a TokFSM model over --data (a TokFSM dataset, which carries
    its machine and state labels: zoo:tokfsm), write both codebook tables, and print how purely each FSM state's best
    code names it (against the best any code can do), the loss gap and what forcing a state's code does."""
    # deferred: CLI start-up (torch)
    from workbench.analysis import write_tables
    from workbench.circuits.codebook import ANALYSIS, CodebookConfig, check, codebook_dir
    from workbench.circuits.codebook.tokfsm import dataset_fsm, fsm_codebook_study
    from workbench.references import short_name

    CodebookConfig("--site", d=1, n_codes=n_codes, k=1, similarity=similarity)  # refuses bad settings at once
    dataset = open_data(data)
    dataset_fsm(dataset)  # a dataset that is not TokFSM's is refused before the model loads
    hooked = open_model(model, workspace, device, "float32", trust_remote_code)
    check(hooked, dataset, [site] if site else [], context_length)
    ws = Workspace(workspace).ensure()
    directory = codebook_dir(ws, run or f"{short_name(model)}-tokfsm")
    study = fsm_codebook_study(
        hooked,
        dataset,
        site=site,
        n_codes=n_codes,
        steps=steps,
        similarity=similarity,
        context_length=context_length,
        directory=directory,
        seed=seed,
        progress=progress,
    )
    written = write_tables(ws, ANALYSIS, study["frames"])
    steer = study["steering"]
    typer.echo(
        f"state purity {study['mean_state_purity']:.3f} (ceiling for a code that knows the exact state posterior "
        f"{study['purity_ceiling']:.3f}), loss gap {study['report'].loss_gap:+.3f} nats, forced code → legal from "
        f"forced state {steer['forced_legal_from_forced']:.2f} vs unforced {steer['plain_legal_from_forced']:.2f}"
    )
    tables = ", ".join(f"{name} ({rows} rows)" for name, rows in written.items())
    typer.echo(f"codebooks saved in {directory}; wrote {tables} to {ws.results_path}")


add_deprecated_alias(app, "analyse", "codebook analyse", "codebook run", run_analysis)
