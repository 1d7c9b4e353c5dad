"""`workbench circuits export MODEL --data DATA --transcoder ID ... --format circuit-tracer --out DIR` (mounted
through the workbench.cli entry points): a transcoder circuit as circuit-tracer graph files."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from workbench.cli_options import (
    ContextOption,
    DataOption,
    DeviceOption,
    ModelArgument,
    TrustRemoteCodeOption,
    WorkspaceOption,
    fail,
    open_data,
    open_model,
)

app = typer.Typer(help="Transcoder circuits in other tools' formats.", no_args_is_help=True)

# The circuit's options, shared with `workbench sae circuit`.
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
EXPORT_FORMATS = ("circuit-tracer",)
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
    """Transcoder circuits in other tools' formats."""


@app.command()
def export(
    model: ModelArgument,
    out: Annotated[str, typer.Option("--out", help="Directory for the graph files.")],
    transcoder: Annotated[
        list[str],
        typer.Option(help="Transcoder id in the workspace or directory (repeatable; one per layer)."),
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
    slug: Annotated[str | None, typer.Option(help="Graph name (default: model-target-prompt).")] = None,
    pages_tokens: Annotated[
        int,
        typer.Option(
            "--pages-tokens",
            min=0,
            help="Token budget for the feature pages of transcoders that have none on --data yet (0: skip).",
        ),
    ] = 20_000,
    device: DeviceOption = "cpu",
    workspace: WorkspaceOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Trace the circuit of the next-token logits (or of a transcoder feature, --root feature) on a prompt of --data
    and write it as circuit-tracer graph JSON
    (OUT/<slug>.json, OUT/graph-metadata.json) with the transcoders' feature files (OUT/features/<scan>/), which
    circuit_tracer.frontend.local_server.serve(data_dir=OUT, features_dir=OUT/features) opens."""
    import pandas as pd

    from workbench.circuits.circuit_export import circuit_tracer_graph, write_circuit_tracer
    from workbench.circuits.sae.analysis import find_sae, write_results
    from workbench.circuits.sae.features import feature_pages_on_data
    from workbench.circuits.transcoder_circuits import ANALYSIS, layer_of, run
    from workbench.references import short_name
    from workbench.workspace import Workspace, safe_name

    if format not in EXPORT_FORMATS:
        fail(f"--format {format!r} is not one of {', '.join(EXPORT_FORMATS)}")
    checked_root = circuit_root(root, layer, feature)
    if data is None:
        fail(
            "--data is required: the prompt is a token row of it (a text file, FILE.jsonl:FIELD, zoo:python-stdlib)"
        )
    hooked = open_model(model, workspace, device, "float32", trust_remote_code).eval()
    ANALYSIS.check(hooked)
    dataset = open_data(data)
    found = [find_sae(ref, workspace) for ref in transcoder]
    frames = run(hooked, dataset, [sae for _, sae in found], root=checked_root,
                 layer=layer, feature=feature, prompt_index=prompt_index, position=position,
                 context_length=context_length, top_k=top_k, depth=depth, max_logits=max_logits,
                 logit_probability=logit_probability)  # fmt: skip
    nodes = frames["transcoder_circuits"]
    top = nodes.iloc[0]
    rows = dataset.token_rows(hooked.tokenizer, context_length=context_length, max_rows=prompt_index + 1)
    prompt_ids = [int(t) for t in rows[prompt_index]]
    tokens = hooked.to_str_tokens(prompt_ids)
    name = safe_name(slug or f"{short_name(hooked.cfg.name)}-{top['target'].replace('#', '-').replace('@', '-')}"
                     f"-p{prompt_index}", "for a graph")  # fmt: skip
    ids = [found_id for found_id, _ in found]
    graph = circuit_tracer_graph(nodes, tokens, slug=name, scan=f"./features/{safe_name(short_name(hooked.cfg.name))}",
                                 transcoder_list=ids, prompt=top["prompt"], prompt_ids=prompt_ids)  # fmt: skip
    results = Workspace(workspace).results()
    features = results.read("sae_features", sae_id=ids, dataset=dataset.name)
    missing = [
        (found_id, sae)
        for found_id, sae in found
        if features.empty or found_id not in set(features["sae_id"])
    ]
    if missing and pages_tokens > 0:
        computed = [
            feature_pages_on_data(
                hooked,
                dataset,
                sae,
                found_id,
                workspace=workspace,
                max_tokens=pages_tokens,
                context_length=context_length,
                progress=False,
            )
            for found_id, sae in missing
        ]
        write_results(workspace, {"sae_features": pd.concat(computed, ignore_index=True)})
        features = results.read("sae_features", sae_id=ids, dataset=dataset.name)
    layers = {found_id: layer_of(sae) for found_id, sae in found}
    pages = {(layers[page["sae_id"]], int(page["latent"])): page for _, page in features.iterrows()}
    path = write_circuit_tracer(out, graph, pages)
    typer.echo(f"circuit of {top['target']} ({len(graph['nodes'])} nodes, {len(graph['links'])} links) written to "
               f"{path}; view it with circuit_tracer.frontend.local_server.serve(data_dir={out!r}, "
               f"features_dir={out!r} + '/features')")  # fmt: skip


@app.command("clt-eval")
def clt_eval(
    path: Annotated[str, typer.Argument(help="circuit-tracer cross-layer transcoder folder (config.yaml + "
                                        "W_enc_L / W_dec_L safetensors).")],
    model: ModelArgument,
    data: DataOption = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens of --data to score on.")] = 4096,
    context_length: ContextOption = 64,
    device: DeviceOption = "cpu",
    workspace: WorkspaceOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:  # fmt: skip
    """Score a cross-layer transcoder on MODEL over --data: per layer, FVU and cosine of its predicted MLP outputs
    and the mean L0 of its features."""
    from workbench.circuits.sae.formats.circuit_tracer import evaluate_clt, load_clt

    if data is None:
        fail(
            "--data is required: the text the CLT is scored on (a text file, FILE.jsonl:FIELD, zoo:python-stdlib)"
        )
    clt = load_clt(path, device=device)
    hooked = open_model(model, workspace, device, "float32", trust_remote_code).eval()
    frame = evaluate_clt(hooked, open_data(data), clt, max_tokens=max_tokens, context_length=context_length)
    typer.echo(frame.to_string(index=False))
