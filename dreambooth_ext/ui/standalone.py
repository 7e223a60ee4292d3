"""The tab outside the WebUI: gradio serving it over a folder of checkpoints, with the HTTP API beside it.

    python -m dreambooth_ext ui --models-dir models [--port 7861]      (python3 standalone.py ui)

The page gets the extension's own `javascript/dreambooth.js` and `style.css`, as the WebUI would inject them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from .adapter import HostAdapter, folder_adapter
from .api import register_api
from .jobs import JobManager
from .tab import DreamboothTab, build_tab
from .widgets import enable_queue, js_kwarg

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

    def close(self) -> None:
        self.jobs.shutdown(30)
        self.blocks.close()


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
    server_app, _, _ = page.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True,
                                   show_api=False)
    register_api(server_app, jobs, adapter, api_auth)
    return StandaloneApp(page, tab, jobs, adapter)
