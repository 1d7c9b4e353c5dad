"""`workbench sae train MODEL --data DATA`, `sae eval|features SAE MODEL --data DATA`, `sae import PATH [MODEL]` and
`sae export SAE [MODEL] --out DIR` (mounted through the workbench.cli entry points): SAEs and transcoders on any
model reference and any dataset reference. Hidden for one release: `sae circuit` (now `circuits attribute`) and
`--model` of import / export (now the positional MODEL)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from workbench.circuits.attribution.cli import app as circuits_app
from workbench.circuits.attribution.cli import run_deprecated_circuit
from workbench.cli_options import (
    BatchSizeOption,
    ContextOption,
    DataOption,
    DepthOption,
    DeviceOption,
    FeatureOption,
    LayerOption,
    LogitProbabilityOption,
    MaxLogitsOption,
    ModelArgument,
    PositionOption,
    ProgressOption,
    PromptIndexOption,
    RootOption,
    SeedOption,
    TopKOption,
    TrustRemoteCodeOption,
    WorkspaceOption,
    add_deprecated_alias,
    deprecation_note,
    fail,
    open_data,
    open_model,
    require_data,
)
from workbench.workspace import Workspace

if TYPE_CHECKING:  # imported where used: CLI start-up (torch)
    from workbench.circuits.sae.analysis import SAETrainSettings

app = typer.Typer(
    help="Sparse autoencoders and transcoders: train, eval, features, import, export (MODEL after the SAE "
    "where a command takes both).",
    no_args_is_help=True,
)

# The model an SAE is checked against or read through, where a command can do without it (`sae import`, `sae export`):
# a positional MODEL after the SAE, as in `sae eval|features SAE MODEL`; `--model` is the spelling before issue 30.
OptionalModelArgument = Annotated[
    str | None, typer.Argument(help="Model reference (as MODEL of `workbench sae eval`); optional here.")
]
OldModelOption = Annotated[
    str | None, typer.Option("--model", hidden=True, help="Deprecated: MODEL, positional.")
]


def _model_argument(command: str, model: str | None, old_option: str | None) -> str | None:
    """MODEL, or the hidden ``--model`` it replaced (one deprecation line); both given is refused."""
    if old_option is None:
        return model
    if model is not None:
        fail(f"MODEL is given twice ({model!r} and --model {old_option!r}): pass it once, after the SAE")
    deprecation_note(f"sae {command} ... --model MODEL", f"sae {command} ... MODEL")
    return old_option


# Checked by the library (an `error:` line naming the fix) rather than by typer's range check.
TokensOption = Annotated[
    int | None,
    typer.Option("--max-tokens", help="Token budget read from --data (default: 100000 for train)."),
]


@app.command()
def train(
    context: typer.Context,
    model: ModelArgument,
    hook: Annotated[
        list[str],
        typer.Option(
            help="Input hook, e.g. blocks.0.hook_resid_post (or blocks.0.attn.hook_z: the heads flattened); repeat "
            "it (or comma-separate) for several SAEs, all trained from one model forward."
        ),
    ],
    data: DataOption = None,
    hook_out: Annotated[
        list[str] | None,
        typer.Option(
            help="Output hook for a transcoder (e.g. blocks.0.hook_mlp_out); with several --hook, one per --hook "
            "in the same order."
        ),
    ] = None,
    architecture: Annotated[
        str, typer.Option(help="relu, topk, batchtopk, jumprelu, gated or matryoshka_batchtopk.")
    ] = "topk",
    d_sae: Annotated[int, typer.Option(help="Number of latents.")] = 256,
    k: Annotated[int, typer.Option(help="Active latents per token (topk / batchtopk).")] = 8,
    skip: Annotated[bool, typer.Option(help="Skip transcoder (adds x @ W_skip).")] = False,
    steps: Annotated[int, typer.Option(help="Training steps.")] = 300,
    max_tokens: TokensOption = 100_000,
    context_length: ContextOption = 128,
    batch_size: BatchSizeOption = 16,
    train_batch_size: Annotated[
        int, typer.Option(min=1, help="Activation rows per training step (over all processes).")
    ] = 256,
    sae_id: Annotated[
        list[str] | None,
        typer.Option(
            help="Name of the SAE (default: MODEL's short name, hook(s) and architecture); with several --hook, "
            "one per --hook."
        ),
    ] = None,
    seed: SeedOption = 0,
    device: DeviceOption = "cpu",
    workspace: WorkspaceOption = None,
    progress: ProgressOption = True,
    trust_remote_code: TrustRemoteCodeOption = False,
    nproc: Annotated[
        int,
        typer.Option(
            help="Processes on this machine (torchrun; gloo on CPU, NCCL on GPU: one GPU per process), each "
            "running the model on its own share of the documents. For several machines run `torchrun --nnodes "
            "... -m workbench.cli sae train ...` instead."
        ),
    ] = 1,
    parallel: Annotated[
        str,
        typer.Option(
            help="How the processes share the SAEs: data (every process trains every SAE, gradients averaged), "
            "hooks (each SAE trained by one process on every process's activations of its hook, like sparsify's "
            "distribute_modules) or auto (hooks when there are at least as many SAEs as processes, else data)."
        ),
    ] = "auto",
    checkpoint_every: Annotated[
        int,
        typer.Option(
            min=0,
            help="Save the training state every N steps (0: never) in the workspace's jobs/sae-train-<key>/ "
            "(<key>: this command's options); the same command rerun after a crash or a killed process resumes "
            "from the last checkpoint. Removed once the SAEs are saved.",
        ),
    ] = 0,
    mask_outliers: Annotated[
        float | None,
        typer.Option(
            help="Leave out of training the tokens whose norm exceeds this many times the median "
            "(attention sinks / massive activations), e.g. 10."
        ),
    ] = None,
    mask_action: Annotated[
        str, typer.Option(help="What --mask-outliers does to such tokens: exclude or cap (scale down).")
    ] = "exclude",
    mask_metric: Annotated[
        str,
        typer.Option(
            help="Size --mask-outliers compares: norm, or max (largest |entry|: post-LayerNorm models)."
        ),
    ] = "norm",
) -> None:
    """Train SAEs / transcoders (one per --hook, from one model forward) on MODEL's activations over --data, save
    them under the workspace (saes/<id>/) and write sae_evals (held-out quarter of the rows) and sae_features.

    With --nproc N (or under torchrun) the N processes take disjoint document ranges; --parallel picks
    data-parallel or hook-sharded training. Hook-sharded SAE files are written by the process that trains them:
    across machines, put the workspace on a filesystem every machine sees."""
    from workbench.analysis import write_tables  # deferred: CLI start-up (pandas)
    from workbench.circuits.sae import distributed as dist  # deferred: CLI start-up (torch)
    from workbench.circuits.sae.analysis import (  # deferred: CLI start-up (torch)
        ANALYSIS,
        SAETrainSettings,
        run,
    )

    require_data(data, "the text the activations are read from, or an activation store holding the hook(s)")
    settings = SAETrainSettings(
        max_tokens=max_tokens,
        context_length=context_length,
        batch_size=batch_size,
        steps=steps,
        train_batch_size=train_batch_size,
        seed=seed,
    )
    launch = _Launch(
        context, model, data, device, workspace, progress, trust_remote_code, nproc, checkpoint_every
    )
    wanted = _Wanted(_listed(hook), _listed(hook_out), _listed(sae_id), architecture, d_sae, k, skip)
    if architecture.startswith("clt"):  # one cross-layer transcoder over every layer the patterns match
        return _train_clt(launch, _clt_spec(wanted), settings)
    specs = _sae_specs(model, wanted)
    world = int(os.environ["WORLD_SIZE"]) if dist.launched_by_torchrun() else nproc
    mode = dist.parallel_mode(parallel, len(specs), world)  # checked before any process starts
    started = _start(launch, mode)
    if started is None:  # this process launched the --nproc processes, which did the work
        return
    ctx, hooked, state_dir, options = started
    main = ctx is None or ctx.is_main
    if mask_outliers:
        options |= {
            "outlier_norm": mask_outliers,
            "outlier_action": mask_action,
            "outlier_metric": mask_metric,
        }
    frames = run(
        hooked,
        open_data(data),
        specs,
        settings,
        workspace=workspace,
        progress=progress and main,
        distributed=ctx,
        train_options=options,
    )
    if main:
        written = write_tables(workspace, ANALYSIS, frames)
        if state_dir is not None:  # every rank is past training (run gathered their rows)
            shutil.rmtree(state_dir, ignore_errors=True)
        rows = frames["sae_evals"].set_index("sae_id")
        for name in specs:
            typer.echo(f"{name}: {_metrics(rows.loc[name], name)}")
        if ctx is not None:
            typer.echo(_layout(ctx, list(specs)))
        saved = ", ".join(f"saes/{name}" for name in specs)
        tables = ", ".join(f"{table} {count} rows" for table, count in written.items())
        typer.echo(
            f"saved to {saved}; {hooked.cfg.name} on {rows.iloc[0]['dataset']!r} written to the workspace "
            f"({tables})"
        )
    if ctx is not None:
        dist.shutdown()


@dataclass(frozen=True)
class _Launch:
    """Where and how one ``sae train`` command runs, beside what it trains (its specs) and how (its
    ``SAETrainSettings``): the references, the device and workspace, the processes and the checkpoints."""

    context: typer.Context
    model: str
    data: str | None
    device: str
    workspace: Path | None
    progress: bool
    trust_remote_code: bool
    nproc: int
    checkpoint_every: int


def _start(launch: _Launch, mode: str):
    """Start ``sae train`` in this process: None when this process launched the --nproc processes (torchrun) that do
    the work; else (this rank of the torchrun job or None, the model, the checkpoint folder or None, the
    ``TrainConfig`` options that checkpoint into it), the resume said once."""
    from workbench.circuits.sae import distributed as dist  # deferred: CLI start-up (torch)

    if launch.nproc > 1 and not dist.launched_by_torchrun():  # re-run this very command on nproc ranks
        dist.check_local_devices(launch.nproc, launch.device)
        dist.launch(launch.nproc, ["sae", "train", *_argv(launch.context, drop=("nproc",))])
        return None
    ctx = dist.init_distributed(mode, launch.device) if dist.launched_by_torchrun() else None
    device = str(ctx.device) if ctx else launch.device
    hooked = open_model(launch.model, launch.workspace, device, "float32", launch.trust_remote_code).eval()
    world = ctx.world_size if ctx is not None else 1
    if not launch.checkpoint_every:
        return ctx, hooked, None, {}
    state_dir = _checkpoint_dir(launch.context, launch.workspace, world, mode)
    if (ctx is None or ctx.is_main) and state_dir.is_dir() and any(state_dir.iterdir()):
        typer.echo(f"resuming from the checkpoint in {state_dir}")
    return ctx, hooked, state_dir, {"checkpoint_dir": state_dir, "checkpoint_every": launch.checkpoint_every}


@dataclass(frozen=True)
class _Wanted:
    """What one ``sae train`` command trains, as its options name it: the --hook, --hook-out and --sae-id values
    (repeated and comma-separated ones listed in order), the architecture and its width, k and skip."""

    hooks: list[str]
    hooks_out: list[str]
    ids: list[str]
    architecture: str
    d_sae: int
    k: int
    skip: bool


def _clt_spec(wanted: _Wanted) -> dict:
    """``run_clt``'s keyword arguments for ``sae train --architecture clt*``: one --hook pattern and one --hook-out
    pattern (every layer they match), at most one --sae-id."""
    from workbench.circuits.sae.clt import CLT_ARCHITECTURES  # deferred: CLI start-up (torch)

    ins, outs, names, architecture = wanted.hooks, wanted.hooks_out, wanted.ids, wanted.architecture
    if architecture not in CLT_ARCHITECTURES or len(ins) != 1 or len(outs) != 1 or len(names) > 1:
        fail(
            f"--architecture {architecture} trains one CLT ({', '.join(CLT_ARCHITECTURES)}) from one --hook pattern "
            "and one --hook-out pattern, e.g. --hook 'blocks.*.ln2.hook_normalized' --hook-out "
            "'blocks.*.hook_mlp_out'"
        )
    return {
        "sae_id": names[0] if names else None,
        "hook": ins[0],
        "hook_out": outs[0],
        "architecture": architecture,
        "d_sae": wanted.d_sae,
        "k": wanted.k,
        "skip": wanted.skip,
    }


def _train_clt(launch: _Launch, spec: dict, settings: SAETrainSettings) -> None:
    """``sae train --architecture clt|clt_relu|clt_topk|clt_batchtopk``: one CLT of ``spec`` (:func:`_clt_spec`)
    over the layers its patterns match (``circuits.sae.clt_analysis.run_clt``), data-parallel under --nproc."""
    from workbench.analysis import write_tables  # deferred: CLI start-up (pandas)
    from workbench.circuits.sae import distributed as dist  # deferred: CLI start-up (torch)
    from workbench.circuits.sae.clt_analysis import (  # deferred: CLI start-up (torch)
        ANALYSIS,
        REPLACEMENT,
        run_clt,
    )

    started = _start(launch, "data")
    if started is None:  # this process launched the --nproc processes, which did the work
        return
    ctx, hooked, state_dir, options = started
    main = ctx is None or ctx.is_main
    frames = run_clt(
        hooked,
        open_data(launch.data),
        **spec,
        settings=settings,
        workspace=launch.workspace,
        progress=launch.progress and main,
        distributed=ctx,
        train_options=options,
        announce=typer.echo,
    )
    if main:
        written = write_tables(launch.workspace, (ANALYSIS, REPLACEMENT), frames)
        if state_dir is not None:
            shutil.rmtree(state_dir, ignore_errors=True)
        for row in frames["sae_evals"].itertuples():
            typer.echo(
                f"{row.hook} -> {row.hook_out}: L0 {row.L0:.2f}  FVU {row.FVU:.4f}  dead {row.dead_fraction:.0%}"
            )
        for row in frames.get("transcoder_replacement", frames["sae_evals"].iloc[:0]).itertuples():
            typer.echo(
                f"replacement model: CE {row.ce_replacement:.4f} (model {row.ce_clean:.4f}, unigram "
                f"{row.ce_unigram:.4f}), KL {row.kl:.4f}, {_gain_kept(row)}"
            )
        _dead_warnings(frames["sae_evals"], clt=True)
        if ctx is not None:
            typer.echo(f"{ctx.world_size} data-parallel processes (every process trained the CLT)")
        sae_name = frames["sae_evals"].iloc[0]["sae_id"]
        tables = ", ".join(f"{table} {count} rows" for table, count in written.items())
        typer.echo(f"saved to saes/{sae_name}; written to the workspace ({tables})")
    if ctx is not None:
        dist.shutdown()


def _gain_kept(row) -> str:
    """The replacement model's share of the model's loss gain over the unigram baseline, or why it has none (a
    model whose CE is not below the unigram's, e.g. untrained, has no gain to keep)."""
    if row.ce_clean < row.ce_unigram:
        return f"loss gain kept {row.gain_kept:.3f}"
    return (
        f"loss gain kept: none to keep (the model's CE {row.ce_clean:.4f} is not below the unigram "
        f"baseline's {row.ce_unigram:.4f})"
    )


def _dead_warnings(evals, clt: bool) -> None:
    """Print :func:`dead_warning` for each per-layer row of a CLT (``clt``: named by the CLT and its layer's input
    hook) or of a set of transcoders (named by their own ids)."""
    for _, row in evals.iterrows():
        warning = dead_warning(row, f"{row['sae_id']} at {row['hook']}" if clt else str(row["sae_id"]))
        if warning:
            typer.echo(warning)


def _checkpoint_dir(context: typer.Context, workspace: Path | None, world: int, mode: str) -> Path:
    """``jobs/sae-train-<key>`` in the workspace, ``key`` a hash of the options that shape the training stream and
    the SAEs (and of the number of processes and the layout): another command never resumes this one's state."""
    ignored = ("progress", "nproc", "workspace", "checkpoint_every")
    shaping = {k: v for k, v in sorted(context.params.items()) if k not in ignored} | {
        "world": world,
        "mode": mode,
    }
    key = hashlib.sha256(json.dumps(shaping, default=str).encode()).hexdigest()[:16]
    return Workspace(workspace).jobs_dir / f"sae-train-{key}"


def _sae_specs(model: str, wanted: _Wanted) -> dict[str, dict]:
    """{sae_id: SAEConfig kwargs} for ``sae train``: one SAE per --hook (its --hook-out and --sae-id by position)."""
    from workbench.circuits.sae.analysis import default_sae_id  # deferred: CLI start-up (torch)
    from workbench.circuits.sae.base import K_ARCHITECTURES  # deferred: CLI start-up (torch)
    from workbench.circuits.sae.train import check_sae_name  # deferred: CLI start-up (torch)

    ins, outs, names, architecture = wanted.hooks, wanted.hooks_out, wanted.ids, wanted.architecture
    if not ins:
        fail("--hook is empty: name the input hook, e.g. --hook blocks.0.hook_resid_post")
    for option, given in (("--hook-out", outs), ("--sae-id", names)):
        if given and len(given) != len(ins):
            fail(
                f"{len(given)} {option} for {len(ins)} --hook ({', '.join(ins)}): give one {option} per --hook, "
                "in the same order, or none"
            )
    pairs = list(zip(ins, outs or ins, strict=True))  # an SAE reconstructs its own hook
    names = (
        [check_sae_name(n) for n in names]
        if names
        else [default_sae_id(model, h, architecture, o) for h, o in pairs]
    )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        fail(
            f"SAE id {repeated[0]!r} is given twice (the same --hook/--hook-out pair or --sae-id): each SAE needs "
            "its own id"
        )
    extra = {"k": wanted.k} if architecture in K_ARCHITECTURES else {}
    return {
        name: {
            "architecture": architecture,
            "d_sae": wanted.d_sae,
            "hook_in": h,
            "hook_out": o,
            "skip": wanted.skip,
        }
        | extra
        for name, (h, o) in zip(names, pairs, strict=True)
    }


def _listed(values: list[str] | None) -> list[str]:
    """Repeated and comma-separated option values, in order."""
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


def _layout(ctx, names: list[str]) -> str:
    """Which process trained what, for the summary line."""
    from workbench.circuits.sae.distributed import owned_names  # deferred: CLI start-up (torch)

    if ctx.mode == "data":
        return f"{ctx.world_size} data-parallel processes (every process trained every SAE)"
    owners = "; ".join(
        f"rank {r}: {', '.join(owned_names(names, r, ctx.world_size)) or 'none'}"
        for r in range(ctx.world_size)
    )
    return f"{ctx.world_size} hook-sharded processes ({owners})"


def _argv(context: typer.Context, drop: tuple[str, ...] = ()) -> list[str]:
    """The command line that gives ``context``'s parameter values (what a torchrun rank re-parses)."""
    argv: list[str] = []
    for param in context.command.params:
        value = context.params.get(param.name or "")
        if param.name in drop or value is None:
            continue
        opts, negative = list(param.opts), list(getattr(param, "secondary_opts", []))
        if param.param_type_name == "argument":
            argv.append(str(value))
        elif getattr(param, "is_flag", False):
            argv += [opts[0]] if value else negative[:1]
        else:
            for item in value if getattr(param, "multiple", False) else [value]:
                argv += [opts[0], str(item)]
    return argv


@app.command("eval")
def evaluate(
    sae_path: Annotated[
        str,
        typer.Argument(
            help="SAE directory (any layout sae import reads) or SAE id; a cross-layer transcoder (id, or folder: "
            "ours or circuit-tracer's) or a circuit-tracer transcoder set; or per-layer transcoders, "
            "comma-separated (ID0,ID1,...), scored together as a replacement model."
        ),
    ],
    model: ModelArgument,
    data: DataOption = None,
    max_tokens: TokensOption = 20_000,
    context_length: ContextOption = 128,
    batch_size: BatchSizeOption = 16,
    sae_id: Annotated[
        str | None, typer.Option(help="Name in sae_evals (default: the directory name).")
    ] = None,
    device: DeviceOption = "cpu",
    workspace: WorkspaceOption = None,
    progress: ProgressOption = True,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Evaluate a saved SAE spliced into MODEL over --data and write its sae_evals row (CE metrics on causal LMs,
    reconstruction metrics on any model). A CLT or several transcoders: per-layer sae_evals rows and the
    replacement model (every MLP replaced at once) in transcoder_replacement."""
    from workbench.analysis import write_tables  # deferred: CLI start-up (pandas)
    from workbench.circuits.sae.analysis import (  # deferred: CLI start-up (torch)
        ANALYSIS,
        check_sae_fits,
        find_sae,
        hook_widths,
    )
    from workbench.circuits.sae.analysis import evaluate as evaluate_on  # deferred: CLI start-up (torch)
    from workbench.circuits.sae.clt_analysis import find_transcoders  # deferred: CLI start-up (torch)

    require_data(data, "the text the activations are read from, or an activation store holding the hook(s)")
    references = _listed([sae_path])
    if not references:
        fail("the SAE argument is empty: name an SAE id or directory, or transcoders as ID0,ID1,...")
    several = find_transcoders(references, workspace)
    if several is not None:
        _eval_transcoders(
            several,
            model,
            data,
            max_tokens,
            context_length,
            batch_size,
            sae_id,
            device,
            workspace,
            progress,
            trust_remote_code,
        )
        return
    found, sae = find_sae(references[0], workspace)
    hooked = open_model(model, workspace, device, "float32", trust_remote_code).eval()
    dataset = open_data(data)
    hooks = list(dict.fromkeys([sae.hook_in, sae.hook_out]))
    if all(h in hooked.hook_names() for h in hooks):  # evaluate_on names a missing hook with its fix
        note = check_sae_fits(sae, hooked, hook_widths(hooked, hooks)[0], sae_id or found)
        if note:
            typer.echo(f"warning: {note}", err=True)
    frames = evaluate_on(
        hooked,
        dataset,
        sae,
        sae_id=sae_id or found,
        max_tokens=max_tokens,
        context_length=context_length,
        batch_size=batch_size,
        progress=progress,
    )
    write_tables(workspace, ANALYSIS, frames)
    typer.echo(
        f"{sae_id or found} on {hooked.cfg.name} / {dataset.name!r}: "
        + _metrics(frames["sae_evals"].iloc[0], sae_id or found)
    )


# The last release's CLT scorer, `circuits clt-eval PATH MODEL`, is `sae eval PATH MODEL` for one release (registered
# here: circuits/attribution/cli.py cannot import this module, which imports it).
add_deprecated_alias(
    circuits_app, "clt-eval", "circuits clt-eval PATH MODEL", "sae eval PATH MODEL", evaluate
)


def _eval_transcoders(
    found,
    model,
    data,
    max_tokens,
    context_length,
    batch_size,
    sae_id,
    device,
    workspace,
    progress,
    trust_remote_code,
) -> None:
    """``sae eval`` of a CLT or a set of per-layer transcoders (``clt_analysis.evaluate_replacement``)."""
    from workbench.analysis import write_tables  # deferred: CLI start-up (pandas)
    from workbench.circuits.sae.clt_analysis import (  # deferred: CLI start-up (torch)
        ANALYSIS,
        REPLACEMENT,
        evaluate_replacement,
    )

    hooked = open_model(model, workspace, device, "float32", trust_remote_code).eval()
    dataset = open_data(data)
    frames, notes = evaluate_replacement(
        hooked,
        dataset,
        found,
        sae_id=sae_id,
        workspace=workspace,
        max_tokens=max_tokens,
        context_length=context_length,
        batch_size=batch_size,
        progress=progress,
    )
    for note in notes:
        typer.echo(f"warning: {note}", err=True)
    written = write_tables(workspace, (ANALYSIS, REPLACEMENT), frames)
    for row in frames["sae_evals"].itertuples():
        typer.echo(
            f"{row.sae_id} {row.hook} -> {row.hook_out}: L0 {row.L0:.2f}  FVU {row.FVU:.4f}  dead "
            f"{row.dead_fraction:.0%}  dense {row.dense_fraction:.0%}"
        )
    for row in frames.get("transcoder_replacement", frames["sae_evals"].iloc[:0]).itertuples():
        typer.echo(
            f"replacement model ({row.n_tokens} predicted tokens): CE {row.ce_replacement:.4f} (model "
            f"{row.ce_clean:.4f}, unigram {row.ce_unigram:.4f} from {row.unigram_tokens}), KL {row.kl:.4f}, "
            f"{_gain_kept(row)}"
        )
    if "transcoder_replacement" not in frames:
        typer.echo(f"no replacement-model row: {frames['sae_evals'].iloc[0]['ce_note']}")
    _dead_warnings(frames["sae_evals"], clt=not isinstance(found.transcoders, list))
    tables = ", ".join(f"{table} {count} rows" for table, count in written.items())
    typer.echo(
        f"{sae_id or found.name} on {hooked.cfg.name} / {dataset.name!r} written to the workspace ({tables})"
    )


@app.command(hidden=True)
def circuit(
    model: ModelArgument,
    transcoder: Annotated[
        list[str],
        typer.Option(
            help="Transcoder id in the workspace or directory (repeatable; one per layer below the target)."
        ),
    ],
    data: DataOption = None,
    root: RootOption = "feature",
    layer: LayerOption = None,
    feature: FeatureOption = None,
    prompt_index: PromptIndexOption = 0,
    position: PositionOption = -1,
    context_length: ContextOption = 64,
    top_k: TopKOption = 3,
    depth: DepthOption = 3,
    max_logits: MaxLogitsOption = 3,
    logit_probability: LogitProbabilityOption = 0.95,
    device: DeviceOption = "cpu",
    workspace: WorkspaceOption = None,
    progress: ProgressOption = True,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Deprecated alias (one release) of `circuits attribute --data DATA --prompt-index N`: the full attribution
    graph of the prompt replaces the greedy path search (--top-k / --depth no longer apply)."""
    run_deprecated_circuit(
        "sae circuit",
        model=model,
        transcoders=transcoder,
        data=data,
        root=root,
        layer=layer,
        feature=feature,
        prompt_index=prompt_index,
        position=position,
        context_length=context_length,
        max_logits=max_logits,
        logit_probability=logit_probability,
        out=None,
        device=device,
        workspace=workspace,
        trust_remote_code=trust_remote_code,
        progress=progress,
    )


DEAD_WARNING_FRACTION = 0.25
AUXK_ARCHITECTURES = ("topk", "batchtopk", "matryoshka_batchtopk", "clt_topk", "clt_batchtopk")


def dead_warning(row, name: str) -> str:
    """``""``, or a ``warning:`` line when more than ``DEAD_WARNING_FRACTION`` of the latents of one ``sae_evals``
    row (an SAE, a transcoder, or one layer of a CLT: ``name`` says which) never fired on its evaluation tokens,
    with what to change for its architecture."""
    if not row["dead_fraction"] > DEAD_WARNING_FRACTION:
        return ""
    architecture = str(row["architecture"])
    clt = architecture.startswith("clt")
    lr = (
        "a lower learning rate (lr= of workbench.circuits.sae.clt_analysis.run_clt)"
        if clt
        else "a lower learning rate (train_options={'lr': ...} of workbench.circuits.sae.analysis.run)"
    )
    if architecture in AUXK_ARCHITECTURES:
        fix = (
            f"AuxK already feeds them gradient in {architecture}, so train longer (--steps, --max-tokens), with "
            f"fewer latents (--d-sae) or {lr}"
        )
    else:
        auxk = "clt_topk or clt_batchtopk" if clt else "topk or batchtopk"
        fix = f"train --architecture {auxk} (their AuxK loss revives dead latents), or use {lr}"
    return (
        f"warning: {row['dead_fraction']:.0%} of the {row['d_sae']} latents of {name} are dead (never active on "
        f"the {row['n_tokens']} evaluation tokens); {fix}"
    )


def _metrics(row, sae_id: str) -> str:
    """The end-of-run summary of one ``sae_evals`` row: sparsity, reconstruction, dead and dense latent fractions,
    the CE metrics (or why they do not apply, or why CE recovered means nothing here), and :func:`dead_warning`."""
    text = (
        f"L0 {row['L0']:.2f}  FVU {row['FVU']:.4f}  cosine {row['cosine']:.3f}  dead {row['dead_fraction']:.1%}"
        f"  dense {row['dense_fraction']:.1%}"
    )
    ce_note, recovered_note = (
        row.get(c) if isinstance(row.get(c), str) else "" for c in ("ce_note", "ce_recovered_note")
    )
    if ce_note:
        text += f"  ({ce_note})"
    elif recovered_note:
        text += (
            f"  CE spliced {row['ce_spliced']:.3f} (clean {row['ce_clean']:.3f})  KL {row['kl']:.4f}\n"
            f"  {recovered_note}"
        )
    else:
        text += f"  CE recovered {row['ce_recovered']:.3f}  KL {row['kl']:.4f}"
    warning = dead_warning(row, sae_id)
    return f"{text}\n{warning}" if warning else text


# ---------------------------------------------------------------------------------------- foreign formats
@app.command("import")
def import_(
    path: Annotated[
        str,
        typer.Argument(
            help="SAE folder or file: SAELens, sparsify (a coder or a run folder), "
            "Gemma Scope params.npz, dictionary_learning ae.pt, circuit-tracer set."
        ),
    ],
    format: Annotated[
        str,
        typer.Option(
            "--format", help="auto, saelens, sparsify, gemmascope, dictionary_learning or circuit_tracer."
        ),
    ] = "auto",
    sae_id: Annotated[
        str | None,
        typer.Option(
            "--id", help="Name in the workspace (several SAEs: the prefix; default: the folder name)."
        ),
    ] = None,
    family: Annotated[
        str | None,
        typer.Option(
            help="Model family for sparsify module names (gpt_neox, gpt2, llama) when the names fit several."
        ),
    ] = None,
    hook: Annotated[str | None, typer.Option(help="Input hook, where the layout records none.")] = None,
    hook_out: Annotated[str | None, typer.Option(help="Output hook of a transcoder.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace SAEs of the same id.")] = False,
    model: Annotated[
        str | None,
        typer.Argument(help="Check every SAE's hooks and widths against this model before registering any."),
    ] = None,
    old_model: OldModelOption = None,
    workspace: WorkspaceOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Register SAEs / transcoders from another trainer's layout in the workspace (saes/<id>/), so sae eval,
    sae features, sae export, circuits attribute and the dashboard use them like ours; nothing is registered on
    error."""
    from workbench.circuits.sae.formats.transfer import import_saes  # deferred: CLI start-up (torch)

    model = _model_argument("import", model, old_model)
    hooked = open_model(model, workspace, "cpu", "float32", trust_remote_code).eval() if model else None
    if hooked is not None and family is None:
        family = hooked.capabilities.module_names
    ids = import_saes(
        path,
        workspace,
        format=format,
        sae_id=sae_id,
        family=family,
        hook=hook,
        hook_out=hook_out,
        overwrite=overwrite,
        model=hooked,
    )
    from workbench.circuits.sae import load_sae  # deferred: CLI start-up (torch)
    from workbench.circuits.sae.clt import is_clt_dir, load_clt_dir  # deferred: CLI start-up (torch)
    from workbench.circuits.sae.evals import sae_dir  # deferred: CLI start-up (torch)

    for (
        name
    ) in ids:  # read back from the workspace (a folder named like the id may sit in the working directory)
        if is_clt_dir(sae_dir(Workspace(workspace), name)):
            clt = load_clt_dir(sae_dir(Workspace(workspace), name))
            ins, outs = clt.hook_names
            typer.echo(
                f"imported {name}: cross-layer transcoder ({clt.cfg.activation}) over {clt.n_layers} layers, "
                f"d_model={clt.d_model} d_transcoder={clt.d_transcoder} ({ins[0]} … {outs[-1]})"
            )
            continue
        sae = load_sae(sae_dir(Workspace(workspace), name))
        what = f"{sae.hook_in} -> {sae.hook_out}" if sae.cfg.is_transcoder else sae.hook_in
        typer.echo(f"imported {name}: {sae.cfg.architecture} d_in={sae.d_in} d_sae={sae.d_sae} ({what})")


@app.command()
def features(
    sae_path: Annotated[str, typer.Argument(help="SAE id in the workspace or SAE directory.")],
    model: ModelArgument,
    data: DataOption = None,
    max_tokens: TokensOption = 20_000,
    context_length: ContextOption = 128,
    batch_size: BatchSizeOption = 16,
    device: DeviceOption = "cpu",
    workspace: WorkspaceOption = None,
    progress: ProgressOption = True,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Feature pages (top contexts, quantiles, histogram, promoted tokens) of a saved or imported SAE on MODEL
    over --data, written to sae_features."""
    from workbench.analysis import write_tables  # deferred: CLI start-up (pandas)
    from workbench.circuits.sae.analysis import (  # deferred: CLI start-up (torch)
        ANALYSIS,
        feature_pages_on_data,
        find_sae,
    )

    require_data(data, "the text the activations are read from, or an activation store holding the hook(s)")
    found, sae = find_sae(sae_path, workspace)
    hooked = open_model(model, workspace, device, "float32", trust_remote_code).eval()
    dataset = open_data(data)
    pages = feature_pages_on_data(
        hooked,
        dataset,
        sae,
        found,
        workspace=workspace,
        max_tokens=max_tokens,
        context_length=context_length,
        batch_size=batch_size,
        progress=progress,
    )
    write_tables(workspace, ANALYSIS, {"sae_features": pages})
    live = int((pages["density"] > 0).sum())
    typer.echo(
        f"{found}: {len(pages)} feature pages ({live} latents fire) on {dataset.name!r} written to sae_features"
    )


@app.command()
def export(
    sae_path: Annotated[str, typer.Argument(help="SAE id in the workspace or SAE directory.")],
    out: Annotated[str, typer.Option("--out", help="Directory to write.")],
    format: Annotated[
        str,
        typer.Option(
            "--format", help="saelens, sparsify or neuronpedia; circuit-tracer for a cross-layer transcoder."
        ),
    ] = "saelens",
    family: Annotated[
        str | None, typer.Option(help="Model family for sparsify's module names (gpt_neox, gpt2, llama).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Argument(
            help="The SAE's model (sparsify: its family, by default the family "
            "of the model the SAE records; neuronpedia: logits through its "
            "unembedding)."
        ),
    ] = None,
    old_model: OldModelOption = None,
    workspace: WorkspaceOption = None,
    device: DeviceOption = "cpu",
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Write a workspace SAE as SAELens or sparsify files (sae-lens / sparsify / delphi load it unchanged), or its
    feature pages as SAEDashboard batch JSON + a Neuronpedia bulk-import folder; a cross-layer transcoder in
    circuit-tracer's layout (--format circuit-tracer)."""
    from workbench.circuits.sae.analysis import find_sae  # deferred: CLI start-up (torch)
    from workbench.circuits.sae.features import (  # deferred: CLI start-up (torch)
        residual_writes,
        token_decoder,
    )
    from workbench.circuits.sae.formats.transfer import (  # deferred: CLI start-up (torch)
        EXPORT_FORMATS,
        export_sae,
    )
    from workbench.references import short_name  # deferred: CLI start-up (torch)

    model = _model_argument("export", model, old_model)
    if format not in EXPORT_FORMATS:
        fail(f"--format {format!r} is not one of {', '.join(EXPORT_FORMATS)}")
    from workbench.circuits.sae.clt_analysis import find_clt  # deferred: CLI start-up (torch)
    from workbench.circuits.sae.formats.transfer import export_clt  # deferred: CLI start-up (torch)

    clt = find_clt(sae_path, workspace)
    if clt is not None:
        written = export_clt(clt[1], out, format)
        typer.echo(
            f"{clt[0]} written as circuit-tracer's cross_layer_transcoder to {written} ({clt[1].n_layers} "
            "layers: config.yaml, W_enc_L / W_dec_L.safetensors)"
        )
        return
    found, sae = find_sae(sae_path, workspace)
    hooked = open_model(model, workspace, device, "float32", trust_remote_code).eval() if model else None
    options: dict = {"sae_id": found}
    if format == "sparsify" and not family and hooked is None:
        hooked = _recorded_model(found, sae, workspace, device, trust_remote_code)
        typer.echo(f"model family {hooked.cfg.family}, from the model {found} records ({hooked.cfg.name})")
    if format == "sparsify":
        options["family"] = family or (hooked.capabilities.module_names if hooked is not None else None)
    if format == "neuronpedia":
        options["features"] = Workspace(workspace).results().read("sae_features", sae_id=found)
        if hooked is not None and hooked.unembedding_matrix() is not None:
            options |= {
                "unembedding": hooked.unembedding_matrix(),
                "writes": residual_writes(sae, hooked),
                "decode": token_decoder(hooked.tokenizer),
                "model_id": short_name(hooked.cfg.name),
            }  # model_id: a folder name (no "/")
    written = export_sae(sae, out, format, **options)
    typer.echo(f"{found} written as {format} to {written}")


def _recorded_model(found: str, sae, workspace: Path | None, device: str, trust_remote_code: bool):
    """The model an SAE records (``cfg.model`` at ``cfg.checkpoint``), loaded; a clear failure naming --family and
    --model when it records none or it does not load here."""
    # workbench.model imports torch: imported here, not at start-up, so `workbench --help` stays fast
    from workbench.model import ModelLoadError

    fix = "pass --family (gpt_neox, gpt2, llama) or --model"
    if not sae.cfg.model:
        fail(f"sparsify names folders by the model's modules, and {found} records no model: {fix}")
    recorded = sae.cfg.model + (f"@step{sae.cfg.checkpoint}" if sae.cfg.checkpoint is not None else "")
    try:
        return open_model(recorded, workspace, device, "float32", trust_remote_code)
    except ModelLoadError as err:
        fail(
            f"sparsify names folders by the model's modules; {found} records the model {recorded!r}, which does "
            f"not load here ({err}): {fix}"
        )
