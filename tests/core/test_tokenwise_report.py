"""The query report's token heat map: its markup, and what a real headless browser draws of it."""

import os
import shutil
import subprocess

import pytest

from dataworth.reports.html import HEAT_NEGATIVE, HEAT_POSITIVE, heat_color
from dataworth.reports.query_report import render_query_report

QUERIES = [{"id": "q1", "prompt": "Tova keeps three", "completion": " grey cats", "generated": False}]
RESULTS = {"dot": {"q1": [{"rank": 1, "score": 0.75, "example_id": 1, "document_id": "d1", "text": "Tova keeps"}]}}
SPLIT = {
    "mode": "dot",
    "rank": 1,
    "example_id": 1,
    "document_id": "d1",
    "total": 0.75,
    "query": [(" grey", 1.0), (" cats", -0.25)],
    "train": [("T", 0.5), ("ova", 0.5), (" keeps", -0.5), (" three", 0.0), (" <b>", 0.25)] * 6,
}


def _page(tmp_path, token_scores) -> str:
    html = render_query_report("t", QUERIES, RESULTS, token_scores=token_scores)
    path = tmp_path / ("tokens.html" if token_scores else "plain.html")
    path.write_text(html)
    return html, path


def test_heat_colors_diverge_from_white():
    assert heat_color(0.0)[0] == "rgb(255,255,255)"
    assert heat_color(1.0)[0] == "rgb({},{},{})".format(*HEAT_POSITIVE)
    assert heat_color(-1.0)[0] == "rgb({},{},{})".format(*HEAT_NEGATIVE)
    assert heat_color(7.0) == heat_color(1.0) and heat_color(float("nan"))[0] == "rgb(255,255,255)"


def test_heat_map_markup(tmp_path):
    html, _ = _page(tmp_path, {"q1": [SPLIT]})
    assert "Token attribution" in html and "supports (+)" in html and "opposes (−)" in html
    # each token a span with its value in a tooltip, scaled to its row's largest |score|, text escaped
    assert html.count('class="tok"') == 2 + 30
    assert 'title="&#x27; grey&#x27; · 1"' in html and 'title="&#x27; cats&#x27; · -0.25"' in html
    assert "background:rgb({},{},{})".format(*HEAT_POSITIVE) in html  # " grey": the query row's largest
    assert "&lt;b&gt;" in html and "<b>" not in html.split("<main>")[1]
    plain, _ = _page(tmp_path, None)
    assert "Token attribution" not in plain


def _browser() -> str | None:
    for name in ("chromium-headless-shell", "chromium", "/usr/lib/chromium/chromium-headless-shell"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _screenshot(browser: str, page, out) -> "object":
    from PIL import Image

    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1200,900",
            f"--screenshot={out}",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return Image.open(out).convert("RGB")


def _near(image, color, tol=12) -> int:
    r0, g0, b0 = color
    return sum(
        count
        for count, (r, g, b) in image.getcolors(maxcolors=1 << 24)
        if abs(r - r0) <= tol and abs(g - g0) <= tol and abs(b - b0) <= tol
    )


def test_heat_map_renders_in_a_headless_browser(tmp_path):
    browser = _browser()
    if browser is None:
        if os.geteuid() == 0:
            pytest.fail("no headless browser: `make install` installs chromium-headless-shell (apt-get)")
        pytest.skip("no headless browser and not root: apt-get install chromium-headless-shell")
    _, with_tokens = _page(tmp_path, {"q1": [SPLIT]})
    _, without = _page(tmp_path, None)
    shot = _screenshot(browser, with_tokens, tmp_path / "tokens.png")
    plain = _screenshot(browser, without, tmp_path / "plain.png")
    assert shot.size == (1200, 900)
    # The full colours fill whole token boxes (the largest |share| of each row and the legend's ends); the page
    # without token scores has none of them.
    positive, negative = _near(shot, HEAT_POSITIVE), _near(shot, HEAT_NEGATIVE)
    assert positive > 1500 and negative > 1500, (positive, negative)
    assert _near(plain, HEAT_POSITIVE) < 50 and _near(plain, HEAT_NEGATIVE) < 50
