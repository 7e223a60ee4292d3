"""dreambooth_ext.models: reading, converting, exporting checkpoints; tokenizer; prediction type."""

from __future__ import annotations

import os
import pickle
import sys
import types

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml

from dreambooth_ext.errors import DreamboothError
from dreambooth_ext.models import checkpoint as ckpt
from dreambooth_ext.models import convert, export
from dreambooth_ext.models.bundle import (
    SourceInfo,
    load_bundle,
    load_bundle_from_file,
    probe_v_prediction,
    resolve_prediction_type,
)
from dreambooth_ext.models.family import SD1_TEXT_PREFIX, SD2_TEXT_PREFIX, detect_family, family_named, normalize_keys
from dreambooth_ext.models.tiny import save_tiny_checkpoint, tiny_checkpoint


@pytest.fixture(scope="module")
def tiny() -> dict:
    cache: dict = {}

    def get(family: str = "sd1", seed: int = 0) -> dict:
        if (family, seed) not in cache:
            cache[(family, seed)] = tiny_checkpoint(family, seed)
        return dict(cache[(family, seed)])
    return get


def _small_state_dict() -> dict:
    return {"model.diffusion_model.w": torch.arange(6.0).reshape(2, 3), "cond_stage_model.b": torch.ones(2)}


# ----------------------------------------------------------------------------------------------------------
# Round trip


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_round_trip_is_bit_for_bit(tiny, family):
    sd = tiny(family)
    bundle = load_bundle(sd, prediction_type="epsilon")
    out = export.build_checkpoint(bundle, bundle.unet, bundle.text_encoders, bundle.vae, precision="fp32")
    assert out.keys() == sd.keys()
    different = [k for k in sd if out[k].dtype != sd[k].dtype or not torch.equal(out[k], sd[k])]
    assert different == []
    # The reverse maps really produced the model keys (not just the carried-over base).
    produced = convert.unet_to_ldm(bundle.unet.state_dict(), bundle.unet_config)
    assert len(produced) == sum(k.startswith("model.diffusion_model.") for k in sd)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_modules_from_round_tripped_dict_compute_the_same(tiny, family):
    first = load_bundle(tiny(family), prediction_type="epsilon")
    again = load_bundle(export.build_checkpoint(first, first.unet, first.text_encoders, first.vae, "fp32"),
                        prediction_type="epsilon")
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    ids = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 4])
    with torch.no_grad():
        for bundle_a, bundle_b in [(first, again)]:
            hidden_a = bundle_a.text_encoders[0](ids).last_hidden_state
            assert torch.equal(hidden_a, bundle_b.text_encoders[0](ids).last_hidden_state)
            out_a = bundle_a.unet(latents, torch.tensor([10]), encoder_hidden_states=hidden_a).sample
            assert torch.equal(out_a, bundle_b.unet(latents, torch.tensor([10]), encoder_hidden_states=hidden_a).sample)
            image = bundle_a.vae.decode(latents).sample
            assert image.shape == (1, 3, 64, 64)  # the tiny VAE keeps the x8 downscale
            assert torch.equal(image, bundle_b.vae.decode(latents).sample)


def test_sd2_text_encoder_uses_penultimate_layer_and_keeps_last_block_from_base(tiny):
    sd = tiny("sd2")
    config = convert.open_clip_config_from_ldm(sd, SD2_TEXT_PREFIX, skip_last_layer=True)
    assert (config.num_hidden_layers, config.hidden_act, config.num_attention_heads) == (2, "gelu", 1)
    (text,) = family_named("sd2").text_encoders_from_ldm(sd)
    mapped = family_named("sd2").text_encoders_to_ldm((text.state_dict(),))
    assert not any(".resblocks.2." in k for k in mapped)
    weight = sd["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(text.text_model.encoder.layers[1].self_attn.k_proj.weight, weight[32:64])
    assert torch.equal(text.text_model.final_layer_norm.weight, sd["cond_stage_model.model.ln_final.weight"])


def test_sd1_text_config_from_shapes(tiny):
    config = convert.clip_config_from_ldm(tiny("sd1"), SD1_TEXT_PREFIX, hidden_act="quick_gelu")
    assert (config.vocab_size, config.hidden_size, config.max_position_embeddings) == (49408, 32, 77)
    assert (config.intermediate_size, config.num_hidden_layers, config.hidden_act) == (64, 2, "quick_gelu")


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_inferred_unet_config(tiny, family):
    config = convert.unet_config_from_ldm(tiny(family), family_named(family))
    assert config["block_out_channels"] == (32, 64)
    assert config["layers_per_block"] == 1
    assert config["down_block_types"] == ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert config["up_block_types"] == ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    assert config["cross_attention_dim"] == 32
    assert config["in_channels"] == config["out_channels"] == 4
    assert config["use_linear_projection"] is (family == "sd2")
    if family == "sd2":
        assert config["attention_head_dim"] == (1, 1) and config["upcast_attention"] is True
    else:
        assert config["attention_head_dim"] == 8


def test_sd_sized_config_heads():
    config = convert.make_unet_config(family=family_named("sd2"), block_out_channels=(320, 640, 1280, 1280),
                                      layers_per_block=2, attention_levels=(True, True, True, False),
                                      cross_attention_dim=1024)
    assert config["attention_head_dim"] == (5, 10, 20, 20)
    assert config["down_block_types"][-1] == "DownBlock2D" and config["up_block_types"][0] == "UpBlock2D"


def test_inferred_vae_config(tiny):
    config = convert.vae_config_from_ldm(tiny("sd1"), family_named("sd1"))
    assert config["block_out_channels"] == (32, 32, 32, 32)
    assert (config["layers_per_block"], config["latent_channels"], config["scaling_factor"]) == (1, 4, 0.18215)


def test_vae_attention_is_conv_in_ldm_and_linear_in_diffusers(tiny):
    sd = tiny("sd1")
    assert sd["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    vae = convert.vae_from_ldm(sd, family_named("sd1"))
    assert vae.decoder.mid_block.attentions[0].to_q.weight.shape == (32, 32)


def test_text_encoder_ignores_a_damaged_position_ids_buffer(tiny):
    sd = tiny("sd1")
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77.0)[None] - 0.001
    (model,) = family_named("sd1").text_encoders_from_ldm(sd)
    assert torch.equal(model.text_model.embeddings.position_ids, torch.arange(77)[None])


def test_missing_weight_is_refused(tiny):
    sd = tiny("sd1")
    del sd["model.diffusion_model.middle_block.1.proj_out.weight"]
    with pytest.raises(DreamboothError, match="proj_out"):
        convert.unet_from_ldm(sd, family_named("sd1"))


def test_tiny_checkpoint_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = tiny_checkpoint("sd1", seed=5)
    assert torch.equal(torch.rand(3), expected)
    b = tiny_checkpoint("sd1", seed=5)
    c = tiny_checkpoint("sd1", seed=6)
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])
    assert a["betas"].dtype == torch.float32 and a["betas"].shape == (1000,)


@torch.no_grad()
def test_tiny_vae_has_a_real_vaes_latent_scale(tiny):
    # Scaled latents of about unit variance and a posterior far narrower, as SD's VAE: else a sampled latent
    # is mostly noise and training on the small model learns little about the images.
    from dreambooth_ext.models.bundle import load_bundle

    vae = load_bundle(tiny("sd1")).vae
    half = torch.linspace(-1, 1, 64)
    pictures = torch.stack([torch.stack([half[None, :].expand(64, 64) * s, half[:, None].expand(64, 64),
                                         torch.full((64, 64), s)]) for s in (-0.8, 0.1, 0.9)])
    dist = vae.encode(pictures).latent_dist
    scaled = dist.mean * vae.config.scaling_factor
    assert 0.3 < scaled.std().item() < 3.0
    assert dist.std.max().item() * vae.config.scaling_factor < 0.05 * scaled.std().item()
    # Different pictures, different latents.
    assert (scaled[0] - scaled[2]).abs().mean() > 0.1 * scaled.abs().mean()


# ----------------------------------------------------------------------------------------------------------
# Families and keys


def test_live_wrapped_keys_normalize(tiny):
    for family, inner in (("sd1", "transformer."), ("sd2", "model.")):
        sd = tiny(family)
        live = {k.replace("cond_stage_model." + inner, "cond_stage_model.wrapped." + inner): v for k, v in sd.items()}
        assert any(".wrapped." in k for k in live)
        normal = normalize_keys(live)
        assert normal.keys() == sd.keys()
        assert all(normal[k] is sd[k] for k in sd)
        assert detect_family(normal).name == family


def test_sdxl_is_detected_and_its_refiner_and_inpainting_models_are_refused_by_name(tiny):
    from dreambooth_ext.models.tiny import tiny_checkpoint

    sdxl = tiny_checkpoint("sdxl")
    assert detect_family(sdxl).name == "sdxl"
    assert detect_family({k: tuple(v.shape) for k, v in sdxl.items()}).name == "sdxl"  # a header's shapes do
    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in sdxl.items()
               if not k.startswith("conditioner.embedders.0.")}
    with pytest.raises(DreamboothError, match="SDXL refiner") as info:
        detect_family(refiner)
    assert "pick an SDXL base checkpoint" in str(info.value)
    for base in (sdxl, tiny("sd1")):
        inpainting = dict(base)
        first = inpainting["model.diffusion_model.input_blocks.0.0.weight"]
        inpainting["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(first.shape[0], 9, 3, 3)
        with pytest.raises(DreamboothError, match="inpainting model"):
            detect_family(inpainting)
        with pytest.raises(DreamboothError, match="inpainting model"):
            detect_family({k: tuple(v.shape) for k, v in inpainting.items()})


def test_sdxl_live_layout_normalizes_to_the_file_layout():
    """sd_hijack wraps each SDXL embedder (`conditioner.embedders.N.wrapped.`) and its token embedding, and points
    cond_stage_model at the conditioner, so the live state dict lists the text encoders twice."""
    from webui_stub.fake_model import FakeSDModel

    from dreambooth_ext.models.tiny import tiny_checkpoint

    sdxl = tiny_checkpoint("sdxl")
    live = FakeSDModel(sdxl).state_dict()
    assert "conditioner.embedders.1.wrapped.model.token_embedding.wrapped.weight" in live
    assert "cond_stage_model.embedders.0.wrapped.transformer.text_model.final_layer_norm.weight" in live
    normal = normalize_keys(live)
    assert normal.keys() == sdxl.keys()
    assert all(torch.equal(normal[k], sdxl[k]) for k in sdxl)


def test_vae_only_and_lora_are_refused_with_help(tiny):
    vae_only = {k[len("first_stage_model."):]: v for k, v in tiny("sd1").items() if k.startswith("first_stage_model.")}
    with pytest.raises(DreamboothError, match="VAE") as info:
        detect_family(vae_only)
    assert "full SD 1.x, 2.x or SDXL checkpoint" in str(info.value)
    with pytest.raises(DreamboothError, match="LoRA"):
        detect_family({"lora_unet_down.lora_up.weight": torch.zeros(1)})


def test_vae_override_replaces_every_first_stage_key(tiny, tmp_path):
    base, other = tiny("sd1", 0), tiny("sd1", 1)
    standalone = {k[len("first_stage_model."):]: v for k, v in other.items() if k.startswith("first_stage_model.")}
    standalone["loss.logvar"] = torch.zeros(1)
    path = tmp_path / "my-vae.safetensors"
    safetensors.torch.save_file(standalone, str(path))
    vae = ckpt.read_vae(path)
    assert "first_stage_model.loss.logvar" not in vae
    base["first_stage_model.stale_extra"] = torch.zeros(1)
    bundle = load_bundle(base, vae_state_dict=vae, prediction_type="epsilon")
    first_stage = {k for k in bundle.base if k.startswith("first_stage_model.")}
    assert first_stage == {k for k in other if k.startswith("first_stage_model.")}
    assert all(torch.equal(bundle.base[k], other[k]) for k in first_stage)
    key = "first_stage_model.decoder.conv_out.weight"
    assert torch.equal(bundle.vae.decoder.conv_out.weight, other[key])
    assert torch.equal(export.build_checkpoint(bundle, bundle.unet, precision="fp32")[key], other[key])


def test_read_vae_refuses_a_non_vae(tmp_path):
    path = tmp_path / "x.safetensors"
    safetensors.torch.save_file(_small_state_dict(), str(path))
    with pytest.raises(DreamboothError, match="not a VAE"):
        ckpt.read_vae(path)


# ----------------------------------------------------------------------------------------------------------
# Reading files


def test_reads_safetensors_and_plain_ckpt(tmp_path):
    sd = _small_state_dict()
    safetensors.torch.save_file(sd, str(tmp_path / "a.safetensors"))
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "a.ckpt")
    for name in ("a.safetensors", "a.ckpt"):
        loaded = ckpt.read_checkpoint(tmp_path / name)
        assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)


def _fake_lightning(monkeypatch) -> type:
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
    sys.modules[names[-1]].ModelCheckpoint = cls
    return cls


def test_lightning_ckpt_loads_through_the_restricted_unpickler(tmp_path, monkeypatch):
    sd = _small_state_dict()
    path = tmp_path / "old.ckpt"
    with monkeypatch.context() as patch:
        callback_cls = _fake_lightning(patch)
        callback = callback_cls()
        callback.best_model_score = torch.tensor(0.5)
        torch.save({"state_dict": sd, "global_step": np.int64(470000), "callbacks": {callback_cls: {"x": 1}},
                    "instance": callback}, path)
    assert "pytorch_lightning" not in sys.modules
    with pytest.raises(pickle.UnpicklingError):  # so the fallback is what reads it
        torch.load(path, map_location="cpu", weights_only=True)
    loaded = ckpt.read_checkpoint(path)
    assert loaded.keys() == sd.keys() and torch.equal(loaded["model.diffusion_model.w"], sd["model.diffusion_model.w"])
    assert "pytorch_lightning" not in sys.modules


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("kind", ["system", "eval"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, kind):
    marker = tmp_path / "pwned"
    payload = (_Evil(os.system, f"touch {marker}") if kind == "system"
               else _Evil(eval, f"__import__('pathlib').Path({str(marker)!r}).touch()"))
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": _small_state_dict(), "x": payload}, path)
    with pytest.raises(DreamboothError) as info:
        ckpt.read_checkpoint(path)
    message = str(info.value)
    assert (".system" in message if kind == "system" else "builtins.eval" in message)
    assert ".safetensors" in message
    assert not marker.exists()


def test_bad_files_give_helpful_errors(tmp_path):
    with pytest.raises(DreamboothError, match="does not exist"):
        ckpt.read_checkpoint(tmp_path / "missing.safetensors")
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(DreamboothError, match="extension '.bin'"):
        ckpt.read_checkpoint(tmp_path / "model.bin")
    for name in ("broken.safetensors", "broken.ckpt"):
        (tmp_path / name).write_bytes(b"\x00garbage" * 10)
        with pytest.raises(DreamboothError, match="damaged"):
            ckpt.read_checkpoint(tmp_path / name)


def test_hashes(tmp_path):
    path = tmp_path / "f.safetensors"
    path.write_bytes(b"abc")
    sha = ckpt.file_sha256(path)
    assert sha == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert ckpt.short_hash(sha) == "ba7816bf8f"


# ----------------------------------------------------------------------------------------------------------
# Export


def test_export_casts_model_parts_to_fp16_and_keeps_schedule_fp32(tiny):
    sd = tiny("sd2")
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.diffusion_modelw"] = torch.zeros(2)
    bundle = load_bundle(sd, prediction_type="epsilon")
    out = export.build_checkpoint(bundle, bundle.unet)
    assert not any(k.startswith("model_ema.") for k in out)
    for key, value in out.items():
        if key.startswith(export.MODEL_PARTS):
            assert value.dtype == torch.float16, key
        assert value.is_contiguous()
    for key in ("betas", "alphas_cumprod", "alphas_cumprod_prev"):
        assert out[key].dtype == torch.float32 and torch.equal(out[key], sd[key])
    assert "cond_stage_model.model.transformer.resblocks.2.ln_1.weight" in out


def test_export_uses_the_trained_weights(tiny):
    bundle = load_bundle(tiny("sd1"), prediction_type="epsilon")
    with torch.no_grad():
        bundle.unet.conv_in.weight.add_(1.0)
        bundle.text_encoders[0].text_model.final_layer_norm.bias.add_(1.0)
    key_unet = "model.diffusion_model.input_blocks.0.0.weight"
    key_text = "cond_stage_model.transformer.text_model.final_layer_norm.bias"
    without_text = export.build_checkpoint(bundle, bundle.unet, precision="fp32")
    assert torch.equal(without_text[key_unet], bundle.unet.conv_in.weight)
    assert torch.equal(without_text[key_text], bundle.base[key_text])  # text encoder not given: base kept
    with_text = export.build_checkpoint(bundle, bundle.unet, bundle.text_encoders, precision="fp32")
    assert torch.equal(with_text[key_text], bundle.text_encoders[0].text_model.final_layer_norm.bias)
    averaged = {k: v + 2.0 for k, v in bundle.unet.state_dict().items()}  # e.g. EMA weights
    with_ema = export.build_checkpoint(bundle, bundle.unet, precision="fp32", unet_state=averaged)
    assert torch.equal(with_ema[key_unet], averaged["conv_in.weight"])


def test_metadata_keys(tiny):
    bundle = load_bundle(tiny("sd2"), prediction_type="v_prediction", source=SourceInfo(name="base.safetensors",
                                                                                        short_hash="abcdef0123"))
    meta = export.checkpoint_metadata(bundle, title="proj", steps=100, config_json="{}", resolution=640,
                                      extra={"x.count": 3})
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert meta["modelspec.prediction_type"] == "v" and meta["modelspec.resolution"] == "640x640"  # as trained
    assert meta["dreambooth.base_model_hash"] == "abcdef0123" and meta["dreambooth.steps"] == "100"
    assert meta["x.count"] == "3" and meta["dreambooth.config"] == "{}" and "dreambooth.engine_version" in meta
    assert bundle.native_resolution == 768


def test_atomic_save_success_and_failure(tiny, tmp_path, monkeypatch):
    sd = {"model.diffusion_model.w": torch.ones(2, 2)}
    path = export.save_checkpoint(sd, tmp_path / "out.safetensors", {"a": "b"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]
    loaded = safetensors.torch.load_file(str(path))
    assert torch.equal(loaded["model.diffusion_model.w"], sd["model.diffusion_model.w"])
    assert ckpt.read_safetensors_metadata(path) == {"a": "b"}

    def fail(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        export.save_checkpoint(sd, tmp_path / "second.safetensors", {}, yaml_text="x: 1\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_v_prediction_save_writes_matching_yaml(tiny, tmp_path):
    bundle = load_bundle(tiny("sd2"), prediction_type="v_prediction")
    text = export.yaml_for_bundle(bundle)
    assert text is not None
    path = export.save_checkpoint(export.build_checkpoint(bundle, bundle.unet), tmp_path / "v.safetensors", {},
                                  yaml_text=text)
    written = (tmp_path / "v.yaml").read_text()
    params = yaml.safe_load(written)["model"]["params"]
    assert params["parameterization"] == "v"
    assert params["unet_config"]["params"]["model_channels"] == 32
    assert params["unet_config"]["params"]["channel_mult"] == [1, 2]
    assert params["unet_config"]["params"]["attention_resolutions"] == [2, 1]
    assert params["unet_config"]["params"]["use_linear_in_transformer"] is True
    assert params["first_stage_config"]["params"]["ddconfig"]["ch_mult"] == [1, 1, 1, 1]
    assert params["cond_stage_config"]["params"]["layer"] == "penultimate"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    # Reading it back resolves to v-prediction from the yaml.
    assert load_bundle_from_file(path).prediction_type == "v_prediction"
    assert export.yaml_for_bundle(load_bundle(tiny("sd1"), prediction_type="epsilon")) is None


# ----------------------------------------------------------------------------------------------------------
# Tokenizer, prediction type, files


@pytest.mark.parametrize("family,pad", [("sd1", 49407), ("sd2", 0)])
def test_tokenizer(family, pad):
    (tokenizer,) = family_named(family).tokenizers()
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    assert tokenizer.pad_token_id == pad
    padded = tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == pad


def test_prediction_type_sources():
    v_yaml = "model:\n  params:\n    parameterization: \"v\"\n    timesteps: 1000\n"
    eps_yaml = "model:\n  params:\n    timesteps: 1000\n"
    assert resolve_prediction_type(family_named("sd2"), "epsilon", yaml_text=v_yaml) == "epsilon"
    assert resolve_prediction_type(family_named("sd1"), "v_prediction") == "v_prediction"
    assert resolve_prediction_type(family_named("sd1"), "auto", yaml_text=v_yaml) == "epsilon"
    assert resolve_prediction_type(family_named("sd2"), "auto", yaml_text=v_yaml) == "v_prediction"
    assert resolve_prediction_type(family_named("sd2"), "auto", yaml_text=eps_yaml) == "epsilon"
    sd2 = family_named("sd2")
    assert resolve_prediction_type(sd2, "auto", metadata={"modelspec.prediction_type": "v"}) == "v_prediction"
    assert resolve_prediction_type(sd2, "auto", metadata={"modelspec.prediction_type": "epsilon"}) == "epsilon"
    with pytest.raises(DreamboothError, match="prediction_type = 'x'"):
        resolve_prediction_type(family_named("sd2"), "x")


class _FakeUnet(torch.nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.scale = scale
        self.config = types.SimpleNamespace(in_channels=4, cross_attention_dim=8)

    def forward(self, x, t, encoder_hidden_states):
        assert int(t[0]) == 999 and encoder_hidden_states.shape[-1] == 8
        return types.SimpleNamespace(sample=x * self.scale)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_a_fp16_checkpoint_loads_to_exactly_its_values(tiny, family):
    """The UNet trains in fp32; the frozen VAE and text encoders keep the file's own fp16 tensors (no copies)."""
    sd = {k: (v.half() if v.is_floating_point() and k != "betas" else v) for k, v in tiny(family).items()}
    bundle = load_bundle(dict(sd), prediction_type="epsilon")
    assert all(p.dtype == torch.float32 for p in bundle.unet.parameters())
    assert all(p.dtype == torch.float16 for m in (bundle.vae, *bundle.text_encoders) for p in m.parameters())
    # The file's own tensors, but where the layout splits one (OpenCLIP's in_proj into q, k and v: fp16 copies).
    shared = [bundle.vae, *(bundle.text_encoders if family == "sd1" else ())]
    stored = {v.untyped_storage().data_ptr() for v in bundle.base.values()}
    assert all(p.untyped_storage().data_ptr() in stored for m in shared for p in m.parameters())
    assert not any(m.training for m in (bundle.unet, bundle.vae, *bundle.text_encoders))
    out = export.build_checkpoint(bundle, bundle.unet, bundle.text_encoders, bundle.vae, precision="fp32")
    model_keys = [k for k in sd if k.startswith(("model.", "first_stage_model.", "cond_stage_model.",
                                                 "conditioner."))]
    different = [k for k in model_keys if not torch.equal(out[k], sd[k].float())]
    assert len(model_keys) > 100 and different == []


def test_prediction_type_probe():
    assert probe_v_prediction(_FakeUnet(-3.0)) == pytest.approx(-2.0)
    assert resolve_prediction_type(family_named("sd2"), "auto", unet=_FakeUnet(-3.0)) == "v_prediction"
    assert resolve_prediction_type(family_named("sd2"), "auto", unet=_FakeUnet(1.0)) == "epsilon"


def test_load_bundle_from_file(tiny, tmp_path):
    path = tmp_path / "tiny2.safetensors"
    safetensors.torch.save_file(tiny("sd2"), str(path), metadata={"modelspec.prediction_type": "v"})
    bundle = load_bundle_from_file(path)
    assert bundle.family.name == "sd2" and bundle.prediction_type == "v_prediction"
    assert bundle.noise_scheduler.config.prediction_type == "v_prediction"
    assert bundle.source.sha256 == ckpt.file_sha256(path) and bundle.source.short_hash == bundle.source.sha256[:10]
    assert bundle.source.name == "tiny2.safetensors"
    assert bundle.tokenizers[0].pad_token_id == 0


def test_scheduler_uses_the_checkpoint_betas(tiny):
    sd = tiny("sd1")
    sd["betas"] = sd["betas"] * 1.5
    bundle = load_bundle(sd, prediction_type="auto")
    assert bundle.prediction_type == "epsilon" and bundle.native_resolution == 512
    scheduler = bundle.noise_scheduler
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.clip_sample is False
    assert torch.allclose(scheduler.betas, sd["betas"])


def test_save_tiny_checkpoint(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "demo.safetensors", family="sd2")
    assert detect_family(ckpt.read_checkpoint(path)).name == "sd2"
