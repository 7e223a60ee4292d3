"""LoRA training on each family: the file the WebUI's Lora extension loads (every key matched, the trained output
reproduced when it is applied the host's way), the merged checkpoint, resume, metadata."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from ui_helpers import run_until_cancelled

from dreambooth_ext.config import from_dict
from dreambooth_ext.hosts.files import FolderHost
from dreambooth_ext.models.bundle import load_bundle
from dreambooth_ext.models.checkpoint import read_checkpoint, read_safetensors_metadata
from dreambooth_ext.models.family import normalize_keys
from dreambooth_ext.models.lora import adapters
from dreambooth_ext.models.tiny import save_tiny_checkpoint
from dreambooth_ext.train.run import TrainingRun

pytest_plugins = ("webui_stub.fixtures",)

UNET = "model.diffusion_model."


class KeepingHost(FolderHost):
    """Keeps the bundle a run trained, to compare its output with the file's."""

    def load_base(self, config):
        self.bundle = super().load_base(config)
        return self.bundle


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        image = Image.new("RGB", (72, 64), color)
        image.paste((250, 250, 0), (10 + 5 * i, 10, 40, 40))
        image.save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bases")
    return {family: save_tiny_checkpoint(folder / f"tiny_{family}.safetensors", family, seed=2)
            for family in ("sd1", "sd2", "sdxl")}


def lora_config(base: Path, photos: Path, **overrides):
    data = {"project_name": "lo", "base_model": str(base), "train_mode": "lora", "max_train_steps": 3,
            "lora_rank": 4, "lora_alpha": 8, "lora_learning_rate": 3e-2, "lora_text_encoder_lr": 3e-2,
            "train_text_encoder": True, "lora_conv_rank": 2, "seed": 4, "prior_preservation": False,
            "save_precision": "fp32", "gradient_checkpointing": False,
            "mixed_precision": "no",  # fp32 modules, whose outputs these tests compare at 1e-4 (auto is bf16 on
            # a CPU that computes it natively)
            "concepts": [{"instance_dir": str(photos), "token": "zwx", "class_word": "toy"}]}
    data.update(overrides)
    return from_dict(data)


def unet_output(bundle, unet) -> torch.Tensor:
    torch.manual_seed(0)
    sample = torch.randn(1, 4, 8, 8)
    conditioning = bundle.encode(["photo of zwx toy"])
    sizes = bundle.family.size_conditioning([_whole(64)])
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), **conditioning.with_added(sizes).unet_kwargs()).sample


def _whole(size: int):
    from dreambooth_ext.data.images import Fit

    return Fit.whole(size, size)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_the_webui_matches_every_key_and_reproduces_the_trained_model(family, bases, photos, tmp_path, make_webui):
    """The file, loaded by the host's key matching and added to the weights at <lora:name:1>, gives the trained
    model's UNet and text-encoder outputs (UNet attention, feed-forward, 3x3 convolutions, every text encoder)."""
    make_webui(load=False)  # the host's modules, for its Lora extension's matching
    import networks
    from webui_stub.fake_model import FakeSDModel

    host = KeepingHost(tmp_path / "models")
    result = TrainingRun(lora_config(bases[family], photos), host).run()
    (path,) = result.loras
    assert path == tmp_path / "models" / "Lora" / "lo" / "lo_3.safetensors" and not result.checkpoints
    tensors = read_checkpoint(path)
    base = read_checkpoint(bases[family])
    model = FakeSDModel(base)  # the host's live model (fp32: --no-half), its layers named as the host names them
    found = networks.apply(model, tensors)
    assert found.failed == {}
    trained = host.bundle
    layers = sum(len(adapters(m)) for m in (trained.unet, *trained.text_encoders))
    assert len(found.layers) == layers == len(tensors) // 3
    assert any(k.startswith("lora_unet_") and v.ndim == 4 and v.shape[-1] == 3 for k, v in tensors.items())

    applied = load_bundle(normalize_keys(model.state_dict()), prediction_type="epsilon")
    for module in (trained.unet, *trained.text_encoders):
        module.eval()
    expected, got = unet_output(trained, trained.unet), unet_output(applied, applied.unet)
    untrained = load_bundle(base)
    assert (expected - unet_output(untrained, untrained.unet)).abs().max() > 1e-3  # it learnt
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
    with torch.no_grad():
        want, have = trained.encode(["photo of zwx toy"]), applied.encode(["photo of zwx toy"])
    assert torch.allclose(have.context, want.context, atol=1e-4, rtol=1e-4)
    for name, value in (want.added or {}).items():  # SDXL's pooled vector comes from the second encoder
        assert torch.allclose(have.added[name], value, atol=1e-4, rtol=1e-4)
    metadata = read_safetensors_metadata(path)
    networks.list_available_networks()  # (the stand-in host's Lora folder; ours is read directly)
    assert metadata["ss_output_name"] == "lo_3" and metadata["ss_network_dim"] == "4"
    assert metadata["ss_network_alpha"] == "8" and metadata["ss_network_module"] == "networks.lora"
    version = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[family]
    assert metadata["ss_base_model_version"] == version and metadata["ss_v2"] == str(family == "sd2")
    # A LoCon file (lora_conv_rank 2) says so as kohya's train_network.py does: json.dumps of its --network_args.
    assert metadata["ss_network_args"] == '{"conv_dim": "2", "conv_alpha": "2"}'


def test_the_lora_file_is_what_the_lora_tab_reads(bases, photos, tmp_path):
    config = lora_config(bases["sd1"], photos, max_train_steps=2, sample_every_n_steps=2, sample_steps=2,
                         save_precision="fp16", train_text_encoder=False, lora_conv_rank=0)
    result = TrainingRun(config, FolderHost(tmp_path / "models")).run()
    path = result.loras[-1]
    metadata = read_safetensors_metadata(path)
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[8 + header:]).hexdigest()  # the WebUI's addnet hash
    assert json.loads(metadata["ss_tag_frequency"]) == {f"1_{photos.name}": {"photo of zwx toy": 3}}
    assert metadata["ss_num_train_images"] == "3" and metadata["ss_resolution"] == "(64, 64)"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert "ss_network_args" not in metadata  # a plain LoRA: kohya writes none without --network_args
    import base64
    import io

    (cover,) = json.loads(metadata["ssmd_cover_images"])
    assert Image.open(io.BytesIO(base64.b64decode(cover))).size == (64, 64)  # the last sample, as the card image
    tensors = read_checkpoint(path)
    assert all(v.dtype == torch.float16 for v in tensors.values())
    assert not any(k.startswith("lora_te") for k in tensors)  # text encoders frozen: no adapters for them


def test_the_merged_checkpoint_is_base_plus_scaled_up_down(bases, photos, tmp_path):
    config = lora_config(bases["sd2"], photos, max_train_steps=2, lora_save_merged=True)
    result = TrainingRun(config, FolderHost(tmp_path / "models")).run()
    (merged_path,) = result.checkpoints
    assert merged_path == tmp_path / "models" / "Stable-diffusion" / "lo" / "lo_2.safetensors"
    merged, lora, base = read_checkpoint(merged_path), read_checkpoint(result.loras[0]), read_checkpoint(bases["sd2"])
    assert merged.keys() == base.keys()
    changed = set()
    for key in (k for k in lora if k.startswith("lora_unet_") and k.endswith(".lora_down.weight")):
        module = key[:-len(".lora_down.weight")]
        down, up = lora[key], lora[f"{module}.lora_up.weight"]
        scale = lora[f"{module}.alpha"].item() / down.shape[0]
        target = UNET + module[len("lora_unet_"):]
        (weight,) = [k for k in base if k.startswith(UNET) and k.endswith(".weight")
                     and k[:-len(".weight")].replace(".", "_") == target.replace(".", "_")]
        expected = base[weight] + (up.flatten(1) @ down.flatten(1)).reshape(base[weight].shape) * scale
        assert torch.allclose(merged[weight], expected, atol=1e-6), weight
        changed.add(weight)
    assert len(changed) == len([k for k in lora if k.startswith("lora_unet_")]) // 3
    untouched = [k for k in base if k.startswith(UNET) and k not in changed]
    assert untouched and all(torch.equal(merged[k], base[k]) for k in untouched)
    text = [k for k in base if k.startswith("cond_stage_model.") and not torch.equal(merged[k], base[k])]
    assert any("in_proj_weight" in k for k in text)  # the text encoder's adapters are merged too


def test_a_resumed_lora_run_equals_an_uninterrupted_one(bases, photos, tmp_path):
    config = lora_config(bases["sd1"], photos, max_train_steps=4, ema=True, ema_decay=0.5)
    straight = TrainingRun(config, FolderHost(tmp_path / "straight")).run()
    host = FolderHost(tmp_path / "interrupted")
    assert run_until_cancelled(config, host, 2).status == "cancelled"
    state = tmp_path / "interrupted" / "dreambooth" / "lo" / "state" / "weights.safetensors"
    assert all(".down." in k or ".up." in k for k in read_checkpoint(state))  # only the adapters are state
    resumed = TrainingRun(config, host, resume=True).run()
    a, b = read_checkpoint(straight.loras[-1]), read_checkpoint(resumed.loras[-1])
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6

    changed = lora_config(bases["sd1"], photos, max_train_steps=4, lora_rank=8)
    run_until_cancelled(changed, FolderHost(tmp_path / "other"), 2)
    with pytest.raises(Exception, match="lora_rank = 8"):
        TrainingRun(lora_config(bases["sd1"], photos, max_train_steps=4), FolderHost(tmp_path / "other"),
                    resume=True).run()


@pytest.mark.parametrize("base", [torch.nn.Linear(32, 64), torch.nn.Conv2d(32, 64, 3, padding=1)],
                         ids=["linear", "conv"])
def test_an_adapter_on_a_bf16_base_under_autocast_makes_no_fp32_copy_of_its_input(base):
    from torch.utils._python_dispatch import TorchDispatchMode

    from dreambooth_ext.models.lora import LoRALayer

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.fp32 = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and out.dtype == torch.float32:
                self.fp32.append(tuple(out.shape))
            return out

    layer = LoRALayer(base.to(torch.bfloat16).requires_grad_(False), rank=4, alpha=4)
    torch.nn.init.normal_(layer.up.weight)
    x = torch.randn(2, 32, 8, 8) if isinstance(base, torch.nn.Conv2d) else torch.randn(2, 16, 32)
    x = x.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), Copies() as copies:
        out = layer(x)
    assert tuple(x.shape) not in copies.fp32  # the input's fp32 copy (the adapter's weights may be cast, not x)
    out.float().sum().backward()
    assert layer.down.weight.grad.dtype == torch.float32 and layer.down.weight.grad.abs().sum() > 0
    # Without autocast, the adapter computes in its own fp32 and gives the same result within bf16's precision.
    expected = layer.base(x).float() + layer.up(layer.down(x.float())) * layer.scale
    assert torch.allclose(layer(x).float(), expected, rtol=2e-2, atol=2e-2)
    assert torch.allclose(out.float(), expected, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("base", [torch.nn.Linear(32, 64), torch.nn.Conv2d(32, 64, 3, padding=1)],
                         ids=["linear", "conv"])
def test_an_adapter_under_autocast_gives_the_dtype_its_layer_gives(base):
    """A fp32 input (the cached text embeddings into to_k and to_v) comes out of the plain layer in bf16: with an
    adapter, too. A fp32 key beside a bf16 query stops attention on the CPU under torch before 2.2."""
    from dreambooth_ext.models.lora import LoRALayer

    x = torch.randn(2, 32, 8, 8) if isinstance(base, torch.nn.Conv2d) else torch.randn(2, 16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = base(x)
        adapted = LoRALayer(base, rank=4, alpha=4)(x)
    assert plain.dtype == adapted.dtype == torch.bfloat16
