"""Dashboard views under streamlit's AppTest: data present, empty states, and bad workspaces."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

VIEWS = Path(__file__).resolve().parents[1] / "app" / "views"
ALL_VIEWS = ("overview", "massive", "attention", "probes", "sae", "circuits", "codebooks", "neuron_paths")


def _run(view: str, workspace: Path, monkeypatch) -> AppTest:
    monkeypatch.setenv("WORKBENCH_WORKSPACE", str(workspace))
    app = AppTest.from_file(str(VIEWS / f"{view}.py"), default_timeout=60)
    return app.run()


@pytest.mark.parametrize("view", ALL_VIEWS)
def test_every_view_renders_without_exceptions(view, dashboard_workspace, monkeypatch) -> None:
    app = _run(view, dashboard_workspace.root, monkeypatch)
    assert not app.exception, app.exception
    assert app.title and app.title[0].value


def test_massive_view_shows_heatmap_curves_and_fits(dashboard_workspace, monkeypatch) -> None:
    app = _run("massive", dashboard_workspace.root, monkeypatch)
    charts = app.get("plotly_chart")
    assert len(charts) >= 2
    assert app.selectbox[0].value == "code-tiny"
    assert len(app.dataframe) >= 1


def test_attention_view_shows_layer_head_heatmap(dashboard_workspace, monkeypatch) -> None:
    app = _run("attention", dashboard_workspace.root, monkeypatch)
    assert len(app.get("plotly_chart")) == 2 and len(app.dataframe) == 1
    app.radio[0].set_value("sink").run()
    assert not app.exception


def test_probes_view_shows_heatmap_curves_and_rows(dashboard_workspace, monkeypatch) -> None:
    app = _run("probes", dashboard_workspace.root, monkeypatch)
    assert not app.exception, app.exception
    assert len(app.get("plotly_chart")) == 2
    assert app.selectbox[1].value == "bracket_depth"
    assert set(app.dataframe[0].value["checkpoint"]) == {0, 64, 300}
    app.radio[0].set_value("selectivity").run()
    assert not app.exception


def test_circuits_view_draws_the_path_search(dashboard_workspace, monkeypatch) -> None:
    app = _run("circuits", dashboard_workspace.root, monkeypatch)
    assert not app.exception, app.exception
    assert len(app.get("plotly_chart")) == 1 and len(app.dataframe) == 1
    nodes = app.dataframe[0].value
    assert nodes.iloc[0]["kind"] == "target" and len(nodes) > 1


def test_overview_lists_models_and_tables(dashboard_workspace, monkeypatch) -> None:
    app = _run("overview", dashboard_workspace.root, monkeypatch)
    models = app.dataframe[0].value
    assert "code-tiny" in set(models["model"])
    tables = set(app.dataframe[1].value["table"])
    assert {"massive_layers", "attention_stats"} <= tables


@pytest.mark.parametrize("view", ["probes", "sae", "circuits", "codebooks", "neuron_paths"])
def test_views_without_data_name_the_command_that_produces_it(view, tmp_path, monkeypatch) -> None:
    from workbench.workspace import Workspace

    Workspace(tmp_path).results().write("unrelated", pd.DataFrame({"x": [1]}))
    app = _run(view, tmp_path, monkeypatch)
    assert not app.exception
    assert app.info and "workbench" in app.info[0].value


def test_missing_workspace_and_newer_database_get_clear_messages(tmp_path, monkeypatch) -> None:
    import duckdb

    app = _run("overview", tmp_path / "nowhere", monkeypatch)
    assert not app.exception and "does not exist" in app.warning[0].value
    from workbench.results import SCHEMA_VERSION, ResultsDB

    ResultsDB(tmp_path / "results.duckdb").write("t", pd.DataFrame({"a": [1]}))
    con = duckdb.connect(str(tmp_path / "results.duckdb"))
    con.execute("UPDATE _schema SET version = ?", [SCHEMA_VERSION + 1])
    con.close()
    app = _run("massive", tmp_path, monkeypatch)
    assert not app.exception and "newer workbench" in app.warning[0].value
