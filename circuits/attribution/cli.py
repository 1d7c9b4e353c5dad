"""`workbench circuits attribute|qk MODEL ...` and `circuits jobs status [JOB]` (mounted through the workbench.cli
entry points): attribution graphs of a prompt or a batch of prompts, stored in the workspace and exported as
circuit-tracer or Neuronpedia JSON. Hidden for one release: `circuits export` (now `circuits attribute --out`),
`circuits status` (now `circuits jobs status`), `circuits clt-eval PATH MODEL` (now `sae eval PATH MODEL`, registered
by circuits/sae/cli.py next to it) and, in `sae`, `sae circuit`, through :func:`run_deprecated_circuit`."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Literal

import typer

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
    TopKOption,
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
    help="Attribution graphs of transcoder circuits: attribute (one prompt or a batch), jobs status, qk.",
    no_args_is_help=True,
)
jobs_app = typer.Typer(
    help="Batches of attribution graphs (`circuits attribute --prompts`).", no_args_is_help=True
)
app.add_typer(jobs_app, name="jobs")

EXPORT_FORMATS = ("circuit-tracer",)
ATTRIBUTION_FORMATS = ("circuit-tracer", "neuronpedia")
ROOTS = ("logit", "feature")


def circuit_root(root: str, layer: int | None, feature: int | None) -> Literal["logit", "feature"]:
    """--root checked: one of ROOTS, and --layer / --feature only with a feature root."""
    if root not in ROOTS:
        fail(f"--root {root!r} is not one of {', '.join(ROOTS)}")
    if root == "logit" and (layer is not None or feature is not None):
        fail("--layer / --feature name a target feature: pass --root feature with them")
    return "logit" if root == "logit" else "feature"


@app.callback()
def main() -> None:
    """Attribution graphs of transcoder circuits: attribute (one prompt or a batch), jobs status, qk."""


@app.command(hidden=True)
def export(
    model: ModelArgument,
    out: Annotated[str, typer.Option("--out", help="Directory for the graph files.")],
    transcoder: Annotated[
        list[str], typer.Option(help="Transcoder id or directory (repeatable; one per layer).")
    ],
    data: DataOption = None,
    format: Annotated[str, typer.Option("--format", help="circuit-tracer.")] = "circuit-tracer",
    root: RootOption = "logit",
    max_logits: MaxLogitsOption = 3,
    logit_probability: LogitProbabilityOption = 0.95,
    layer: LayerOption = None,
    feature: FeatureOption = None,
    prompt_index: PromptIndexOption = 0,
    position: PositionOption = -1,
    context_length: ContextOption = 64,
    top_k: TopKOption = 3,
    depth: DepthOption = 3,
    slug: Annotated[
        str | None, typer.Option(help="Ignored (the graph file is named by its graph id).")
    ] = None,
    pages_tokens: Annotated[int, typer.Option("--pages-tokens", min=0, help="Ignored.")] = 20_000,
    device: DeviceOption = "cpu",
    workspace: WorkspaceOption = None,
    progress: ProgressOption = True,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Deprecated alias (one release) of `circuits attribute --data DATA --prompt-index N --out DIR --format
    circuit-tracer`: the full attribution graph replaces the greedy path search (--top-k / --depth no longer apply)."""
    if format != "circuit-tracer":
        fail(
            f"--format {format!r} is not one of circuit-tracer (or use `workbench circuits attribute --format`)"
        )
    run_deprecated_circuit(
        "circuits export",
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
        out=out,
        device=device,
        workspace=workspace,
        trust_remote_code=trust_remote_code,
        progress=progress,
    )


def run_deprecated_circuit(
    command: str,
    *,
    model: str,
    transcoders: list[str],
    data: str | None,
    root: str,
    layer: int | None,
    feature: int | None,
    prompt_index: int,
    position: int,
    context_length: int,
    max_logits: int,
    logit_probability: float,
    out: str | None,
    device: str,
    workspace,
    trust_remote_code: bool,
    progress: bool = True,
) -> None:
    """The retired greedy-search commands (`sae circuit`, `circuits export`) translated to `circuits attribute`:
    one deprecation line naming the command that runs, then the full attribution graph of the same prompt (root
    logit: the next-token logits at --position; root feature: --layer / --feature at --position, by default the
    highest layer's most active feature there, as the old default)."""
    import torch  # deferred: CLI start-up (torch)

    from workbench.circuits.attribution.transcoders import as_transcoders  # deferred: CLI start-up (torch)

    checked = circuit_root(root, layer, feature)
    data = require_data(data, "the prompt is a token row of it")
    target = "logits"
    if checked == "feature":
        hooked = open_model(model, workspace, device, "float32", trust_remote_code).eval()
        tc = as_transcoders(hooked, _load_transcoders(transcoders, workspace, device)[1])
        layer = tc.n_layers - 1 if layer is None else layer
        if not 0 <= layer < tc.n_layers:
            fail(f"--layer {layer} is not a layer of {hooked.cfg.name} (0..{tc.n_layers - 1})")
        tokens = _prompt_tokens(hooked, None, data, prompt_index, context_length)
        assert isinstance(tokens, torch.Tensor)
        at = position + len(tokens) if position < 0 else position
        if not 0 <= at < len(tokens):
            fail(f"--position {position} is outside the prompt of {len(tokens)} tokens")
        if feature is None:
            with torch.no_grad(), hooked.capture(tc.hook_in(layer)) as cache:
                hooked(tokens[None])
            feature = int(tc.encode(layer, cache[tc.hook_in(layer)][0, at].to(tc.dtype)[None])[0].argmax())
        target = f"feature:{layer}:{at}:{feature}"
    translated = [
        "workbench",
        "circuits",
        "attribute",
        model,
        *(a for t in transcoders for a in ("--transcoders", t)),
        "--data",
        data,
        "--prompt-index",
        str(prompt_index),
        "--target",
        target,
        "--position",
        str(position),
        "--context-length",
        str(context_length),
        "--max-logits",
        str(max_logits),
        "--logit-probability",
        str(logit_probability),
        *(["--out", out, "--format", "circuit-tracer"] if out else []),
    ]
    typer.echo(
        f"warning: `workbench {command}` is deprecated (the greedy path search is retired; it goes in the "
        f"next release); running `{shlex.join(translated)}`",
        err=True,
    )
    attribute(
        model=model,
        transcoders=transcoders,
        data=data,
        prompt_index=prompt_index,
        target=[target],
        position=position,
        max_logits=max_logits,
        logit_probability=logit_probability,
        context_length=context_length,
        out=out,
        device=device,
        workspace=workspace,
        trust_remote_code=trust_remote_code,
        progress=progress,
    )


def _load_transcoders(references: list[str], workspace, device: str) -> tuple[list[str], object]:
    """--transcoders: one cross-layer transcoder folder, or one saved SAE id / directory per layer."""
    from workbench.circuits.attribution.batch import load_transcoders  # deferred: CLI start-up (torch)

    if not references:
        fail("--transcoders is required: one transcoder id per layer, or one cross-layer transcoder folder")
    return load_transcoders(references, workspace, device)


def _prompt_tokens(
    hooked, prompt: str | None, data: str | None, prompt_index: int, context_length: int
) -> object:
    """--prompt TEXT (the library tokenizes it and refuses one longer than the model's positions), or token row
    --prompt-index of --data as token ids [pos]."""
    import torch  # deferred: CLI start-up (torch)

    if (prompt is None) == (data is None):
        fail("pass exactly one of --prompt TEXT or --data REF (with --prompt-index N)")
    if prompt is not None:
        return prompt
    dataset = open_data(data)
    rows = dataset.token_rows(hooked.tokenizer, context_length=context_length, max_rows=prompt_index + 1)
    if len(rows) <= prompt_index:
        fail(f"{dataset.name!r} has {len(rows)} token row(s); pick --prompt-index 0..{len(rows) - 1}")
    return torch.tensor(rows[prompt_index], dtype=torch.long)


def _prompt_range(text: str) -> tuple[int, int]:
    """--prompts START:STOP → (start, stop), checked."""
    start, colon, stop = text.partition(":")
    if not colon or not start.strip().isdigit() or not stop.strip().isdigit() or int(stop) <= int(start):
        fail(
            f"--prompts {text!r} is not a range START:STOP of token rows with STOP > START, e.g. --prompts 0:500"
        )
    return int(start), int(stop)


def _probe_readout(spec: str, hooked, workspace):
    """--target probe:NAME[:SITE[:LABEL]] → a ProbeReadout: the saved probe's logit for LABEL (classification:
    LABEL's logit minus the mean logit, or minus the other class's for a binary probe, i.e. its log-odds;
    regression: target LABEL, default 0) at SITE (a hook name or a layer number; default: the probe's only site),
    as an affine read-out of the activation with the probe's standardisation folded in."""
    # probes and circuits are siblings (app → probes, circuits → workbench): only this command reads a saved probe,
    # through the probes package's own reader, so its format has one owner; the attribution library takes a vector.
    from workbench.circuits.attribution.graph import ProbeReadout
    from workbench.probes.linear import ProbeError  # deferred: CLI start-up (torch)
    from workbench.probes.readout import load_probe_for  # deferred: CLI start-up (torch)

    name, *rest = spec[len("probe:") :].split(":")
    if not name or len(rest) > 2:
        fail(f"--target {spec!r}: write probe:NAME, probe:NAME:SITE or probe:NAME:SITE:LABEL")
    try:
        probes, saved, note = load_probe_for(hooked, name, workspace)
    except ProbeError as err:
        fail(str(err))  # a missing probe, or one of another model or width: the message says how to make one
    if note:
        typer.echo(f"warning: {note}", err=True)
    site = rest[0] if rest else None
    if site is None:
        if len(probes.sites) != 1:
            fail(
                f"probe {name!r} reads {len(probes.sites)} sites; name one: probe:{name}:SITE with SITE one of "
                f"{', '.join(probes.sites)} (or its layer number)"
            )
        site = probes.sites[0]
    elif site.lstrip("-").isdigit():
        at_layer = [s for s in probes.sites if s.startswith(f"blocks.{int(site)}.")]
        if len(at_layer) != 1:
            fail(
                f"probe {name!r} has {len(at_layer)} sites at layer {site}; name the hook: one of "
                f"{', '.join(probes.sites)}"
            )
        site = at_layer[0]
    elif site not in probes.sites:
        fail(f"probe {name!r} has no site {site!r}; its sites: {', '.join(probes.sites)}")
    index = probes.sites.index(site)
    weight = probes.weight[index].double() / probes.scale[index].double()[:, None]  # [d, outputs]
    bias = probes.bias[index].double() - probes.mean[index].double() @ weight  # [outputs]
    if probes.task == "regression":
        column = int(rest[1]) if len(rest) > 1 and rest[1].isdigit() else 0
        if len(rest) > 1 and not rest[1].isdigit() or not 0 <= column < weight.shape[1]:
            fail(
                f"probe {name!r} is a regression on {weight.shape[1]} target(s); LABEL is a target index "
                f"0..{weight.shape[1] - 1}"
            )
        vector, constant, label = weight[:, column], bias[column], f"target {column}"
    else:
        assert probes.classes is not None
        values = [str(int(v)) if float(v).is_integer() else str(float(v)) for v in probes.classes.tolist()]
        names = saved.label_names or []
        named = {n: str(i) for i, n in enumerate(names)}
        wanted = rest[1] if len(rest) > 1 else values[-1]
        wanted = named.get(wanted, wanted)
        if wanted not in values:
            fail(
                f"probe {name!r} has no class {rest[1]!r}; its classes: {', '.join(values)}"
                + (f" ({', '.join(names)})" if names else "")
            )
        column = values.index(wanted)
        others = (
            [c for c in range(len(values)) if c != column] if len(values) == 2 else list(range(len(values)))
        )
        vector = weight[:, column] - weight[:, others].mean(1)
        constant = bias[column] - bias[others].mean()
        shown = names[int(float(wanted))] if names and 0 <= int(float(wanted)) < len(names) else wanted
        label = f"class {shown} {'log-odds' if len(values) == 2 else 'logit − mean'}"
    return ProbeReadout(site, vector, float(constant), f"probe {name} {label} at {site}")


@app.command()
def attribute(
    model: ModelArgument,
    transcoders: Annotated[
        list[str],
        typer.Option(
            "--transcoders",
            help="Transcoder ids or directories, one per layer (repeatable), or one "
            "cross-layer transcoder folder.",
        ),
    ],
    prompt: Annotated[str | None, typer.Option("--prompt", help="The prompt text.")] = None,
    data: DataOption = None,
    prompt_index: PromptIndexOption = 0,
    prompts: Annotated[
        str | None,
        typer.Option(
            "--prompts",
            help="START:STOP: a graph for each of these token rows "
            "of --data, as a resumable batch job (see `circuits jobs status`).",
        ),
    ] = None,
    backend: Annotated[
        str, typer.Option(help="--prompts: local (this process, or a process pool with --workers) or ray.")
    ] = "local",
    workers: Annotated[
        int, typer.Option(min=1, help="--prompts: parallel workers (processes or Ray CPUs).")
    ] = 1,
    address: Annotated[
        str | None,
        typer.Option(help="--prompts --backend ray: the cluster address (default: start a local one)."),
    ] = None,
    target: Annotated[
        list[str] | None,
        typer.Option(
            "--target",
            help="logits (default) | diff:A,B (tokens or ids) | feature:LAYER:POSITION:FEATURE "
            "| probe:NAME[:SITE[:LABEL]] (a saved probe's logit at --position) (repeatable).",
        ),
    ] = None,
    position: PositionOption = -1,
    max_feature_nodes: Annotated[
        int, typer.Option("--max-feature-nodes", min=0, help="Features kept, the most influential first.")
    ] = 7500,
    max_logits: MaxLogitsOption = 10,
    logit_probability: LogitProbabilityOption = 0.95,
    batch_size: BatchSizeOption = 64,
    heads: Annotated[
        bool, typer.Option("--heads/--no-heads", help="Split cross-position edges over heads.")
    ] = True,
    context_length: ContextOption = 64,
    out: Annotated[
        str | None, typer.Option("--out", help="Also write the pruned graph here (--format).")
    ] = None,
    format: Annotated[
        str,
        typer.Option(
            "--format", help="circuit-tracer (files its serve opens) | neuronpedia (one graph upload JSON)."
        ),
    ] = "circuit-tracer",
    scan: Annotated[
        str | None,
        typer.Option(
            "--scan", help="--format neuronpedia: Neuronpedia's model id (default: the model's short name)."
        ),
    ] = None,
    source_set: Annotated[
        str | None,
        typer.Option(
            "--source-set",
            help="--format neuronpedia: the Neuronpedia source "
            "set of the transcoders' feature dashboards, if it has them.",
        ),
    ] = None,
    node_threshold: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Pruning: node influence kept.")
    ] = 0.8,
    edge_threshold: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Pruning: edge influence kept.")
    ] = 0.98,
    progress: ProgressOption = True,
    device: DeviceOption = "cpu",
    workspace: WorkspaceOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """The complete attribution graph of a prompt (--prompt TEXT, or token row --prompt-index of --data): every
    direct effect between transcoder features, error nodes, token (and position) embeddings and the targets in the
    local replacement model, stored unpruned in the workspace (tables attribution_graphs / _nodes / _edges /
    _heads) with its replacement and completeness scores; --out writes the pruned graph as circuit-tracer JSON.
    --prompts START:STOP makes one graph per token row of --data as a resumable batch job (table
    attribution_batch; `workbench circuits jobs status` shows it)."""
    # deferred: CLI start-up (torch)
    from workbench.analysis import write_tables  # deferred: CLI start-up (pandas)
    from workbench.circuits.attribution.export import (  # deferred: CLI start-up (torch)
        write_attribution_graph,
        write_neuronpedia_graph,
    )
    from workbench.circuits.attribution.graph import attribute as attribute_graph
    from workbench.circuits.attribution.store import (  # deferred: CLI start-up (torch)
        ANALYSIS,
        graph_frames,
    )

    if out is not None and format not in ATTRIBUTION_FORMATS:
        fail(f"--format {format!r} is not one of {', '.join(ATTRIBUTION_FORMATS)}")
    if prompts is not None:
        if prompt is not None or data is None:
            fail("--prompts START:STOP picks token rows of --data REF; pass --data (not --prompt)")
        if out is not None:
            fail("--out exports one graph: export a batch's graph with --data REF --prompt-index N --out DIR")
        if backend not in ("local", "ray"):
            fail(f"--backend {backend!r} is not one of local, ray")
        span = _prompt_range(prompts)
    elif prompt is not None and data is not None or prompt is None and data is None:
        fail(
            "pass exactly one of --prompt TEXT or --data REF (with --prompt-index N or --prompts START:STOP)"
        )
    hooked = open_model(model, workspace, device, "float32", trust_remote_code).eval()
    ANALYSIS.check(hooked)
    ids, loaded = _load_transcoders(transcoders, workspace, device)
    targets: list[object] = [
        _probe_readout(spec, hooked, workspace) if spec.startswith("probe:") else spec
        for spec in target or ["logits"]
    ]
    if prompts is not None:
        assert data is not None
        _attribute_batch(
            model,
            hooked,
            transcoders,
            ids,
            loaded,
            targets,
            data,
            span,
            workspace=workspace,
            max_feature_nodes=max_feature_nodes,
            batch_size=batch_size,
            position=position,
            max_logits=max_logits,
            logit_probability=logit_probability,
            heads=heads,
            device=device,
            context_length=context_length,
            backend=backend,
            workers=workers,
            address=address,
            progress=progress,
        )
        return
    tokens = _prompt_tokens(hooked, prompt, data, prompt_index, context_length)
    graph = attribute_graph(
        hooked,
        loaded,
        tokens,
        targets=targets,
        max_feature_nodes=max_feature_nodes,
        batch_size=batch_size,
        position=position,
        max_logits=max_logits,
        logit_probability=logit_probability,
        heads=heads,
        progress=progress,
    )
    frames = graph_frames(graph, ids, max_feature_nodes)  # the Graph itself is what --out exports
    write_tables(workspace, ANALYSIS, frames)
    name = str(frames["attribution_graphs"]["graph"].iloc[0])
    scores = ", ".join(f"{key} {value:.3f}" for key, value in graph.scores.items())
    typer.echo(
        f"graph {name}: {graph.n_features} of {graph.n_active} active features, {graph.n_nodes} nodes, "
        f"{int((graph.adjacency != 0).sum())} edges; {scores}"
    )
    gap = graph.error_gap
    logits = (
        f"KL(model ‖ replacement) {gap['errors_zeroed_kl']:.4f} nats, same top output at "
        f"{gap['errors_zeroed_top1']:.0%} of positions, "
        if gap["errors_zeroed_kl"] == gap["errors_zeroed_kl"]
        else ""
    )
    exact = gap["reproduction_max_diff"] <= 1e-3 * max(1.0, gap["errors_zeroed_max_diff"])
    typer.echo(
        f"error nodes zeroed: {logits}max |output difference| {gap['errors_zeroed_max_diff']:.4g}; with them "
        f"{gap['reproduction_max_diff']:.2g} "
        + (
            "(the replacement reproduces the model)"
            if exact
            else "(the replacement does NOT reproduce the model: a bug — please report it with the model and "
            "transcoders)"
        )
    )
    if out is not None and format == "neuronpedia":
        from workbench.references import short_name  # deferred: CLI start-up (torch)

        path = write_neuronpedia_graph(
            out,
            graph,
            slug=name,
            scan=scan or short_name(hooked.cfg.name),
            transcoder_list=ids,
            node_threshold=node_threshold,
            edge_threshold=edge_threshold,
            source_set=source_set,
            generation={
                "max_n_logits": max_logits,
                "desired_logit_prob": logit_probability,
                "batch_size": batch_size,
                "max_feature_nodes": max_feature_nodes,
            },
        )
        typer.echo(
            f"pruned graph written as Neuronpedia graph JSON to {path} (upload it on Neuronpedia's graph page)"
        )
    elif out is not None:
        path = write_attribution_graph(
            out, graph, slug=name, scan=ids, node_threshold=node_threshold, edge_threshold=edge_threshold
        )
        typer.echo(f"pruned graph written as circuit-tracer JSON to {path}")


def _attribute_batch(
    model_ref: str,
    hooked,
    references: list[str],
    ids: list[str],
    loaded,
    targets: list[object],
    data: str,
    span: tuple[int, int],
    *,
    workspace,
    device: str,
    context_length: int,
    backend: str,
    workers: int,
    address: str | None,
    progress: bool,
    **options,
) -> None:
    """`circuits attribute --data REF --prompts START:STOP`: one graph per token row, as a resumable batch job."""
    from workbench.circuits.attribution.batch import (  # deferred: CLI start-up (torch)
        GraphSpec,
        preload,
        run_batch,
    )

    dataset = open_data(data)
    rows = dataset.token_rows(hooked.tokenizer, context_length=context_length, max_rows=span[1])
    if len(rows) < span[1]:
        fail(
            f"{dataset.name!r} has {len(rows)} token row(s) at --context-length {context_length}; pick --prompts "
            f"within 0:{len(rows)}"
        )
    where = Path(model_ref.split("@")[0]).expanduser()
    located = (
        str(where.resolve()) + model_ref[len(model_ref.split("@")[0]) :] if where.exists() else model_ref
    )
    spec = GraphSpec(
        model=located,
        identity=hooked.cfg.name,
        checkpoint=hooked.cfg.checkpoint,
        workspace=str(Workspace(workspace).root.resolve()),
        transcoders=tuple(
            str(Path(r).resolve()) if Path(r).expanduser().is_dir() and len(Path(r).parts) > 1 else r
            for r in references
        ),
        targets=tuple(targets),
        dataset=dataset.name,
        context_length=context_length,
        device=device,
        **options,
    )
    if workers == 1 and backend == "local":
        preload(spec, hooked, ids, loaded)
    job, status = run_batch(
        spec,
        {i: rows[i] for i in range(*span)},
        backend=backend,
        workers=workers,
        address=address,
        progress=progress,
    )
    _print_batch(job, status)
    if (status["status"] == "failed").any():
        raise typer.Exit(1)


def _print_batch(job: str, status) -> None:
    """The per-prompt summary (graph id, replacement and completeness scores) and one count line."""
    shown = status[
        [
            "prompt_index",
            "status",
            "graph",
            "replacement_score",
            "completeness_score",
            "n_features",
            "n_edges",
        ]
    ]
    typer.echo(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-"))
    for row in status[status["status"] == "failed"].itertuples():
        typer.secho(f"failed prompt {row.prompt_index}: {row.error}", fg=typer.colors.RED)
    counts = status["status"].value_counts().to_dict()
    done = status[status["status"] == "done"]
    means = (
        f"; mean replacement score {done['replacement_score'].mean():.3f}, completeness "
        f"{done['completeness_score'].mean():.3f}"
        if len(done)
        else ""
    )
    typer.echo(
        f"batch {job}: "
        + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        + means
        + f" (graphs in table attribution_graphs; `workbench circuits jobs status {job}`)"
    )


@jobs_app.command("status")
def batch_status_command(
    job: Annotated[str | None, typer.Argument(help="A batch job id (default: list every batch job).")] = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Batches of attribution graphs (`circuits attribute --prompts`): every job with its done / failed / pending
    counts, or one job's prompts with their graph ids and scores."""
    from workbench.circuits.attribution.batch import (  # deferred: CLI start-up (torch)
        batch_jobs,
        batch_status,
    )

    if job is None:
        jobs = batch_jobs(workspace)
        if jobs.empty:
            typer.echo(
                "no attribution batches in this workspace; start one with `workbench circuits attribute "
                "MODEL --transcoders ... --data REF --prompts START:STOP`"
            )
            return
        typer.echo(jobs.to_string(index=False))
        return
    _print_batch(job, batch_status(workspace, job))


@app.command()
def qk(
    model: ModelArgument,
    transcoders: Annotated[
        list[str],
        typer.Option(
            "--transcoders",
            help="Transcoder ids or directories, one per layer (repeatable), or one "
            "cross-layer transcoder folder.",
        ),
    ],
    layer: Annotated[int, typer.Option("--layer", min=0, help="The attention layer.")],
    head: Annotated[int, typer.Option("--head", min=0, help="The query head.")],
    query: Annotated[int, typer.Option("--query", min=0, help="The query position.")],
    key: Annotated[int, typer.Option("--key", min=0, help="The key position.")],
    prompt: Annotated[str | None, typer.Option("--prompt", help="The prompt text.")] = None,
    data: DataOption = None,
    prompt_index: PromptIndexOption = 0,
    top: Annotated[int, typer.Option("--top", min=1, help="Terms shown (the rest summed in one row).")] = 20,
    context_length: ContextOption = 64,
    batch_size: BatchSizeOption = 64,
    device: DeviceOption = "cpu",
    workspace: WorkspaceOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Why a head attended: its pre-softmax score at (--query, --key) decomposed into query-side source node ×
    key-side source node terms (transcoder features, error nodes, token and position embeddings, biases) of the local
    replacement model, ranked; the terms sum to the model's score."""
    from workbench.circuits.attribution.qk import qk_attribution  # deferred: CLI start-up (torch)

    hooked = open_model(model, workspace, device, "float32", trust_remote_code).eval()
    _, loaded = _load_transcoders(transcoders, workspace, device)
    tokens = _prompt_tokens(hooked, prompt, data, prompt_index, context_length)
    frame = qk_attribution(
        hooked, loaded, tokens, layer=layer, head=head, query=query, key=key, top=top, batch_size=batch_size
    )
    typer.echo(
        frame[["query_label", "key_label", "score"]].to_string(index=False, float_format=lambda v: f"{v:.4f}")
    )
    typer.echo(
        f"L{layer}.H{head} score at query {query}, key {key}: {frame.attrs['score']:.6g} (pre-softmax, scale "
        f"{frame.attrs['scale']:.4g}) = the sum of the terms above ({float(frame['score'].sum()):.6g})"
    )


add_deprecated_alias(app, "status", "circuits status", "circuits jobs status", batch_status_command)
