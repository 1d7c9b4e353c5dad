"""The one-command demo: train the embedded zoo, run every analysis, fill the results database.

Each finished step is recorded in the results table ``demo_steps`` and skipped on a rerun (the probe job resumes
by its own task status, zoo training from its last checkpoint), so a rerun only serves the dashboard.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from rich.console import Console

from workbench.workspace import Workspace

console = Console()
DEMO_MODELS = ("code-tiny", "code-small", "fsm-tiny", "fsm-small", "vit-digits")
PROBE_JOB = Path(__file__).with_name("demo_probes.toml")
DEMO_DATASET = "demo-prompts"
CODE_PROMPTS = [
    "def add(a, b):\n    return a + b\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
    "data = {'a': [1, 2, 3], 'b': (4, 5)}\n",
    "try:\n    value = int(text)\nexcept ValueError:\n    value = None\n",
]


DEMO_TABLE = "demo_steps"


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


def _job_done(ws: Workspace, job_file: Path) -> bool:
    from probes.jobs import job_status

    return bool((job_status(job_file, ws)["status"] == "done").all())


def run_demo(workspace: str | Path | None = None) -> Workspace:
    """Run every demo step into ``workspace`` and return it."""
    from workbench.checkpoints import CheckpointSeries
    from workbench.zoo.train import train_zoo_model

    ws = Workspace(workspace).ensure()
    db = ws.results()
    console.print(f"[bold]Workbench demo[/] → workspace {ws.root}")
    for name in DEMO_MODELS:
        _step(
            db,
            f"train zoo model {name}",
            lambda name=name: str(train_zoo_model(name, ws, progress=True).name),
            done=False,
        )  # fmt: skip  (training resumes from its last checkpoint, so always ask it)

    def massive() -> str:
        from workbench.massive import fit_emergence, track_massive, write_results

        series = CheckpointSeries.from_directory(ws.model_dir("code-small"))
        report = track_massive(series, CODE_PROMPTS, dataset=DEMO_DATASET)
        fits = fit_emergence(report.layers, metric="top1")
        write_results(report, fits, ws)
        ok = fits[fits["status"] == "ok"]
        return f"{len(series)} checkpoints, {len(ok)}/{len(fits)} layers fitted"

    _step(db, "massive activations over code-small checkpoints", massive)

    def attention() -> str:
        from workbench.attention.summary import write_attention_statistics

        series = CheckpointSeries.from_directory(ws.model_dir("code-small"))
        frame = write_attention_statistics(series.iter(progress=True), CODE_PROMPTS, ws, dataset=DEMO_DATASET)
        return f"{len(frame)} (checkpoint, layer, head) rows"

    _step(db, "attention statistics over code-small checkpoints", attention)

    def probes() -> str:
        from probes.jobs import run_job

        status = run_job(PROBE_JOB, workspace=ws, workers=2)
        rows = db.read("probe_results", job="demo-probes")
        last = rows[rows["checkpoint"] == rows.groupby("model")["checkpoint"].transform("max")]
        best = last.groupby("label_set")["score"].max().round(3).to_dict()
        return f"{(status['status'] == 'done').sum()}/{len(status)} tasks; best final accuracy {best}"

    _step(db, "probe job (code-small, fsm-tiny over checkpoints)", probes, done=_job_done(ws, PROBE_JOB))

    import circuits.codebook
    import circuits.neuron_path
    import circuits.sae
    import circuits.transcoder_circuits

    analyses = [
        ("SAE and transcoders on code-tiny", circuits.sae.demo_step),
        ("transcoder circuit on code-tiny", circuits.transcoder_circuits.demo_step),
        ("codebooks on fsm-small", circuits.codebook.demo_step),
        ("neuron paths on vit-digits", circuits.neuron_path.demo_step),
    ]
    for title, run in analyses:
        _step(db, title, lambda run=run: run(ws, progress=True))
    console.print("[bold green]demo results ready[/]")
    return ws
