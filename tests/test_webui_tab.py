"""The extension's script file in the stand-in WebUI host: tab, setting, API and cleanup are registered, and a
tiny run started from the tab goes through the host's call queue, progress state and checkpoint list."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.testclient import TestClient
from ui_helpers import make_instance_images, quick_run_data

from dreambooth_ext import config as schema

pytest_plugins = ("webui_stub.fixtures",)

REPO = Path(__file__).resolve().parent.parent


def load_extension():
    from webui_stub import load_extension as loader

    (module,) = loader.load_scripts(REPO)
    return module, loader


def test_script_registers_tab_settings_api_and_unload(webui, tmp_path):
    module, loader = load_extension()
    tabs = loader.build_ui()
    (blocks, title, elem_id), = [t for t in tabs if t[2] == "dreambooth"]
    assert title == "Dreambooth"
    from modules import shared

    assert shared.opts.dreambooth_load_after_training is False
    app = FastAPI()
    loader.start_app(app)
    status = TestClient(app).get("/dreambooth/v1/status")
    assert status.status_code == 200 and status.json()["state"] == "idle"
    import dreambooth_ext.ui.jobs  # noqa: F401 - importable after the host restored sys.path


def test_tab_start_trains_the_loaded_model_through_the_host_queue(webui, tmp_path):
    module, loader = load_extension()
    from dreambooth_ext.ui.tab import DEFAULT_PICK, build_tab

    tab = build_tab(module._adapter(), module.jobs)
    images = make_instance_images(tmp_path / "photos")
    values = tab.form_values(schema.from_dict(quick_run_data("", images, project="inhost")))
    outputs = tab.start("task(host1)", DEFAULT_PICK, None, *values)
    status = module.jobs.status()
    assert status["state"] == "finished", (status, outputs[-1])
    assert "Time taken" in outputs[-1]  # the host's wrap_gradio_gpu_call ran around it
    assert Path(status["checkpoints"][-1]).is_file()


def test_the_hosts_ui_config_file_does_not_freeze_the_forms_defaults(webui, tmp_path):
    """The host saves every tab component's value in ui-config.json at its first start and sets it again at every
    later one: an older version's default (resolution 512 before "the model's own size") would win over the
    schema's forever. The tab's components opt out; the host's other fields still work as before."""
    import json

    from modules import shared

    resolution = schema.OPTIONS_BY_NAME["resolution"]
    old_file = {f"dreambooth/{resolution.label}/value": 512, "dreambooth/Start training/visible": False}
    Path(shared.cmd_opts.ui_config_file).write_text(json.dumps(old_file), encoding="utf-8")
    module, loader = load_extension()
    (blocks, _, _), = [t for t in loader.build_ui() if t[2] == "dreambooth"]
    components = list(blocks.blocks.values())
    field = next(b for b in components if getattr(b, "label", None) == resolution.label)
    assert field.value == resolution.default != 512
    start = next(b for b in components if getattr(b, "elem_id", None) == "dreambooth_start")
    assert start.visible
    saved = json.loads(Path(shared.cmd_opts.ui_config_file).read_text(encoding="utf-8"))
    assert {k for k in saved if k.startswith("dreambooth/")} == set(old_file)  # and nothing more is written there
