"""Results database: round trips, idempotent re-runs, schema growth, versioning, safe names, read-only queries."""

from __future__ import annotations

import duckdb
import pandas as pd
import pytest

from workbench.results import SCHEMA_VERSION, ResultsDB, SchemaVersionError


def test_write_read_filter_and_rerun_replaces(tmp_path) -> None:
    db = ResultsDB(tmp_path / "results.duckdb")
    rows = pd.DataFrame(
        {"model": ["m", "m", "m"], "checkpoint": [0, 8, 8], "hook": ["a", "a", "b"], "acc": [0.1, 0.5, 0.6]}
    )
    assert db.write("probe_results", rows, replace_keys=["model", "checkpoint", "hook"]) == 3
    assert db.tables() == ["probe_results"]
    got = db.read("probe_results", checkpoint=8)
    assert sorted(got["acc"]) == [0.5, 0.6]
    assert set(got.columns) >= {
        "model",
        "checkpoint",
        "hook",
        "dataset",
        "workbench_version",
        "created_at",
        "acc",
    }
    rerun = pd.DataFrame({"model": ["m"], "checkpoint": [8], "hook": ["a"], "acc": [0.7]})
    db.write("probe_results", rerun, replace_keys=["model", "checkpoint", "hook"])
    table = db.read("probe_results")
    assert len(table) == 3 and table.loc[(table.checkpoint == 8) & (table.hook == "a"), "acc"].item() == 0.7
    assert db.read("probe_results", hook=["a", "b"], checkpoint=[0]).shape[0] == 1
    assert db.delete("probe_results", checkpoint=0) == 1


def test_new_columns_and_nested_values(tmp_path) -> None:
    db = ResultsDB(tmp_path / "r.duckdb")
    db.write("massive", pd.DataFrame({"model": ["m"], "layer": [0], "ratio": [3.0]}))
    db.write("massive", pd.DataFrame({"model": ["m"], "layer": [1], "ratio": [4.0], "top_dims": [[3, 7]]}))
    table = db.read("massive").sort_values("layer")
    assert table["top_dims"].isna().tolist() == [True, False]
    assert table["top_dims"].iloc[1] == "[3, 7]"
    assert db.read("nothing_here").empty


def test_unsafe_names_are_refused(tmp_path) -> None:
    db = ResultsDB(tmp_path / "r.duckdb")
    with pytest.raises(ValueError, match="table name"):
        db.write("x; DROP TABLE y", pd.DataFrame({"a": [1]}))
    db.write("t", pd.DataFrame({"a": [1]}))
    with pytest.raises(ValueError, match="column name"):
        db.read("t", **{'a" OR 1=1 --': 1})


def test_database_from_a_newer_workbench_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "r.duckdb"
    ResultsDB(path).write("t", pd.DataFrame({"a": [1]}))
    con = duckdb.connect(str(path))
    con.execute("UPDATE _schema SET version = ?", [SCHEMA_VERSION + 1])
    con.close()
    with pytest.raises(SchemaVersionError, match="newer workbench"):
        ResultsDB(path).tables()


def test_query_is_read_only_and_parameterised(tmp_path) -> None:
    db = ResultsDB(tmp_path / "r.duckdb")
    db.write("t", pd.DataFrame({"model": ["a", "b"], "x": [1, 2]}))
    assert db.query("SELECT x FROM t WHERE model = ?", ["b"])["x"].tolist() == [2]
    with pytest.raises(duckdb.Error, match="read-only"):
        db.query("DELETE FROM t")
    assert len(db.read("t")) == 2


def test_a_writer_waits_for_another_process_holding_the_lock(tmp_path) -> None:
    import subprocess
    import sys
    import time

    path = tmp_path / "r.duckdb"
    ResultsDB(path).write("t", pd.DataFrame({"x": [1]}))
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(path)!r}); print('held', flush=True); "
         "time.sleep(1.5); c.close()"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    began = time.monotonic()
    ResultsDB(path).write("t", pd.DataFrame({"x": [2]}))
    holder.wait(timeout=30)
    assert time.monotonic() - began > 0.5
    assert sorted(ResultsDB(path).read("t")["x"]) == [1, 2]


@pytest.mark.parametrize("damage", ["random", "truncated", "empty"])
def test_a_corrupt_database_gives_a_clear_error_naming_the_file_and_the_fix(tmp_path, damage) -> None:
    import os

    from workbench.results import ResultsCorruptError, ResultsError

    path = tmp_path / "results.duckdb"
    db = ResultsDB(path)
    db.write("t", pd.DataFrame({"model": ["m"] * 5000, "x": range(5000)}))
    data = path.read_bytes()
    path.write_bytes(
        {"random": os.urandom(len(data)), "truncated": data[: len(data) // 3], "empty": b""}[damage]
    )
    for call in (db.tables, lambda: db.read("t"), lambda: db.write("t", pd.DataFrame({"x": [1]})),
                 lambda: db.query("SELECT 1")):  # fmt: skip
        with pytest.raises(ResultsCorruptError, match=rf"{path}.* corrupt .*Move it aside") as caught:
            call()
        assert isinstance(caught.value, ResultsError) and not isinstance(caught.value, duckdb.Error)
    path.rename(tmp_path / "results.duckdb.corrupt")
    assert db.write("t", pd.DataFrame({"x": [1]})) == 1 and len(db.read("t")) == 1
