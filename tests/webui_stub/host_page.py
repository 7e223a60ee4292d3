"""The stand-in host's page served to a browser, as v1.10.1's webui.py serves its own (re-implemented from its
source for what the extension's JavaScript meets there):

- `modules/ui_gradio_extensions.py`: every page gradio sends gets, before `</head>`, the host's script.js, then
  the host's javascript/*.js, then each extension's javascript/*.js (here the stand-ins of tests/webui_stub/
  javascript, inlined instead of linked through gradio's `file=` route).
- `webui.py`: the page is queued (`demo.queue(64)`) and launched; then `ui_extra_networks.add_pages_to_demo(app)`
  adds the extra-networks routes, and the `app_started` callbacks run (the extension's API).
- `ui_extra_networks.get_single_card`: GET /sd_extra_networks/get-single-card?page=&tabname=&name= answers
  `{"html": <the card of that item for that tab>}`, the item made again from its file
  (`page.create_item(name, enable_filter=False)`: shown even when the loaded model is of another family). An item
  the page does not know (a name not in its list since its last refresh) or a page that does not exist fails
  there: a 500.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

STUB_JAVASCRIPT = Path(__file__).resolve().parent / "javascript"
HOST_SCRIPTS = ("script.js", "extraNetworks.js")  # script.js first, as the host puts it


def javascript_html(extension_dirs: Sequence[Path]) -> str:
    files = [STUB_JAVASCRIPT / name for name in HOST_SCRIPTS]
    for folder in extension_dirs:
        files += sorted(Path(folder, "javascript").glob("*.js"))
    return "".join(f'<script type="text/javascript">{path.read_text(encoding="utf-8")}</script>\n' for path in files)


@contextlib.contextmanager
def scripts_in_pages(extension_dirs: Sequence[Path]) -> Iterator[None]:
    """While inside: every page gradio sends carries the host's and the extensions' scripts (reload_javascript)."""
    original = gr.routes.templates.TemplateResponse
    head = javascript_html(extension_dirs)

    def template_response(*args, **kwargs):
        response = original(*args, **kwargs)
        response.body = response.body.replace(b"</head>", f"{head}</head>".encode())
        response.init_headers()
        return response

    gr.routes.templates.TemplateResponse = template_response
    try:
        yield
    finally:
        gr.routes.templates.TemplateResponse = original


@dataclass
class CardRequests:
    """The get-single-card requests the app answered, as (page, tabname, name, status code)."""

    seen: list[tuple[str, str, str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, *request) -> None:
        with self.lock:
            self.seen.append(request)


def add_pages_to_demo(app, requests: CardRequests) -> None:
    """The extra-networks route the extension's JavaScript uses (v1.10.1 adds thumb, cover-images and metadata
    beside it)."""
    from fastapi.responses import JSONResponse
    from modules import ui_extra_networks

    def get_single_card(page: str = "", tabname: str = "", name: str = ""):
        found = next((p for p in ui_extra_networks.extra_pages if p.name == page), None)
        item = None
        if found is not None:
            try:
                item = found.create_item(name, enable_filter=False)
                found.items[name] = item
            except Exception:  # noqa: BLE001 - v1.10.1 reports it and falls back to the item it listed last
                item = found.items.get(name)
        if item is None:  # v1.10.1 fails reading the missing item's user metadata: the request gets a 500
            requests.record(page, tabname, name, 500)
            return JSONResponse({"error": f"no item {name!r} on page {page!r}"}, status_code=500)
        requests.record(page, tabname, name, 200)
        return JSONResponse({"html": found.create_item_html(tabname, item)})

    app.add_api_route("/sd_extra_networks/get-single-card", get_single_card, methods=["GET"])


def launch(demo: gr.Blocks, requests: CardRequests):
    """Serve the host's page on a free local port, as webui.py does; returns gradio's app (its `local_url`
    is on the demo)."""
    from webui_stub.load_extension import start_app

    demo.queue(64)
    app, _, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, show_api=False)
    add_pages_to_demo(app, requests)
    start_app(app, demo)
    return app
