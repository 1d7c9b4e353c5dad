"""`workbench prompt-lab run MODEL --prompt TEXT [--interventions FILE]`: one prompt-lab session of a text model from
the command line (the row the dashboard's Prompt lab page saves), stored in ``prompt_lab_sessions``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from workbench.cli_options import (
    DeviceOption,
    ModelArgument,
    SeedOption,
    TrustRemoteCodeOption,
    WorkspaceOption,
    fail,
    open_model,
)

app = typer.Typer(
    help="Prompt lab: a prompt clean vs under a stack of interventions, as the dashboard's Prompt lab page shows "
    "it.",
    no_args_is_help=True,
)


def read_interventions(path: Path) -> list:
    """The intervention stack of a JSON file: a list of objects with the fields of ``Intervention`` (what a saved
    session's ``interventions`` column holds); anything else is refused naming the problem."""
    from workbench.interventions import Intervention  # deferred: CLI start-up (torch)

    try:
        entries = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        fail(f"--interventions {path}: cannot be read as JSON ({err})")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        fail(
            f"--interventions {path}: give a JSON list of objects, e.g. "
            '[{"kind": "zero", "hook": "blocks.0.attn.hook_z", "heads": [1]}]'
        )
    stack = []
    for number, entry in enumerate(entries):
        try:
            stack.append(Intervention.from_dict(entry))
        except (TypeError, ValueError) as err:
            fail(f"--interventions {path}: entry {number} is not an intervention ({err})")
    return stack


@app.command("run")
def run_command(
    model: ModelArgument,
    prompt: Annotated[str, typer.Option(help="The prompt (text; a masked LM's may hold its [MASK] token).")],
    interventions: Annotated[
        Path | None,
        typer.Option(
            help="JSON file with the intervention stack: a list of objects such as "
            '{"kind": "zero", "hook": "blocks.0.attn.hook_z", "heads": [1]} (kind zero, mean, steer or patch), as '
            "a saved session's interventions column holds them (default: none, the clean run only)."
        ),
    ] = None,
    top_k: Annotated[int, typer.Option(min=1, help="Top tokens (or classes) compared.")] = 8,
    focus_token: Annotated[
        str | None, typer.Option(help="A token whose logit difference clean → intervened is reported.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Continuation length (causal LMs).")] = 20,
    temperature: Annotated[
        float, typer.Option(min=0.0, help="0: greedy continuations; above 0: sampled with --seed.")
    ] = 0.0,
    seed: SeedOption = 0,
    masked_position: Annotated[
        int | None, typer.Option(help="Masked LMs: the [MASK] position compared (default: the first).")
    ] = None,
    second_prompt: Annotated[
        str | None, typer.Option(help="Encoders: a second prompt whose pooled embedding is compared.")
    ] = None,
    device: DeviceOption = "cpu",
    workspace: WorkspaceOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
) -> None:
    """Run PROMPT on MODEL clean and under the stack of --interventions, print the comparison and store the session
    in prompt_lab_sessions (the dashboard's Prompt lab page lists it)."""
    from workbench.analyses.prompt_lab.analysis import ANALYSIS, run  # deferred: CLI start-up (torch)
    from workbench.analysis import write_tables  # deferred: CLI start-up (pandas)

    stack = read_interventions(interventions) if interventions is not None else []
    hooked = open_model(model, workspace, device, "float32", trust_remote_code).eval()
    ANALYSIS.check(hooked)
    frames = run(
        hooked,
        prompt,
        interventions=stack,
        top_k=top_k,
        focus_token=focus_token,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        masked_position=masked_position,
        second_prompt=second_prompt,
    )
    write_tables(workspace, ANALYSIS, frames)
    row = frames["prompt_lab_sessions"].iloc[0]
    for intervention in stack:
        typer.echo(f"intervention: {intervention.describe()}")
    if not stack:
        typer.echo("no interventions (--interventions FILE): the intervened run is the clean run")
    _print_outputs(row)
    typer.echo(f"saved session {row['session']} of {hooked.cfg.name} to prompt_lab_sessions in the workspace")


def _print_outputs(row) -> None:
    """The session's comparisons as lines: top outputs clean → intervened, continuations, embedding cosines."""
    outputs = json.loads(row["outputs"])
    table = json.loads(row["next_token"]) if row["next_token"] is not None else []
    if table:
        what = {"next_token": "next token", "masked_token": "masked token", "class": "class"}[row["output"]]
        best = max(table, key=lambda r: r["p_clean"])
        moved = max(table, key=lambda r: r["p_intervened"])
        typer.echo(
            f"top {what} clean {best['token']!r} (p={best['p_clean']:.4f}) → intervened {moved['token']!r} "
            f"(p={moved['p_intervened']:.4f}); KL(clean‖intervened) = {outputs['kl']:.4f} nats"
        )
    elif row["output"] == "masked_token":
        typer.echo("no masked-token comparison: the prompt has no mask token")
    if row["focus_token"] is not None:
        typer.echo(f"logit difference of {row['focus_token']!r}: {row['logit_diff']:+.4f}")
    for which in ("clean", "intervened"):
        text = row[f"continuation_{which}"]
        if text is not None:
            typer.echo(f"continuation ({which}): {text!r}")
    if row["continuation_note"]:
        typer.echo(f"note: {row['continuation_note']}")
    for pair in outputs.get("embedding", []):
        typer.echo(f"pooled-embedding cosine {pair['pair']}: {pair['cosine']:.4f}")
