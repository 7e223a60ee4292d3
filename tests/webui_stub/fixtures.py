"""pytest fixtures that start the stand-in host: `make_webui(...)` (a factory) and `webui` (the default).

Use from a test module or a conftest: `pytest_plugins = ("webui_stub.fixtures",)`.
Each call gets a fresh `modules` package (its module-level state is new), a data dir in tmp with a tiny SD1
checkpoint in models/Stable-diffusion, this repository's preload.py applied to the host's parser, and the
checkpoint loaded as `shared.sd_model` (fp16 unless --no-half is passed). Afterwards `modules.*` is removed from
sys.modules and sys.path is restored.
"""

from __future__ import annotations

import importlib
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType

import pytest
import torch

from .tiny import save_tiny, tiny_state_dict

STUB_DIR = Path(__file__).resolve().parent
TESTS_DIR = STUB_DIR.parent
REPO_DIR = TESTS_DIR.parent
CHECKPOINT_NAME = "tiny_sd1.safetensors"
TORCH_LOAD = torch.load  # before any stand-in host replaced it

__all__ = ["WebUIStub", "make_webui", "save_tiny", "tiny_state_dict", "webui"]


class WebUIStub:
    """A started stand-in host: its folders, its modules and helpers to change what is loaded."""

    def __init__(self, data_dir: Path, models_dir: Path, checkpoint: Path):
        self.data_dir = data_dir
        self.models_dir = models_dir
        self.checkpoint = checkpoint

    def __getattr__(self, name: str) -> ModuleType:
        """`webui.shared`, `webui.sd_models`, ... are the stand-in's modules."""
        if name.startswith("_"):
            raise AttributeError(name)
        return importlib.import_module(f"modules.{name}")

    def write_checkpoint(self, name: str, family: str = "sd1", seed: int = 0, folder: Path | None = None, *,
                         with_yaml: bool = True, parameterization: str = "eps") -> Path:
        """A tiny checkpoint in the host's checkpoint folder (or `folder`), with the yaml the host needs for it."""
        return save_tiny(Path(folder or self.sd_models.model_path) / name, family, seed, with_yaml=with_yaml,
                         parameterization=parameterization)

    def generate(self, prompt: str = "a photo", **override_settings):
        """What txt2img does about the model: load the selected checkpoint first. Returns the Processed."""
        p = self.processing.StableDiffusionProcessing(prompt=prompt, override_settings=dict(override_settings))
        return self.processing.process_images(p)

    def write_vae(self, name: str, seed: int = 1) -> Path:
        """A standalone VAE file (keys without the first_stage_model. prefix) in models/VAE."""
        import safetensors.torch

        prefix = "first_stage_model."
        vae = {k[len(prefix):]: v for k, v in tiny_state_dict("sd1", seed).items() if k.startswith(prefix)}
        path = Path(self.sd_vae.vae_path) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(vae, str(path))
        self.sd_vae.refresh_vae_list()
        return path

    def load(self, title: str | None = None):
        """Load (or switch to) a checkpoint like picking it in the dropdown: sd_models.reload_model_weights."""
        self.sd_models.list_models()
        info = self.sd_models.get_closet_checkpoint_match(title) if title else None
        return self.sd_models.reload_model_weights(info=info)

    def api_refresh_checkpoints(self) -> None:
        """POST /sdapi/v1/refresh-checkpoints (modules/api/api.py): shared.refresh_checkpoints() in the queue lock,
        which re-selects the --ckpt file when the host was started with one, loading nothing."""
        with self.call_queue.queue_lock:
            self.shared.refresh_checkpoints()

    def page_load(self, elem_id: str):
        """What a page loaded now receives for the component `elem_id` from the events the host runs on page load
        (e.g. `txt2img_lora_cards_html`: the cards of txt2img's Lora tab); None when no load event sets it."""
        for dependency, block_fn in zip(self.shared.demo.dependencies, self.shared.demo.fns, strict=True):
            ids = [output.elem_id for output in block_fn.outputs]
            if dependency["trigger"] == "load" and elem_id in ids:
                return block_fn.fn()[ids.index(elem_id)]
        return None

    def click(self, elem_id: str) -> dict:
        """Press the button `elem_id` (a hidden one too, as the page's JS does): {output elem_id: value}."""
        demo = self.shared.demo
        for dependency, block_fn in zip(demo.dependencies, demo.fns, strict=True):
            targets = [demo.blocks[target].elem_id for target in dependency["targets"]]
            if dependency["trigger"] == "click" and elem_id in targets:
                return dict(zip([output.elem_id for output in block_fn.outputs], block_fn.fn(), strict=True))
        raise KeyError(f"no button {elem_id!r} on the page")

    def select_vae(self, name: str):
        """Settings > VAE > SD VAE = name (or "None"), applied as the host applies it."""
        self.shared.opts.data["sd_vae"] = name
        return self.sd_vae.reload_vae_weights()


def _purge_modules() -> None:
    """The host is gone: its modules (the built-in Lora extension's too), and the torch.load its
    modules.safe put in place."""
    for name in [n for n in sys.modules if n in ("modules", "networks", "ui_extra_networks_lora")
                 or n.startswith("modules.")]:
        del sys.modules[name]
    torch.load = TORCH_LOAD


def _start(root: Path, args: Sequence[str], load: bool, device: str | None, ckpt: bool,
           monkeypatch: pytest.MonkeyPatch) -> WebUIStub:
    data_dir = root / "webui"
    argv = ["--data-dir", str(data_dir), *args]
    if ckpt:  # started with --ckpt naming the checkpoint it serves (as many users start the WebUI)
        argv += ["--ckpt", str(data_dir / "models" / "Stable-diffusion" / CHECKPOINT_NAME)]
    monkeypatch.setenv("WEBUI_STUB_ARGS", shlex.join(argv))
    monkeypatch.setenv("WEBUI_STUB_SCRIPT_PATH", str(data_dir))
    monkeypatch.setenv("WEBUI_STUB_EXTENSIONS", str(REPO_DIR))
    _purge_modules()
    from modules import devices, paths, sd_models, sd_models_config, shared

    sd_models_config.write_default_configs()
    devices.device = torch.device(device) if device else devices.get_optimal_device()
    shared.device = devices.device
    models_dir = Path(paths.models_path)
    checkpoint = save_tiny(Path(sd_models.model_path) / CHECKPOINT_NAME)
    sd_models.list_models()
    # The built-in Lora extension: the host puts its folder on sys.path and lists the Lora folder at start; its
    # script registers the Lora page for txt2img and img2img before the UI is built (after the host's own pages).
    importlib.import_module("networks").list_available_networks()
    from modules import script_callbacks, ui_extra_networks

    ui_extra_networks.initialize()
    ui_extra_networks.register_default_pages()
    lora_page = importlib.import_module("ui_extra_networks_lora").ExtraNetworksPageLora
    script_callbacks.on_before_ui(lambda: ui_extra_networks.register_page(lora_page()))
    if load:
        shared.opts.data["sd_model_checkpoint"] = sd_models.checkpoint_tiles()[0]
        sd_models.load_model()
    return WebUIStub(data_dir, models_dir, checkpoint)


@pytest.fixture
def make_webui(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., WebUIStub]]:
    """make_webui(*args, load=True, device=None, ckpt=False): start the stand-in host with these command-line flags
    (ckpt: also --ckpt naming its tiny checkpoint).

    device: what `devices.device` is (default: cuda when there is one, else cpu). A device this machine lacks
    (e.g. "cuda" on a CPU box) is only recorded by the fake model's moves, so release/restore can be observed.
    """
    syspath = list(sys.path)
    sys.path[:0] = [str(STUB_DIR), str(TESTS_DIR), str(STUB_DIR / "builtin_lora")]
    started = []

    def start(*args: str, load: bool = True, device: str | None = None, ckpt: bool = False) -> WebUIStub:
        started.append(len(started))
        return _start(tmp_path / f"host{len(started)}", args, load, device, ckpt, monkeypatch)

    try:
        yield start
    finally:
        _purge_modules()
        sys.path[:] = syspath


@pytest.fixture
def webui(make_webui: Callable[..., WebUIStub]) -> WebUIStub:
    """The stand-in host with default flags and the tiny SD1 checkpoint loaded (fp16)."""
    return make_webui()
