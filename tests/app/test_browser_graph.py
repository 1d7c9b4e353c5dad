"""Real-browser test of the graph page's intervention, on the dashboard server fixture of tests/app/test_browser.py and
its traced graph: a feature pinned and ablated in the page, and the model's new top logits the page shows equal to
the prompt lab's ``compare_next_token`` on the same intervention built here from the stored graph. Screenshots in
test-artifacts/dashboard/; every request on 127.0.0.1."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import pytest
import torch

from tests.app.test_browser import (  # noqa: F401  (dashboard_url and the fixtures it uses are found by name)
    ARTIFACTS,
    CHROMIUM,
    FLAGS,
    LOCAL_HOSTS,
    _choose,
    _idle,
    _pruned_counts,
    _until,
    dashboard_url,
    server_log,
    traced_graph,
)
from tests.app.test_browser_prompt_lab import _open_list

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it with apt-get)"),
]
COLUMNS = ("token", "p_clean", "p_intervened", "logit_clean", "logit_intervened", "delta_logit")


def _grid(page, column: str) -> list[dict[str, str]]:
    """The rows the ``st.dataframe`` with a column titled ``column`` has in the DOM (its grid's accessibility table:
    the rows in view), as column title -> the text shown."""
    return page.evaluate(
        """(column) => {
            for (const table of document.querySelectorAll('[data-testid="stDataFrame"] table[role="grid"]')) {
                const titles = Array.from(table.querySelectorAll('th[role="columnheader"]'), (th) => th.textContent);
                if (!titles.includes(column)) continue;
                return Array.from(table.querySelectorAll('tbody tr[role="row"]'), (tr) => Object.fromEntries(
                    Array.from(tr.querySelectorAll('td[role="gridcell"]'), (td, i) => [titles[i], td.textContent])));
            }
            return [];
        }""",
        column,
    )


def _logits_equal(page, table) -> bool:
    """The logits table shown has ``table``'s rows (those in view, at least the clean top 10) to float32 rounding:
    the grid's accessibility table holds each number at full precision."""
    rows = _grid(page, "logit_intervened")
    if len(rows) < min(10, len(table)) or set(rows[0]) != set(COLUMNS):
        return False
    return all(
        row["token"] == str(want["token"])
        and [float(row[c]) for c in COLUMNS[1:]] == pytest.approx([want[c] for c in COLUMNS[1:]], abs=1e-5)
        for row, want in zip(rows, table.to_dict("records"), strict=False)
    )


def test_graph_page_ablates_a_pinned_feature_as_the_library(
    dashboard_url,  # noqa: F811 (the imported fixture)
    dashboard_workspace,
    traced_graph,  # noqa: F811
) -> None:
    """Open the traced graph, open its most influential drawn feature (typed into the node picker), pin it, run the
    form's default intervention (ablate the first pinned feature): the KL and the next-token logits table shown
    equal ``compare_next_token`` with the feature's decoder row taken out at its position (−activation × W_dec[f]
    at the transcoder's output hook)."""
    from playwright.sync_api import sync_playwright

    from workbench.analyses.prompt_lab.analysis import compare_next_token
    from workbench.app.graph_explorer import (
        Annotations,
        load_stored_graph,
        open_graph_parts,
        subgraph,
        write_annotations,
    )
    from workbench.interventions import Intervention

    model, name = traced_graph
    stored = load_stored_graph(dashboard_workspace, model, name)
    write_annotations(dashboard_workspace, stored, Annotations())
    shown = subgraph(stored, 0.8, 0.98)
    feats = shown.nodes[shown.nodes["kind"] == "feature"].sort_values("influence", ascending=False)
    node = int(feats.iloc[0]["node"])
    row = stored.nodes.iloc[node]
    opened = open_graph_parts(dashboard_workspace, stored)
    sae = opened.transcoders[int(row["layer"])][1]
    stack = [Intervention.steer(sae.hook_out, sae.W_dec[int(row["feature"])], scale=-float(row["activation"]),
                                positions=[int(row["position"])])]  # fmt: skip
    tokens = torch.tensor(json.loads(stored.summary["tokens"]))[None]
    targets = stored.nodes[stored.nodes["kind"] == "target"]
    assert set(targets["position"]) == {tokens.shape[1] - 1}  # the page reads the prompt's last logits
    api = compare_next_token(opened.model, tokens, stack, top_k=10)
    assert (api.table["logit_intervened"] != api.table["logit_clean"]).any()
    label = str(row["label"])
    option = f"{label} (influence {float(row['influence']):.3g})"
    requests: list[str] = []
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.on("request", lambda request: requests.append(request.url))
        page.goto(f"{dashboard_url}/graph", wait_until="networkidle")
        page.get_by_role("heading", name="Attribution graphs").first.wait_for(timeout=60_000)
        _idle(page)
        _choose(page, "graph", f"[{name}]")  # the workspace may hold other graphs
        _until(lambda: _pruned_counts(page) == (shown.pruned_nodes, shown.pruned_edges), timeout=120,
               what="the traced graph's pruned counts")  # fmt: skip
        _idle(page)
        _open_list(page, "node")
        page.keyboard.type(label)  # the picker filters its options: the node need not be in the list's view
        page.get_by_role("option", name=option).first.click()
        _until(
            lambda: page.locator(".st-key-node_panel").get_by_text(label).count() > 0, what="the node's panel"
        )
        _idle(page)
        page.locator(".st-key-pin_button button").click()
        _until(lambda: page.locator(".st-key-pin_button").get_by_text("unpin").count() > 0, what="unpin")
        _idle(page)
        # the form's defaults: the first pinned feature, ablate
        form = page.locator('[data-testid="stForm"]').filter(has_text="run intervention")
        _until(lambda: form.get_by_text(f"node {node}").count() > 0, what="the pinned feature in the form")
        form.get_by_role("button", name="run intervention").click()
        _until(lambda: page.get_by_text(f"KL(clean‖intervened) = {api.kl:.4f} nats").count() > 0,
               what="the intervention's KL")  # fmt: skip
        _until(lambda: _logits_equal(page, api.table), what="the logits table equal to compare_next_token's")
        assert page.get_by_text(stack[0].describe().split(" (")[0]).count() > 0  # the stack run, described
        assert page.locator('[data-testid="stException"]').count() == 0
        # the page scrolls inside streamlit's main container: the screenshot shows the view, the table at the top
        page.get_by_text("the model's next-token logits, clean and intervened").evaluate(
            "e => e.scrollIntoView()"
        )
        page.screenshot(path=str(ARTIFACTS / "graph_intervention.png"), full_page=True)
        browser.close()
    fetched = [url for url in requests if not url.startswith(("data:", "blob:"))]
    assert fetched and not [url for url in fetched if urlsplit(url).hostname not in LOCAL_HOSTS]
