"""Shared pieces of the UI, API and browser tests: a tiny checkpoint, training images, quick run settings."""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path

from PIL import Image

from dreambooth_ext.config import default_config, to_dict
from dreambooth_ext.errors import DreamboothError
from dreambooth_ext.hosts.base import Host
from dreambooth_ext.hosts.files import FolderHost
from dreambooth_ext.models.tiny import save_tiny_checkpoint


def make_instance_images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, color in enumerate([(200, 30, 30), (30, 200, 30)]):
        image = Image.new("RGB", (64, 64), color)
        image.paste((250, 250, 0), (10 + 5 * i, 10, 40, 40))
        image.save(folder / f"img{i}.png")
    return folder


def make_models_dir(root: Path) -> Path:
    """A WebUI-like models folder with one tiny SD1 checkpoint, `Stable-diffusion/tiny.safetensors`."""
    models = root / "models"
    save_tiny_checkpoint(models / "Stable-diffusion" / "tiny.safetensors", family="sd1", seed=0)
    return models


def quick_run_data(base_model: Path | str, instance_dir: Path, project: str = "quick", **overrides) -> dict:
    """A run that finishes in seconds on CPU: 64 px, 2 steps, no class images, fp32 result."""
    data = to_dict(default_config())
    data.update({"project_name": project, "base_model": str(base_model), "resolution": 64, "max_train_steps": 2,
                 "learning_rate": 1e-4, "prior_preservation": False, "save_precision": "fp32",
                 "device": "cpu", "mixed_precision": "no", "sample_steps": 2})
    data["concepts"] = [dict(data["concepts"][0], instance_dir=str(instance_dir), num_class_images=0)]
    concept = overrides.pop("concept", {})
    data["concepts"][0].update(concept)
    data.update(overrides)
    return data


class BlockingHost(Host):
    """A host whose load_base waits until released, then fails: keeps a run 'active' for as long as a test needs."""

    def __init__(self, root: Path):
        self.inner = FolderHost(root)
        self.entered = threading.Event()
        self.release = threading.Event()

    def check(self, config):
        pass  # the refusals come from load_base, once the run is active

    def load_base(self, config):
        self.entered.set()
        self.release.wait(30)
        raise DreamboothError("blocking host released: no model here")

    def checkpoint_path(self, project, step):
        return self.inner.checkpoint_path(project, step)

    def lora_path(self, project, step):
        return self.inner.lora_path(project, step)

    def work_dir(self, project):
        return self.inner.work_dir(project)


def run_until_cancelled(config, host: Host, step: int):
    """Start a run and cancel it once it has made `step` optimizer steps; returns its result (state saved)."""
    from dreambooth_ext.train.run import TrainingRun

    holder = {}

    def stop(progress) -> None:
        if progress.phase == "training" and progress.step == step:
            holder["run"].cancel()

    holder["run"] = TrainingRun(config, host, on_progress=stop)
    return holder["run"].run()


def find_chromium() -> str | None:
    """Chromium's path for the browser tests ($DREAMBOOTH_CHROMIUM first), or None when there is none."""
    candidates = [os.environ.get("DREAMBOOTH_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                  shutil.which("chromium-browser")]
    return next((path for path in candidates if path and Path(path).is_file()), None)


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


# -- the tab's wording (gradio 3 and 4 alike: read from the page's config) ------------------------------------

ACRONYMS = {"vae": "VAE", "ema": "EMA", "unet": "UNet", "lora": "LoRA", "snr": "SNR", "cpu": "CPU", "gpu": "GPU",
            "gpus": "GPUs", "locon": "LoCon", "ddim": "DDIM", "sdxl": "SDXL"}
ABBREVIATIONS = {"lr", "num", "dir", "dtype", "p", "te", "ckpt", "cfg"}  # option-name shorthand, not words
SNAKE_CASE = re.compile(r"\b[A-Za-z0-9]+(?:_[A-Za-z0-9]+)+\b")
QUOTED = re.compile(r"(?<!\w)'[^']*'(?!\w)")  # a value as the user types it: 'lora', 'cuda:1'
MARKUP = re.compile(r"<[^<>]*>|\{[^{}]*\}")  # file-name patterns and prompt syntax: <project>, <lora:name:1>, {token}


def page_texts(config: dict) -> list[tuple[str, str]]:
    """(where, text) for every label, help line, placeholder and button text of a gradio page's config."""
    texts = []
    for component in config["components"]:
        props = component.get("props", {})
        where = props.get("elem_id") or f"{component.get('type')} {component.get('id')}"
        keys = ("label", "info", "placeholder") + (("value",) if component.get("type") == "button" else ())
        texts.extend((f"{where} {key}", props[key]) for key in keys if isinstance(props.get(key), str))
    return texts


def wording_problems(texts: list[tuple[str, str]], choice_values: set[str]) -> list[str]:
    """What in `texts` is not written as words: option names (snake_case that is no dropdown value), `code`,
    acronyms in the wrong case (Vae, lora), option-name shorthand (Lr, Flip p)."""
    problems = []
    for where, text in texts:
        unmarked = MARKUP.sub(" ", text)
        if "`" in text:
            problems.append(f"{where}: backticks in {text!r}")
        for token in SNAKE_CASE.findall(unmarked):
            if token not in choice_values:
                problems.append(f"{where}: {token!r} in {text!r}")
        for word in re.findall(r"(?<![.\w])[A-Za-z]+", QUOTED.sub(" ", unmarked)):  # not .ckpt, torch.compile
            proper = ACRONYMS.get(word.lower())
            if proper and word != proper:
                problems.append(f"{where}: {word!r} (write {proper}) in {text!r}")
            if word.lower() in ABBREVIATIONS:
                problems.append(f"{where}: shorthand {word!r} in {text!r}")
    return problems


def choose(page, elem_id: str, value: str) -> None:
    """Pick `value` in a gradio dropdown (3.41 and 4.40 both mark the options so)."""
    page.click(f"#{elem_id} input")
    page.locator(f"[data-testid='dropdown-option'][aria-label='{value}']").first.click()


def check_rates_follow_train_mode(page) -> None:
    """In a browser on the tab: the Training group shows the learning rates of the chosen train mode, and no
    other (a rate the run would not use must not be there to be typed in)."""
    if not page.locator("#dreambooth_max_train_steps").is_visible():
        page.click("#dreambooth_group_training .label-wrap")  # closed at first
    full = ("#dreambooth_learning_rate", "#dreambooth_text_encoder_lr")
    lora = ("#dreambooth_lora_learning_rate", "#dreambooth_lora_text_encoder_lr")
    _expect_shown(page, full, lora)
    choose(page, "dreambooth_train_mode", "lora")
    _expect_shown(page, lora, full)
    text = page.inner_text("#dreambooth_lora_learning_rate")
    if "LoRA learning rate" not in text or "Default 1e-4" not in text:
        raise AssertionError(f"the LoRA rate's field reads {text!r}")
    choose(page, "dreambooth_train_mode", "full")
    _expect_shown(page, full, lora)


def _expect_shown(page, shown: tuple[str, ...], hidden: tuple[str, ...]) -> None:
    for selector in shown:
        page.wait_for_selector(selector, state="visible", timeout=30_000)
    for selector in hidden:
        page.wait_for_selector(selector, state="hidden", timeout=30_000)


# -- driving the tab in a browser (gradio 3.41 and 4.40 alike) -------------------------------------------------


def fill(page, elem_id: str, value: str) -> None:
    """Type `value` into a text or number field of the tab, then leave it (gradio reads it on change)."""
    field = page.locator(f"#{elem_id} textarea, #{elem_id} input[type=number], #{elem_id} input[type=text]").first
    field.fill(value)
    field.press("Tab")


def open_group(page, group: str, field: str) -> None:
    """Open the tab's group (an accordion) unless `field`, one of its fields, shows already."""
    if not page.locator(f"#{field}").is_visible():
        page.click(f"#dreambooth_group_{group} .label-wrap")
    page.wait_for_selector(f"#{field}", state="visible", timeout=30_000)


def status_text(page) -> str:
    return page.inner_text("#dreambooth_status")


def start_cancel_resume(page, models: Path, images: Path, project: str) -> int:
    """Start a long run in the tab, Cancel it once it trains, then Resume it with the steps cut to two more than it
    made: the resumed run must finish. Returns the step it was cancelled at."""
    fill(page, "dreambooth_project_name", project)
    fill(page, "dreambooth_base_model", str(models / "Stable-diffusion" / "tiny.safetensors"))
    fill(page, "dreambooth_c0_instance_dir", str(images))
    fill(page, "dreambooth_resolution", "64")
    open_group(page, "training", "dreambooth_max_train_steps")
    page.locator("#dreambooth_prior_preservation input[type=checkbox]").uncheck()
    fill(page, "dreambooth_max_train_steps", "5000")
    page.click("#dreambooth_start")
    page.wait_for_selector("#dreambooth_status [data-state='running'] .dreambooth-numbers:has-text('loss')",
                           timeout=120_000)
    page.click("#dreambooth_cancel")
    page.wait_for_selector("#dreambooth_status [data-state='cancelled']", timeout=120_000)
    stopped = re.search(r"Cancelled at step (\d+)", status_text(page))
    if stopped is None:
        raise AssertionError(f"the cancelled run's status reads {status_text(page)!r}")
    step = int(stopped.group(1))
    fill(page, "dreambooth_max_train_steps", str(step + 2))
    page.click("#dreambooth_resume")
    page.wait_for_selector("#dreambooth_status [data-state='finished']", timeout=120_000)
    if f"Finished: {step + 2} steps" not in status_text(page):
        raise AssertionError(f"the resumed run's status reads {status_text(page)!r}")
    return step


def press_the_other_buttons(page, project: str) -> None:
    """With the form filled in (a tiny run's folders): Check dataset, Save, Refresh list, Load, Lowest memory and
    the model box's Refresh each do what they say."""
    page.click("#dreambooth_check")
    page.wait_for_selector("#dreambooth_dataset_report :text('Dataset check')", timeout=60_000)
    fill(page, "dreambooth_project_name", project)
    page.click("#dreambooth_project_save")
    page.wait_for_selector(f"#dreambooth_project_message :text('{project}')", timeout=30_000)
    page.click("#dreambooth_project_refresh")
    choose(page, "dreambooth_project_pick", project)  # listed
    fill(page, "dreambooth_resolution", "128")
    page.click("#dreambooth_project_load")
    page.wait_for_selector(f"#dreambooth_project_message :text(\"Loaded project '{project}'\")", timeout=30_000)
    resolution = page.locator("#dreambooth_resolution input[type=number]").first
    page.wait_for_function("field => field.value === '64'", arg=resolution.element_handle(), timeout=30_000)
    open_group(page, "memory", "dreambooth_lowest_memory")
    page.click("#dreambooth_lowest_memory")
    optimizer = page.locator("#dreambooth_optimizer input").first
    page.wait_for_function("field => field.value === 'adafactor'", arg=optimizer.element_handle(), timeout=30_000)
    page.click("#dreambooth_model_refresh")
    page.wait_for_selector("#dreambooth_model_info :text('No model is loaded here')", timeout=30_000)
