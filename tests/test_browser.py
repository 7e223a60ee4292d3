"""The tab in a real browser: gradio 3.41 serves it (folder host, tiny model), headless Chromium drives it.

Needs Chromium from the system (Debian/Ubuntu: `apt-get install -y chromium`) and the `playwright` package;
the test fails, saying so, when either is missing. The screenshot lands in artifacts/dreambooth_tab.png.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from ui_helpers import (
    CHROMIUM_ARGS,
    check_rates_follow_train_mode,
    fill,
    find_chromium,
    make_instance_images,
    make_models_dir,
    press_the_other_buttons,
    start_cancel_resume,
)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
INSTALL_HINT = ("Chromium is needed for the browser test: install it with "
                "`apt-get update && apt-get install -y chromium` (or set DREAMBOOTH_CHROMIUM to its path), and the "
                "Python package with `pip install -c constraints.txt -r requirements-test.txt`.")


def chromium_path() -> str:
    return find_chromium() or pytest.fail(INSTALL_HINT)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from dreambooth_ext.ui.standalone import serve

    root = tmp_path_factory.mktemp("browser")
    models = make_models_dir(root)
    images = make_instance_images(root / "photos")
    app = serve(models, root / "work", port=None)
    yield app, models, images, root
    app.close()


@pytest.fixture(scope="module")
def page():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(INSTALL_HINT)
    executable = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        yield page
        browser.close()


def test_train_a_tiny_model_from_the_browser(served, page):
    app, models, images, root = served
    errors, console = [], []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda message: console.append(message.text))
    page.goto(app.url)
    page.wait_for_selector("#dreambooth_start", timeout=60_000)
    page.wait_for_function("typeof dreambooth_start === 'function'", timeout=30_000)  # the extension's JS

    fill(page, "dreambooth_project_name", "browser run")
    fill(page, "dreambooth_base_model", str(models / "Stable-diffusion" / "tiny.safetensors"))
    fill(page, "dreambooth_c0_instance_dir", str(images))
    fill(page, "dreambooth_resolution", "64")
    for group in ("training", "saving", "samples"):  # closed accordions
        page.click(f"#dreambooth_group_{group} .label-wrap")
    fill(page, "dreambooth_max_train_steps", "12")
    fill(page, "dreambooth_sample_every_n_steps", "6")
    fill(page, "dreambooth_save_every_n_steps", "6")
    page.locator("#dreambooth_prior_preservation input[type=checkbox]").uncheck()

    # Save twice: the second save asks before overwriting (accepted here).
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))
    page.click("#dreambooth_project_save")
    page.wait_for_selector("#dreambooth_project_message :text('Saved')", timeout=30_000)
    page.click("#dreambooth_project_save")
    page.wait_for_function("() => document.querySelector('#dreambooth_project_message') && "
                           "document.querySelector('#dreambooth_project_message').textContent.includes('Saved')")
    deadline = time.time() + 10
    while not dialogs and time.time() < deadline:
        page.wait_for_timeout(100)
    assert dialogs and "exists already" in dialogs[0]
    assert (root / "work" / "browser run" / "project.json").is_file()

    page.click("#dreambooth_start")
    page.wait_for_selector("#dreambooth_status [data-state='running']", timeout=60_000)
    page.wait_for_selector("#dreambooth_status .dreambooth-numbers:has-text('step')", timeout=60_000)
    progress_text = page.inner_text("#dreambooth_status")
    page.wait_for_selector("#dreambooth_status [data-state='finished']", timeout=180_000)

    result = models / "Stable-diffusion" / "browser run" / "browser run_12.safetensors"
    status_text = page.inner_text("#dreambooth_status")
    assert result.is_file()
    assert "browser run_12.safetensors" in status_text and "browser run_6.safetensors" in status_text
    page.wait_for_selector("#dreambooth_gallery img", timeout=30_000)
    page.wait_for_selector("#dreambooth_loss_chart canvas, #dreambooth_loss_chart svg", timeout=30_000)
    # The learning monitor's chart beside it: its signals, the verdict and the best saved step in its caption.
    page.wait_for_selector("#dreambooth_monitor_chart canvas, #dreambooth_monitor_chart svg", timeout=30_000)
    page.wait_for_selector("#dreambooth_monitor_chart :text('Best saved step:')", timeout=30_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dreambooth_tab.png"), full_page=True)
    assert "step" in progress_text

    # A reload brings the last run's form back (the page would otherwise show the defaults).
    page.reload()
    page.wait_for_selector("#dreambooth_start", timeout=60_000)
    page.wait_for_function("() => { const f = document.querySelector('#dreambooth_project_name textarea, "
                           "#dreambooth_project_name input'); return f && f.value === 'browser run'; }",
                           timeout=30_000)
    assert not errors, errors
    assert not [m for m in console if "Infinite extent" in m], console  # no empty chart drawn at page load


def test_the_learning_rates_shown_follow_the_train_mode(served, page):
    page.goto(served[0].url)
    page.wait_for_selector("#dreambooth_start", timeout=60_000)
    check_rates_follow_train_mode(page)


def test_start_cancel_resume_and_the_other_buttons_in_the_browser(served, page):
    app, models, images, root = served
    page.goto(app.url)
    page.wait_for_selector("#dreambooth_start", timeout=60_000)
    page.wait_for_function("typeof dreambooth_start === 'function'", timeout=30_000)
    step = start_cancel_resume(page, models, images, "resumed in browser")
    assert (models / "Stable-diffusion" / "resumed in browser" / f"resumed in browser_{step + 2}.safetensors").is_file()
    press_the_other_buttons(page, "pressed in browser")
    assert (root / "work" / "pressed in browser" / "project.json").is_file()
