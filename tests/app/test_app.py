"""Dashboard views under streamlit's AppTest: data present, empty states, and bad workspaces."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

VIEWS = Path(__file__).resolve().parents[2] / "app" / "views"
ALL_VIEWS = ("overview", "massive", "attention", "dynamics", "probes", "sae", "graph", "codebooks",
             "neuron_paths", "prompt_lab")  # fmt: skip


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


def test_codebook_and_neuron_path_views_show_their_results(dashboard_workspace, monkeypatch) -> None:
    codebooks = _run("codebooks", dashboard_workspace.root, monkeypatch)
    assert not codebooks.exception, codebooks.exception
    assert codebooks.get("plotly_chart") and codebooks.selectbox[0].options
    paths = _run("neuron_paths", dashboard_workspace.root, monkeypatch)
    assert not paths.exception, paths.exception
    assert len(paths.get("plotly_chart")) >= 2


def _frame_with(app: AppTest, column: str) -> pd.DataFrame:
    return next(frame.value for frame in app.dataframe if column in frame.value)


def test_overview_lists_models_runs_and_tables(dashboard_workspace, monkeypatch) -> None:
    from workbench.workspace import Workspace

    app = _run("overview", dashboard_workspace.root, monkeypatch)
    assert "code-tiny" in set(_frame_with(app, "checkpoints")["model"])
    runs = _frame_with(app, "kind")
    assert "SAE / transcoder" in set(runs["kind"])
    counts = _frame_with(app, "table").set_index("table")
    assert {"massive_layers", "attention_stats"} <= set(counts.index)
    db = Workspace(dashboard_workspace.root).results()
    assert counts.loc["attention_stats", "rows"] == len(db.read("attention_stats"))
    assert counts.loc["massive_layers", "models"] == db.read("massive_layers")["model"].nunique()


def _massive_on_users_gpt2_dirs(zoo_workspace, dirs: list[Path], workspace: Path) -> None:
    """A random GPT-2 saved in each of ``dirs`` (the zoo's tokenizer beside it), each run through `workbench massive`
    into ``workspace``."""
    import shutil

    import torch
    import transformers
    from typer.testing import CliRunner

    from workbench.cli import app as cli

    for seed, path in enumerate(dirs):
        torch.manual_seed(seed)
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=512, n_positions=64)
        transformers.GPT2LMHeadModel(config).save_pretrained(path)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(zoo_workspace.model_dir("code-tiny") / name, path / name)
        result = CliRunner().invoke(
            cli, ["massive", "run", str(path), "--workspace", str(workspace), "--no-progress"]
        )
        assert result.exit_code == 0, result.output


def test_overview_and_prompt_lab_list_the_users_own_models_with_results(zoo_workspace, tmp_path, monkeypatch):
    """Two of the user's own GPT-2 directories named alike (exp-a/my-gpt2, exp-b/my-gpt2), analysed with `workbench
    massive` into a workspace without zoo models: the overview lists both, told apart, and the prompt lab offers
    both."""
    workspace = tmp_path / "ws"
    dirs = [tmp_path / run / "my-gpt2" for run in ("exp-a", "exp-b")]
    _massive_on_users_gpt2_dirs(zoo_workspace, dirs, workspace)
    app = _run("overview", workspace, monkeypatch)
    models = _frame_with(app, "identity").set_index("identity")
    assert set(models.index) == {str(p) for p in dirs}
    assert sorted(models["model"]) == ["exp-a/my-gpt2", "exp-b/my-gpt2"]
    assert set(models["tables"]) == {"massive_layers, massive_top"}
    assert not any("No models" in info.value for info in app.info)
    lab = _run("prompt_lab", workspace, monkeypatch)
    choice = lab.selectbox(key="lab_model")
    assert {"exp-a/my-gpt2 (has results)", "exp-b/my-gpt2 (has results)"} <= set(choice.options)
    assert choice.value == str(dirs[0]) and not lab.exception  # the first is loaded by its identity


def test_model_selects_tell_same_named_folders_apart(zoo_workspace, tmp_path, monkeypatch) -> None:
    """Two of the user's GPT-2 directories whose last two path parts agree (x/run/my-gpt2, y/run/my-gpt2), both
    analysed with `workbench massive` into one workspace: the massive view's model select shows both, told apart
    by their identities, and choosing the second shows that model's rows only."""
    from workbench.identity import display_name
    from workbench.workspace import Workspace

    workspace = tmp_path / "ws"
    dirs = [tmp_path / parent / "run" / "my-gpt2" for parent in ("x", "y")]
    _massive_on_users_gpt2_dirs(zoo_workspace, dirs, workspace)
    assert display_name(str(dirs[0])) == display_name(str(dirs[1])) == "run/my-gpt2"
    app = _run("massive", workspace, monkeypatch)
    assert not app.exception, app.exception
    choice = app.selectbox[0]
    assert choice.label == "model" and choice.options == [f"run/my-gpt2 ({d})" for d in dirs]
    assert choice.value == str(dirs[0])
    choice.set_value(str(dirs[1])).run()
    assert not app.exception, app.exception
    shown = _frame_with(app, "magnitude")
    top = Workspace(workspace).results().read("massive_top", model=str(dirs[1]))
    top = top[top["checkpoint"] == top["checkpoint"].max()] if top["checkpoint"].notna().any() else top
    assert sorted(shown["magnitude"]) == sorted(top["magnitude"])
    other = Workspace(workspace).results().read("massive_top", model=str(dirs[0]))
    assert sorted(shown["magnitude"]) != sorted(other["magnitude"])


@pytest.mark.parametrize(
    "view",
    ["massive", "attention", "dynamics", "probes", "sae", "graph", "codebooks", "neuron_paths"],
)
def test_views_without_data_name_a_command_that_exists(view, tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from workbench.cli import app as cli
    from workbench.workspace import Workspace

    Workspace(tmp_path).results().write("unrelated", pd.DataFrame({"x": [1]}))
    app = _run(view, tmp_path, monkeypatch)
    assert not app.exception
    message = app.info[0].value
    commands = [line.split("#")[0].split() for line in message.splitlines() if line.startswith("workbench ")]
    assert commands, message
    for words in commands:
        subcommand = [w for w in words[1:] if not w.startswith("-")][:2]
        result = CliRunner().invoke(cli, [*subcommand[:1], "--help"])
        assert result.exit_code == 0, (message, result.output)
        groups = ("probe", "sae", "codebook", "neuron-path", "dynamics", "massive", "attention", "circuits")
        if subcommand[0] in groups and len(subcommand) > 1:
            assert CliRunner().invoke(cli, [*subcommand, "--help"]).exit_code == 0, message


def test_a_locked_database_gets_a_message_not_a_traceback(tmp_path, monkeypatch) -> None:
    import subprocess
    import sys
    import time

    from workbench import results
    from workbench.workspace import Workspace

    Workspace(tmp_path).results().write("t", pd.DataFrame({"a": [1]}))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', flush=True); "
         "time.sleep(30)", str(tmp_path / "results.duckdb")], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(results, "LOCK_WAIT_SECONDS", 0.5)
        start = time.monotonic()
        app = _run("overview", tmp_path, monkeypatch)
        assert not app.exception, app.exception
        assert "locked by another process" in app.warning[0].value
        assert time.monotonic() - start < 20
    finally:
        holder.kill()
        holder.wait()


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


PAYLOADS = ("<script>alert(1)</script>", "[x](javascript:alert(1))", "![](http://evil/x.png)", ":red[red]")


def test_feature_contexts_render_user_tokens_inert(tmp_path, monkeypatch) -> None:
    """Tokens are user data: no script tag, javascript: link or remote image reaches the rendered markdown, and
    each still reads literally once its character references are decoded."""
    import html
    import json

    from workbench.workspace import Workspace

    context = {"tokens": ["def", *PAYLOADS, "x"], "acts": [0.1, 2.0, 1.0, 0.5, 0.2, 0.0], "focus": 1,
               "activation": 2.0}  # fmt: skip
    Workspace(tmp_path).results().write("sae_features", pd.DataFrame([{
        "sae_id": "evil", "model": "m", "hook": "blocks.0.hook_resid_post", "latent": 0, "density": 0.1,
        "max_activation": 2.0, "top_contexts": json.dumps([context]), "histogram": json.dumps({}),
        "quantile_samples": json.dumps([{"low": 0.0, "high": None, "count": 1, "contexts": [context]}]),
    }]))  # fmt: skip
    app = _run("sae", tmp_path, monkeypatch)
    assert not app.exception, app.exception
    rendered = [m.value for m in app.markdown if "span" in m.value]
    assert len(rendered) == 2, [m.value for m in app.markdown]  # the top context and the quantile sample
    for value in rendered:
        for active in ("<script", "javascript:", "](", "http://", ":red[", "![", "<img"):
            assert active not in value, (active, value)
        assert value.count("<span") == len(context["tokens"])
        text = html.unescape(value)
        assert all(payload in text for payload in PAYLOADS)


def test_plain_leaves_no_markup_character() -> None:
    import html
    import re

    from workbench.app.data import plain

    for payload in (*PAYLOADS, "a *b* _c_ `d` $e$ \\f & g"):
        escaped = plain(payload)
        assert re.fullmatch(r"(?:[A-Za-z0-9 ]|&#\d+;)*", escaped), escaped
        assert html.unescape(escaped) == payload


def test_a_corrupt_database_gets_a_message_not_a_traceback(tmp_path, monkeypatch) -> None:
    import os

    (tmp_path / "results.duckdb").write_bytes(os.urandom(8192))
    for view in ("overview", "sae"):
        app = _run(view, tmp_path, monkeypatch)
        assert not app.exception, app.exception
        assert "is corrupt" in app.warning[0].value and "Move it aside" in app.warning[0].value


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_stopping_workbench_dashboard_stops_its_streamlit_server(stop, tmp_path) -> None:
    """`kill` (or Ctrl-C) of the `workbench dashboard` process takes its Streamlit server down with it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    parent = subprocess.Popen([sys.executable, "-m", "workbench.cli", "dashboard", "-w", str(tmp_path), "--port",
                               str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    children: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while True:
            assert parent.poll() is None and time.monotonic() < deadline, "the dashboard never served"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as response:
                    if response.read() == b"ok":
                        break
            except OSError:
                time.sleep(0.5)
        children = [
            int(p) for p in Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()
        ]
        assert children, "the dashboard serves from a child process"
        parent.send_signal(stop)
        output, _ = parent.communicate(timeout=30)
        assert parent.returncode == 0, output
        assert f"dashboard stopped ({stop.name}); the server on http://127.0.0.1:{port} is down" in output
        with pytest.raises(ProcessLookupError):
            os.kill(children[0], 0)
        with socket.socket() as client, pytest.raises(ConnectionRefusedError):
            client.connect(("127.0.0.1", port))
    finally:
        for pid in children:  # only after a failure is anything left: nothing this test started outlives it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)  # the server leads its own process group
        if parent.poll() is None:
            parent.kill()
        parent.wait()
