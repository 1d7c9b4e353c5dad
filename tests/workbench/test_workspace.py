"""Workspace: location from argument or environment, layout, names kept inside it."""

from __future__ import annotations

import pytest

from workbench.results import ResultsDB
from workbench.workspace import Workspace


def test_location_from_argument_environment_or_default(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WORKBENCH_WORKSPACE", str(tmp_path / "env"))
    assert Workspace().root == (tmp_path / "env").resolve()
    assert Workspace(tmp_path / "arg").root == (tmp_path / "arg").resolve()
    assert Workspace(Workspace(tmp_path / "arg")).root == (tmp_path / "arg").resolve()
    monkeypatch.delenv("WORKBENCH_WORKSPACE")
    monkeypatch.chdir(tmp_path)
    assert Workspace().root == (tmp_path / "workspace").resolve()


def test_layout_and_results_database_live_inside(tmp_path) -> None:
    ws = Workspace(tmp_path / "ws")
    assert not ws.root.exists()
    ws.ensure()
    assert ws.models_dir.is_dir() and ws.stores_dir.is_dir() and ws.jobs_dir.is_dir()
    assert ws.model_dir("code-tiny") == ws.models_dir / "code-tiny"
    assert ws.store_dir("run1") == ws.stores_dir / "run1"
    assert ResultsDB(ws).path == ws.results_path == ws.root / "results.duckdb"
    assert ws.results().tables() == []
    assert sorted(p.name for p in ws.root.iterdir()) == ["jobs", "models", "stores"]
    assert {p.resolve() for p in tmp_path.iterdir()} == {ws.root}


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "", "  "])
def test_names_cannot_leave_the_workspace(tmp_path, name) -> None:
    with pytest.raises(ValueError, match="not a valid name"):
        Workspace(tmp_path).store_dir(name)
