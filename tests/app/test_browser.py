"""Real-browser smoke test: the dashboard served on 127.0.0.1, every page visited in Debian's chromium.

Screenshots land in test-artifacts/dashboard/. `.ci/run` installs chromium with apt-get when it is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
PAGES = {"": "Interpretability workbench", "massive": "Massive activations", "attention": "Attention statistics",
         "probes": "Probes", "sae": "SAE features", "graph": "Attribution graphs",
         "codebooks": "Codebooks", "neuron_paths": "Neuron paths", "prompt_lab": "Prompt lab"}  # fmt: skip
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it with apt-get)"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dashboard-log") / "server.log"


@pytest.fixture(scope="module")
def traced_graph(dashboard_workspace) -> tuple[str, str]:
    """A small graph traced on code-tiny with the workspace's two trained transcoders, stored before the dashboard
    starts (the graph page's first graph)."""
    from workbench.app.graph_explorer import trace_prompt

    return trace_prompt(dashboard_workspace, "code-tiny", ["code-tiny.L0-mlp-transcoder", "code-tiny.L1-mlp-transcoder"],
                        GRAPH_PROMPT, step=lambda _: None)  # fmt: skip


@pytest.fixture(scope="module")
def dashboard_url(dashboard_workspace, server_log, traced_graph):
    """`workbench dashboard` itself (the installed entry point, with the Streamlit settings it passes) on a free
    port; its output goes to ``server_log``."""
    port = _free_port()
    workbench = Path(sys.executable).with_name("workbench")
    command = [str(workbench), "dashboard", "--workspace", str(dashboard_workspace.root), "--port", str(port)]
    log = server_log.open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        os.killpg(server.pid, signal.SIGKILL)
        pytest.fail(f"streamlit did not start: {server_log.read_text()[-2000:]}")
    yield url
    os.killpg(server.pid, signal.SIGTERM)  # workbench dashboard stops its streamlit server with it
    server.wait(timeout=30)
    log.close()


FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def test_every_page_renders_from_127_0_0_1_only_with_a_minimal_toolbar(dashboard_url, server_log) -> None:
    """Every page renders in Chromium without an exception (a screenshot each); every request the pages make
    (fonts, icons, scripts, favicons included) goes to the local server; the toolbar offers no "Deploy"; the server
    logs no `use_container_width` deprecation. One visit per page checks all of it."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    requests: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("request", lambda request: requests.append(request.url))
        for path, title in PAGES.items():
            page.goto(f"{dashboard_url}/{path}", wait_until="networkidle")
            page.get_by_role("heading", name=title).first.wait_for(timeout=60_000)
            page.wait_for_timeout(1500)
            assert page.locator('[data-testid="stException"]').count() == 0, f"exception on /{path}"
            assert page.locator('[data-testid="stToolbar"]').get_by_text("Deploy").count() == 0, (
                f"Deploy on /{path}"
            )
            page.screenshot(path=str(ARTIFACTS / f"{path or 'overview'}.png"), full_page=True)
        browser.close()
    assert {p.name for p in ARTIFACTS.glob("*.png")} >= {f"{path or 'overview'}.png" for path in PAGES}
    fetched = [url for url in requests if not url.startswith(("data:", "blob:"))]
    assert len(fetched) > len(PAGES)
    remote = [url for url in fetched if urlsplit(url).hostname not in LOCAL_HOSTS]
    assert not remote, remote
    log = server_log.read_text()
    assert "use_container_width" not in log, log[-3000:]


PROMPT = "def f(x):\n    return x"
GRAPH_PROMPT = "def f(x):\n    return x +"
SAE_ID = "code-tiny.L0-resid-topk"


def _until(check, timeout: float = 60.0, what: str = "") -> None:
    """Poll ``check()`` until it is truthy (streamlit reruns asynchronously after each input)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {what}")


def _script_state(page) -> str | None:
    """The frontend's script-run state (``notRunning``, ``rerunRequested``, ``running``, ...). It changes the moment
    an input sends its rerun request, unlike the running-man widget, which appears only after a delay."""
    return page.locator('[data-testid="stApp"]').first.get_attribute("data-test-script-state")


def _idle(page) -> None:
    """Wait until the script run triggered by the last input has finished: the app reports ``notRunning`` on two
    polls in a row (a loaded machine can start the rerun late) and the running-man widget is gone."""
    page.wait_for_timeout(300)
    settled = 0
    deadline = time.monotonic() + 120
    while settled < 2:
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for the script run to finish (state {_script_state(page)!r})")
        idle = (
            _script_state(page) == "notRunning"
            and page.locator('[data-testid="stStatusWidget"]').count() == 0
        )
        settled = settled + 1 if idle else 0
        page.wait_for_timeout(250)


def _choose(page, label: str, option: str) -> None:
    _idle(page)
    page.get_by_label(label, exact=True).last.click()
    page.get_by_role("option", name=option).first.click()


def _codes(page) -> list[str]:
    """The text of every code block, read in one step: a rerun can remove a block between listing the blocks and
    reading one, and reading a vanished element waits 30 s and fails."""
    return [text.rstrip() for text in page.locator('[data-testid="stCode"] code').all_inner_texts()]


def _chips_show(texts: list[str], n_tokens: int, latent: str) -> bool:
    """Whether the prompt's row holds one chip per token and the first chip names ``latent`` (texts read in one
    step, so a rerun cannot remove a chip between counting and reading)."""
    return len(texts) == n_tokens and latent in texts[0]


def test_prompt_lab_steers_in_a_real_browser(dashboard_url, dashboard_workspace) -> None:
    """Pick a zoo model, type a prompt, see the token chips with SAE latents, add a steering intervention: the
    continuation and next-token KL shown change and equal what the same intervention gives through the API."""
    from playwright.sync_api import sync_playwright

    from workbench.analyses.prompt_lab import analysis as lab
    from workbench.circuits.sae.readout import latent_steering, load_sae_for, top_latents

    model = lab.load_lab_model("code-tiny", workspace=dashboard_workspace)
    tokens = lab.encode_prompt(model, PROMPT)
    sae, _ = load_sae_for(model, SAE_ID, dashboard_workspace)
    first_latent = int(top_latents(model, tokens, sae, k=1).iloc[0]["latent"])
    steer = latent_steering(sae, SAE_ID, 7, 30.0)
    api = lab.continuations(model, tokens, [steer])
    kl = lab.compare_next_token(model, tokens, [steer]).kl
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{dashboard_url}/prompt_lab", wait_until="networkidle")
        page.get_by_role("heading", name="Prompt lab").first.wait_for(timeout=60_000)
        _choose(page, "model", "code-tiny")
        _idle(page)
        box = page.get_by_label("prompt", exact=True).last
        box.fill(PROMPT)
        box.press("Control+Enter")
        _until(
            lambda: _codes(page)[:1] == [PROMPT + api["clean"]], what="the clean continuation of the prompt"
        )
        page.get_by_text("SAE latents", exact=True).last.click()
        _choose(page, "SAE", f"{SAE_ID} (blocks.0.hook_resid_post)")
        chips = page.locator(".token-row .token-chip")  # the prompt's row, not a latent's contexts
        _until(lambda: _chips_show(chips.all_inner_texts(), tokens.shape[1], f"L{first_latent}:"),
               what="token chips with the SAE's top latents")  # fmt: skip
        page.screenshot(path=str(ARTIFACTS / "prompt_lab_latents.png"), full_page=True)
        _idle(page)
        assert page.get_by_label("steering SAE", exact=True).last.input_value() == SAE_ID  # the SAE shown
        for label, value in (("latent", "7"), ("scale", "30")):
            _idle(page)
            field = page.get_by_label(label, exact=True).last
            field.fill(value)
            field.press("Enter")
            _idle(page)
            assert float(field.input_value()) == float(value), (
                f"the {label} field holds {field.input_value()!r}"
            )
        page.get_by_role("button", name="add intervention").last.click()
        _until(lambda: page.get_by_text("latent 7)").count() > 0, what="the intervention in the stack")
        _until(lambda: _codes(page) == [PROMPT + api["clean"], PROMPT + api["intervened"]],
               what="the intervened continuation")  # fmt: skip
        assert api["intervened"] != api["clean"]
        assert page.get_by_text(f"KL(clean‖intervened) = {kl:.4f} nats").count() == 1
        assert page.locator('[data-testid="stException"]').count() == 0
        page.screenshot(path=str(ARTIFACTS / "prompt_lab_steered.png"), full_page=True)
        browser.close()


PLOT = '[data-testid="stPlotlyChart"] .js-plotly-plot'


def _markers(page) -> list[dict]:
    """The node markers of the graph figure (first plotly chart) with their pixel position on the page."""
    return page.evaluate(
        """(selector) => {
            const gd = document.querySelector(selector), layout = gd._fullLayout, box = gd.getBoundingClientRect();
            const found = [];
            gd._fullData.forEach((trace) => {
                if (trace.mode !== "markers" || trace.name === "pinned") return;
                Array.from(trace.x).forEach((x, i) => found.push({kind: trace.name, node: Number(trace.customdata[i]),
                    px: box.left + layout._size.l + layout.xaxis.l2p(x),
                    py: box.top + layout._size.t + layout.yaxis.l2p(trace.y[i])}));
            });
            return found;
        }""",
        PLOT,
    )


def _pruned_counts(page) -> tuple[int, int] | None:
    """The pruned node and edge counts the graph page shows, or None while no count is on the page (read in one
    step: a rerun can remove the line between finding and reading it)."""
    texts = page.get_by_text("pruned:").all_inner_texts()
    if not texts:
        return None
    words = texts[0].replace("*", "").split()
    return int(words[1]), int(words[3])


def test_graph_page_click_pin_and_threshold_in_a_real_browser(
    dashboard_url, dashboard_workspace, traced_graph
) -> None:
    """Open the graph page on the traced graph: the nodes drawn are the pruned subgraph's; a click on a node opens
    its panel; two pinned nodes show their subgraph (the paths between them, as ``paths_between`` says); moving the
    node threshold to its minimum changes the count to what ``prune_sparse`` keeps there."""
    from playwright.sync_api import sync_playwright

    from workbench.app.graph_explorer import (
        Annotations,
        load_stored_graph,
        paths_between,
        prune_sparse,
        subgraph,
        write_annotations,
    )

    model, name = traced_graph
    stored = load_stored_graph(dashboard_workspace, model, name)
    write_annotations(dashboard_workspace, stored, Annotations())
    shown = subgraph(stored, 0.8, 0.98)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(f"{dashboard_url}/graph", wait_until="networkidle")
        page.get_by_role("heading", name="Attribution graphs").first.wait_for(timeout=60_000)
        _idle(page)
        _choose(page, "graph", f"[{name}]")  # the workspace may hold other graphs
        _until(lambda: _pruned_counts(page) == (shown.pruned_nodes, shown.pruned_edges), timeout=120,
               what="the traced graph's pruned counts")  # fmt: skip
        page.locator(PLOT).first.wait_for(timeout=120_000)
        _idle(page)
        markers = _markers(page)
        assert sorted(m["node"] for m in markers) == sorted(shown.nodes["node"].tolist())
        page.screenshot(path=str(ARTIFACTS / "graph.png"), full_page=True)

        def isolated(m: dict) -> bool:  # nothing else drawn within 12 px: the click lands on this node
            return all(o is m or abs(o["px"] - m["px"]) + abs(o["py"] - m["py"]) > 12 for o in markers)

        features = [m for m in markers if m["kind"] == "feature" and isolated(m)]
        assert len(features) >= 2, "two features to click on"
        labels = stored.nodes["label"]
        pinned = []
        for chosen in features[:2]:
            page.locator(PLOT).first.scroll_into_view_if_needed()  # pinning scrolls to the button: re-measure
            marker = next(m for m in _markers(page) if m["node"] == chosen["node"])
            page.mouse.click(marker["px"], marker["py"])
            _until(lambda m=marker: page.locator(".st-key-node_panel").get_by_text(str(labels[m["node"]])).count() > 0,
                   what=f"the panel of node {marker['node']}")  # fmt: skip
            _idle(page)
            page.locator(".st-key-pin_button button").click()
            _until(lambda: page.locator(".st-key-pin_button").get_by_text("unpin").count() > 0, what="unpin")
            pinned.append(marker["node"])
            _idle(page)
            if len(pinned) == 1:
                page.screenshot(path=str(ARTIFACTS / "graph_node_panel.png"), full_page=True)
        on_path = paths_between(shown.edges, pinned)
        _until(lambda: page.get_by_text(f"pinned subgraph: {len(on_path)} nodes").count() > 0,
               what="the pinned subgraph")  # fmt: skip
        page.screenshot(path=str(ARTIFACTS / "graph_pinned.png"), full_page=True)
        slider = page.get_by_role("slider").first
        slider.focus()
        slider.press("Home")
        fewer = prune_sparse(stored, 0.05, 0.98)
        _until(lambda: _pruned_counts(page) == (int(fewer.nodes.sum()), int(fewer.edges.sum())),
               what="the count at node threshold 0.05")  # fmt: skip
        assert int(fewer.nodes.sum()) != shown.pruned_nodes
        assert page.locator('[data-testid="stException"]').count() == 0
        page.screenshot(path=str(ARTIFACTS / "graph_threshold.png"), full_page=True)
        browser.close()
