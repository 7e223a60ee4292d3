"""WebUIHost on Forge, against the Forge stand-in (tests/forge_stub): the model in memory and Forge's VAE / Text
Encoder selection are what trains, its dropdown's format is what a loaded result is selected with, and a result
Forge cannot load is an error with Forge's reason."""

from __future__ import annotations

import html
from pathlib import Path

import pytest
import safetensors.torch
import torch
from webui_stub.tiny import tiny_state_dict

from dreambooth_ext.config import from_dict
from dreambooth_ext.errors import DreamboothError
from dreambooth_ext.hosts import webui as webui_host
from dreambooth_ext.hosts.webui import WebUIHost

pytest_plugins = ("forge_stub.fixtures",)  # the make_forge and forge fixtures

UNET = "model.diffusion_model."
VAE = "first_stage_model."
MODULES = (UNET, VAE, "cond_stage_model.", "conditioner.")  # what Forge's modules hold


def config(**overrides):
    data = {"project_name": "proj", "resolution": 64, "max_train_steps": 2, "learning_rate": 1e-3, "seed": 3,
            "prior_preservation": False, "device": "cpu", "save_precision": "fp32",
            "concepts": [{"instance_dir": "/nonexistent", "token": "ohwx", "class_word": "toy"}]}
    data.update(overrides)
    return from_dict(data)


def fp16(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.half().float()


def assert_is_fp16_copy_of(base: dict, original: dict, keys=None) -> None:
    """Each weight is the fp16 rounding of the original's (Forge holds the modules in fp16 here)."""
    for key in keys or original:
        assert torch.equal(base[key].float(), fp16(original[key])), key


def test_stand_in_is_a_forge_host(forge):
    assert webui_host.is_forge()
    model = forge.model
    assert model.first_stage_model is None and model.cond_stage_model is None and model.is_sd1
    keys = set(model.forge_objects.clip.cond_stage_model.state_dict())
    assert "clip_l.transformer.text_model.final_layer_norm.weight" in keys and "clip_l.logit_scale" in keys
    assert forge.shared.opts.sd_model_checkpoint == "tiny_sd1.safetensors"  # Forge selects by name


# ----------------------------------------------------------------------------------------------------------
# What trains: Forge's model in memory


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_the_trained_base_is_forges_memory_in_the_files_layout(forge, family):
    path = forge.write_checkpoint(f"tiny_{family}_b.safetensors", family, seed=4)
    forge.select_checkpoint(path.name)
    forge.generate()
    unet = forge.model.forge_objects.unet.model.diffusion_model
    with torch.inference_mode():  # Forge's tensors are inference tensors (forge_model_reload runs in that mode)
        getattr(unet.out, "2").weight.add_(0.25)  # changed in memory, not in the file

    bundle = WebUIHost().load_base(config())

    original = tiny_state_dict(family, seed=4)
    assert bundle.family.name == family
    assert set(bundle.base) == set(original)  # the file's keys: Forge's added projection / logit_scale left out
    changed = UNET + "out.2.weight"
    assert torch.equal(bundle.base[changed], (original[changed].half() + 0.25).float())  # as Forge holds it
    assert bundle.base[changed].dtype == torch.float32  # the UNet trains in fp32
    from_file = [k for k in original if not k.startswith(MODULES) or k.endswith("logit_scale")
                 or not original[k].is_floating_point()]
    for key in from_file:  # what Forge keeps in no module it builds from the file (the DDPM schedule, ...)
        assert torch.equal(bundle.base[key], original[key]), key
    weights = [k for k in original if k not in from_file and k != changed]
    assert_is_fp16_copy_of(bundle.base, original, weights)  # the text encoders converted back exactly
    # our copy never aliases Forge's tensors
    forge_ptrs = {t.data_ptr() for t in unet.state_dict().values()}
    assert not forge_ptrs & {t.data_ptr() for t in bundle.base.values()}


def test_forges_vae_selection_is_what_trains_and_what_the_box_names(forge):
    vae_file = forge.write_vae("other_vae.safetensors", seed=7)
    forge.select_modules(vae_file)
    forge.generate()  # Forge loads the checkpoint with the selected VAE

    summary = webui_host.loaded_model_summary()
    assert "other_vae.safetensors" in summary["vae"] and summary["problem"] is None
    bundle = WebUIHost().load_base(config())
    chosen = safetensors.torch.load_file(str(vae_file))
    assert_is_fp16_copy_of({k[len(VAE):]: v for k, v in bundle.base.items() if k.startswith(VAE)}, chosen)
    assert bundle.source.vae_name == "other_vae.safetensors"
    checkpoint_file, vae = WebUIHost().base_files(config())
    assert checkpoint_file == forge.checkpoint and vae == vae_file


def test_forges_text_encoder_selection_is_what_trains(forge):
    prefix = "cond_stage_model.transformer."
    other = {k[len(prefix):]: v for k, v in tiny_state_dict("sd1", seed=12).items() if k.startswith(prefix)}
    te_file = forge.data_dir / "models" / "text_encoder" / "clip_l_other.safetensors"
    te_file.parent.mkdir(parents=True)
    safetensors.torch.save_file(other, str(te_file))  # a CLIP-L in the transformers layout
    forge.select_modules(te_file)
    forge.generate()

    summary = webui_host.loaded_model_summary()
    assert "text encoder: clip_l_other.safetensors" in summary["vae"]
    bundle = WebUIHost().load_base(config())
    weights = [k for k, v in other.items() if v.is_floating_point()]
    assert_is_fp16_copy_of({k[len(prefix):]: v for k, v in bundle.base.items() if k.startswith(prefix)}, other, weights)
    assert WebUIHost().base_files(config())[1] is None  # no VAE among the selected modules


def test_a_vae_selected_but_not_loaded_yet_is_loaded_first(forge):
    vae_file = forge.write_vae("later_vae.safetensors", seed=8)
    forge.select_modules(vae_file)  # no generation since: memory still holds the checkpoint's own VAE

    assert "later_vae.safetensors" in webui_host.loaded_model_summary()["vae"]
    bundle = WebUIHost().load_base(config())
    chosen = safetensors.torch.load_file(str(vae_file))
    assert_is_fp16_copy_of({k[len(VAE):]: v for k, v in bundle.base.items() if k.startswith(VAE)}, chosen)


def test_a_lora_forge_merged_is_undone_from_its_backup(forge):
    keys = forge.merge_lora(strength=0.5)
    unet = forge.model.forge_objects.unet.model
    assert keys and not torch.equal(unet.state_dict()[keys[0]].float(),
                                    fp16(tiny_state_dict()[UNET + keys[0].removeprefix("diffusion_model.")]))

    bundle = WebUIHost().load_base(config())

    original = tiny_state_dict()
    assert_is_fp16_copy_of(bundle.base, original, [UNET + k.removeprefix("diffusion_model.") for k in keys])
    assert unet.lora_loader.backup  # Forge's model is left as it is


def test_nothing_loaded_yet_loads_the_selection_as_a_generation_would(make_forge):
    forge = make_forge(load=False)
    assert webui_host.loaded_model_summary()["title"] == "tiny_sd1.safetensors"  # what the next generation loads
    assert WebUIHost().check(config()).family.name == "sd1"

    bundle = WebUIHost().load_base(config())

    assert forge.model.sd_checkpoint_info.filename == str(forge.checkpoint)
    assert_is_fp16_copy_of(bundle.base, tiny_state_dict(), [k for k in tiny_state_dict() if k.startswith(UNET)])


def test_a_checkpoint_selected_but_not_loaded_is_what_trains(forge):
    other = forge.write_checkpoint("other.safetensors", seed=5)
    forge.select_checkpoint(other.name)

    assert webui_host.loaded_model_summary()["title"] == "other.safetensors"
    assert webui_host.loaded_file() == str(other)
    bundle = WebUIHost().load_base(config())
    assert forge.model.sd_checkpoint_info.filename == str(other)
    assert_is_fp16_copy_of(bundle.base, tiny_state_dict(seed=5), [UNET + "out.2.weight"])


@pytest.mark.parametrize("low_bits", ["bnb-nf4", "float8-e4m3fn"])
def test_a_quantized_unet_is_read_from_the_file_and_the_box_says_so(forge, low_bits):
    vae_file = forge.write_vae("q_vae.safetensors", seed=9)
    forge.select_modules(vae_file)
    forge.low_bits(low_bits)
    forge.generate()
    assert webui_host.forge.unet_storage(forge.model) is not None

    summary = webui_host.loaded_model_summary()
    assert "quantized" in summary["note"] and summary["problem"] is None
    from dreambooth_ext.ui.render import model_summary_html

    assert html.escape(summary["note"]) in model_summary_html(summary)  # the tab's model box says so
    bundle = WebUIHost().load_base(config())
    original = tiny_state_dict()
    assert all(torch.equal(bundle.base[k], original[k]) for k in original if k.startswith(UNET))  # the file's fp32
    chosen = safetensors.torch.load_file(str(vae_file))
    assert all(torch.equal(bundle.base[VAE + k], v) for k, v in chosen.items())  # with Forge's selected VAE
    assert WebUIHost().check(config()).family.name == "sd1"


def test_the_box_has_no_note_for_a_model_read_from_memory(forge):
    summary = webui_host.loaded_model_summary()
    assert "note" not in summary and summary["family"] == "sd1" and summary["vae"] == ""


# ----------------------------------------------------------------------------------------------------------
# Loading a result


def test_loading_a_result_selects_it_the_way_forges_dropdown_does(forge):
    other = forge.write_checkpoint("other.safetensors", seed=5)
    webui_host.load_checkpoint_now(other)
    forge.generate()
    webui_host.load_checkpoint_now(forge.checkpoint)
    assert " [" in forge.sd_models.checkpoint_aliases["other.safetensors"].title  # hashed once loaded

    webui_host.load_checkpoint_now(other)

    assert forge.shared.opts.sd_model_checkpoint == "other.safetensors"
    assert forge.shared.opts.sd_model_checkpoint in forge.dropdown_choices()
    assert forge.model.sd_checkpoint_info.filename == str(other)  # loaded now, not at the next generation
    assert forge.generate().sd_model is forge.model  # and the next generation keeps it


def test_loading_follows_the_dropdowns_short_names(forge):
    forge.shared.opts.set("sd_checkpoint_dropdown_use_short", True)
    sub = forge.write_checkpoint("sub/other.safetensors", seed=5)
    forge.generate()

    webui_host.load_checkpoint_now(sub)

    assert forge.shared.opts.sd_model_checkpoint in forge.dropdown_choices()
    assert forge.model.sd_checkpoint_info.filename == str(sub)


def test_a_result_forge_cannot_load_is_an_error_with_its_reason(forge):
    broken = Path(forge.sd_models.model_path) / "broken.safetensors"
    safetensors.torch.save_file({"some.weight": torch.zeros(2)}, str(broken))

    with pytest.raises(DreamboothError, match="Failed to recognize model type"):
        webui_host.load_checkpoint_now(broken)

    assert forge.shared.opts.sd_model_checkpoint == "tiny_sd1.safetensors"  # the previous selection is kept
    assert forge.generate().sd_model.sd_checkpoint_info.filename == str(forge.checkpoint)  # and loads again


# ----------------------------------------------------------------------------------------------------------
# A run end to end


def test_a_run_trains_forges_memory_and_its_result_loads_in_forge(forge, tmp_path):
    from PIL import Image

    from dreambooth_ext.train.run import TrainingRun

    images = tmp_path / "instance"
    images.mkdir()
    for i, color in enumerate([(200, 30, 30), (30, 200, 30)]):
        Image.new("RGB", (64, 64), color).save(images / f"img{i}.png")
    vae_file = forge.write_vae("run_vae.safetensors", seed=11)
    forge.select_modules(vae_file)
    forge.generate()
    cfg = config(concepts=[{"instance_dir": str(images), "token": "ohwx", "class_word": "toy"}])

    result = TrainingRun(cfg, WebUIHost()).run()  # Forge's tensors are inference tensors: the copies must train

    assert result.status == "finished" and result.checkpoints
    saved = safetensors.torch.load_file(str(result.checkpoints[-1]))
    chosen = safetensors.torch.load_file(str(vae_file))
    assert all(torch.equal(saved[VAE + k].float(), fp16(v)) for k, v in chosen.items())  # Forge's VAE went in
    name = webui_host.load_checkpoint_now(result.checkpoints[-1])
    assert forge.model.sd_checkpoint_info.title == name
    assert forge.shared.opts.sd_model_checkpoint in forge.dropdown_choices()


def test_the_api_answers_422_with_forges_reason_when_forge_cannot_load(forge):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from webui_stub import load_extension as loader

    (module,) = loader.load_scripts(Path(__file__).resolve().parent.parent)
    app = FastAPI()
    loader.start_app(app)
    try:
        broken = Path(forge.sd_models.model_path) / "broken.safetensors"
        safetensors.torch.save_file({"some.weight": torch.zeros(2)}, str(broken))
        response = TestClient(app).post("/dreambooth/v1/load", json={"checkpoint": str(broken)})
        assert response.status_code == 422 and "Failed to recognize model type" in response.text
        ok = TestClient(app).post("/dreambooth/v1/load", json={"checkpoint": "tiny_sd1.safetensors"})
        assert ok.status_code == 200 and forge.shared.opts.sd_model_checkpoint in forge.dropdown_choices()
    finally:
        module.jobs.shutdown(10)


def test_an_sdxl_run_trains_from_forges_memory(forge, tmp_path):
    from PIL import Image

    from dreambooth_ext.train.run import TrainingRun

    images = tmp_path / "instance"
    images.mkdir()
    for i, color in enumerate([(200, 30, 30), (30, 200, 30)]):
        Image.new("RGB", (64, 64), color).save(images / f"img{i}.png")
    path = forge.write_checkpoint("tiny_sdxl.safetensors", "sdxl", seed=2)
    forge.select_checkpoint(path.name)
    forge.generate()
    objects = forge.model.forge_objects
    with torch.inference_mode():  # in memory only: the UNet's (trained) and the VAE's (frozen)
        getattr(objects.unet.model.diffusion_model.out, "2").bias.add_(1.0)
        objects.vae.first_stage_model.decoder.conv_out.bias.add_(1.0)
    cfg = config(max_train_steps=1, concepts=[{"instance_dir": str(images), "token": "ohwx", "class_word": "toy"}])

    result = TrainingRun(cfg, WebUIHost()).run()

    assert result.status == "finished"
    saved = safetensors.torch.load_file(str(result.checkpoints[-1]))
    original = tiny_state_dict("sdxl", seed=2)
    assert set(saved) == set(original)
    for key, trained in ((UNET + "out.2.bias", True), (VAE + "decoder.conv_out.bias", False)):
        held = (original[key].half() + 1.0).float()
        if trained:  # one step of 1e-3 from Forge's value
            assert (saved[key] - held).abs().max() < 0.01, key
        else:
            assert torch.equal(saved[key], held), key
