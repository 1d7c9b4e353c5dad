"""The architecture study of "Hidden Dynamics of Massive Activations" on the zoo: train a sweep of architectures,
track each over its checkpoints, fit the emergence curve per layer, and learn architecture → curve parameters with
leave-one-architecture-out cross-validation.

`workbench dynamics sweep SWEEP.toml`; the file::

    name = "arch"                        # the sweep's name (rows, run directories)
    data = "zoo:python-stdlib"           # any dataset reference, probed at every checkpoint
    base = "code-tiny"                   # the zoo spec every [[config]] starts from
    metrics = ["massive_top1", "massive_ratio", "resid_norm_growth"]   # per-layer metrics the predictor learns
    family = "exp_log"                   # curve family fitted per layer
    predictor = "ridge"                  # "ridge" (standardised RidgeCV) or "forest" (random forest)

    [defaults]                           # ZooSpec fields for every config (steps, context_length, max_files, ...)
    steps = 300

    [track]                              # dynamics settings: max_sequences, context_length, batch_size, bos,
    max_sequences = 16                   # sparsity_threshold, n_boot, level
    n_boot = 20

    [[config]]                           # one zoo architecture: any ZooSpec field (name required)
    name = "sw-l2-d64"
    n_layers = 2
    d_model = 64
    prepend_bos = true                   # the fixed first token
    lr = 3e-3
    weight_decay = 0.1

    [[series]]                           # an existing checkpoint series instead of a zoo training run, e.g.
    model = "EleutherAI/pythia-70m"      # Pythia over the hub (or its offline cache): its config gives the
    steps = [0, 512, 1000, 143000]       # sizes; lr / weight_decay / prepend_bos as trained (optional)
    lr = 1e-3

Each config trains into the workspace like any zoo model (``models/<name>/``, resumable) and each series is
tracked with :func:`workbench.analyses.dynamics.analysis.track_dynamics` (resumable per checkpoint), so a killed
sweep continues where it stopped. Everything in the file is checked before any training. The predictor is
:class:`workbench.analyses.dynamics.predictor.ParameterPredictor`.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.ensemble import RandomForestRegressor
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from workbench.analyses.dynamics.analysis import ANALYSIS, METRICS, NO_HEAD, DynamicsSettings, track_dynamics
from workbench.analyses.dynamics.emergence import FAMILIES, FitError
from workbench.analyses.dynamics.predictor import LOG_TARGETS, ParameterPredictor
from workbench.analysis import write_tables
from workbench.datasets import load_dataset
from workbench.deprecation import renamed_keys
from workbench.references import model_trainer, resolve_series, short_name
from workbench.workspace import Workspace, safe_name

TOP_KEYS = {"name", "data", "base", "metrics", "family", "predictor", "defaults", "track", "config", "series"}
PREDICTORS = (
    "ridge",
    "forest",
)  # standardised ridge (extrapolates linearly to a held-out size) or a random forest
TRACK_KEYS = {"max_sequences", "context_length", "batch_size", "bos", "sparsity_threshold", "n_boot", "level"}
SERIES_KEYS = {"model", "name", "steps", "lr", "weight_decay", "prepend_bos"}
RENAMED = {"seq_len": "context_length"}  # ZooSpec fields' old names (one release)
DERIVED_TARGETS = ("emergence_step", "final_value", "steady_state")
# The paper's qualitative claim per target (arXiv 2508.03616: steady state predicted well, emergence timing moderately)
CLAIMS = {
    "K": "steady state: predicted well",
    "steady_state": "steady state: predicted well",
    "final_value": "steady state (the value reached at the last step): predicted well",
    "A": "amplitude: predicted well with the steady state",
    "emergence_step": "emergence timing: predicted moderately",
    "gamma": "emergence timing: predicted moderately",
    "lambda": "emergence timing (decay): predicted moderately",
    "t0": "emergence timing (onset): predicted moderately",
}


class SweepError(ValueError):
    """A sweep file cannot be run; the message names the file, the table and the fix."""


@dataclass
class SweepEntry:
    """One architecture of the sweep: a zoo spec to train (``workbench.references.model_trainer``'s), or an
    existing series reference."""

    name: str
    spec: Any = None
    model: str | None = None
    steps: list[int] | None = None
    recipe: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sweep:
    name: str
    data: str
    metrics: list[str]
    family: str
    predictor: str
    settings: DynamicsSettings
    n_boot: int
    level: float
    entries: list[SweepEntry]


@dataclass
class SweepResult:
    """``fits``: per architecture × metric × layer, the selected fit with the architecture's features;
    ``scores``: leave-one-architecture-out R² per metric × target with the paper's claim; ``predictions``:
    out-of-fold predicted vs fitted per row (scale targets as log10)."""

    sweep: str
    fits: pd.DataFrame
    scores: pd.DataFrame
    predictions: pd.DataFrame
    notes: list[str]

    def frames(self) -> dict[str, pd.DataFrame]:
        """The sweep's tables of :data:`ANALYSIS` (``dynamics_sweep_fits``, ``dynamics_predictor``,
        ``dynamics_predictions``), for ``write_tables``."""
        return {
            "dynamics_sweep_fits": self.fits,
            "dynamics_predictor": self.scores,
            "dynamics_predictions": self.predictions,
        }


def load_sweep(path: str | Path) -> Sweep:
    """Parse and check a sweep file (see the module doc); every problem is a SweepError naming file and key."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise SweepError(f"{path} is not valid TOML: {err}") from None
    _known(path, "the top level", raw, TOP_KEYS)
    name = safe_name(str(raw.get("name", path.stem)), f"as the sweep name in {path}")
    metrics = list(raw.get("metrics", ["massive_top1", "massive_ratio", "resid_norm_growth"]))
    for metric in metrics:
        if metric not in METRICS or METRICS[metric].per_head:
            per_layer = [m for m, info in METRICS.items() if not info.per_head]
            raise SweepError(
                f"{path}: metrics has {metric!r}; the predictor learns per-layer metrics: {per_layer}"
            )
    family = str(raw.get("family", "exp_log"))
    if family not in FAMILIES:
        raise SweepError(f"{path}: family {family!r} is not registered; choose one of {', '.join(FAMILIES)}")
    predictor = str(raw.get("predictor", "ridge"))
    if predictor not in PREDICTORS:
        raise SweepError(f"{path}: predictor {predictor!r} is not one of {', '.join(PREDICTORS)}")
    track = dict(raw.get("track", {}))
    _known(path, "[track]", track, TRACK_KEYS)
    n_boot, level = int(track.pop("n_boot", 20)), float(track.pop("level", 0.9))
    settings = DynamicsSettings(**track)
    base = str(raw.get("base", "code-tiny"))
    defaults = renamed_keys(raw.get("defaults", {}), RENAMED, f"{path} [defaults]")
    entries: list[SweepEntry] = []
    for i, table in enumerate(raw.get("config", [])):
        if "name" not in table:
            raise SweepError(f"{path}: [[config]] #{i + 1} has no name; give every config a unique name")
        overrides = {**defaults, **renamed_keys(table, RENAMED, f"{path} [[config]] #{i + 1}")}
        try:
            spec = model_trainer("zoo").spec(base, **overrides)
        except ValueError as err:  # an unknown base or field, named with the valid ones
            raise SweepError(f"{path}: [[config]] {table['name']!r}: {err}") from None
        if spec.corpus == "digits":
            raise SweepError(
                f"{path}: [[config]] {spec.name!r} is an image model; the sweep tracks language models"
            )
        safe_name(spec.name, f"as a config name in {path}")
        recipe = {"lr": spec.lr, "weight_decay": spec.weight_decay, "prepend_bos": spec.prepend_bos}
        entries.append(SweepEntry(spec.name, spec=spec, recipe=recipe))
    for i, table in enumerate(raw.get("series", [])):
        _known(path, f"[[series]] #{i + 1}", table, SERIES_KEYS)
        if "model" not in table:
            raise SweepError(f"{path}: [[series]] #{i + 1} has no model (a model reference with checkpoints)")
        label = str(table.get("name", short_name(table["model"])))
        recipe = {k: table[k] for k in ("lr", "weight_decay", "prepend_bos") if k in table}
        steps = [int(s) for s in table["steps"]] if "steps" in table else None
        entries.append(SweepEntry(label, model=str(table["model"]), steps=steps, recipe=recipe))
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise SweepError(
            f"{path}: names repeat ({sorted({n for n in names if names.count(n) > 1})}); make them unique"
        )
    if len(entries) < 2:
        raise SweepError(
            f"{path}: leave-one-architecture-out needs at least 2 architectures; got {len(entries)}"
        )
    data = str(raw.get("data", "zoo:python-stdlib"))
    return Sweep(name, data, metrics, family, predictor, settings, n_boot, level, entries)


def _known(path: Path, where: str, table: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise SweepError(f"{path}: {where} has unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def run_sweep(
    path: str | Path,
    workspace: str | Path | Workspace | None = None,
    *,
    write: bool = True,
    progress: bool = True,
) -> SweepResult:
    """Train (or resume) every config, track every architecture, fit per layer, and score the predictor.

    Each architecture's own dynamics tables are stored as it is tracked; ``write`` also stores the sweep's tables
    (:meth:`SweepResult.frames`; False when the caller stores them, as ``workbench dynamics sweep`` does).
    """
    sweep = load_sweep(path)
    data = load_dataset(sweep.data)
    ANALYSIS.check(data=data)
    ws = Workspace(workspace).ensure()
    frames = []
    notes: list[str] = []
    for entry in sweep.entries:
        if entry.spec is not None:
            model_trainer("zoo").train(entry.spec, ws, progress=progress)
        series = resolve_series(entry.model or entry.name, workspace=ws.root)
        result = track_dynamics(
            series,
            data,
            settings=sweep.settings,
            workspace=ws,
            run=f"{sweep.name}--{entry.name}",
            families=(sweep.family,),
            n_boot=sweep.n_boot,
            level=sweep.level,
            steps=entry.steps,
            progress=progress,
        )
        notes += [f"{entry.name}: {note}" for note in result.notes]
        cfg = (
            result.spec or series.load(result.steps[-1]).cfg.to_dict()
        )  # files written before specs were stored
        features = {
            "n_layers": cfg["n_layers"],
            "d_model": cfg["d_model"],
            "n_heads": cfg["n_heads"],
            "d_mlp": cfg["d_mlp"],
            "lr": entry.recipe.get("lr"),
            "weight_decay": entry.recipe.get("weight_decay", 0.0),
            "prepend_bos": bool(entry.recipe.get("prepend_bos", False)),
            "architecture": entry.name,
        }
        rows = result.fits[
            result.fits["metric"].isin(sweep.metrics)
            & (result.fits["layer"] >= 0)
            & (result.fits["head"] == NO_HEAD)
            & (result.fits["family"] == sweep.family)
        ]
        frames.append(rows.assign(**features, model=series.name))
    fits = pd.concat(frames, ignore_index=True).assign(sweep=sweep.name, dataset=data.name)
    scores, predictions = score_predictor(fits, sweep.family, sweep.predictor)
    scores, predictions = scores.assign(sweep=sweep.name), predictions.assign(sweep=sweep.name)
    swept = SweepResult(sweep.name, fits, scores, predictions, notes)
    if write:
        write_tables(ws, ANALYSIS, swept.frames())
    return swept


def score_predictor(
    fits: pd.DataFrame, family: str = "exp_log", predictor: str = "ridge"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Leave-one-architecture-out R² of :class:`ParameterPredictor` per metric × target.

    The curve parameters are learnt from identifiable ("ok") fits only; the derived quantities (emergence step,
    steady state) from every usable fit. A target with fewer than 3 rows or 2 architectures gets R² NaN and a note.
    """
    estimator = _estimator(predictor)
    scores, predictions = [], []
    for metric, group in fits.groupby("metric", sort=False):
        for target in (*FAMILIES[family].params, *DERIVED_TARGETS):
            statuses = ["ok"] if target in FAMILIES[family].params else ["ok", "non_identifiable"]
            rows = group[group["status"].isin(statuses)].reset_index(drop=True)
            base = {
                "metric": metric,
                "target": target,
                "claim": CLAIMS.get(target, ""),
                "n_rows": len(rows),
                "n_architectures": int(rows["architecture"].nunique()) if len(rows) else 0,
                "learnt_as": "log10" if target in LOG_TARGETS else "value",
                "predictor": predictor,
            }
            try:
                learnt = ParameterPredictor([target], estimator).fit(rows, groups="architecture")
            except FitError as err:
                scores.append({**base, "r2": np.nan, "note": str(err)})
                continue
            column = f"param_{target}" if f"param_{target}" in rows else target
            fitted = rows[column].to_numpy(dtype=float)
            if target in LOG_TARGETS:
                fitted = np.log10(np.abs(fitted))
            scores.append({**base, "r2": learnt.cv_scores[target], "note": ""})
            predictions.append(
                pd.DataFrame(
                    {
                        "metric": metric,
                        "target": target,
                        "model": rows["model"],
                        "architecture": rows["architecture"],
                        "layer": rows["layer"],
                        "fitted": fitted,
                        "predicted": learnt.cv_predictions[target],
                    }
                )
            )
    columns = ["metric", "target", "model", "architecture", "layer", "fitted", "predicted"]
    return pd.DataFrame(scores), (
        pd.concat(predictions, ignore_index=True) if predictions else pd.DataFrame(columns=columns)
    )


def _estimator(predictor: str) -> Any:
    """The regressor behind ``predictor`` (see :data:`PREDICTORS`)."""
    if predictor == "forest":
        return RandomForestRegressor(n_estimators=200, random_state=0)
    return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))


def describe_sweep(result: SweepResult) -> str:
    """The predictor's R² per metric and target next to the paper's claim, and what was fitted."""
    lines = [
        f"sweep {result.sweep}: {result.fits['architecture'].nunique()} architectures, {len(result.fits)} "
        "per-layer fits (status counts: "
        + ", ".join(f"{k} {v}" for k, v in result.fits["status"].value_counts().items())
        + ")"
    ]
    for note in result.notes:
        lines.append(f"note: {note}")
    shown = result.scores[["metric", "target", "r2", "n_rows", "n_architectures", "claim", "note"]]
    predictor = result.scores["predictor"].iloc[0] if "predictor" in result.scores else ""
    lines.append(f"leave-one-architecture-out R² ({predictor}; scale targets learnt as log10):")
    lines.append(shown.to_string(index=False))
    return "\n".join(lines)
