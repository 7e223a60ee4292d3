"""What the tab and the API need from their host, as plain callables.

The WebUI's script file fills one in from `hosts.webui` and the WebUI's call queue; `folder_adapter` fills one
in for a folder of checkpoints (the standalone UI and the tests). The tab and API never import the WebUI.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import DreamboothError
from ..hosts.base import Host
from ..hosts.files import FolderHost
from ..inputs import check_inputs, image_files
from ..train.devices import deepspeed_installed, device_choices
from ..train.guard import check_where_it_writes
from ..train.resuming import check_no_earlier_results, check_run_choice


def _same(fn: Callable) -> Callable:
    return fn


@dataclass
class HostAdapter:
    # (config, checkpoint title picked in the tab or None) -> (config to train, host to train with)
    prepare: Callable[[Config, str | None], tuple[Config, Host]]
    projects_dir: Callable[[], Path]
    # {"title", "hash", "vae", "family", "problem"} of what an empty base_model trains
    model_summary: Callable[[], dict]
    checkpoint_titles: Callable[[], list[str]]
    # Wraps the tab's Start handler; its first argument is the page's task id (the WebUI: wrap_gradio_gpu_call).
    # Called as foreground(fn, extra_outputs): extra_outputs are what the host shows before its error HTML.
    foreground: Callable[[Callable, list], Callable] = lambda fn, extra_outputs: fn
    # Wraps the API's background thread body (the WebUI: its queue lock and shared.state.begin/end).
    background: Callable[[Callable[[], Any]], Callable[[], Any]] = _same
    # Wraps a short call that needs the device, e.g. loading a checkpoint (the WebUI: wrap_queued_call).
    queued: Callable[[Callable], Callable] = _same
    # path or title -> title: load it and make it the host's selected checkpoint; None where the host has no
    # loaded model to replace (then the tab shows no Load button and the API has no /load)
    load_checkpoint: Callable[[str], str] | None = None
    # (fresh choices, selected title) of the host's own checkpoint dropdown; None where there is none
    checkpoint_selection: Callable[[], tuple[list[str], str | None]] | None = None
    # The file of the model the host has loaded now (None when none): the tab shows a result in use as such
    loaded_file: Callable[[], str | None] = lambda: None
    # Changes each time the host loads a model or selects another checkpoint, so the tab redraws its model box only then
    model_version: Callable[[], Any] = lambda: 0
    # Whether to load the result right after a successful run from the tab (a WebUI setting)
    load_after_training: Callable[[], bool] = lambda: False
    # The devices a run can train on, for the tab's device choice ("cuda:1 (name, free memory)" ...)
    device_choices: Callable[[], list[str]] = lambda: device_choices()
    # Whether the deepspeed package is here (the tab shows deepspeed_offload only then)
    deepspeed_installed: Callable[[], bool] = lambda: deepspeed_installed()

    def prepare_checked(self, config: Config, title: str | None, *, resume: bool = False) -> tuple[Config, Host]:
        """`prepare`, then the checks that need no weights (the host's; the paths the run will write; Start or
        Resume against the project's stopped run; Start against its earlier results) and that the files and folders
        it names exist: a refusal comes before any run starts."""
        config, host = self.prepare(config, title)
        check_inputs(config)
        host.check(config)
        images = sum(len(image_files(concept.instance_dir)) for concept in config.concepts)
        check_where_it_writes(config, host, images)
        check_run_choice(config.project_name, host.work_dir(config.project_name), resume=resume)
        if not resume:
            from ..train.trained import result_folders

            check_no_earlier_results(config.project_name, result_folders(host, config))
        return config, host


def folder_adapter(models_dir: str | Path, work_root: str | Path | None = None) -> HostAdapter:
    """A host adapter for checkpoints in `models_dir/Stable-diffusion` (the WebUI's folder layout)."""
    host = FolderHost(models_dir, work_root)
    checkpoints = Path(models_dir) / "Stable-diffusion"

    def titles() -> list[str]:
        if not checkpoints.is_dir():
            return []
        files = [p for p in checkpoints.rglob("*") if p.suffix in (".safetensors", ".ckpt") and p.is_file()]
        return sorted(str(p.relative_to(checkpoints)) for p in files)

    def prepare(config: Config, title: str | None) -> tuple[Config, Host]:
        if title:
            if title not in titles():
                raise DreamboothError(f"Checkpoint {title!r} is not in {checkpoints}; pick one from the list.")
            config = dataclasses.replace(config, base_model=str(checkpoints / title))
        return config, host

    def summary() -> dict:
        return {"title": "", "hash": "", "vae": "", "family": "",
                "problem": "No model is loaded here: the run trains the checkpoint in \"Base model\", or the one "
                           "picked below."}

    return HostAdapter(prepare=prepare, projects_dir=lambda: host.work_root, model_summary=summary,
                       checkpoint_titles=titles)
