"""The one-command demo: a list of recipes over the zoo — the same `workbench` commands a user types.

Each recipe is a command line run in-process through the CLI (`workbench.cli.app`), so the demo exercises exactly
what the README shows, from `workbench zoo train NAME` (it resumes from its last checkpoint) to `workbench codebook
tokfsm fsm-small` (the codebooks' TokFSM study). Each finished recipe is recorded in the results table
``demo_steps`` and skipped on a rerun (zoo training is always asked, and resumes or finds its run finished; the
probe job resumes by its own task status), so a rerun only serves the dashboard. A failing recipe raises
DemoStepError naming it and the command to rerun by hand; the recipes before it stay done.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from rich.console import Console

from workbench.cli import app
from workbench.probes.jobs import job_status
from workbench.workspace import Workspace

console = Console()
DEMO_MODELS = ("code-tiny", "code-small", "fsm-tiny", "fsm-small", "vit-digits")
HERE = Path(__file__).parent
PROBE_JOB = HERE / "demo_probes.toml"
PROMPTS = HERE / "demo_prompts.jsonl"  # the demo's own "user data": a jsonl file with a text field
DEMO_TABLE = "demo_steps"
GRAPH_PROMPT = "def add(a, b):\n    return a +"  # traced into the graph page's first graph
# `sae train`'s SAEs, one model forward: (--hook, --hook-out, --sae-id): an SAE on code-tiny's layer-0 residual
# stream and a transcoder on each MLP (the graph's transcoders)
DEMO_SAES = (
    ("blocks.0.hook_resid_post", "blocks.0.hook_resid_post", "code-tiny.L0-resid-topk"),
    ("blocks.0.hook_resid_pre", "blocks.0.hook_mlp_out", "code-tiny.L0-mlp-transcoder"),
    ("blocks.1.hook_resid_pre", "blocks.1.hook_mlp_out", "code-tiny.L1-mlp-transcoder"),
)


@dataclass(frozen=True)
class Recipe:
    """One demo step: a title and a `workbench` command line ({ws} is the workspace)."""

    title: str
    command: tuple[str, ...]

    def argv(self, ws: Workspace) -> list[str]:
        return [part.format(ws=ws.root) for part in self.command]


def recipes() -> list[Recipe]:
    """The demo, in order: train the zoo, then every analysis on zoo models and zoo / packaged data, plus the real
    pretrained MiniLM on the demo's prompts file."""
    prompts = str(PROMPTS)
    steps = [Recipe(f"train zoo model {name}", ("zoo", "train", name, "-w", "{ws}")) for name in DEMO_MODELS]
    steps += [
        Recipe(
            "massive activations over code-small checkpoints",
            ("massive", "run", "code-small", "--data", prompts, "-w", "{ws}"),
        ),
        Recipe(
            "massive activations of the pretrained MiniLM",
            ("massive", "run", "minilm", "--data", prompts, "-w", "{ws}"),
        ),
        Recipe(
            "attention statistics over code-small checkpoints",
            ("attention", "run", "code-small", "--data", prompts, "-w", "{ws}"),
        ),
        Recipe(
            "training dynamics over code-small checkpoints",
            ("dynamics", "run", "code-small", "--data", prompts, "-w", "{ws}"),
        ),
        Recipe(
            "probe job (code-small, fsm-tiny over checkpoints)",
            ("probe", "jobs", "run", str(PROBE_JOB), "--workers", "2", "-w", "{ws}"),
        ),
        Recipe(
            "SAE and transcoders on code-tiny",
            (
                "sae",
                "train",
                "code-tiny",
                "--data",
                "zoo:python-stdlib",
                "--max-tokens",
                "4096",
                "--context-length",
                "64",
                *(
                    a
                    for hook, hook_out, sae_id in DEMO_SAES
                    for a in ("--hook", hook, "--hook-out", hook_out, "--sae-id", sae_id)
                ),
                "-w",
                "{ws}",
            ),
        ),
        Recipe(
            "attribution graph on code-tiny (its two transcoders)",
            (
                "circuits",
                "attribute",
                "code-tiny",
                "--transcoders",
                "code-tiny.L0-mlp-transcoder",
                "--transcoders",
                "code-tiny.L1-mlp-transcoder",
                "--prompt",
                GRAPH_PROMPT,
                "-w",
                "{ws}",
            ),
        ),
        Recipe(
            "codebooks on fsm-small",
            (
                "codebook",
                "tokfsm",
                "fsm-small",
                "--n-codes",
                "300",
                "--steps",
                "300",
                "--run",
                "fsm-small-demo",
                "-w",
                "{ws}",
            ),
        ),
        Recipe(
            "neuron paths on vit-digits",
            (
                "neuron-path",
                "run",
                "vit-digits",
                "--data",
                "zoo:digits",
                "--top-k",
                "3",
                "--steps",
                "5",
                "--max-sequences",
                "30",
                "-w",
                "{ws}",
            ),
        ),
    ]
    return steps


class DemoStepError(RuntimeError):
    """A demo step failed; the message names the step and says that finished steps are kept."""


def _step(db, name: str, run: Callable[[], str | None], done: bool | None = None) -> None:
    """Run one demo step unless the demo already finished it in this workspace (recorded in ``demo_steps``)."""
    if done is None:
        done = DEMO_TABLE in db.tables() and not db.read(DEMO_TABLE, step=name).empty
    if done:
        console.print(f"[green]✓[/] {name} (already in the workspace)")
        return
    start = time.perf_counter()
    console.print(f"[bold]→ {name}[/]")
    try:
        note = run()
    except Exception as err:
        logging.getLogger(__name__).info("demo step %r failed", name, exc_info=True)
        raise DemoStepError(
            f"demo step '{name}' failed: {type(err).__name__}: {err}. The steps before it are kept; fix the cause "
            "and rerun `workbench demo` (or `make demo`) to continue from here (add -v to see the traceback)."
        ) from err
    seconds = time.perf_counter() - start
    db.write(
        DEMO_TABLE,
        pd.DataFrame([{"step": name, "seconds": seconds, "note": note or ""}]),
        replace_keys=["step"],
    )
    console.print(f"[green]✓[/] {name} in {seconds:.1f}s" + (f": {note}" if note else ""))


class RecipeFailed(RuntimeError):
    """A recipe's command exited non-zero (its one-line error is already printed)."""


def _run_command(argv: list[str]) -> str:
    """Run one `workbench` command line in this process; its exit code must be 0."""
    code = app(args=argv, standalone_mode=False)
    if code:
        raise RecipeFailed(f"`workbench {' '.join(argv)}` exited with {code} (its error is printed above)")
    return f"workbench {' '.join(argv[:2])} …"


def _job_done(ws: Workspace, job_file: Path) -> bool:
    return bool((job_status(job_file, ws)["status"] == "done").all())


def run_demo(workspace: str | Path | None = None) -> Workspace:
    """Run every demo recipe into ``workspace`` and return it."""
    ws = Workspace(workspace).ensure()
    db = ws.results()
    console.print(f"[bold]Workbench demo[/] → workspace {ws.root}")
    for recipe in recipes():
        run = lambda recipe=recipe: _run_command(recipe.argv(ws))  # noqa: E731
        done = None
        if recipe.title.startswith("train zoo model"):
            done = False  # training resumes from its last checkpoint, so always ask it
        elif "probe" in recipe.command:
            done = _job_done(ws, PROBE_JOB)
        _step(db, recipe.title, run, done=done)
    console.print("[bold green]demo results ready[/]")
    return ws
