"""The one-command demo: train the embedded zoo, run every analysis, fill the results database.

Each step is skipped when its results are already in the workspace, so a rerun only serves the dashboard.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from workbench.workspace import Workspace

console = Console()
DEMO_MODELS = ("code-tiny", "code-small", "fsm-tiny", "fsm-small", "vit-digits")
PROBE_JOB = Path(__file__).with_name("demo_probes.toml")
CODE_PROMPTS = [
    "def add(a, b):\n    return a + b\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
    "data = {'a': [1, 2, 3], 'b': (4, 5)}\n",
    "try:\n    value = int(text)\nexcept ValueError:\n    value = None\n",
]


def _step(name: str, done: bool, run: Callable[[], str | None]) -> None:
    if done:
        console.print(f"[green]✓[/] {name} (already in the workspace)")
        return
    start = time.perf_counter()
    console.print(f"[bold]→ {name}[/]")
    note = run()
    console.print(f"[green]✓[/] {name} in {time.perf_counter() - start:.1f}s" + (f": {note}" if note else ""))


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
            f"train zoo model {name}",
            False,
            lambda name=name: str(train_zoo_model(name, ws, progress=True).name),
        )

    def massive() -> str:
        from workbench.massive import fit_emergence, track_massive, write_results

        series = CheckpointSeries.from_directory(ws.model_dir("code-small"))
        report = track_massive(series, CODE_PROMPTS)
        fits = fit_emergence(report.layers, metric="top1")
        write_results(report, fits, ws)
        ok = fits[fits["status"] == "ok"]
        return f"{len(series)} checkpoints, {len(ok)}/{len(fits)} layers fitted"

    _step("massive activations over code-small checkpoints", "massive_layers" in db.tables(), massive)

    def attention() -> str:
        from workbench.attention.summary import attention_statistics

        series = CheckpointSeries.from_directory(ws.model_dir("code-small"))
        tables = [attention_statistics(model, CODE_PROMPTS) for model in series.iter(progress=True)]
        import pandas as pd

        frame = pd.concat(tables, ignore_index=True).assign(
            dataset="demo-prompts", hook="blocks.*.attn.hook_*"
        )
        db.write("attention_stats", frame, replace_keys=["model", "checkpoint", "layer", "head"])
        return f"{len(frame)} (checkpoint, layer, head) rows"

    _step("attention statistics over code-small checkpoints", "attention_stats" in db.tables(), attention)

    def probes() -> str:
        from probes.jobs import run_job

        status = run_job(PROBE_JOB, workspace=ws, workers=2)
        rows = db.read("probe_results", job="demo-probes")
        last = rows[rows["checkpoint"] == rows.groupby("model")["checkpoint"].transform("max")]
        best = last.groupby("label_set")["score"].max().round(3).to_dict()
        return f"{(status['status'] == 'done').sum()}/{len(status)} tasks; best final accuracy {best}"

    _step("probe job (code-small, fsm-tiny over checkpoints)", _job_done(ws, PROBE_JOB), probes)

    import circuits.codebook
    import circuits.neuron_path
    import circuits.sae
    import circuits.transcoder_circuits

    analyses = [
        ("SAE and transcoders on code-tiny", "sae_evals", circuits.sae.demo_step),
        ("transcoder circuit on code-tiny", "transcoder_circuits", circuits.transcoder_circuits.demo_step),
        ("codebooks on fsm-small", "codebook_purity", circuits.codebook.demo_step),
        ("neuron paths on vit-digits", "neuron_path_metrics", circuits.neuron_path.demo_step),
    ]
    for title, table_name, run in analyses:
        _step(title, table_name in db.tables(), lambda run=run: run(ws, progress=True))
    console.print("[bold green]demo results ready[/]")
    return ws
