"""pytest fixtures that start the Forge stand-in: `make_forge(...)` (a factory) and `forge` (the default).

Use from a test module: `pytest_plugins = ("forge_stub.fixtures",)`. Each start gets fresh `modules`,
`modules_forge` and `backend` packages, a data dir in tmp with the tiny SD1 checkpoint (and its yaml) in
models/Stable-diffusion, Forge's options registered, the checkpoint selected the way Forge's UI does at start
(its name) and, unless load=False, one generation run so that Forge has loaded it (Forge loads lazily).
"""

from __future__ import annotations

import importlib
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import safetensors.torch
import torch

FORGE_DIR = Path(__file__).resolve().parent
TESTS_DIR = FORGE_DIR.parent
STUB_DIR = TESTS_DIR / "webui_stub"
REPO_DIR = TESTS_DIR.parent
CHECKPOINT_NAME = "tiny_sd1.safetensors"
TORCH_LOAD = torch.load
_PACKAGES = ("modules", "modules_forge", "backend")

__all__ = ["ForgeStub", "forge", "make_forge"]


class ForgeStub:
    """A started Forge stand-in: its folders, its modules, and what a user does in its UI."""

    def __init__(self, data_dir: Path, checkpoint: Path):
        self.data_dir = data_dir
        self.checkpoint = checkpoint

    def __getattr__(self, name: str) -> ModuleType:
        """`forge.shared`, `forge.sd_models`, ... are the stand-in's `modules`."""
        if name.startswith("_"):
            raise AttributeError(name)
        return importlib.import_module(f"modules.{name}")

    @property
    def main_entry(self) -> ModuleType:
        return importlib.import_module("modules_forge.main_entry")

    @property
    def model(self):
        return self.sd_models.model_data.sd_model

    def write_checkpoint(self, name: str, family: str = "sd1", seed: int = 0) -> Path:
        from webui_stub.tiny import save_tiny

        return save_tiny(Path(self.sd_models.model_path) / name, family, seed)

    def write_vae(self, name: str, family: str = "sd1", seed: int = 7) -> Path:
        """A standalone VAE file (keys without first_stage_model.) in models/VAE."""
        from webui_stub.tiny import tiny_state_dict

        prefix = "first_stage_model."
        vae = {k[len(prefix):]: v for k, v in tiny_state_dict(family, seed).items() if k.startswith(prefix)}
        path = self.data_dir / "models" / "VAE" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(vae, str(path))
        return path

    def dropdown_choices(self) -> list[str]:
        """What Forge's checkpoint dropdown lists (its refresh)."""
        return list(self.main_entry.refresh_models()[0])

    def select_checkpoint(self, choice: str) -> None:
        """Refresh Forge's checkpoint dropdown and pick `choice` (loads nothing: the next generation does)."""
        self.main_entry.refresh_models()
        self.main_entry.checkpoint_change(choice)

    def select_modules(self, *paths: Path) -> None:
        """Pick files in Forge's "VAE / Text Encoder" dropdown (by name, as the dropdown gives them)."""
        self.main_entry.refresh_models()
        self.main_entry.modules_change([Path(p).name for p in paths])

    def low_bits(self, choice: str) -> None:
        """Forge's "Diffusion in Low Bits" (e.g. "bnb-nf4", "float8-e4m3fn", "Automatic")."""
        self.shared.opts.set("forge_unet_storage_dtype", choice)
        self.main_entry.refresh_model_loading_parameters()

    def generate(self, prompt: str = "a photo"):
        p = self.processing.StableDiffusionProcessing(prompt=prompt)
        return self.processing.process_images(p)

    def merge_lora(self, strength: float = 0.5, seed: int = 0) -> list[str]:
        """What Forge's built-in LoRA extension does with <lora:x:strength> (non-online): patch clones of the
        original patchers and let the next load merge them. Returns the UNet keys it patched."""
        model = self.model
        unet = model.forge_objects_original.unet.clone()
        generator = torch.Generator().manual_seed(seed)
        keys = [k for k, _ in unet.model.named_parameters() if k.endswith(("to_q.weight", "to_v.weight"))]
        patches = {k: ("diff", (torch.randn(p.shape, generator=generator),))
                   for k, p in unet.model.named_parameters() if k in keys}
        unet.add_patches(filename="x.safetensors", patches=patches, strength_patch=strength)
        model.forge_objects.unet = unet
        model.forge_objects.unet.refresh_loras()
        return keys


def _purge_modules() -> None:
    for name in [n for n in sys.modules if n.split(".")[0] in (*_PACKAGES, "networks", "ui_extra_networks_lora")]:
        del sys.modules[name]
    torch.load = TORCH_LOAD


def _start(root: Path, load: bool, monkeypatch: pytest.MonkeyPatch) -> ForgeStub:
    from webui_stub.tiny import save_tiny

    data_dir = root / "forge"
    monkeypatch.setenv("WEBUI_STUB_ARGS", shlex.join(["--data-dir", str(data_dir)]))
    monkeypatch.setenv("WEBUI_STUB_SCRIPT_PATH", str(data_dir))
    monkeypatch.setenv("WEBUI_STUB_EXTENSIONS", str(REPO_DIR))
    _purge_modules()
    from modules import devices, options, sd_models, shared
    from modules_forge import main_entry, shared_options

    templates: dict = {}
    shared_options.register(templates, options.options_section, options.OptionInfo)
    for key, info in templates.items():
        shared.opts.add_option(key, info)
    devices.device = shared.device = torch.device("cpu")
    checkpoint = save_tiny(Path(sd_models.model_path) / CHECKPOINT_NAME)
    sd_models.list_models()
    # make_checkpoint_manager_ui: with nothing selected, Forge selects the first checkpoint by its name
    shared.opts.set("sd_model_checkpoint", next(iter(sd_models.checkpoints_list.values())).name)
    main_entry.refresh_models()
    main_entry.refresh_model_loading_parameters()  # forge_main_entry
    stub = ForgeStub(data_dir, checkpoint)
    if load:
        stub.generate()
    return stub


@pytest.fixture
def make_forge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., ForgeStub]]:
    """make_forge(load=True): start the Forge stand-in (load: run one generation, so a model is in memory)."""
    syspath = list(sys.path)
    sys.path[:0] = [str(FORGE_DIR), str(TESTS_DIR)]
    started = []

    def start(load: bool = True) -> ForgeStub:
        started.append(len(started))
        return _start(tmp_path / f"host{len(started)}", load, monkeypatch)

    try:
        yield start
    finally:
        _purge_modules()
        sys.path[:] = syspath


@pytest.fixture
def forge(make_forge: Callable[..., ForgeStub]) -> ForgeStub:
    """The Forge stand-in with the tiny SD1 checkpoint loaded (modules stored in fp16, as on a GPU)."""
    return make_forge()
