"""Real-browser test of the prompt lab on an encoder (MiniLM), on the dashboard server fixture of
tests/test_browser.py: what the page shows equal to the library's values for the same intervention, screenshots in
test-artifacts/dashboard/, and every request on 127.0.0.1."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.test_browser import (  # noqa: F401  (dashboard_url and the fixtures it uses are found by name)
    ARTIFACTS,
    CHROMIUM,
    FLAGS,
    LOCAL_HOSTS,
    _choose,
    _idle,
    _until,
    dashboard_url,
    server_log,
    traced_graph,
)
from workbench import prompt_lab as lab
from workbench.interventions import Intervention

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it with apt-get)"),
]
SENTENCE = "the cat sat on the mat by the door"
SECOND = "a dog lay on the rug"


def _metrics(page) -> dict[str, str]:
    """The page's st.metric values by label."""
    return {
        m.locator('[data-testid="stMetricLabel"]').inner_text().strip(): m.locator(
            '[data-testid="stMetricValue"]'
        )
        .inner_text()
        .strip()
        for m in page.locator('[data-testid="stMetric"]').all()
    }


def _fill(page, label: str, value: str, key: str = "Enter") -> None:
    _idle(page)
    field = page.get_by_label(label, exact=True).last
    field.fill(value)
    field.press(key)
    _idle(page)


def _add_head_ablation(page, layer: int, heads: str) -> None:
    _choose(page, "kind", "zero-ablate heads")
    _choose(page, "ablation layer", str(layer))
    _fill(page, "heads", heads)
    page.get_by_role("button", name="add intervention").last.click()
    _until(
        lambda: page.get_by_text(f"zero-ablate blocks.{layer}.attn.hook_z heads [{heads}]").count() > 0,
        what="the intervention",
    )


@contextlib.contextmanager
def _prompt_lab(url: str, requests: list[str]) -> Iterator[Any]:
    """The prompt lab open in chromium; every URL it requests is appended to ``requests``."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("request", lambda request: requests.append(request.url))
        page.goto(f"{url}/prompt_lab", wait_until="networkidle")
        page.get_by_role("heading", name="Prompt lab").first.wait_for(timeout=60_000)
        yield page
        browser.close()


def _only_local(requests: list[str]) -> None:
    fetched = [url for url in requests if not url.startswith(("data:", "blob:"))]
    assert fetched and not [url for url in fetched if urlsplit(url).hostname not in LOCAL_HOSTS]


def test_encoder_lab_in_a_real_browser(dashboard_url) -> None:  # noqa: F811 (the imported fixture)
    """MiniLM: token chips, the pooled-embedding cosines to a second prompt, then a head ablation: the cosines shown
    equal the library's."""
    model = lab.load_lab_model("minilm")
    tokens = lab.encode_prompt(model, SENTENCE)
    clean = lab.compare_embeddings(model, tokens, [], SECOND)
    stack = [Intervention("zero", "blocks.2.attn.hook_z", heads=(0, 3, 7))]
    ablated = lab.compare_embeddings(model, tokens, stack, SECOND)
    requests: list[str] = []
    with _prompt_lab(dashboard_url, requests) as page:
        _choose(page, "model", "other reference…")
        _fill(page, "model reference", "minilm")
        _fill(page, "prompt", SENTENCE, "Control+Enter")
        _fill(page, "second prompt", SECOND)
        page.get_by_role("heading", name="Sentence embedding").first.wait_for(timeout=120_000)
        chips = page.locator(".token-chip")
        _until(lambda: chips.count() == tokens.shape[1], what="a chip per token")
        _until(lambda: _metrics(page).get("cosine clean · second") == f"{clean.cosine('clean · second'):.4f}",
               what="the cosine to the second prompt")  # fmt: skip
        page.screenshot(path=str(ARTIFACTS / "prompt_lab_encoder.png"), full_page=True)
        _add_head_ablation(page, 2, "0, 3, 7")
        want = {f"cosine {pair}": f"{ablated.cosine(pair):.4f}" for pair in ablated.table["pair"]}
        _until(
            lambda: {k: v for k, v in _metrics(page).items() if k in want} == want, what="the ablated cosines"
        )
        assert want["cosine clean · intervened"] != "1.0000"
        assert page.locator('[data-testid="stException"]').count() == 0
        page.screenshot(path=str(ARTIFACTS / "prompt_lab_encoder_ablated.png"), full_page=True)
    _only_local(requests)
