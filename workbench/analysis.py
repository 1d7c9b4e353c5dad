"""The analysis contract: what every analysis declares once, and the one writer of its results.

An analysis module holds one :class:`Analysis`::

    ANALYSIS = Analysis(
        name="massive",
        command="workbench massive run MODEL --data DATA",
        tables=(Table("massive_layers", keys=("model", "checkpoint", "hook", "dataset"), columns=(...)), ...),
        requires=("tokenizer",),
    )

and a library function ``run(model, data, options) -> dict[table name, DataFrame]``; its CLI command takes
``MODEL`` (any model reference) and ``--data`` (any dataset reference) with the shared options of
``workbench.cli_options``, and stores frames with :func:`write_tables`. The dashboard reads the declarations
(table names, keys, the command that fills them) from the analyses the ``workbench.analyses`` entry points list,
so no table name is spelled twice. :meth:`Analysis.check` refuses a model or dataset the analysis cannot use
before any work is done.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

import pandas as pd

from workbench.workspace import Workspace

REQUIREMENTS = {
    "tokenizer": "a tokenizer (text input)",
    "causal": "a causal language model (next-token logits)",
    "logits": "output logits (a causal LM's next-token or a classifier's class logits)",
    "mlp": "MLP blocks (d_mlp > 0)",
    "rotary": "rotary position embeddings (GPT-NeoX, Llama, a rotary TransformerLens model)",
    "text": "a text dataset (documents or token ids)",
}


S = TypeVar("S")


def settings_with(settings: S | None, kind: type[S], overrides: Mapping[str, Any]) -> S:
    """``settings`` (default ``kind()``), a settings dataclass shared by an analysis's ``run()`` and its command, with
    the fields ``overrides`` names replaced; a key that is no field of ``kind`` is the TypeError a misspelt keyword of
    ``run()`` would give."""
    unknown = set(overrides) - {f.name for f in fields(kind)}  # type: ignore[arg-type]
    if unknown:
        raise TypeError(
            f"run() got unexpected keyword arguments {sorted(unknown)}; {kind.__name__} has no such field"
        )
    return replace(settings if settings is not None else kind(), **overrides)  # type: ignore[type-var]


class AnalysisNotApplicable(ValueError):
    """The analysis cannot run on this model or dataset; raised before any work, naming what is missing."""


@dataclass(frozen=True)
class Table:
    """A result table: ``keys`` identify a row (a re-run replaces rows with the same keys), ``columns`` are the
    analysis's own columns (every row also carries model, checkpoint, hook, dataset, workbench_version,
    created_at)."""

    name: str
    keys: tuple[str, ...]
    columns: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class Analysis:
    """One analysis: its name, the command that fills its tables, the tables, and what it needs of a model."""

    name: str
    command: str
    tables: tuple[Table, ...]
    requires: tuple[str, ...] = ()
    description: str = ""

    def table(self, name: str) -> Table:
        for table in self.tables:
            if table.name == name:
                return table
        raise KeyError(f"analysis {self.name!r} declares no table {name!r}; tables: {self.table_names}")

    @property
    def table_names(self) -> list[str]:
        return [t.name for t in self.tables]

    def check(self, model: Any = None, data: Any = None) -> None:
        """Raise :class:`AnalysisNotApplicable` if ``model`` (a HookedModel) or ``data`` (a Dataset) lacks a
        requirement; called by every command before it loads data or trains anything."""
        missing = [r for r in self.requires if not _meets(r, model, data)]
        if missing:
            what = model.cfg.name if model is not None else "this input"
            raise AnalysisNotApplicable(
                f"{self.name} needs {', '.join(REQUIREMENTS[r] for r in missing)}, which {what}"
                f"{' (' + model.cfg.family + ')' if model is not None else ''} does not have; "
                f"{_advice(missing)}"
            )


def _meets(requirement: str, model: Any, data: Any) -> bool:
    """Whether ``model`` / ``data`` meet ``requirement``, from the model's declared capabilities (never its family)."""
    if requirement == "text":
        return data is None or data.modality in ("text", "tokens")
    if model is None:
        return True
    cfg, caps = model.cfg, model.capabilities
    if requirement == "tokenizer":
        return model.tokenizer is not None or (data is not None and data.modality == "tokens")
    if requirement == "causal":
        return bool(cfg.causal) and caps.modality == "text"
    if requirement == "logits":
        return (bool(cfg.causal) and caps.modality == "text") or caps.modality == "image"
    if requirement == "mlp":
        return cfg.d_mlp > 0
    if requirement == "rotary":
        return caps.positional == "rotary"
    raise KeyError(requirement)


def _advice(missing: list[str]) -> str:
    if "causal" in missing or "logits" in missing:
        return "use a causal LM (GPT-2, GPT-NeoX/Pythia, Llama, a code-* or fsm-* zoo model)"
    if "rotary" in missing:
        return "use a model with rotary position embeddings (GPT-NeoX/Pythia, Llama, a rotary TransformerLens model)"
    if "text" in missing:
        return "pass a text or token dataset with --data"
    return "use a model that has it"


def write_tables(
    workspace: Any, analysis: Analysis | Sequence[Analysis], frames: Mapping[str, pd.DataFrame]
) -> dict[str, int]:
    """The one results writer: store each frame in the table its analysis declares (one analysis, or several
    whose tables one command fills), replacing rows with the same keys.

    Returns rows written per table. A frame for an undeclared table, or one missing a declared key column,
    is refused before anything is written.
    """
    analyses = [analysis] if isinstance(analysis, Analysis) else list(analysis)
    owner = {table.name: a for a in analyses for table in a.tables}
    tables = {name: owner.get(name, analyses[0]).table(name) for name in frames}
    for name, frame in frames.items():
        absent = [k for k in tables[name].keys if k not in frame.columns and k not in _FILLED]
        if absent:
            raise ValueError(
                f"{owner.get(name, analyses[0]).name}: frame for {name} lacks key column(s) {absent}"
            )
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    db = ws.results()
    return {
        name: db.write(name, frame, replace_keys=list(tables[name].keys))
        for name, frame in frames.items()
        if not frame.empty
    }


_FILLED = ("model", "checkpoint", "hook", "dataset")  # ResultsDB fills these when a frame lacks them


def registered_analyses() -> dict[str, Analysis]:
    """Every installed analysis, from the ``workbench.analyses`` entry-point group (name -> Analysis)."""
    found: dict[str, Analysis] = {}
    for entry in importlib.metadata.entry_points(group="workbench.analyses"):
        analysis = entry.load()
        found[analysis.name] = analysis
    return found
