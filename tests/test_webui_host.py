"""WebUIHost against the stand-in WebUI v1.10.1 host (tests/webui_stub): the live model, folders, device, progress."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from webui_stub.fake_model import FakeSDModel
from webui_stub.load_extension import build_ui, load_scripts
from webui_stub.tiny import tiny_state_dict

from dreambooth_ext.config import from_dict
from dreambooth_ext.errors import DreamboothError
from dreambooth_ext.hosts import webui as webui_host
from dreambooth_ext.hosts.webui import WebUIHost
from dreambooth_ext.models.export import build_checkpoint
from dreambooth_ext.train.run import Progress, TrainingRun
from dreambooth_ext.ui import render

pytest_plugins = ("webui_stub.fixtures",)  # the make_webui and webui fixtures

SCHEDULE = ("betas", "alphas_cumprod", "alphas_cumprod_prev")


def config(instance_dir: Path | str = "/nonexistent", **overrides):
    data = {"project_name": "proj", "resolution": 64, "max_train_steps": 2, "learning_rate": 1e-3, "seed": 3,
            "prior_preservation": False, "device": "cpu", "save_precision": "fp32",
            "concepts": [{"instance_dir": str(instance_dir), "token": "ohwx", "class_word": "toy"}]}
    data.update(overrides)
    return from_dict(data)


@pytest.fixture
def instance_dir(tmp_path) -> Path:
    folder = tmp_path / "instance"
    folder.mkdir()
    for i, color in enumerate([(200, 30, 30), (30, 200, 30)]):
        Image.new("RGB", (64, 64), color).save(folder / f"img{i}.png")
    return folder


def assert_fp16_of(base: dict, original: dict, keys=None) -> None:
    """Every weight is exactly the fp16 rounding of the original: the UNet's upcast to fp32 (it trains), the
    others as the host holds them (fp16: frozen, they are never copied to fp32)."""
    for key in keys or original:
        if key in SCHEDULE:
            continue
        unet = key.startswith("model.diffusion_model.")
        assert base[key].dtype == (original[key].dtype if unet else torch.float16), key
        assert torch.equal(base[key].to(original[key].dtype), original[key].half().to(original[key].dtype)), key


# ----------------------------------------------------------------------------------------------------------
# Reading the live model


def test_live_fp16_model_gives_clean_bundle_in_file_layout(webui):
    live = webui.shared.sd_model
    assert live.state_dict()["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert any(k.startswith("cond_stage_model.wrapped.") for k in live.state_dict())

    bundle = WebUIHost().load_base(config())

    original = tiny_state_dict()
    assert set(bundle.base) == set(original)
    assert_fp16_of(bundle.base, original)
    # The halved schedule is rebuilt from the fp32 alphas_cumprod the host keeps.
    for key in SCHEDULE:
        assert bundle.base[key].dtype == torch.float32
        torch.testing.assert_close(bundle.base[key], original[key], rtol=1e-4, atol=1e-7)
    assert bundle.family.name == "sd1" and bundle.prediction_type == "epsilon"
    assert bundle.source.name == "tiny_sd1.safetensors"
    assert bundle.source.short_hash == live.sd_checkpoint_info.shorthash and len(bundle.source.sha256) == 64
    # Our copy never aliases the host's tensors.
    live_ptrs = {t.data_ptr() for t in live.state_dict().values()}
    assert not live_ptrs & {t.data_ptr() for t in bundle.base.values()}

    exported = build_checkpoint(bundle, bundle.unet, text_encoders=bundle.text_encoders, precision="fp32")
    assert set(exported) == set(original)
    assert not [k for k in exported if ".wrapped." in k]


def test_no_half_host_gives_the_exact_weights(make_webui):
    make_webui("--no-half")
    bundle = WebUIHost().load_base(config())
    original = tiny_state_dict()
    for key, value in original.items():
        assert torch.equal(bundle.base[key], value), key


def test_v_parameterization_and_explicit_prediction_type(webui):
    webui.shared.sd_model.parameterization = "v"
    assert WebUIHost().load_base(config()).prediction_type == "v_prediction"
    assert WebUIHost().load_base(config(prediction_type="epsilon")).prediction_type == "epsilon"


def test_fp8_storage_is_refused_naming_the_setting(webui):
    webui.shared.opts.data["fp8_storage"] = "Enable"
    webui.load()  # the host reloads when the fp8 setting no longer matches
    assert webui.shared.sd_model.state_dict()["model.diffusion_model.out.2.weight"].dtype == torch.float8_e4m3fn

    with pytest.raises(DreamboothError, match=r"Settings > Optimizations > FP8 weight") as caught:
        WebUIHost().load_base(config())
    assert "Disable" in str(caught.value)
    assert "FP8 weight" in webui_host.loaded_model_summary()["problem"]


def test_lora_applied_in_place_is_undone_from_the_hosts_backup(webui):
    live = webui.shared.sd_model
    patched = live.apply_lora(strength=0.1)
    assert patched
    key = patched[0] + ".weight"
    original = tiny_state_dict()
    file_key = key.replace("cond_stage_model.wrapped.", "cond_stage_model.")
    assert not torch.equal(live.state_dict()[key].float(), original[file_key].half().float())

    bundle = WebUIHost().load_base(config())

    assert_fp16_of(bundle.base, original)
    assert webui_host.loaded_model_summary()["problem"] is None
    # The host's model keeps its LoRA: we only fixed our copy.
    assert live.lora_layers()[0][1].network_current_names


def test_lora_on_sd2_multihead_attention_is_undone(webui):
    webui.write_checkpoint("tiny_sd2.safetensors", family="sd2")
    live = webui.load("tiny_sd2")
    assert live.is_sd2
    patched = live.apply_lora(strength=0.1)
    assert any(name.endswith(".attn") for name in patched)  # OpenCLIP's in_proj_weight/out_proj

    bundle = WebUIHost().load_base(config())

    assert bundle.family.name == "sd2"
    assert_fp16_of(bundle.base, tiny_state_dict("sd2"))


def test_lora_without_backup_is_refused_with_the_fix(webui):
    webui.shared.sd_model.apply_lora(backup=False)
    with pytest.raises(DreamboothError, match=r"remove every <lora:\.\.\.> from the prompt") as caught:
        WebUIHost().load_base(config())
    assert "reload the checkpoint" in str(caught.value)


def test_generation_without_lora_leaves_clean_weights(webui):
    live = webui.shared.sd_model
    live.apply_lora(strength=0.1)
    live.generate_without_lora()
    assert_fp16_of(WebUIHost().load_base(config()).base, tiny_state_dict())


def test_external_vae_in_use_is_trained_with(webui):
    webui.write_vae("other.vae.safetensors", seed=7)
    webui.select_vae("other.vae.safetensors")
    assert webui.sd_vae.loaded_vae_file.endswith("other.vae.safetensors")

    bundle = WebUIHost().load_base(config())

    other = tiny_state_dict("sd1", 7)
    vae_keys = [k for k in other if k.startswith("first_stage_model.")]
    assert_fp16_of(bundle.base, other, vae_keys)
    assert_fp16_of(bundle.base, tiny_state_dict(), [k for k in other if k.startswith("model.diffusion_model.")])
    assert bundle.source.vae_name == "other.vae.safetensors"
    assert webui_host.loaded_model_summary()["vae"] == "other.vae.safetensors"

    webui.select_vae("None")  # back to the checkpoint's own VAE
    assert_fp16_of(WebUIHost().load_base(config()).base, tiny_state_dict(), vae_keys)


def test_no_loaded_model_and_an_sdxl_refiner_are_refused(webui):
    webui.shared.sd_model = None  # a failed load leaves it None
    assert webui_host.loaded_model_summary()["problem"] == webui_host.NO_MODEL
    with pytest.raises(DreamboothError, match="No checkpoint is loaded: pick one in the"):
        WebUIHost().load_base(config())

    sd = tiny_state_dict()
    sd["conditioner.embedders.0.model.ln_final.weight"] = torch.ones(4)
    sd["denoiser.sigmas"] = torch.ones(1000)
    webui.shared.sd_model = FakeSDModel(sd, checkpoint_info=webui.sd_models.select_checkpoint())
    assert webui_host.loaded_model_summary()["family"] == "sdxl"
    assert "SDXL refiner" in webui_host.loaded_model_summary()["problem"]
    with pytest.raises(DreamboothError, match="SDXL refiner"):
        WebUIHost().load_base(config())


def test_summary_names_the_loaded_checkpoint(webui):
    summary = webui_host.loaded_model_summary()
    info = webui.shared.sd_model.sd_checkpoint_info
    assert summary == {"title": info.name, "hash": info.shorthash, "vae": "", "family": "sd1", "prediction": "",
                       "problem": None}
    assert f"{summary['title']} [{summary['hash']}]" in webui_host.checkpoint_titles()
    assert render.model_summary_html(summary).count(info.shorthash) == 1  # the hash is shown once


def test_a_checkpoint_title_or_path_is_read_from_disk(webui):
    webui.write_checkpoint("other.safetensors", seed=5)
    webui.sd_models.list_models()
    other = tiny_state_dict("sd1", 5)
    for host, cfg in ((WebUIHost("other.safetensors"), config()),
                      (WebUIHost(), config(base_model=str(webui.checkpoint.parent / "other.safetensors")))):
        bundle = host.load_base(cfg)
        assert all(torch.equal(bundle.base[k], other[k]) for k in other)  # full precision, from the file
        assert bundle.source.name == "other.safetensors"
    with pytest.raises(DreamboothError, match="neither a file nor a checkpoint"):
        WebUIHost("missing-model").load_base(config())


# ----------------------------------------------------------------------------------------------------------
# Folders


def test_paths_follow_models_dir_ckpt_dir_and_dreambooth_dir(make_webui, tmp_path):
    make_webui("--models-dir", str(tmp_path / "m"))
    host = WebUIHost()
    assert host.checkpoint_path("proj", 5) == tmp_path / "m" / "Stable-diffusion" / "proj" / "proj_5.safetensors"
    assert host.work_dir("proj") == tmp_path / "m" / "dreambooth" / "proj"

    make_webui("--ckpt-dir", str(tmp_path / "ck"), "--dreambooth-dir", str(tmp_path / "db"))
    assert host.checkpoint_path("proj", 5) == tmp_path / "ck" / "proj" / "proj_5.safetensors"
    assert host.work_dir("proj") == tmp_path / "db" / "proj"
    assert webui_host.dreambooth_dir() == tmp_path / "db"


def test_publish_makes_the_file_appear_in_the_checkpoint_list(webui):
    host = WebUIHost()
    path = host.checkpoint_path("proj", 7)
    webui.write_checkpoint(path.name, folder=path.parent)
    assert "proj/proj_7.safetensors" not in webui.sd_models.checkpoint_tiles()
    host.publish(path)
    assert "proj/proj_7.safetensors" in webui.sd_models.checkpoint_tiles()
    assert webui.sd_models.get_closet_checkpoint_match("proj_7").filename == str(path)


# ----------------------------------------------------------------------------------------------------------
# The device


def test_release_and_restore_move_the_hosts_model(make_webui):
    webui = make_webui(device="cuda")  # on a CPU machine the fake model only records the moves
    live = webui.shared.sd_model
    assert live.device == torch.device("cuda")
    host = WebUIHost()
    host.release_device()
    assert live.device == torch.device("cpu")
    host.restore_device()
    assert live.device == torch.device("cuda")
    host.restore_device()  # only once
    assert live.moves[-2:] == [torch.device("cpu"), torch.device("cuda")]


def test_the_selected_checkpoint_is_loaded_before_the_live_model_is_read(make_webui):
    """Memory holds another checkpoint than the selected one (the host's refresh re-selected its --ckpt file):
    check, base_files and the model box describe the selected file, and load_base first loads it as a generation
    would; the model stays off the device the run trains on until restore_device."""
    webui = make_webui(ckpt=True, device="cuda")  # on a CPU machine the fake model only records the moves
    webui.write_checkpoint("other.safetensors", seed=5)
    webui.load("other.safetensors")
    webui.api_refresh_checkpoints()
    selected = webui.sd_models.select_checkpoint()
    assert selected.filename == str(webui.checkpoint) != webui.shared.sd_model.sd_checkpoint_info.filename
    host, cfg = WebUIHost(), config()
    assert host.check(cfg).family.name == "sd1"
    assert host.base_files(cfg) == (webui.checkpoint, None)
    assert webui_host.loaded_file() == selected.filename
    summary = webui_host.loaded_model_summary()
    assert (summary["title"], summary["hash"], summary["family"]) == (selected.name, selected.shorthash, "sd1")

    host.release_device()
    bundle = host.load_base(cfg)
    live = webui.shared.sd_model
    assert live.sd_checkpoint_info.filename == selected.filename and live.device == torch.device("cpu")
    assert (bundle.source.name, bundle.source.sha256) == (selected.name, selected.sha256)
    host.restore_device()
    assert live.device == torch.device("cuda")
    assert webui.generate().checkpoint_title == selected.title

    webui.load("other.safetensors")
    webui.api_refresh_checkpoints()
    webui.checkpoint.unlink()  # selected, then deleted: the load fails and the run says what to do
    with pytest.raises(DreamboothError, match="tiny_sd1.safetensors.*loading it failed.*Select a checkpoint"):
        WebUIHost().load_base(cfg)


def test_model_goes_back_to_its_device_when_training_fails(make_webui, instance_dir):
    webui = make_webui(device="cuda")
    live = webui.shared.sd_model
    moves = len(live.moves)
    with pytest.raises(DreamboothError, match="neither a file nor a checkpoint"):
        TrainingRun(config(instance_dir, base_model="missing"), WebUIHost()).run()
    assert len(live.moves) == moves  # refused before anything moved

    class FailingHost(WebUIHost):
        def load_base(self, config):
            raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError, match="disk went away"):  # device auto: it trains where the host's model is
        TrainingRun(config(instance_dir, device="auto"), FailingHost()).run()
    assert torch.device("cpu") in live.moves[moves:] and live.device == torch.device("cuda")


# ----------------------------------------------------------------------------------------------------------
# Training as the tab does it: inside the host's job wrapper, progress mirrored, interrupt honoured


def run_as_job(webui, cfg, task_id="task(dreambooth-1)", on_step=None):
    """What the tab's button does: wrap_gradio_gpu_call around a TrainingRun with the WebUIHost wiring."""
    seen = []

    def train(id_task):
        def also(progress: Progress):
            answer = webui.progress.progressapi(webui.progress.ProgressRequest(id_task=id_task))
            seen.append((progress, answer, webui.shared.state.textinfo))
            if on_step:
                on_step(progress)

        result = TrainingRun(cfg, WebUIHost(), on_progress=also).run()
        return [result, f"<p>{result.status}</p>"]

    job = webui.call_queue.wrap_gradio_gpu_call(train, extra_outputs=[None])
    return job(task_id), seen


def test_training_the_loaded_model_end_to_end(webui, instance_dir):
    (result, html), seen = run_as_job(webui, config(instance_dir))

    assert "Time taken" in html, html  # no error div: the job ran through
    assert result.status == "finished" and result.step == 2
    path = result.checkpoints[-1]
    assert path == Path(webui.sd_models.model_path) / "proj" / "proj_2.safetensors"
    assert "proj/proj_2.safetensors" in webui_host.checkpoint_selection()[0]
    training = [(p, a, text) for p, a, text in seen if p.phase == "training"]
    assert [p.step for p, _, _ in training] == [1, 2]
    progress, answer, text = training[0]
    assert answer.active and answer.progress == pytest.approx(0.5)
    assert text.startswith("Training step 1/2, loss ")
    assert webui.shared.sd_model.device == webui.devices.device  # back where it was

    title = webui_host.load_checkpoint_now(path)
    assert webui.shared.sd_model.sd_checkpoint_info.filename == str(path)
    assert title == webui.shared.sd_model.sd_checkpoint_info.title and title.startswith("proj/proj_2.safetensors [")
    assert webui.shared.opts.sd_model_checkpoint == title


def test_interrupt_in_the_webui_cancels_within_a_step(webui, instance_dir):
    def interrupt_after_first(progress: Progress):
        if progress.phase == "training" and progress.step == 1:
            webui.shared.state.interrupt()  # what the Interrupt button and /sdapi/v1/interrupt do

    (result, _), seen = run_as_job(webui, config(instance_dir, max_train_steps=50), on_step=interrupt_after_first)
    assert result.status == "cancelled" and result.step == 1
    assert seen[-1][0].phase == "cancelled"
    assert not webui.shared.state.interrupted  # the host's wrapper clears it after the job


def test_loading_a_checkpoint_inside_a_job_does_not_deadlock(webui):
    webui.write_checkpoint("other.safetensors", seed=5)

    def job(id_task):
        return [webui_host.load_checkpoint_now(webui.checkpoint.parent / "other.safetensors"), ""]

    title, _ = webui.call_queue.wrap_gradio_gpu_call(job)("task(x)")
    assert title.startswith("other.safetensors [")
    with pytest.raises(DreamboothError, match="not in the WebUI's checkpoint list"):
        webui_host.load_checkpoint_now("/elsewhere/model.safetensors")


# ----------------------------------------------------------------------------------------------------------
# The stand-in itself: how extension scripts load and callbacks run


def test_extension_scripts_load_like_in_the_host(webui, tmp_path):
    ext = tmp_path / "extensions" / "my_ext"
    (ext / "scripts").mkdir(parents=True)
    (ext / "helper_mod_xyz.py").write_text("VALUE = 42\n")
    (ext / "scripts" / "main.py").write_text(
        "import sys\nfrom modules import scripts, script_callbacks\nimport helper_mod_xyz\n"
        "BASEDIR = scripts.basedir()\nFIRST_PATH = sys.path[0]\n"
        "import gradio as gr\nscript_callbacks.on_ui_tabs(lambda: [(gr.Blocks(), 'Tab', 'my_tab')])\n")
    (module,) = load_scripts(ext)
    assert module.__name__ == "main.py" and module.BASEDIR == str(ext.resolve())
    assert module.FIRST_PATH == str(ext.resolve()) and str(ext.resolve()) not in sys.path
    assert webui.scripts.basedir() != str(ext.resolve())
    assert [(label, ifid) for _, label, ifid in build_ui()] == [("Tab", "my_tab")]
    assert [c.name for c in webui.script_callbacks.callback_map["callbacks_ui_tabs"]] == ["my_ext/main.py/ui_tabs"]


def test_job_wrapper_reports_errors_as_html(webui):
    def failing(id_task):
        raise DreamboothError("bad <input>")

    result = webui.call_queue.wrap_gradio_gpu_call(failing, extra_outputs=[None])("task(y)")
    assert result[0] is None  # the extra outputs, then the error as HTML (with the host's timing appended)
    assert result[1].startswith("<div class='error'>DreamboothError: bad &lt;input&gt;</div>")
    assert "task(y)" in webui.progress.finished_tasks and webui.shared.state.job == ""


def test_class_image_generation_moves_the_hosts_bar_with_its_own_rate(webui, instance_dir, tmp_path):
    cfg = config(instance_dir, max_train_steps=1, prior_preservation=True, class_image_steps=2,
                 concepts=[{"instance_dir": str(instance_dir), "token": "ohwx", "class_word": "toy",
                            "class_dir": str(tmp_path / "classes"), "num_class_images": 2}])
    (result, _), seen = run_as_job(webui, cfg)
    assert result.status == "finished"
    images = [(p, a, text) for p, a, text in seen if p.phase == "class_images" and p.done]
    assert [p.done for p, _, _ in images] == [1, 2]
    progress, answer, text = images[0]
    assert answer.active and answer.progress == pytest.approx(0.5)
    assert text == f"Generating class images: 1/2, {progress.it_per_s:.2f} images/s"
    assert progress.eta_s == pytest.approx(1 / progress.it_per_s)  # one image left at that rate
    assert answer.eta is not None and abs(answer.eta - progress.eta_s) < 1.0  # the bar's ETA is the run's
