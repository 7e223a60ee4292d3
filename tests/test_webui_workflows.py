"""What a WebUI user does in the first hour, through the extension's own script file in the stand-in v1.10.1 host:
cancel and resume, load the result and generate with it, read the model box, load results of unusual bases, and
be refused plainly. The stand-in behaves as the host does where these depend on it (torch.load replaced by its
checker, the checkpoint dropdown created after the tabs, the selected checkpoint loaded before each generation,
results built from the yaml beside them or a guessed config)."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import gradio as gr
import pytest
import safetensors.torch
import torch
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient
from ui_helpers import make_instance_images, quick_run_data

from dreambooth_ext import config as schema
from dreambooth_ext.models.checkpoint import read_checkpoint, read_safetensors_metadata
from dreambooth_ext.ui.tab import DEFAULT_PICK

pytest_plugins = ("webui_stub.fixtures",)

REPO = Path(__file__).resolve().parent.parent
UNET = "model.diffusion_model."


class Extension:
    """The extension loaded into a started stand-in host, its page built as the host builds it."""

    def __init__(self, webui, tmp_path: Path):
        from webui_stub import load_extension as loader

        (self.module,) = loader.load_scripts(REPO)
        loader.build_ui()
        self.webui = webui
        self.tab = self.module.tabs[0]
        self.images = make_instance_images(tmp_path / "photos")
        self.app = FastAPI()
        loader.start_app(self.app)
        self.api = TestClient(self.app)

    def values(self, project: str, **overrides) -> list:
        base_model = overrides.pop("base_model", "")  # empty: the loaded model
        data = quick_run_data(base_model, self.images, project=project, **overrides)
        return self.tab.form_values(schema.from_dict(data))

    def start(self, project: str, *, pick: str = DEFAULT_PICK, resume: bool = False, **overrides) -> list:
        handler = self.tab.resume if resume else self.tab.start
        return handler(f"task({project})", pick, None, *self.values(project, **overrides))

    def status(self) -> dict:
        return self.module.jobs.status()


@pytest.fixture
def extension(webui, tmp_path):
    ext = Extension(webui, tmp_path)
    yield ext
    ext.module.jobs.shutdown(30)


def unet_of(path) -> dict:
    return {k: v for k, v in read_checkpoint(path).items() if k.startswith(UNET)}


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def interrupt_at_step(webui, step: int) -> threading.Thread:
    """Press the host's Interrupt once its progress API shows `step` (as a user watching the bar would)."""

    def watch():
        deadline = time.time() + 120
        while time.time() < deadline:
            state = webui.shared.state
            if (state.textinfo or "").startswith("Training step") and state.sampling_step >= step:
                webui.shared.state.interrupt()
                return
            time.sleep(0.002)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


# ----------------------------------------------------------------------------------------------------------
# Item 1 and 7: cancel through the host's Interrupt, then resume, under the host's torch.load


def test_interrupt_then_resume_in_the_host_equals_an_uninterrupted_run(extension):
    webui = extension.webui
    assert torch.load.__module__ == "modules.safe"  # the host's checker is in place, as in a running WebUI
    steps = 30
    watcher = interrupt_at_step(webui, 2)
    outputs = extension.start("resumed", max_train_steps=steps)
    watcher.join(5)
    status = extension.status()
    assert status["state"] == "cancelled" and 2 <= status["step"] < steps, outputs[-1]
    assert "Resume continues from there" in status["message"]
    cancelled_at = status["step"]
    assert not webui.shared.state.interrupted  # the host's wrapper cleared it after the job

    outputs = extension.start("resumed", resume=True, max_train_steps=steps)
    status = extension.status()
    assert status["state"] == "finished" and status["step"] == steps, outputs[-1]
    assert status["losses"][0][0] == cancelled_at + 1  # continued, not from scratch
    assert not [r for r in webui.errors.reported if "malicious" in r]  # nothing went through the host's checker

    extension.start("straight", max_train_steps=steps)
    straight = extension.status()["checkpoints"][-1]
    assert max_difference(unet_of(status["checkpoints"][-1]), unet_of(straight)) < 1e-5


def wait_settled(api, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = api.get("/dreambooth/v1/status").json()
        if not status["active"]:
            return status
        time.sleep(0.05)
    raise AssertionError("the run did not end")


def test_api_cancel_then_resume_equals_an_uninterrupted_run(extension):
    api, steps = extension.api, 30
    data = quick_run_data("", extension.images, project="viaapi", max_train_steps=steps)
    assert api.post("/dreambooth/v1/start", json=data).status_code == 200
    deadline = time.time() + 120
    while api.get("/dreambooth/v1/status").json()["step"] < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert api.post("/dreambooth/v1/cancel").json()["cancelling"] is True
    status = wait_settled(api)
    assert status["state"] == "cancelled" and 2 <= status["step"] < steps, status
    assert api.post("/dreambooth/v1/start", json=data, params={"resume": "true"}).status_code == 200
    resumed = wait_settled(api)
    assert resumed["state"] == "finished" and resumed["step"] == steps, resumed
    straight = dict(data, project_name="viaapi_straight")
    assert api.post("/dreambooth/v1/start", json=straight).status_code == 200
    reference = wait_settled(api)["checkpoints"][-1]
    assert max_difference(unet_of(resumed["checkpoints"][-1]), unet_of(reference)) < 1e-5


# ----------------------------------------------------------------------------------------------------------
# Item 3: "Load this model now" (and the setting, and the API) make the result the selected checkpoint


def dropdown_wiring(webui, tab) -> bool:
    """Whether the page redraws the host's checkpoint dropdown when the tab's selection token changes."""
    dropdown = webui.shared.settings_components["sd_model_checkpoint"]
    for dependency in webui.shared.demo.dependencies:
        targets = [t[0] if isinstance(t, (list, tuple)) else t for t in dependency["targets"]]
        if tab.selection_token._id in targets and dependency["outputs"] == [dropdown._id]:
            return True
    return False


def test_load_now_selects_the_result_so_the_next_generation_uses_it(extension):
    webui, tab = extension.webui, extension.tab
    assert dropdown_wiring(webui, tab)
    old_title = webui.shared.opts.sd_model_checkpoint
    extension.start("loadme")
    path = extension.status()["checkpoints"][-1]

    message, token = tab.load_model()
    title = webui.shared.sd_model.sd_checkpoint_info.title
    assert "Loaded loadme/loadme_2.safetensors [" in message and token
    assert webui.shared.opts.sd_model_checkpoint == title != old_title
    dropdown = tab.checkpoint_dropdown_update()  # what the token's change event sends to the host's dropdown
    assert dropdown["value"] == title and title in dropdown["choices"]
    assert webui.generate().checkpoint_title == title  # the next txt2img keeps the trained model
    assert webui.shared.sd_model.sd_model_checkpoint == path


def test_the_load_after_training_setting_selects_the_result(extension):
    webui = extension.webui
    webui.shared.opts.dreambooth_load_after_training = True
    outputs = extension.start("autoload")
    assert "Loaded autoload/autoload_2.safetensors [" in outputs[-1]
    assert webui.generate().checkpoint_title.startswith("autoload/autoload_2.safetensors [")


def shown_load_state(tab) -> tuple[bool, bool]:
    """(Load button visible, the status says the result is the loaded model) as the page's next poll draws them."""
    outputs = tab.refresh(None)
    return outputs[3]["visible"], "the WebUI's loaded model" in outputs[-2]


def test_start_again_on_the_loaded_result_is_refused_and_leaves_the_file_alone(extension):
    """Seen in a real v1.10.1: with the result loaded, Start on the same project trained from it and wrote its
    result over that very file (the WebUI went on listing the old hash)."""
    webui = extension.webui
    webui.shared.opts.dreambooth_load_after_training = True
    extension.start("again")
    path = Path(extension.status()["checkpoints"][-1])
    before = path.read_bytes()
    assert webui.shared.sd_model.sd_checkpoint_info.filename == str(path)
    outputs = extension.start("again")
    assert "has the results of an earlier run" in outputs[-1] and path.name in outputs[-1]
    response = extension.api.post("/dreambooth/v1/start", json=quick_run_data("", extension.images, project="again"))
    assert response.status_code == 422 and "has the results of an earlier run" in response.text
    assert path.read_bytes() == before and extension.status()["state"] == "finished"


def test_the_tab_says_when_the_result_is_the_loaded_model(extension):
    """After the setting or the button loaded the result, the page's polls neither offer to load it again nor
    drop the news; once the user picks another checkpoint, the button is back."""
    from dreambooth_ext.hosts.webui import load_checkpoint_now

    webui, tab = extension.webui, extension.tab
    extension.start("shown")
    assert shown_load_state(tab) == (True, False)
    tab.load_model()
    assert shown_load_state(tab) == (False, True)
    load_checkpoint_now("tiny_sd1.safetensors")
    assert shown_load_state(tab) == (True, False)

    webui.shared.opts.dreambooth_load_after_training = True
    extension.start("shown_auto")
    assert shown_load_state(tab) == (False, True)


def test_what_the_host_appends_to_the_status_stays_while_the_page_polls(extension):
    """The host adds "Time taken" (and the peak VRAM, on a GPU) under the last output of Start; the polls that
    follow the run leave an unchanged status alone instead of drawing it again without that line."""
    tab = extension.tab
    outputs = extension.start("timed")
    assert "Time taken" in outputs[-1]
    assert "<b>timed</b>: finished</p>" in outputs[-1]  # the phase only when it says more than the state
    seen = outputs[2]
    for _ in range(3):
        polled = tab.refresh(seen)
        assert polled[-2] == gr.update(), polled[-2]
        seen = polled[2]
    tab.load_model()  # the status changes (the result is now the loaded model): it is drawn again
    assert "the WebUI's loaded model" in tab.refresh(seen)[-2]


def test_load_best_selects_the_learning_monitors_best_saved_step(extension):
    """A run with saves ends; "Load best" (beside "Load this model now") loads the file of the step the monitor
    chose, the host's dropdown follows, the next generation uses it, and the button goes once it is loaded."""
    webui, tab = extension.webui, extension.tab
    outputs = extension.start("best", save_every_n_steps=1)  # saves at steps 1 and 2
    status = extension.status()
    best = status["monitor"]["best_step"]
    assert status["state"] == "finished" and best in (1, 2), outputs[-1]
    assert outputs[5] == gr.update(value=f"Load best (step {best})", visible=True)
    assert outputs[4]["visible"] and f"Best saved step: {best}." in outputs[4]["caption"]

    message, token = tab.load_best()
    title = webui.shared.sd_model.sd_checkpoint_info.title
    assert f"Loaded best/best_{best}.safetensors [" in message and token
    assert webui.shared.sd_model.sd_checkpoint_info.filename == str(Path(status["checkpoints"][-1]).with_name(
        f"best_{best}.safetensors"))
    assert tab.checkpoint_dropdown_update()["value"] == title == webui.shared.opts.sd_model_checkpoint
    assert webui.generate().checkpoint_title == title
    assert tab.refresh(None)[5]["visible"] is False  # loaded: nothing left to do


def test_api_load_selects_a_checkpoint_by_path_or_title(extension):
    webui, api = extension.webui, extension.api
    extension.start("viaapi")
    path = extension.status()["checkpoints"][-1]
    response = api.post("/dreambooth/v1/load", json={"checkpoint": path})
    assert response.status_code == 200, response.text
    title = response.json()["loaded"]
    assert title.startswith("viaapi/viaapi_2.safetensors [") and webui.generate().checkpoint_title == title

    response = api.post("/dreambooth/v1/load", json={"checkpoint": "tiny_sd1.safetensors"})
    assert response.status_code == 200 and webui.generate().checkpoint_title == response.json()["loaded"]
    for body in ({"checkpoint": "no_such_model"}, {"checkpoint": "/etc/passwd"}, {}):
        response = api.post("/dreambooth/v1/load", json=body)
        assert response.status_code == 422, (body, response.text)
    assert webui.generate().checkpoint_title.startswith("tiny_sd1.safetensors")


def test_a_webui_started_with_ckpt_keeps_the_selected_result(make_webui, tmp_path):
    """The host's list_models() selects the --ckpt file again on every re-scan: publishing a result or redrawing
    the dropdown must not undo the user's choice (seen in a real v1.10.1 started with --ckpt)."""
    webui = make_webui(ckpt=True)
    ext = Extension(webui, tmp_path)
    ext.start("first")
    ext.tab.load_model()
    title = webui.shared.sd_model.sd_checkpoint_info.title
    assert title.startswith("first/first_2.safetensors [") and webui.shared.opts.sd_model_checkpoint == title
    assert ext.tab.checkpoint_dropdown_update()["value"] == title  # the redraw after Load keeps it
    ext.start("second")  # trains the selected model; its result is published (the list re-scanned)
    assert webui.shared.opts.sd_model_checkpoint == title
    assert webui.generate().checkpoint_title == title  # the next txt2img keeps the user's model
    loaded = ext.api.post("/dreambooth/v1/load", json={"checkpoint": ext.status()["checkpoints"][-1]}).json()
    assert webui.generate().checkpoint_title == loaded["loaded"] == webui.shared.opts.sd_model_checkpoint


def test_api_load_needs_the_api_credentials(make_webui, tmp_path):
    webui = make_webui("--api-auth", "me:secret")
    ext = Extension(webui, tmp_path)
    assert ext.api.post("/dreambooth/v1/load", json={"checkpoint": "tiny_sd1.safetensors"}).status_code == 401
    ok = ext.api.post("/dreambooth/v1/load", json={"checkpoint": "tiny_sd1.safetensors"}, auth=("me", "secret"))
    assert ok.status_code == 200


# ----------------------------------------------------------------------------------------------------------
# Item 4: the model box shows what will be trained, from page load on


def test_model_box_follows_the_loaded_model_from_page_load(make_webui, tmp_path):
    webui = make_webui(load=False)  # the host loads its model after building the UI
    ext = Extension(webui, tmp_path)
    assert "No checkpoint is loaded" in ext.tab.model_html.value
    webui.load()
    outputs = ext.tab.refresh(None)  # the page's first poll
    info = webui.shared.sd_model.sd_checkpoint_info
    assert f"<b>{info.name}</b>" in outputs[-1] and outputs[-1].count(info.shorthash) == 1
    assert "No checkpoint is loaded" not in outputs[-1]
    seen = outputs[2]
    assert ext.tab.refresh(seen)[-1] == gr.update()  # unchanged: not sent again

    webui.write_checkpoint("other.safetensors", seed=5)
    webui.load("other.safetensors")  # the user picks another checkpoint at the top of the page
    assert "<b>other.safetensors</b>" in ext.tab.refresh(seen)[-1]


def test_a_run_trains_the_selected_checkpoint_when_memory_holds_another(make_webui, tmp_path):
    """Seen in a real v1.10.1 started with --ckpt: POST /sdapi/v1/refresh-checkpoints selects the --ckpt file again
    while another checkpoint stays in memory until the next generation loads the selection. A run does as a
    generation does (it trains the selected checkpoint), and the model box names that one from then on."""
    webui = make_webui(ckpt=True)
    webui.write_checkpoint("other.safetensors", seed=5)
    webui.load("other.safetensors")  # picked in the dropdown: selected and loaded
    ext = Extension(webui, tmp_path)
    seen = ext.tab.refresh(None)[2]  # a page open from here on
    webui.api_refresh_checkpoints()
    selected = webui.sd_models.select_checkpoint()
    assert selected.filename == str(webui.checkpoint)
    assert webui.shared.sd_model.sd_checkpoint_info.name == "other.safetensors"  # still in memory

    box = ext.tab.refresh(seen)[-1]  # the page's next poll redraws the box: the selection changed
    assert f"<b>{selected.name}</b>" in box and selected.shorthash in box and "(sd1" in box and "other" not in box
    assert "<b>tiny_sd1.safetensors</b>" in ext.tab.model_box(DEFAULT_PICK)

    ext.start("selected")
    status = ext.status()
    assert status["state"] == "finished", status
    metadata = read_safetensors_metadata(status["checkpoints"][-1])
    assert metadata["dreambooth.base_model"] == selected.name
    assert metadata["dreambooth.base_model_hash"] == selected.shorthash
    assert webui.shared.sd_model.sd_checkpoint_info.filename == selected.filename
    assert webui.generate().checkpoint_title == selected.title  # the next generation has nothing to swap


def test_model_box_shows_the_checkpoint_picked_in_the_tab_and_the_prediction_type(make_webui, tmp_path):
    """Seen in a real v1.10.1: with another checkpoint picked under "Train another checkpoint", the box went on
    naming the loaded model (an SD2-v one) while the run trained the picked SD1 file."""
    webui = make_webui()
    webui.write_checkpoint("tiny_sd2v.safetensors", family="sd2", seed=2, parameterization="v")
    webui.load("tiny_sd2v.safetensors")
    ext = Extension(webui, tmp_path)
    tab = ext.tab
    assert dependency_wiring(webui, tab.checkpoint_pick, tab.model_html)  # the box follows the picker
    loaded = tab.model_box(DEFAULT_PICK)
    assert "<b>tiny_sd2v.safetensors</b>" in loaded and "(sd2, v-prediction)" in loaded
    picked = tab.model_box("tiny_sd1.safetensors")
    assert "<b>tiny_sd1.safetensors</b>" in picked and "(sd1, noise prediction)" in picked and "picked below" in picked
    seen = tab.refresh(None, "tiny_sd1.safetensors")[2]
    webui.load("tiny_sd1.safetensors")  # a model load redraws the box: still the picked checkpoint's
    assert "picked below" in tab.refresh(seen, "tiny_sd1.safetensors")[-1]
    # Start and Resume clear what Check dataset showed: the run's status shows its own check (not twice)
    assert dependency_wiring(webui, tab.start_button, tab.dataset_report)
    assert dependency_wiring(webui, tab.resume_button, tab.dataset_report)
    gone = tab.model_box("gone.safetensors")  # listed when the page was built, deleted since
    assert "dreambooth-warning" in gone and "gone.safetensors" in gone and "neither a file nor a checkpoint" in gone


def dependency_wiring(webui, source, target) -> bool:
    """Whether the page has an event of `source` that updates `target`."""
    return any(source._id in [t[0] if isinstance(t, (list, tuple)) else t for t in dependency["targets"]]
               and target._id in dependency["outputs"] for dependency in webui.shared.demo.dependencies)


# ----------------------------------------------------------------------------------------------------------
# Item 5: results load in the host whenever their base did


def host_loads(webui, path) -> object:
    webui.sd_models.list_models()
    info = webui.sd_models.get_closet_checkpoint_match(os.path.relpath(path, webui.sd_models.model_path))
    return webui.sd_models.reload_model_weights(info=info)


def test_a_result_of_a_base_with_its_own_yaml_loads_with_that_config(extension):
    webui = extension.webui
    base_yaml = webui.checkpoint.with_suffix(".yaml").read_text()
    extension.start("custom")
    path = Path(extension.status()["checkpoints"][-1])
    assert path.with_suffix(".yaml").read_text() == base_yaml
    model = host_loads(webui, path)
    assert model.sd_model_checkpoint == str(path) and model.used_config == str(path.with_suffix(".yaml"))

    host_loads(webui, webui.checkpoint)
    path.with_suffix(".yaml").unlink()  # what results looked like before: the host guesses SD1.5 and fails
    with pytest.raises(RuntimeError, match="size mismatch"):
        host_loads(webui, path)


def test_a_v_prediction_base_gives_a_v_prediction_result_the_host_loads(extension):
    webui = extension.webui
    webui.write_checkpoint("tiny_sd2v.safetensors", family="sd2", seed=2, parameterization="v")
    webui.load("tiny_sd2v.safetensors")
    assert webui.shared.sd_model.parameterization == "v"
    extension.start("vmodel")
    path = Path(extension.status()["checkpoints"][-1])
    config = yaml.safe_load(path.with_suffix(".yaml").read_text())["model"]["params"]
    assert config["parameterization"] == "v"
    assert read_safetensors_metadata(path)["modelspec.prediction_type"] == "v"
    assert host_loads(webui, path).parameterization == "v"


def test_a_generated_yaml_follows_the_base_it_describes(extension, tmp_path):
    """No yaml beside the base (a v-model named as such only in the options): the yaml written from the model's
    own shapes (heads included) must load in the host."""
    webui = extension.webui
    base = webui.write_checkpoint("bare_sd2.safetensors", family="sd2", seed=2, folder=tmp_path, with_yaml=False)
    extension.start("bare", base_model=str(base), prediction_type="v_prediction")
    path = Path(extension.status()["checkpoints"][-1])
    params = yaml.safe_load(path.with_suffix(".yaml").read_text())["model"]["params"]
    assert params["parameterization"] == "v" and params["unet_config"]["params"]["model_channels"] == 32
    assert host_loads(webui, path).parameterization == "v"


def test_sdxl_loaded_in_the_host_trains_from_the_tab_and_its_result_is_listed_and_loads(extension):
    """The live DiffusionEngine (hijack wrappers, cond_stage_model pointing at the conditioner, fp16 weights and
    sigmas): read back to the file's layout, trained, written in the host's SDXL layout with the base's sgm yaml."""
    import json

    webui = extension.webui
    base_path = webui.write_checkpoint("tiny_sdxl.safetensors", family="sdxl", seed=4)
    webui.load("tiny_sdxl.safetensors")
    assert webui.shared.sd_model.is_sdxl and next(webui.shared.sd_model.parameters()).dtype == torch.float16
    assert "tiny_sdxl" in extension.tab._summary_html() and "(sdxl)" in extension.tab._summary_html()
    assert "dreambooth-warning" not in extension.tab._summary_html()
    outputs = extension.start("xl")
    assert "data-state='finished'" in outputs[-1], outputs[-1]
    path = Path(extension.status()["checkpoints"][-1])
    webui.sd_models.list_models()
    assert any(title.startswith("xl/xl_2.safetensors") for title in webui.sd_models.checkpoint_tiles())
    trained, base = read_checkpoint(path), read_checkpoint(base_path)
    layout = json.loads((REPO / "tests" / "host_layouts" / "tiny-sdxl.json").read_text())["tensors"]
    assert {k: list(v.shape) for k, v in trained.items()} == {k: v["shape"] for k, v in layout.items()}
    frozen = [k for k in base if k.startswith(("conditioner.", "first_stage_model."))]
    assert all(torch.equal(trained[k], base[k].half().float()) for k in frozen if base[k].is_floating_point())
    # The host halved its sigmas; the result has them rebuilt from its fp32 alphas_cumprod, not fp16-rounded.
    assert torch.allclose(trained["denoiser.sigmas"], base["denoiser.sigmas"], rtol=1e-5)
    assert not torch.equal(trained["denoiser.sigmas"], base["denoiser.sigmas"].half().float())
    assert path.with_suffix(".yaml").read_text() == base_path.with_suffix(".yaml").read_text()
    assert host_loads(webui, path).is_sdxl


def test_a_v_pred_marker_the_host_drops_is_read_from_the_file(extension, tmp_path):
    from webui_stub.tiny import tiny_state_dict, tiny_yaml

    from dreambooth_ext.hosts.webui import WebUIHost

    webui = extension.webui
    path = Path(webui.sd_models.model_path) / "vpred_xl.safetensors"
    safetensors.torch.save_file({**tiny_state_dict("sdxl", 5), "v_pred": torch.tensor([])}, str(path))
    path.with_suffix(".yaml").write_text(tiny_yaml("sdxl"))  # EpsScaling: v1.10.1 knows no v_pred key
    webui.load("vpred_xl.safetensors")
    assert "v_pred" not in webui.shared.sd_model.state_dict()
    bundle = WebUIHost().load_base(schema.from_dict(quick_run_data("", extension.images)))
    assert bundle.prediction_type == "v_prediction" and "v_pred" in bundle.base


def test_a_lora_trained_from_the_tab_is_in_the_hosts_lora_folder_and_list_at_once(make_webui, tmp_path):
    lora_dir = tmp_path / "my loras"
    webui = make_webui("--lora-dir", str(lora_dir))
    extension = Extension(webui, tmp_path)
    try:
        import networks

        outputs = extension.start("style", train_mode="lora", lora_rank=4)
        assert "data-state='finished'" in outputs[-1], outputs[-1]
        status = extension.status()
        assert status["loras"] == [str(lora_dir / "style" / "style_2.safetensors")] and not status["checkpoints"]
        assert "&lt;lora:style_2:1&gt;" in outputs[-1]  # the text to paste into a prompt
        listed = networks.available_networks["style_2"]  # refreshed: no restart, no refresh click
        assert listed.alias == "style_2" and listed.sd_version == "SD1"
        found = networks.match(webui.shared.sd_model, read_checkpoint(status["loras"][0]))
        assert found.layers and not found.failed
    finally:
        extension.module.jobs.shutdown(30)


def test_a_new_loras_card_is_in_the_lora_tab_of_txt2img_and_img2img(make_webui, tmp_path):
    """Seen in a real v1.10.1: each of txt2img and img2img keeps its Lora cards' HTML and serves it to every page
    load, so the card of a LoRA trained since the first page load showed only after a press of the tab's Refresh.
    The run refreshes the Lora page as that button does, but not the Checkpoints page (whose refresh selects the
    --ckpt file again: the user's selection stays)."""
    webui = make_webui(ckpt=True)
    webui.write_checkpoint("other.safetensors", seed=5)
    webui.load("other.safetensors")
    extension = Extension(webui, tmp_path)
    tabs = ("txt2img", "img2img")
    for tab in tabs:  # a page loaded before the run: the cards are built and kept
        assert "data-name='style_2'" not in webui.page_load(f"{tab}_lora_cards_html")
    selected = webui.shared.opts.sd_model_checkpoint

    outputs = extension.start("style", train_mode="lora", lora_rank=4)
    assert "data-state='finished'" in outputs[-1], outputs[-1]
    for tab in tabs:  # a page loaded now shows the new card
        assert "data-name='style_2'" in webui.page_load(f"{tab}_lora_cards_html"), tab
    assert webui.shared.opts.sd_model_checkpoint == selected
    assert "Its card is in the Lora tab of txt2img and img2img" in outputs[-1]
    extension.module.jobs.shutdown(30)


def test_the_tab_lists_the_gpus_and_a_run_on_another_device_leaves_the_hosts_model(make_webui, tmp_path,
                                                                                     monkeypatch):
    from dreambooth_ext.train import devices

    monkeypatch.setattr(devices, "gpus", lambda: [(0, "Fake GPU A", 3.5, 24.0), (1, "Fake GPU B", 20.25, 48.0)])
    webui = make_webui(device="cuda")  # the host generates on its (fake) GPU
    extension = Extension(webui, tmp_path)
    try:
        choices = [c[0] if isinstance(c, (list, tuple)) else c for c in extension.tab.widgets["device"].choices]
        assert choices[:3] == ["auto", "cuda:0 (Fake GPU A, 3.5 of 24.0 GiB free)",
                               "cuda:1 (Fake GPU B, 20.2 of 48.0 GiB free)"] and "cpu" in choices
        assert devices.resolve_device("cpu (picked in the tab)") == torch.device("cpu")
        live = webui.shared.sd_model
        moves = len(live.moves)
        outputs = extension.start("elsewhere", device="cpu")  # trained elsewhere: the host keeps its model
        assert "data-state='finished'" in outputs[-1] and live.moves[moves:] == []
        assert live.device == torch.device("cuda")
    finally:
        extension.module.jobs.shutdown(30)


def test_several_gpus_from_the_tab_train_in_child_processes_and_stop_on_interrupt(make_webui, tmp_path,
                                                                                     monkeypatch):
    """The tab's gpus choice: shown with two (fake) GPUs, the run goes to `accelerate launch` on the loaded
    model's file (on this CPU machine the processes train on the CPU), its progress reaches the host's bar and
    the tab, the host's Interrupt stops it with its state kept, Resume finishes it, and the result is listed."""
    from dreambooth_ext.train import devices

    monkeypatch.setattr(devices, "gpus", lambda: [(0, "Fake GPU A", 3.5, 24.0), (1, "Fake GPU B", 20.25, 48.0)])
    webui = make_webui()
    extension = Extension(webui, tmp_path)
    try:
        widget = extension.tab.widgets["gpus"]
        assert widget.visible and [c[0] if isinstance(c, (list, tuple)) else c for c in widget.choices] == [
            "", "all", "0,1"]
        steps = 40
        watcher = interrupt_at_step(webui, 2)
        outputs = extension.start("pair", gpus="0,1", max_train_steps=steps, train_batch_size=2)
        watcher.join(5)
        status = extension.status()
        assert status["state"] == "cancelled" and 2 <= status["step"] < steps, outputs[-1]
        assert (webui.models_dir / "dreambooth" / "pair" / "state" / "state.json").is_file()

        outputs = extension.start("pair", resume=True, gpus="0,1", max_train_steps=steps, train_batch_size=2)
        status = extension.status()
        assert status["state"] == "finished" and status["step"] == steps, outputs[-1]
        (result,) = status["checkpoints"]
        assert Path(result).name == f"pair_{steps}.safetensors" and Path(result).is_file()
        assert any(title.startswith(f"pair/pair_{steps}.safetensors")
                   for title in webui.sd_models.checkpoint_tiles())  # listed at once
        assert status["losses"]  # the child's progress reached the tab
    finally:
        extension.module.jobs.shutdown(30)


def test_without_two_gpus_the_tab_hides_the_several_gpus_choice(extension):
    assert extension.tab.widgets["gpus"].visible is False


def test_deepspeed_offload_from_the_tab_trains_in_a_child_process(make_webui, tmp_path, monkeypatch):
    """Shown where deepspeed is installed (the test setup installs it): the run goes to `accelerate launch` with
    the ZeRO-2 offload configuration on the loaded model's file, and its result is listed."""
    webui = make_webui()
    extension = Extension(webui, tmp_path / "with")
    try:
        assert extension.tab.widgets["deepspeed_offload"].visible
        outputs = extension.start("zero", deepspeed_offload=True, max_train_steps=3)
        status = extension.status()
        assert status["state"] == "finished" and status["step"] == 3, outputs[-1]
        (result,) = status["checkpoints"]
        assert any(title.startswith("zero/zero_3.safetensors") for title in webui.sd_models.checkpoint_tiles())
        log = (Path(result).parents[2] / "dreambooth" / "zero" / "launch.log").read_text()
        assert "DeepSpeed ZeRO stage 2 on 1 process(es)" in log
    finally:
        extension.module.jobs.shutdown(30)


def test_without_deepspeed_the_tab_hides_its_option(webui, tmp_path, monkeypatch):
    """And compile_unet where torch cannot compile a module (before 2.2, e.g. the WebUI's default 2.1)."""
    from dreambooth_ext.ui import adapter

    extension = Extension(webui, tmp_path / "all")
    try:
        assert extension.tab.widgets["compile_unet"].visible is not False
    finally:
        extension.module.jobs.shutdown(30)
    monkeypatch.setattr(adapter, "deepspeed_installed", lambda: False)
    monkeypatch.delattr(torch.nn.Module, "compile")
    extension = Extension(webui, tmp_path / "fewer")
    try:
        assert extension.tab.widgets["deepspeed_offload"].visible is False
        assert extension.tab.widgets["compile_unet"].visible is False
    finally:
        extension.module.jobs.shutdown(30)


# ----------------------------------------------------------------------------------------------------------
# Item 6: expected refusals are refusals, not crashes


def write_refiner_header(folder: Path) -> Path:
    path = folder / "sdxl_refiner.safetensors"
    safetensors.torch.save_file({"conditioner.embedders.0.model.ln_final.weight":
                                 torch.zeros(2), UNET + "input_blocks.0.0.weight": torch.zeros(2)}, str(path))
    return path


def no_tracebacks(caplog, webui) -> bool:
    return not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR] and not webui.errors.reported


def test_refusals_come_before_the_run_without_tracebacks(extension, caplog):
    webui, api = extension.webui, extension.api
    write_refiner_header(Path(webui.sd_models.model_path))
    webui.sd_models.list_models()
    data = quick_run_data("", extension.images, project="refused")
    with caplog.at_level(logging.INFO):
        for checkpoint, words in (("sdxl_refiner.safetensors", "SDXL refiner"),
                                  ("no such title", "neither a file nor")):
            response = api.post("/dreambooth/v1/start", json=data, params={"checkpoint": checkpoint})
            assert response.status_code == 422 and words in str(response.json()), response.text
            outputs = extension.start("refused", pick=checkpoint)
            assert "dreambooth-error" in outputs[-1] and words in outputs[-1]
        assert extension.status()["state"] == "idle"  # nothing started

        webui.shared.opts.fp8_storage = "Enable"
        webui.sd_models.reload_model_weights(forced_reload=True)  # the host now holds fp8 weights
        response = api.post("/dreambooth/v1/start", json=data)
        assert response.status_code == 422 and "FP8 weight" in str(response.json())
        assert "FP8 weight" in extension.start("refused")[-1]
    assert extension.status()["state"] == "idle"
    assert no_tracebacks(caplog, webui), [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_unexpected_failures_keep_their_traceback(extension, caplog, monkeypatch):
    from dreambooth_ext.hosts.webui import WebUIHost

    def broken(self, config):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(WebUIHost, "load_base", broken)
    with caplog.at_level(logging.INFO):
        extension.start("buggy")
    assert extension.status()["state"] == "failed" and "ZeroDivisionError" in extension.status()["error"]
    assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)


# ----------------------------------------------------------------------------------------------------------
# Item 8: one ETA, readable files, no leftovers, the trained resolution


def test_progress_text_has_no_second_eta(extension):
    seen = []
    original = extension.module.webui.WebUIHost.report

    def spy(host, progress):
        original(host, progress)
        if progress.phase == "training":
            answer = extension.webui.progress.progressapi(
                extension.webui.progress.ProgressRequest(id_task="task(eta)"))
            seen.append((progress, answer, extension.webui.shared.state.textinfo))

    extension.module.webui.WebUIHost.report = spy
    try:
        extension.start("eta", max_train_steps=4)
    finally:
        extension.module.webui.WebUIHost.report = original
    progress, answer, text = seen[1]
    assert "ETA" not in text and text.startswith("Training step 2/4")
    assert answer.eta == pytest.approx(progress.eta_s, rel=0.1, abs=0.05)  # the bar's ETA is the run's own


def test_results_are_readable_leftovers_removed_resolution_recorded(extension):
    webui = extension.webui
    folder = Path(webui.sd_models.model_path) / "tidy"
    folder.mkdir(parents=True)
    leftovers = [folder / ".tidy_100.safetensors.abc123.partial", folder / ".tidy_100.yaml.def456.partial"]
    for leftover in leftovers:
        leftover.write_bytes(b"half")
    other = folder / ".other_1.safetensors.x.partial"  # not this project's
    other.write_bytes(b"half")
    state_partial = Path(extension.module.webui.dreambooth_dir()) / "tidy" / "state.partial"
    state_partial.mkdir(parents=True)

    extension.start("tidy")
    path = Path(extension.status()["checkpoints"][-1])
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert path.with_suffix(".yaml").stat().st_mode & 0o777 == 0o666 & ~umask
    assert not any(p.exists() for p in leftovers) and other.exists() and not state_partial.exists()
    assert read_safetensors_metadata(path)["modelspec.resolution"] == "64x64"
