"""The results database: one DuckDB file in the workspace, one table per analysis.

Analyses write pandas DataFrames; the dashboard and notebooks read them back. Every row carries ``model``,
``checkpoint`` (training step, NULL for a model outside a series), ``hook``, ``dataset``, ``workbench_version``
and ``created_at``; an analysis adds its own columns. New columns are added to an existing table on write
(older rows read NULL there). Lists and dicts are stored as JSON text.

Connections are short-lived (opened per call) so that a batch job, a notebook and the dashboard take turns on
the file; a call that finds the file locked by another process retries for a few seconds. A write is one
transaction (fault-injection point ``results.write.before_commit``: a kill there leaves the old rows). Every
failure is a :class:`ResultsError`: locked, newer schema, or corrupt (a file that is not a DuckDB database).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from workbench import __version__
from workbench.faults import crash_point

SCHEMA_VERSION = 1
COMMON_COLUMNS = ("model", "checkpoint", "hook", "dataset", "workbench_version", "created_at")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


LOCK_WAIT_SECONDS = 10.0  # how long a call waits for another process's write lock


_CORRUPT = re.compile(r"not a valid DuckDB database|corrupt|checksum|serializ", re.IGNORECASE)


class ResultsError(RuntimeError):
    """The results database cannot be used; the message names the file and the fix."""


class ResultsLockedError(ResultsError):
    """Another process held the results database's lock for longer than the retry window."""


class SchemaVersionError(ResultsError):
    """The database was written by a newer workbench than this one."""


class ResultsCorruptError(ResultsError):
    """The results file is not a readable DuckDB database (damaged, truncated or another kind of file)."""


def _check_identifier(name: str, what: str = "table") -> str:
    if not _IDENTIFIER.match(name):
        raise ValueError(
            f"{what} name {name!r} is not valid; use letters, digits and '_' (not starting with a digit)"
        )
    return name


def _sql_type(series: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(series):
        return "BOOLEAN"
    if pd.api.types.is_integer_dtype(series):
        return "BIGINT"
    if pd.api.types.is_float_dtype(series):
        return "DOUBLE"
    if pd.api.types.is_datetime64_any_dtype(series):
        return "TIMESTAMP"
    return "VARCHAR"


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


class ResultsDB:
    """Results database at ``path`` (a ``.duckdb`` file) or inside a Workspace."""

    def __init__(self, path: str | Path | Any) -> None:
        results_path = getattr(path, "results_path", None)
        self.path = Path(results_path if results_path is not None else path)

    # ---------------------------------------------------------------- connections
    def _connect(self, read_only: bool = False):
        if read_only and not self.path.exists():
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=read_only)
                break
            except duckdb.Error as err:
                if not isinstance(err, duckdb.IOException) or "lock" not in str(err).lower():
                    raise self._failure(err) from err
                if time.monotonic() > deadline:
                    raise ResultsLockedError(
                        f"the results database {self.path} stayed locked by another process for "
                        f"{LOCK_WAIT_SECONDS:g} s ({err}). "
                        "Wait for the analysis that is writing it to finish, or close the program holding it open "
                        "(e.g. a notebook with a live duckdb connection), then try again."
                    ) from err
                time.sleep(0.05)
        try:
            if not read_only:
                con.execute("CREATE TABLE IF NOT EXISTS _schema (version INTEGER)")
                row = con.execute("SELECT count(*) FROM _schema").fetchone()
                if row is None or row[0] == 0:
                    con.execute("INSERT INTO _schema VALUES (?)", [SCHEMA_VERSION])
            self._check_version(con)
        except duckdb.Error as err:
            con.close()
            raise self._failure(err) from err
        return con

    def _failure(self, err: Exception) -> ResultsError:
        """The ResultsError for a duckdb error: ResultsCorruptError when the file is damaged."""
        if _CORRUPT.search(str(err)):
            return ResultsCorruptError(
                f"the results database {self.path} is corrupt or not a DuckDB file ({str(err).strip()}). "
                f"Move it aside (mv {self.path} {self.path}.corrupt), then rerun the analyses that fill it "
                "(e.g. `workbench demo`); a fresh database is created on the next write."
            )
        return ResultsError(f"the results database {self.path} cannot be opened ({str(err).strip()})")

    def _check_version(self, con) -> None:
        has_schema = con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = '_schema'"
        ).fetchone()[0]
        if not has_schema:
            return
        row = con.execute("SELECT max(version) FROM _schema").fetchone()
        if row and row[0] is not None and row[0] > SCHEMA_VERSION:
            con.close()
            raise SchemaVersionError(
                f"{self.path} was written by a newer workbench (results schema {row[0]}; this is {__version__} with "
                f"schema {SCHEMA_VERSION}); upgrade the workbench (pip install -U interp-workbench) to read it"
            )

    # ---------------------------------------------------------------- public API
    def tables(self) -> list[str]:
        """Names of the analysis tables."""
        con = self._connect(read_only=True)
        if con is None:
            return []
        try:
            rows = con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_name NOT LIKE '\\_%' ESCAPE '\\' "
                "ORDER BY table_name"
            ).fetchall()
        finally:
            con.close()
        return [r[0] for r in rows]

    def columns(self, table: str) -> list[str]:
        """Column names of ``table`` in order ([] when it does not exist)."""
        con = self._connect(read_only=True)
        if con is None:
            return []
        try:
            rows = con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position",
                [_check_identifier(table)],
            ).fetchall()
        finally:
            con.close()
        return [r[0] for r in rows]

    def write(self, table: str, frame: pd.DataFrame, replace_keys: Sequence[str] | None = None) -> int:
        """Append ``frame`` to ``table``; rows whose ``replace_keys`` values match new rows are replaced first,
        so re-running an analysis updates rather than duplicates. Returns the number of rows written."""
        _check_identifier(table)
        if frame.empty:
            return 0
        frame = frame.copy()
        for column in frame.columns:
            _check_identifier(str(column), "column")
        for column in COMMON_COLUMNS:
            if column not in frame:
                frame[column] = None
        frame["workbench_version"] = frame["workbench_version"].fillna(__version__)
        frame["created_at"] = datetime.now(UTC).replace(tzinfo=None)
        frame["checkpoint"] = pd.array(frame["checkpoint"], dtype="Int64")
        for column in frame.columns:
            if (
                frame[column].dtype == object
                and frame[column].map(lambda v: isinstance(v, (list, dict, tuple, np.ndarray))).any()
            ):
                frame[column] = frame[column].map(
                    lambda v: json.dumps(_jsonable(v)) if v is not None else None
                )
        for column in ("model", "hook", "dataset", "workbench_version"):
            frame[column] = frame[column].astype("string")
        con = self._connect()
        try:
            con.execute("BEGIN TRANSACTION")
            existing = {
                r[0]
                for r in con.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table]
                ).fetchall()
            }
            if not existing:
                columns = ", ".join(f'"{c}" {_sql_type(frame[c])}' for c in frame.columns)
                con.execute(f'CREATE TABLE "{table}" ({columns})')
            else:
                for column in frame.columns:
                    if column not in existing:
                        con.execute(f'ALTER TABLE "{table}" ADD COLUMN "{column}" {_sql_type(frame[column])}')
            con.register("_incoming", frame)
            if replace_keys and existing:
                keys = [_check_identifier(k, "key") for k in replace_keys]
                condition = " AND ".join(
                    f'"{table}"."{k}" IS NOT DISTINCT FROM _incoming."{k}"' for k in keys
                )
                con.execute(f'DELETE FROM "{table}" WHERE EXISTS (SELECT 1 FROM _incoming WHERE {condition})')
            names = ", ".join(f'"{c}"' for c in frame.columns)
            con.execute(f'INSERT INTO "{table}" ({names}) SELECT {names} FROM _incoming')
            con.unregister("_incoming")
            crash_point("results.write.before_commit")
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        finally:
            con.close()
        return len(frame)

    def read(self, table: str, **filters: Any) -> pd.DataFrame:
        """Rows of ``table`` matching ``column=value`` filters (a list/tuple value matches any of its items)."""
        _check_identifier(table)
        if table not in self.tables():
            return pd.DataFrame()
        clauses, params = _where(filters)
        return self.query(f'SELECT * FROM "{table}"{clauses}', params)

    def delete(self, table: str, **filters: Any) -> int:
        """Delete the rows matching the filters; returns how many were deleted."""
        _check_identifier(table)
        if table not in self.tables():
            return 0
        clauses, params = _where(filters)
        con = self._connect()
        try:
            before = con.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
            con.execute(f'DELETE FROM "{table}"{clauses}', params)
            after = con.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
        finally:
            con.close()
        return before - after

    def query(self, sql: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
        """Run a read-only SQL query (parameters as ``?``) and return a DataFrame."""
        con = self._connect(read_only=True)
        if con is None:
            return pd.DataFrame()
        try:
            return con.execute(sql, list(params or [])).df()
        finally:
            con.close()


def _where(filters: dict[str, Any]) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    for column, value in filters.items():
        _check_identifier(column, "column")
        if value is None:
            clauses.append(f'"{column}" IS NULL')
        elif isinstance(value, (list, tuple, set)) and not isinstance(value, str):
            values: Iterable[Any] = list(value)
            clauses.append(f'"{column}" IN ({", ".join("?" for _ in values)})')
            params.extend(values)
        else:
            clauses.append(f'"{column}" = ?')
            params.append(value)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params
