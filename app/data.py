"""Cached loaders for the dashboard: everything it shows comes from the workspace's results database.

Caches are keyed by the database path and its modification time, never by large arrays, so a rerun of an
analysis shows up on the next page load.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd
import streamlit as st

from workbench.identity import display_name
from workbench.results import ResultsDB, ResultsError
from workbench.workspace import Workspace


class WorkspaceProblem(Exception):
    """The workspace cannot be shown; the message tells the user what to run or fix."""


def workspace_path() -> Path:
    """The workspace given on the command line (``-- --workspace DIR``), $WORKBENCH_WORKSPACE, or ./workspace."""
    argv = _script_args()
    if "--workspace" in argv and argv.index("--workspace") + 1 < len(argv):
        return Path(argv[argv.index("--workspace") + 1]).resolve()
    return Path(os.environ.get("WORKBENCH_WORKSPACE", "workspace")).resolve()


def _script_args() -> list[str]:
    return sys.argv[1:]


def results_path(workspace: Path) -> Path:
    return Workspace(workspace).results_path


def check_workspace(workspace: Path) -> Path:
    """Raise WorkspaceProblem with a fix when the workspace or its results database is missing, too new, locked
    or corrupt."""
    if not workspace.is_dir():
        raise WorkspaceProblem(
            f"The workspace {workspace} does not exist. Run `make demo` (or `workbench demo --workspace {workspace}`) "
            "to create one, or start the dashboard with `workbench dashboard --workspace DIR`."
        )
    path = results_path(workspace)
    if not path.exists():
        raise WorkspaceProblem(
            f"{workspace} has no results database yet ({path.name}). Run an analysis, e.g. `workbench demo`, "
            "`workbench massive run ...` or `workbench probe jobs run jobs.toml`."
        )

    try:
        ResultsDB(path).tables()
    except ResultsError as err:
        raise WorkspaceProblem(str(err)) from err
    return path


@st.cache_data(show_spinner=False)
def _read(path: str, mtime: float, table: str) -> pd.DataFrame:
    return ResultsDB(Path(path)).read(table)


@st.cache_data(show_spinner=False)
def _tables(path: str, mtime: float) -> list[str]:
    return ResultsDB(Path(path)).tables()


def tables(path: Path) -> list[str]:
    """Names of the tables in the results database at ``path``."""
    return _tables(str(path), path.stat().st_mtime)


def table(path: Path, name: str) -> pd.DataFrame | None:
    """One results table (None when no analysis has written it yet); a database locked for too long or corrupt
    stops the page with a warning."""
    try:
        if name not in tables(path):
            return None
        return _read(str(path), path.stat().st_mtime, name)
    except ResultsError as err:
        st.warning(str(err))
        st.stop()


@st.cache_data(show_spinner=False)
def _row_counts(path: str, mtime: float) -> pd.DataFrame:
    db = ResultsDB(Path(path))
    rows = []
    for name in db.tables():
        columns = set(db.columns(name))
        counted = [c for c in ("model", "checkpoint", "hook") if c in columns]
        select = ", ".join(["count(*) AS rows", *(f"count(DISTINCT {c}) AS {c}s" for c in counted)])
        rows.append({"table": name, **db.query(f"SELECT {select} FROM {name}").iloc[0].to_dict()})
    return pd.DataFrame(rows)


def row_counts(path: Path) -> pd.DataFrame:
    """Per results table: its row count and how many distinct models, checkpoints and hooks it covers."""
    return _row_counts(str(path), path.stat().st_mtime)


@st.cache_data(show_spinner=False)
def _result_models(path: str, mtime: float) -> pd.DataFrame:
    db = ResultsDB(Path(path))
    parts = []
    for name in db.tables():
        columns = set(db.columns(name))
        if "model" not in columns:
            continue
        step = "checkpoint" if "checkpoint" in columns else "NULL"
        found = db.query(f'SELECT DISTINCT model, {step} AS checkpoint FROM "{name}" WHERE model IS NOT NULL')
        parts.append(found.assign(table=name))
    if not parts:
        return pd.DataFrame(columns=["model", "identity", "checkpoints", "first step", "last step", "tables"])
    rows = pd.concat(parts, ignore_index=True)
    out = []
    for identity, group in rows.groupby("model", sort=True):
        steps = sorted({int(s) for s in group["checkpoint"].dropna()})
        out.append(
            {
                "model": display_name(str(identity)),
                "identity": str(identity),
                "checkpoints": len(steps),
                "first step": steps[0] if steps else None,
                "last step": steps[-1] if steps else None,
                "tables": ", ".join(sorted(set(group["table"]))),
            }
        )
    return pd.DataFrame(out)


def result_models(path: Path) -> pd.DataFrame:
    """Every model with rows in the results database at ``path`` (the distinct ``model`` of every table): its short
    display name, identity, the checkpoints its rows cover and the tables that hold them."""
    return _result_models(str(path), path.stat().st_mtime)


def plain(text: object) -> str:
    """``text`` as inert markdown/HTML: every character that markdown, HTML or Streamlit's directives (``:red[]``,
    ``$`` math) could interpret becomes a numeric character reference, so user-derived text (tokens, names) shows
    literally, links and images included, even inside ``unsafe_allow_html`` markup."""
    return "".join(c if c.isalnum() or c == " " else f"&#{ord(c)};" for c in str(text))


def pick(rows: pd.DataFrame, column: str, label: str | None = None, key: str | None = None) -> pd.DataFrame:
    """Filter ``rows`` to one value of ``column`` chosen in a selectbox (shown only when there is a choice)."""
    if column not in rows or rows[column].nunique(dropna=False) <= 1:
        return rows
    values = sorted(rows[column].dropna().unique().tolist(), key=str)
    chosen = st.selectbox(label or column, values, key=key)
    return rows[rows[column] == chosen]


def model_select(rows: pd.DataFrame, key: str | None = None, label: str = "model", container=st) -> str:
    """Choose one of the models of ``rows["model"]`` (identities): shown by ``display_name``, with the identity
    added where two display names coincide, so same-named folders are told apart; returns the identity."""
    identities = sorted({str(m) for m in rows["model"].dropna()}, key=lambda m: (display_name(m), m))
    shown = [display_name(m) for m in identities]
    names = {m: d if shown.count(d) == 1 else f"{d} ({m})" for m, d in zip(identities, shown, strict=True)}
    return str(container.selectbox(label, identities, format_func=names.__getitem__, key=key))


def empty_state(what: str, command: str) -> None:
    """Say that nothing is computed yet and which command produces it."""
    st.info(f"No results yet for {what} in this workspace. Produce them with:\n\n```\n{command}\n```")


def open_workspace_or_stop() -> Path:
    """The results database of the current workspace, or a warning and ``st.stop()``."""
    try:
        return check_workspace(workspace_path())
    except WorkspaceProblem as problem:
        st.warning(str(problem))
        st.stop()


def token_chips(tokens: list[str], values: list[float] | None = None, notes: list[str] | None = None) -> str:
    """A row of token chips as HTML: each token (made inert by ``plain``; spaces shown as ·, newlines as ↵) shaded by
    its value relative to the row's largest |value|, with ``notes`` (e.g. "L12 3.1") under it and the value in its
    tooltip."""
    peak = max((abs(v) for v in values or []), default=0.0) or 1.0
    chips = []
    for i, token in enumerate(tokens):
        value = values[i] if values is not None else 0.0
        alpha = min(1.0, abs(value) / peak)
        note = f'<br><small style="opacity:.8">{plain(notes[i])}</small>' if notes and notes[i] else ""
        chips.append(
            f'<span class="token-chip" title="{i}: {value:.4g}" style="display:inline-block;margin:2px;padding:2px 5px;'
            f"border:1px solid #ccc;border-radius:4px;background:rgba(255,120,0,{alpha:.2f});white-space:pre;"
            f'font-family:monospace;vertical-align:top">{plain(token.replace(" ", "·").replace(chr(10), "↵"))}{note}</span>'
        )
    return "".join(chips)
