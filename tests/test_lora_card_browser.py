"""A LoRA's card in the Lora tab of a page that was already open while the run trained it (issue 29, item 6).

The host rebuilds the cards it serves to pages loaded from now on (tests/test_webui_workflows.py); a page already
open keeps the cards it drew. The extension's JavaScript adds the new card there through the host's own
get-single-card route. Here the stand-in v1.10.1 host's page is served by gradio 3.41 with the stand-ins of its
script.js and extraNetworks.js (tests/webui_stub/javascript) and the extension's javascript/dreambooth.js, and
headless Chromium holds it open while a LoRA run started through the extension's API trains.

Needs Chromium (`apt-get install -y chromium`, or DREAMBOOTH_CHROMIUM) and the `playwright` package.
"""

from __future__ import annotations

import contextlib
import json
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from ui_helpers import CHROMIUM_ARGS, find_chromium, make_instance_images, quick_run_data

pytest_plugins = ("webui_stub.fixtures",)

REPO = Path(__file__).resolve().parent.parent
TABS = ("txt2img", "img2img")
POLL_S = 5  # javascript/dreambooth.js asks for the status this often while its tab is on screen


@contextlib.contextmanager
def browser_page():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("The browser tests need `pip install -c constraints.txt -r requirements-test.txt`.")
    executable = find_chromium() or pytest.fail("Chromium is needed: `apt-get install -y chromium`.")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 1000})
        finally:
            browser.close()


@contextlib.contextmanager
def served_host_page(webui):
    """The stand-in host with the extension loaded, its page served as the host serves it."""
    from webui_stub import load_extension as loader
    from webui_stub.host_page import CardRequests, launch, scripts_in_pages

    from dreambooth_ext.ui.standalone import stop_server

    (module,) = loader.load_scripts(REPO)
    loader.build_ui()
    demo, requests = webui.shared.demo, CardRequests()
    with scripts_in_pages([REPO]):
        launch(demo, requests)
        try:
            yield demo.local_url, module, requests
        finally:
            module.jobs.shutdown(30)
            if stop_server(demo, 3):
                demo.close()


def cards(page, tab: str, name: str) -> int:
    return page.evaluate("([tab, name]) => gradioApp().querySelectorAll("
                         "'#' + tab + '_lora_cards .card[data-name=\"' + CSS.escape(name) + '\"]').length", [tab, name])


def test_a_page_open_during_a_lora_run_shows_its_card_in_both_lora_tabs(webui, tmp_path):
    images = make_instance_images(tmp_path / "photos")
    with served_host_page(webui) as (url, module, requests), browser_page() as page:
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url)
        for tab in TABS:  # the page's load event drew each tab's cards: none yet
            page.wait_for_selector(f"#{tab}_lora_cards .nocards", state="attached", timeout=60_000)
        # What the host's setup registers per page: its search box and sort order, run again over the cards
        # (here it records how many cards it saw, to show it ran after the new card was in).
        page.evaluate("() => { window.filtered = []; ['txt2img_lora', 'img2img_lora'].forEach(function(full) {"
                      "extraNetworksApplyFilter[full] = function(force) { filtered.push([full, "
                      "gradioApp().querySelectorAll('#' + full + '_cards .card').length]); }; }); }")
        page.click("#tabs button:has-text('Dreambooth')")

        data = quick_run_data("", images, project="style", train_mode="lora", lora_rank=4)
        assert httpx.post(f"{url}dreambooth/v1/start", json=data, timeout=30).status_code == 200
        page.wait_for_selector("#dreambooth_status [data-state='finished']", state="attached", timeout=180_000)
        names = [Path(path).stem for path in module.jobs.status()["loras"]]
        assert names, module.jobs.status()

        for tab in TABS:
            for name in names:
                page.wait_for_selector(f"#{tab}_lora_cards .card[data-name='{name}']", state="attached",
                                       timeout=3 * POLL_S * 1000)
            assert page.locator(f"#{tab}_lora_cards .nocards").count() == 0
        page.wait_for_function("() => ['txt2img_lora', 'img2img_lora'].every(function(full) {"
                               "return filtered.some(function(seen) { return seen[0] === full && seen[1] > 0; }); })",
                               timeout=10_000)
        status = page.inner_text("#dreambooth_status")
        assert "Its card is in the Lora tab of txt2img and img2img." in status and "Refresh" not in status

        page.wait_for_timeout(2 * POLL_S * 1000)  # later polls of the same finished status add nothing
        for tab in TABS:
            for name in names:
                assert cards(page, tab, name) == 1, (tab, name)
        asked = sorted((tab, name) for page_name, tab, name, code in requests.seen if page_name == "lora")
        assert asked == sorted((tab, name) for tab in TABS for name in names), requests.seen
        assert all(code == 200 for *_, code in requests.seen), requests.seen
        assert not errors, errors


def status_attributes(shown: str) -> dict:
    """The attributes of the status element, unescaped, as the page's script reads them."""
    found = {}

    class Reader(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if not found and ("class", "dreambooth-status") in attrs:
                found.update(attrs)

    Reader().feed(shown)
    return found


def test_the_status_names_the_loras_the_run_wrote_for_the_pages_script():
    from dreambooth_ext.ui.render import status_html

    loras = ["/models/Lora/p/p_5.safetensors", "/models/Lora/p/it's \"<1>\".safetensors"]
    shown = status_html({"state": "finished", "project": "p", "loras": loras})
    assert json.loads(status_attributes(shown)["data-lora-names"]) == ["p_5", "it's \"<1>\""]
    assert "Its card is in the Lora tab of txt2img and img2img." in shown
    no_lora = status_html({"state": "finished", "project": "p", "checkpoints": ["/models/x.safetensors"]})
    assert "data-lora-names" not in status_attributes(no_lora)
