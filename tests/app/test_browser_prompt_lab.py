"""Real-browser tests of the prompt lab on an encoder (MiniLM) and an image classifier (the zoo's vit-digits), on the
dashboard server fixture of tests/app/test_browser.py: what the page shows equal to the library's values for the same
intervention, screenshots in test-artifacts/dashboard/, and every request on 127.0.0.1."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.app.test_browser import (  # noqa: F401  (dashboard_url and the fixtures it uses are found by name)
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
from workbench.analyses.prompt_lab import analysis as lab
from workbench.interventions import Intervention

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it with apt-get)"),
]
SENTENCE = "the cat sat on the mat by the door"
SECOND = "a dog lay on the rug"
IMAGES = "zoo:digits"  # the page's default image dataset


def _metrics(page) -> dict[str, str]:
    """The page's st.metric values by label, read in one step (a rerun can remove a metric between listing the
    metrics and reading one)."""
    pairs = page.locator('[data-testid="stMetric"]').evaluate_all(
        """metrics => metrics.map(m => [
            (m.querySelector('[data-testid="stMetricLabel"]') || {}).innerText || '',
            (m.querySelector('[data-testid="stMetricValue"]') || {}).innerText || ''])"""
    )
    return {label.strip(): value.strip() for label, value in pairs}


def _fill(page, label: str, value: str, key: str = "Enter") -> None:
    _idle(page)
    field = page.get_by_label(label, exact=True).last
    field.fill(value)
    field.press(key)
    _idle(page)


def _open_list(page, label: str) -> Any:
    """Open the selectbox ``label``'s list of options → its input. The widget is scrolled into view first and the
    click repeated until the list is open: the list is a popover that closes when the page scrolls, and a click on a
    widget below the fold (Playwright scrolls to it first) can open it just before the scroll's event arrives, which
    closes it again (on the ViT's page, long with plotly figures, the first click on "kind" never opened it)."""
    _idle(page)
    box = page.get_by_label(label, exact=True).last
    box.scroll_into_view_if_needed()
    page.wait_for_timeout(200)

    def opened() -> bool:
        if box.get_attribute("aria-expanded") != "true":
            box.click()
            page.wait_for_timeout(250)
        return box.get_attribute("aria-expanded") == "true"

    _until(opened, timeout=30, what=f"the options of {label!r}")
    return box


def _pick(page, label: str, option: str) -> None:
    """Choose ``option`` in the selectbox ``label``, wherever it is on the page."""
    _open_list(page, label)
    page.get_by_role("option", name=option, exact=True).first.click()


def _add_head_ablation(page, layer: int, heads: str) -> None:
    _pick(page, "kind", "zero-ablate heads")
    _pick(page, "ablation layer", str(layer))
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
        chips = page.locator(".token-row .token-chip")  # the prompt's row, not a latent's contexts
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


def _figures(page) -> list[dict]:
    """Every plotly figure on the page: its element's key class (``st-key-…``, or "") and its traces' type, name,
    x, y and z as plotly.js holds them (full precision, unlike the text drawn)."""
    return page.evaluate(
        """() => Array.from(document.querySelectorAll('[data-testid="stPlotlyChart"] .js-plotly-plot')).map((gd) => {
            const keyed = gd.closest('[class*="st-key-"]');
            const key = keyed ? Array.from(keyed.classList).find((c) => c.startsWith("st-key-")) : "";
            const plain = (v) => (v === undefined || v === null ? null : Array.from(v, (r) =>
                typeof r === "object" && r !== null ? Array.from(r) : r));
            return {key: key, traces: gd._fullData.map((t) => ({type: t.type, name: t.name, x: plain(t.x),
                                                                 y: plain(t.y), z: plain(t.z)}))};
        })"""
    )


def _class_bars(page) -> dict[str, tuple[list[str], list[float]]] | None:
    """The class-probability bars (the figure whose bar traces are "clean" and "intervened"): name -> (x, y)."""
    for figure in _figures(page):
        bars = {t["name"]: (t["x"], t["y"]) for t in figure["traces"] if t["type"] == "bar"}
        if set(bars) == {"clean", "intervened"}:
            return bars
    return None


def _bars_equal(page, table, column: str, name: str) -> bool:
    bars = _class_bars(page)
    if bars is None or bars[name][0] != table["token"].map(repr).tolist():
        return False
    return bars[name][1] == pytest.approx(table[column].tolist(), abs=1e-6)


def test_vit_lab_in_a_real_browser(dashboard_url, dashboard_workspace) -> None:  # noqa: F811 (the imported fixture)
    """vit-digits on zoo:digits: the patch grid drawn is the library's residual profile on the image's patches, the
    class probabilities drawn are ``compare_outputs``'s, then a zero-ablation of three heads added in the page: the
    intervened probabilities and the KL shown equal the library's for the same intervention."""
    model = lab.load_lab_model("vit-digits", workspace=dashboard_workspace)
    picture = lab.load_image(model, IMAGES, 0)
    profile = lab.residual_profile(model, picture.pixels)
    at_layer_0 = profile[profile["layer"] == 0]["max_abs"].tolist()
    grid = lab.patch_grid(model, at_layer_0)
    clean = lab.compare_outputs(model, picture.pixels, [], top_k=5)
    stack = [Intervention("zero", "blocks.1.attn.hook_z", heads=(0, 1, 2))]
    ablated = lab.compare_outputs(model, picture.pixels, stack, top_k=5)
    assert ablated.kl > 0
    requests: list[str] = []
    with _prompt_lab(dashboard_url, requests) as page:
        _choose(page, "model", "vit-digits")
        page.get_by_role("heading", name="Patches").first.wait_for(timeout=120_000)
        page.get_by_role("heading", name="Class probabilities").first.wait_for(timeout=120_000)
        _idle(page)
        assert page.get_by_text(f"{picture.name}: pixels {tuple(picture.pixels.shape)}").count() > 0

        def patches_drawn() -> bool:
            overlay = [f for f in _figures(page) if f["key"] == "st-key-lab_patch_overlay"]
            drawn = [v for row in overlay[0]["traces"][1]["z"] for v in row] if overlay else []
            return drawn == pytest.approx(grid.flatten().tolist(), abs=1e-5)

        _until(patches_drawn, what="the patch grid of max |activation| at layer 0")
        _until(
            lambda: _bars_equal(page, clean.table, "p_clean", "clean"), what="the clean class probabilities"
        )
        page.screenshot(path=str(ARTIFACTS / "prompt_lab_vit.png"), full_page=True)  # the patch grid in view
        _add_head_ablation(page, 1, "0, 1, 2")
        _until(lambda: _bars_equal(page, ablated.table, "p_intervened", "intervened")
               and _bars_equal(page, ablated.table, "p_clean", "clean"), what="the ablated class probabilities")  # fmt: skip
        _until(lambda: _metrics(page).get("KL clean → intervened (nats)") == f"{ablated.kl:.4f}",
               what="the KL")  # fmt: skip
        changed = ablated.table["p_intervened"] - ablated.table["p_clean"]
        assert changed.abs().max() > 1e-4
        assert page.locator('[data-testid="stException"]').count() == 0
        page.get_by_role("heading", name="Class probabilities").first.evaluate("e => e.scrollIntoView()")
        page.screenshot(path=str(ARTIFACTS / "prompt_lab_vit_ablated.png"), full_page=True)
    _only_local(requests)
