"""End to end, as a person uses it: the real server on a loopback port, the page in headless Chromium.

Needs Playwright for Python and Debian's Chromium (Playwright's own browser downloads cannot
run here); without them the test is skipped with the command that installs them. Screenshots
go to ``artifacts/`` (or $CBIR_ARTIFACTS).

Also a script: ``python tests/test_service_browser.py --index DIR --query IMG --out PNG`` takes
the screenshot in docs/service.md of the page over any index.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from cbir.service.process import running_server

CHROMIUM = os.environ.get("CBIR_CHROMIUM", "/usr/bin/chromium")
# The network is closed here: without these, Chromium waits on connections it cannot make.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
INSTALL_HINT = ("install them with: apt-get install -y chromium chromium-driver && "
                ".venv/bin/pip install playwright   (or `make install`, which does both)")
ARTIFACTS = Path(os.environ.get("CBIR_ARTIFACTS", Path(__file__).resolve().parents[1] / "artifacts"))


def launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


def search_on_page(page, url: str, query: Path, min_results: int = 1) -> None:
    page.goto(url)
    page.wait_for_function("() => document.querySelector('#stats').textContent.includes('images')")
    page.set_input_files("#file", str(query))
    page.wait_for_function(f"() => document.querySelectorAll('#results .result').length >= {min_results}")


def status_text(page) -> str:
    return page.locator("#status").inner_text()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}; {INSTALL_HINT}")
    sync_api = pytest.importorskip("playwright.sync_api", reason=f"Playwright is not installed; {INSTALL_HINT}")
    with sync_api.sync_playwright() as p:
        b = launch(p)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def server(browser, tmp_path_factory):
    from cbir.service import samples

    _, index = samples.build_index(tmp_path_factory.getbasetemp() / "cbir-service-samples")
    with running_server(index, "--read-only") as url:
        yield url


@pytest.fixture(scope="module")
def queries(tmp_path_factory):
    from cbir.service import samples

    d = tmp_path_factory.mktemp("browser-queries")
    (d / "cat-crop.jpg").write_bytes(samples.crop_query("chelsea"))
    data, left, right = samples.composite_query("coffee", "chelsea")
    (d / "two-photos.jpg").write_bytes(data)
    return d


@pytest.mark.timeout(300)
def test_upload_a_query_and_see_the_right_image_first(browser, server, queries):
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    search_on_page(page, server, queries / "cat-crop.jpg", min_results=6)
    first = page.locator("#results .result").first
    assert first.locator(".name").inner_text() == "chelsea.jpg"
    assert first.locator(".title").inner_text() == "Chelsea the cat"
    assert "Stefan van der Walt" in first.inner_text()
    score = float(first.locator(".score").inner_text())
    assert 0.5 < score <= 1.0
    assert re.search(r"\d+ results .*in \d+ ms", status_text(page)), status_text(page)
    # Every thumbnail loaded.
    page.wait_for_function("() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "service-e2e.png"), full_page=True)

    # Clicking a result searches with it ("more like this"): it is now the query, not a result.
    second = page.locator("#results .result").nth(1)
    name = second.locator(".name").inner_text()
    second.click()
    page.wait_for_function(f"() => document.querySelector('#query-caption').textContent.startsWith({name!r})")
    page.wait_for_function("() => !document.querySelector('#status').textContent.startsWith('searching')")
    names = page.locator("#results .result .name").all_inner_texts()
    assert names and name not in names
    assert not errors, errors
    page.close()


@pytest.mark.timeout(300)
def test_draw_a_box_to_search_part_of_the_query(browser, server, queries):
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    search_on_page(page, server, queries / "two-photos.jpg")
    page.wait_for_function("() => document.querySelector('#query-img').naturalWidth > 0")
    box = page.locator("#overlay").bounding_box()
    for (fx0, fx1), expect in (((0.55, 0.97), "chelsea.jpg"), ((0.03, 0.45), "coffee.jpg")):
        page.mouse.move(box["x"] + fx0 * box["width"], box["y"] + 0.05 * box["height"])
        page.mouse.down()
        page.mouse.move(box["x"] + fx1 * box["width"], box["y"] + 0.95 * box["height"], steps=5)
        page.mouse.up()
        page.wait_for_function("() => document.querySelector('#status').textContent.includes('boxed region')")
        assert page.locator("#results .result .name").first.inner_text() == expect
        assert page.locator("#box").is_visible()
        page.click("#clear-box")
        page.wait_for_function("() => !document.querySelector('#status').textContent.includes('boxed') && "
                               "!document.querySelector('#status').textContent.startsWith('searching')")
    page.close()


@pytest.mark.timeout(300)
def test_phone_sized_screen_and_errors(browser, server, queries, tmp_path):
    ctx = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True, has_touch=True)
    page = ctx.new_page()
    search_on_page(page, server, queries / "cat-crop.jpg")
    assert page.locator("#results .result .name").first.inner_text() == "chelsea.jpg"
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    cols = page.evaluate("getComputedStyle(document.querySelector('#results')).gridTemplateColumns.split(' ').length")
    assert cols == 2
    page.wait_for_function("() => { const i = document.querySelector('#results img'); return i.complete && i.naturalWidth > 0; }")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "service-e2e-phone.png"))
    # A file that is not an image: the server's sentence is shown, in the error style.
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a JPEG")
    page.set_input_files("#file", str(bad))
    page.wait_for_function("() => document.querySelector('#status').classList.contains('error')")
    assert "broken.jpg" in status_text(page) and "not an image" in status_text(page)
    assert page.locator("#results .result").count() == 0
    ctx.close()


@pytest.fixture(scope="module")
def museum_server(browser, tmp_path_factory):
    """The museum collection indexed with the saliency localizer stored (needs ../shared)."""
    import subprocess
    import sys

    from conftest import shared_benchmark

    museum = shared_benchmark("museum")
    index = tmp_path_factory.mktemp("museum-index") / "ix"
    subprocess.run([sys.executable, "-m", "cbir.cli", "index", str(museum / "database"), "--index", str(index),
                    "--localizer", "saliency"], check=True, capture_output=True)
    with running_server(index, "--read-only") as url:
        yield url


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_wall_with_two_paintings_shows_two_outlines_and_a_row_each(browser, museum_server):
    import json

    from conftest import shared_benchmark

    multi = shared_benchmark("museum-multi")
    photo = "queries/w2_00002.jpg"  # two paintings side by side, both in the collection
    gt = next(q for q in json.loads((multi / "gt.json").read_text())["queries"] if q["image"] == photo)
    want = {Path(o["positives"][0]).name for o in gt["objects"]}
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    search_on_page(page, museum_server, multi / photo, min_results=2)
    page.wait_for_function("() => document.querySelectorAll('#outlines polygon').length > 0")
    assert page.locator("#outlines polygon").count() == 2
    rows = page.locator("#results .object-row")
    assert rows.count() == 2
    firsts = {rows.nth(i).locator(".result .name").first.inner_text() for i in range(2)}
    assert firsts == want
    assert "not in the collection" not in rows.nth(0).locator("h2").inner_text()
    assert "2 objects found" in status_text(page)
    # Thumbnails load lazily: wait for those of the first result of each row.
    page.wait_for_function("() => [...document.querySelectorAll('.object-row li:first-child img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "service-multi-object.png"))
    assert not errors, errors
    page.close()


def _screenshot(index: Path, query: Path, out: Path, width: int, height: int, bbox: str | None = None) -> None:
    from playwright.sync_api import sync_playwright

    with running_server(index, "--read-only") as url, sync_playwright() as p:
        b = launch(p)
        page = b.new_page(viewport={"width": width, "height": height})
        search_on_page(page, url, query)
        if bbox:  # drag the box as a person would, in pixels of the query image
            x0, y0, x1, y1 = (float(v) for v in bbox.split(","))
            page.wait_for_function("() => document.querySelector('#query-img').naturalWidth > 0")
            nw, nh = page.evaluate("() => [document.querySelector('#query-img').naturalWidth, "
                                   "document.querySelector('#query-img').naturalHeight]")
            r = page.locator("#overlay").bounding_box()
            page.mouse.move(r["x"] + x0 / nw * r["width"], r["y"] + y0 / nh * r["height"])
            page.mouse.down()
            page.mouse.move(r["x"] + x1 / nw * r["width"], r["y"] + y1 / nh * r["height"], steps=8)
            page.mouse.up()
            page.wait_for_function("() => document.querySelector('#status').textContent.includes('boxed region')")
        page.wait_for_function("() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out))
        b.close()
    from PIL import Image  # 256 colours: a third of the bytes, for a file kept in the repository

    Image.open(out).convert("RGB").quantize(256, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Screenshot the search page over an index (for docs/service.md).")
    ap.add_argument("--index", type=Path, required=True)
    ap.add_argument("--query", type=Path, required=True)
    ap.add_argument("--bbox", help="Drag a box on the query first: x0,y0,x1,y1 in its pixels.")
    ap.add_argument("--out", type=Path, default=Path("docs/img/service.png"))
    ap.add_argument("--size", default="1280x860")
    a = ap.parse_args()
    w, h = (int(v) for v in a.size.split("x"))
    _screenshot(a.index, a.query, a.out, w, h, a.bbox)
