"""The tab outside the WebUI: gradio serving it over a folder of checkpoints, with the HTTP API beside it.

    python -m dreambooth_ext ui --models-dir models [--port 7861]      (python3 standalone.py ui)

The page gets the extension's own `javascript/dreambooth.js` and `style.css`, as the WebUI would inject them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from .adapter import HostAdapter, folder_adapter
from .api import limit_every_body, parse_credentials, register_api
from .jobs import JobManager
from .tab import DreamboothTab, build_tab
from .widgets import enable_queue, js_kwarg

log = logging.getLogger(__name__)

EXTENSION_DIR = Path(__file__).resolve().parent.parent.parent


def page_script() -> str:
    """A page-load function adding the extension's JavaScript to the page as a global script."""
    source = (EXTENSION_DIR / "javascript" / "dreambooth.js").read_text(encoding="utf-8")
    return ("() => { const s = document.createElement('script'); s.textContent = " + json.dumps(source)
            + "; document.head.appendChild(s); }")


@dataclass
class StandaloneApp:
    blocks: gr.Blocks
    tab: DreamboothTab
    jobs: JobManager
    adapter: HostAdapter

    @property
    def url(self) -> str:
        return self.blocks.local_url

    def close(self, grace: float = 3.0) -> None:
        """Cancel a run (it keeps its state), then stop serving within about 2 x `grace` seconds."""
        self.jobs.shutdown(30)
        if stop_server(self.blocks, grace):
            self.blocks.close()  # the queue and gradio's own bookkeeping; its server is already gone
        else:
            log.warning("The web server did not stop within %.0f s; leaving it to end with the process.", 2 * grace)


def stop_server(blocks: gr.Blocks, grace: float) -> bool:
    """Stop gradio's uvicorn server without waiting for ever on connections a browser keeps open.

    gradio's own `close()` joins the server thread with no time limit, and uvicorn waits for every open
    connection to finish first: a page left open made shutdown (and the test suite's teardown) hang. Here the
    server stops accepting and asks connections to close; after `grace` seconds it stops waiting for them."""
    server = getattr(blocks, "server", None)
    thread = getattr(server, "thread", None)
    if server is None or thread is None:
        return True
    server.should_exit = True
    thread.join(grace)
    if thread.is_alive():
        server.force_exit = True  # skip uvicorn's wait for open connections and background tasks
        thread.join(grace)
    return not thread.is_alive()


def build_page(adapter: HostAdapter, jobs: JobManager | None = None) -> tuple[gr.Blocks, DreamboothTab, JobManager]:
    """The tab rendered inside a page, the way the WebUI renders a tab into its own Blocks."""
    jobs = jobs or JobManager()
    tab = build_tab(adapter, jobs)
    css = (EXTENSION_DIR / "style.css").read_text(encoding="utf-8")
    with gr.Blocks(title="Dreambooth", css=css, analytics_enabled=False) as page:
        tab.blocks.render()
        page.load(None, None, None, **js_kwarg(page_script()))
    return page, tab, jobs


def serve(models_dir: str | Path, work_root: str | Path | None = None, *, host: str = "127.0.0.1",
          port: int | None = None, api_auth: str | None = None) -> StandaloneApp:
    adapter = folder_adapter(models_dir, work_root)
    page, tab, jobs = build_page(adapter)
    enable_queue(page, 8)  # polling and Cancel must get through while Start is running
    # The app that serves is the one launch() returns (gradio 3 builds a new one there; page.app is not it).
    # The page is protected by the same credentials as the API (gradio's login form); without them its
    # Start button would train for anyone who can reach the port.
    credentials = parse_credentials(api_auth)
    server_app, _, _ = page.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True,
                                   show_api=False, auth=list(credentials.items()) or None)
    limit_every_body(server_app)  # gradio's own routes read a body before their login check
    register_api(server_app, jobs, adapter, api_auth)
    return StandaloneApp(page, tab, jobs, adapter)
