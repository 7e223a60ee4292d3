"""Smoke test of the tab and API under Forge's stack: gradio 4.40.0, fastapi 0.104.1, pydantic 2.8.2.

Not collected by pytest (the main environment has the WebUI's gradio 3.41.2). Run it in a second environment
that takes torch & co. from the main .venv and adds Forge's gradio on top:

    python3 -m venv /tmp/g4 && .venv/bin/python -c "import site; print(site.getsitepackages()[0])" \
        > "$(/tmp/g4/bin/python -c 'import site; print(site.getsitepackages()[0])')/main_venv.pth"
    printf 'torch==2.13.0\ngradio==4.40.0\nfastapi==0.104.1\npydantic==2.8.2\n' > /tmp/g4-constraints.txt
    /tmp/g4/bin/pip install -c /tmp/g4-constraints.txt gradio==4.40.0
    PYTHONPATH=.:tests /tmp/g4/bin/python tests/gradio4_smoke.py [folder]

Its models, pictures and runs go into `folder` (a temporary folder, removed at the end, when none is given).

(pip leaves the main .venv alone: it reports "Not uninstalling gradio ... outside environment".)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import urllib.request
import warnings
from pathlib import Path

import gradio as gr
from fastapi import FastAPI
from fastapi.testclient import TestClient
from ui_helpers import (
    CHROMIUM_ARGS,
    check_rates_follow_train_mode,
    find_chromium,
    make_instance_images,
    make_models_dir,
    page_texts,
    press_the_other_buttons,
    quick_run_data,
    start_cancel_resume,
    wording_problems,
)

from dreambooth_ext import config as schema
from dreambooth_ext.ui import JobManager, folder_adapter
from dreambooth_ext.ui.api import PREFIX, register_api
from dreambooth_ext.ui.standalone import build_page, serve


def check(condition: bool, what: str) -> None:
    print(("ok   " if condition else "FAIL ") + what, flush=True)
    if not condition:
        raise SystemExit(1)


def main() -> int:
    if len(sys.argv) > 1:
        return smoke(Path(sys.argv[1]))
    with tempfile.TemporaryDirectory(prefix="db_g4_") as root:
        return smoke(Path(root))


def smoke(root: Path) -> int:
    check(gr.__version__.startswith("4."), f"gradio {gr.__version__} is 4.x")
    os.environ["GRADIO_TEMP_DIR"] = str(root / "gradio")  # the gallery's images, with the rest of this test's files
    models = make_models_dir(root)
    images = make_instance_images(root / "photos")
    adapter = folder_adapter(models, root / "work")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        page, tab, jobs = build_page(adapter)
    components = [str(w.message) for w in caught if f"gradio{os.sep}components" in w.filename]
    check(not components, "the tab's components take every argument given (gradio warns of none)"
          + "".join(f"\n  {w}" for w in components))
    check(set(tab.widgets) == {o.name for o in schema.OPTIONS}, "every option has a widget")
    check(tab.collect([c.value for c in tab.form]) == schema.default_config(), "untouched form = defaults")
    config = page.get_config_file()
    check({"dreambooth_start", "dreambooth_confirm_save"} <= {d.get("js") for d in config["dependencies"]},
          "page JS attached with js= (not _js=)")
    choice_values = {c for o in schema.OPTIONS + schema.CONCEPT_OPTIONS for c in o.choices}
    problems = wording_problems(page_texts(config), choice_values)
    check(not problems, "every label and help text reads as words" + "".join(f"\n  {p}" for p in problems))

    values = tab.form_values(schema.from_dict(quick_run_data("", images, project="g4", sample_every_n_steps=2)))
    outputs = tab.start("task(g4)", "tiny.safetensors", None, *values)
    check("data-state='finished'" in outputs[-1], "a tiny run through the Start handler finishes")
    chart, gallery = outputs[0], outputs[1]
    check(tab.chart.postprocess(chart) is not None, "the loss chart's data is accepted by gr.LinePlot")
    check(len(tab.gallery.postprocess(gallery).root) == 1, "the sample images are accepted by gr.Gallery")
    check(tab.refresh(outputs[2])[0] == gr.update(), "polling sends the chart only on change")
    monitor = outputs[4]
    check(monitor["visible"] and tab.monitor_chart.postprocess(monitor["value"]) is not None
          and "Best saved step: 2." in monitor["caption"], "the learning monitor's chart is accepted by gr.LinePlot")
    check(tab.refresh(outputs[2])[4] == gr.update(), "polling sends the monitor's chart only on change")
    check(jobs.active is None and tab.jobs is jobs, "the run's slot is free again")

    app = FastAPI()
    register_api(app, JobManager(), adapter, "u:p")
    client = TestClient(app)
    check(client.get(f"{PREFIX}/status").status_code == 401, "API auth enforced (fastapi 0.104 / pydantic 2)")
    bad = client.post(f"{PREFIX}/start", json={"resolution": 100, "bogus": 1}, auth=("u", "p"))
    problems = bad.json()["detail"]["problems"] if bad.status_code == 422 else []
    check(any(p.startswith("bogus:") for p in problems) and any(p.startswith("resolution = 100") for p in problems),
          "invalid config -> 422 problems")

    check_lora_cards_rebuilt()

    served = serve(models, root / "work2", port=None)
    try:
        with urllib.request.urlopen(served.url.rstrip("/") + "/config", timeout=30) as response:
            check(response.status == 200 and b"dreambooth_start" in response.read(), "the page is served")
        with urllib.request.urlopen(served.url.rstrip("/") + f"{PREFIX}/status", timeout=30) as response:
            check(json.load(response)["state"] == "idle", "the API is served beside the page")
        in_browser(served.url, models, images)
    finally:
        served.close()
    print("gradio 4 smoke test passed")
    return 0


def check_lora_cards_rebuilt() -> None:
    """Forge's txt2img and img2img keep their Lora cards' HTML and serve it to every page load, as the WebUI does;
    after a LoRA run the extension rebuilds it, finding each tab's list through the handler of its hidden Refresh
    button. gradio 4 keeps its events otherwise than gradio 3: the card must still be there for a page loaded
    after the run (the stand-in's extra-networks UI, built by gradio 4 as Forge builds its own)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "webui_stub"))
    from modules import shared, ui_extra_networks

    from dreambooth_ext.hosts import webui

    class LoraPage(ui_extra_networks.ExtraNetworksPage):
        names: list[str] = ["old"]

        def list_items(self):
            return [{"name": name} for name in self.names]

    ui_extra_networks.initialize()
    ui_extra_networks.register_page(LoraPage("Lora"))
    with gr.Blocks() as demo:
        uis = []
        for tab in ("txt2img", "img2img"):
            with gr.Tabs():
                uis.append(ui_extra_networks.create_ui(demo, [], tab))
    shared.demo = demo
    for ui in uis:  # the first page load builds each tab's list
        ui.pages_contents = [page.create_html(ui.tabname) for page in ui.stored_extra_pages]
    LoraPage.names.append("trained")  # the run wrote a LoRA
    check(webui.refresh_lora_cards() and all("data-name='trained'" in ui.pages_contents[0] for ui in uis),
          "a new LoRA's card is in the Lora lists of txt2img and img2img that Forge serves to every page load")


def in_browser(url: str, models: Path, images: Path) -> None:
    """Press the tab's controls in headless Chromium, as a user of Forge would."""
    from playwright.sync_api import sync_playwright

    executable = find_chromium()
    check(executable is not None, "Chromium is installed (apt-get install -y chromium, or set DREAMBOOTH_CHROMIUM)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.wait_for_selector("#dreambooth_start", timeout=60_000)
            check_rates_follow_train_mode(page)
            check(True, "in the browser, switching Train mode shows that mode's learning rates and hides the others")
            page.wait_for_function("typeof dreambooth_start === 'function'", timeout=30_000)
            step = start_cancel_resume(page, models, images, "g4 browser")
            check(True, f"in the browser, Start trains, Cancel stops it at step {step} and Resume finishes it")
            page.wait_for_selector("#dreambooth_monitor_chart :text('Best saved step:')", timeout=30_000)
            check(True, "in the browser, the learning monitor's chart shows after the run")
            press_the_other_buttons(page, "g4 pressed")
            check(True, "in the browser, Check dataset, Save, Refresh list, Load, Lowest memory and Refresh work")
        finally:
            browser.close()


if __name__ == "__main__":
    sys.exit(main())
