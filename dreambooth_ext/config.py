"""The one schema of every option: type, default, range, help text and group.

The WebUI tab, the command line, the HTTP API, saved project files and the defaults all come from the
`OPTIONS` and `CONCEPT_OPTIONS` tables below. Adding an option is one entry here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

SCHEMA_VERSION = 1

GROUPS = ("model", "concepts", "training", "lora", "memory", "saving", "samples")


@dataclass(frozen=True)
class Option:
    """One setting. `kind` is one of: int, float, bool, str, text, path, choice.

    `text` is the help; it names another option as `name` in backticks, which `help` (the command line) turns into
    its flag and `info` (the tab) into its label, so each reads right where it is shown. `mode`: the train mode
    that uses the option ("" for every mode); the tab hides it in the other mode."""

    name: str
    kind: str
    default: Any
    text: str
    group: str
    label: str = ""  # what the tab calls it; empty: made from the name (a new option still gets a widget)
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = ()
    auto: Any = None  # a value outside min..max that means "decided from the base model"
    mode: str = ""

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", self.name.replace("_", " ").capitalize())

    @property
    def help(self) -> str:
        """The help as the command line shows it: other options by their flags."""
        return _name_references(self.text, lambda option: f"--{option.name}")

    @property
    def info(self) -> str:
        """The help as the tab shows it: other options by their labels."""
        return _name_references(self.text, lambda option: f'"{option.label}"')


_REFERENCE = re.compile(r"`(\w+)`")


def _name_references(text: str, name: Any) -> str:
    """`text` with each `option_name` in backticks replaced by name(option); other backticked words stay."""
    def replace(match: re.Match) -> str:
        option = OPTIONS_BY_NAME.get(match.group(1)) or CONCEPT_OPTIONS_BY_NAME.get(match.group(1))
        return name(option) if option is not None else match.group(0)

    return _REFERENCE.sub(replace, text)


def _opt(name, label, kind, default, group, text, **kw) -> Option:
    return Option(name=name, label=label, kind=kind, default=default, group=group, text=text, **kw)


CONCEPT_OPTIONS: tuple[Option, ...] = (
    _opt("instance_dir", "Training images folder", "path", "", "concepts",
         "Folder of training images of your subject. Sub-folders and file names may carry captions "
         "(JoePenna's conventions: 'img@a photo of S.jpg', one folder per subject, one per class)."),
    _opt("token", "Token", "str", "ohwx", "concepts",
         "The rare word that will mean your subject, e.g. 'ohwx'. Prompt with it AND the class word: "
         "'ohwx person', not just 'ohwx'."),
    _opt("class_word", "Class word", "str", "person", "concepts",
         "What your subject is: person, man, woman, dog, style... Used in prompts as {class}."),
    _opt("instance_prompt", "Caption of uncaptioned images", "str", "photo of {token} {class}", "concepts",
         "Caption for training images that have none of their own ({token} and {class} are filled in)."),
    _opt("class_dir", "Class images folder", "path", "", "concepts",
         "Folder of class (regularization) images. Empty: a folder in the project's work directory. "
         "Missing images are generated there with the base model."),
    _opt("class_prompt", "Class prompt", "str", "photo of {class}", "concepts",
         "Prompt of the class images, used to generate them and as their caption."),
    _opt("num_class_images", "Number of class images", "int", 100, "concepts",
         "How many class images prior preservation uses; missing ones are generated.", min=0, max=100000),
    _opt("generate_class_images", "Generate missing class images", "bool", True, "concepts",
         "Render missing class images with the base model into the `class_dir`. Off: that folder is used as it "
         "is, never written to (JoePenna's regularization folders are imported this way)."),
    _opt("token_only", "Token only (no class)", "bool", False, "concepts",
         "Caption images with the token alone and use no class images (as JoePenna's token-only setting does)."),
)

OPTIONS: tuple[Option, ...] = (
    # model
    _opt("project_name", "Project name", "str", "my_project", "model",
         "Name of the project: results are saved as <project>/<project>_<step>.safetensors."),
    _opt("base_model", "Base model", "path", "", "model",
         "Checkpoint to train (.safetensors or .ckpt). In the WebUI, empty means the loaded checkpoint."),
    _opt("vae", "VAE", "path", "", "model",
         "A VAE file to use instead of the checkpoint's own (optional)."),
    _opt("prediction_type", "Prediction type", "choice", "auto", "model",
         "What the model predicts. 'auto' reads it from the checkpoint's .yaml, metadata or the model itself.",
         choices=("auto", "epsilon", "v_prediction")),
    _opt("train_mode", "Train mode", "choice", "full", "model",
         "What to train: 'full' (a whole new checkpoint) or 'lora' (a LoRA: a small file of adapters, a few to a "
         "few hundred MB, used with <lora:name:1> on any checkpoint of the same family; far less memory). Each "
         "mode has learning rates of its own.",
         choices=("full", "lora")),
    _opt("resolution", "Resolution", "int", 0, "model",
         "Training image size in pixels (a multiple of 64). 0: the base model's own size (512 for SD1.x and SD2 "
         "base, 768 for SD2 768-v, 1024 for SDXL). Memory grows with its square.", min=64, max=2048, auto=0),
    # training
    _opt("max_train_steps", "Training steps", "int", 1000, "training",
         "Stop after this many optimizer steps (about 100 per training image works well). 0: stop after "
         "`num_train_epochs` instead.", min=0, max=10_000_000),
    _opt("num_train_epochs", "Epochs", "int", 0, "training",
         "Stop after this many passes over the training images (used when `max_train_steps` is 0).",
         min=0, max=100000),
    _opt("learning_rate", "Learning rate", "float", 2e-6, "training",
         "Learning rate of the UNet in a full fine-tune. Default 2e-6 (SD 1.5 and SDXL; 1e-6 suits SD 2.x). "
         "With `train_mode` 'lora', `lora_learning_rate` is used instead.", min=0.0, max=1.0, mode="full"),
    _opt("lora_learning_rate", "LoRA learning rate", "float", 1e-4, "training",
         "Learning rate of the UNet's adapters when `train_mode` is 'lora'. Default 1e-4. A full fine-tune uses "
         "`learning_rate` instead.", min=0.0, max=1.0, mode="lora"),
    _opt("lr_scheduler", "Learning-rate schedule", "choice", "constant", "training",
         "How the learning rate changes over the run.",
         choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")),
    _opt("lr_warmup_steps", "Warm-up steps", "int", 0, "training",
         "Steps over which the learning rate rises from 0.", min=0, max=1_000_000),
    _opt("lr_num_cycles", "Cosine restarts", "int", 1, "training",
         "cosine_with_restarts: how many times the learning rate falls to 0 and starts again.", min=1, max=1000),
    _opt("lr_power", "Polynomial power", "float", 1.0, "training",
         "polynomial: the power of the decay (1 is linear; 2 falls faster at first).", min=0.1, max=10.0),
    _opt("train_batch_size", "Batch size", "int", 1, "training",
         "Training images per step (each also brings a class image).", min=1, max=1024),
    _opt("gradient_accumulation_steps", "Gradient accumulation steps", "int", 1, "training",
         "Batches whose gradients are added up before each optimizer step.", min=1, max=1024),
    _opt("optimizer", "Optimizer", "choice", "adamw", "training",
         "adamw: 8 bytes of state per trained weight (SD1.5 full: 6.9 GB, SDXL: 20.5 GB). adamw_8bit: 2 bytes "
         "(needs bitsandbytes and a CUDA GPU; saves 5.2 GB on SD1.5, 15 GB on SDXL). adafactor: factored second "
         "moments (each weight as a matrix), no first moment: 6 MB of state on SD1.5, 19 MB on SDXL (saves 6.9 / "
         "20.5 GB), fixed learning rate as set.",
         choices=("adamw", "adamw_8bit", "adafactor")),
    _opt("adam_beta1", "AdamW beta 1", "float", 0.9, "training",
         "AdamW's decay of its running mean of the gradients (beta 1).", min=0.0, max=0.99999),
    _opt("adam_beta2", "AdamW beta 2", "float", 0.999, "training",
         "AdamW's decay of its running mean of the squared gradients (beta 2).", min=0.0, max=0.999999),
    _opt("adam_epsilon", "AdamW epsilon", "float", 1e-8, "training",
         "AdamW's epsilon (added to the divisor, so tiny gradients do not make huge steps).", min=0.0, max=1.0),
    _opt("weight_decay", "Weight decay (UNet)", "float", 1e-2, "training", "AdamW weight decay of the UNet.",
         min=0.0, max=1.0),
    _opt("max_grad_norm", "Gradient clipping", "float", 1.0, "training",
         "Clip gradients to this norm (0: no clipping).", min=0.0, max=1000.0),
    _opt("train_text_encoder", "Train the text encoder", "bool", False, "training",
         "Also train the text encoder: better likeness, about 2 GB more memory."),
    _opt("text_encoder_lr", "Text encoder learning rate", "float", 1e-6, "training",
         "Learning rate of the text encoder in a full fine-tune. Default 1e-6. With `train_mode` 'lora', "
         "`lora_text_encoder_lr` is used instead.", min=0.0, max=1.0, mode="full"),
    _opt("lora_text_encoder_lr", "LoRA text encoder learning rate", "float", 5e-5, "training",
         "Learning rate of the text encoders' adapters when `train_mode` is 'lora' (with `train_text_encoder` "
         "on). Default 5e-5. A full fine-tune uses `text_encoder_lr` instead.", min=0.0, max=1.0, mode="lora"),
    _opt("text_encoder_weight_decay", "Weight decay (text encoder)", "float", 1e-2, "training",
         "AdamW weight decay of the text encoder.", min=0.0, max=1.0),
    _opt("stop_text_encoder", "Text encoder trains for (fraction of steps)", "float", 1.0, "training",
         "Fraction of the steps after which the text encoder stops training (1.0: trains throughout).",
         min=0.0, max=1.0),
    _opt("prior_preservation", "Prior preservation", "bool", True, "training",
         "Train on class images too, so the model keeps what the class word meant (prior preservation)."),
    _opt("prior_loss_weight", "Prior loss weight", "float", 1.0, "training", "Weight of the class images' loss.",
         min=0.0, max=100.0),
    _opt("noise_offset", "Noise offset", "float", 0.0, "training",
         "Offset noise (about 0.05-0.1) lets the model learn very dark and very bright images.", min=0.0, max=1.0),
    _opt("min_snr_gamma", "Min-SNR gamma", "float", 0.0, "training",
         "Min-SNR loss weighting (5 is typical; 0: off). Speeds up convergence.", min=0.0, max=100.0),
    _opt("ema", "EMA (average of the weights)", "bool", False, "training",
         "Keep an exponential moving average (EMA) of the UNet's weights and save it."),
    _opt("ema_decay", "EMA decay", "float", 0.9999, "training",
         "EMA decay per step, reached after a warm-up (step t uses at most (1+t)/(10+t), as diffusers does).",
         min=0.0, max=1.0),
    _opt("ema_on_cpu", "Keep the EMA on the CPU", "bool", True, "training",
         "Keep the EMA weights in CPU memory (saves GPU memory)."),
    _opt("seed", "Seed", "int", 23, "training", "Seed of all randomness: same seed, same run.",
         min=0, max=2**32 - 1),
    _opt("flip_p", "Flip probability", "float", 0.0, "training",
         "Probability of mirroring a training image. Keep 0 for faces (they are not symmetric).",
         min=0.0, max=1.0),
    _opt("crop", "Cropping", "choice", "center", "training", "How images larger than the resolution are cropped.",
         choices=("center", "random")),
    _opt("aspect_ratio_buckets", "Aspect-ratio buckets", "bool", False, "training",
         "Train at several aspect ratios (each with about as many pixels as the square resolution) instead of "
         "cropping to a square."),
    _opt("class_image_steps", "Class image steps", "int", 30, "training",
         "DDIM steps to generate each missing class image.", min=1, max=1000),
    _opt("class_image_guidance", "Class image guidance scale", "float", 7.5, "training",
         "Guidance scale to generate class images.", min=1.0, max=50.0),
    # lora (the LoRA learning rates sit in training, beside the full fine-tune's, which they replace)
    _opt("lora_rank", "LoRA rank", "int", 16, "lora",
         "Rank of each adapter: its capacity and its file size (in fp16 at 16: about 14 MB for SD1.5 and 85 MB for "
         "SDXL, plus 5 / 29 MB with the text encoders).",
         min=1, max=1024),
    _opt("lora_alpha", "LoRA alpha", "float", 0.0, "lora",
         "Adapters are scaled by alpha / rank. 0: alpha = rank (scale 1).", min=0.0, max=4096.0),
    _opt("lora_dropout", "LoRA dropout", "float", 0.0, "lora", "Dropout on each adapter's input while training.",
         min=0.0, max=0.9),
    _opt("lora_conv_rank", "LoRA convolution rank (LoCon)", "int", 0, "lora",
         "Also adapt the UNet's 3x3 convolutions at this rank (kohya's LoCon; alpha = rank). 0: off.",
         min=0, max=1024),
    _opt("lora_save_merged", "Also save a merged checkpoint", "bool", False, "lora",
         "Also write the base checkpoint with the LoRA merged in, next to the other checkpoints."),
    # memory
    _opt("device", "Device", "str", "auto", "memory",
         "Device to train on: 'auto', 'cpu', 'cuda', 'cuda:1' ..."),
    _opt("gpus", "Several GPUs", "str", "", "memory",
         "Train on several GPUs at once (data-parallel, same result as one GPU): their numbers, e.g. 0,1, or all. "
         "The run is started by accelerate's launcher in processes of its own, which read the checkpoint file, "
         "not the WebUI's model in memory. Empty: one device, the one above."),
    _opt("deepspeed_offload", "DeepSpeed with the optimizer in RAM", "bool", False, "memory",
         "Train through DeepSpeed ZeRO stage 2 with the optimizer's state and step in system RAM, for cards too "
         "small for a full fine-tune: the GPU keeps the model and its activations; RAM needs about 16 bytes per "
         "trained weight (SD1.5 14 GB, SDXL 41 GB) and each step is slower. Runs through accelerate's launcher in "
         "processes of its own on the checkpoint file (as `gpus` does: on those GPUs, or on one). Needs the "
         "deepspeed package, `optimizer` adamw, `weights_dtype` fp32 and `fused_backward` off."),
    _opt("mixed_precision", "Mixed precision", "choice", "auto", "memory",
         "Compute in fp16/bf16 with fp32 master weights (the backward pass casts each weight again rather than "
         "keeping its half-precision copy). auto: fp16 on CUDA; bf16 on a CPU that computes it natively (AVX-512 "
         "BF16 or AMX: steps 1.2x to 1.6x faster there), none on other CPUs. bf16 on a CPU needs torch 2.2 or "
         "newer (older ones crash in its attention).",
         choices=("auto", "no", "fp16", "bf16")),
    _opt("fused_backward", "Fused backward pass", "bool", False, "memory",
         "Update each weight the moment its gradient is ready and free that gradient at once: no full set of "
         "gradients in memory (saves 3.4 GB on SD1.5, 10 GB on SDXL in fp32; half that with bf16 weights). Needs "
         "`max_grad_norm` 0 and `mixed_precision` bf16 or no (not fp16); saves nothing with gradient "
         "accumulation."),
    _opt("weights_dtype", "Precision of the trained weights", "choice", "fp32", "memory",
         "bf16 halves the weights' memory (and their gradients'): SD1.5 full saves 1.7 + 1.7 GB, SDXL 5.1 + 5.1 GB; "
         "every update is rounded stochastically so small ones are not lost. Needs `mixed_precision` bf16.",
         choices=("fp32", "bf16")),
    _opt("compile_unet", "Compile the UNet", "bool", False, "memory",
         "Compile the UNet with torch.compile (a compile of a minute or more before the first step). On a GPU it "
         "usually makes steps faster, so it pays on long runs; on a CPU it measured no faster. No memory saving. "
         "Needs torch 2.2 or newer (the tab hides it before)."),
    _opt("gradient_checkpointing", "Gradient checkpointing", "choice", "auto", "memory",
         "Recompute activations in the backward pass: much less memory, about 20% slower on a GPU (a fifth to a "
         "third on a CPU). auto: on with a GPU, where memory runs out first; off on a CPU, where time does.",
         choices=("auto", "on", "off")),
    _opt("cache_latents", "Cache the latents", "bool", True, "memory",
         "Encode every image with the VAE once, then free the VAE from the GPU."),
    _opt("precompute_text_embeddings", "Precompute text embeddings", "bool", True, "memory",
         "Encode every caption once when the text encoder is not trained, then free it from the GPU."),
    # saving
    _opt("save_every_n_steps", "Save every N steps", "int", 0, "saving",
         "Also save a model (and resumable training state) every N steps. 0: only at the end.",
         min=0, max=10_000_000),
    _opt("save_precision", "Precision of the saved model", "choice", "fp16", "saving",
         "fp16 (about 2 GB for SD1.5) or fp32.", choices=("fp16", "fp32")),
    # samples
    _opt("sample_every_n_steps", "Sample every N steps", "int", 0, "samples",
         "Render sample images every N steps (0: never).", min=0, max=10_000_000),
    _opt("sample_prompts", "Sample prompts", "text", "photo of {token} {class}", "samples",
         "One prompt per line for the sample images ({token} and {class} are filled in)."),
    _opt("sample_negative_prompt", "Sample negative prompt", "str", "", "samples",
         "Negative prompt of the sample images."),
    _opt("sample_seed", "Sample seed", "int", 42, "samples",
         "Seed of the sample images (fixed, so they are comparable).", min=0, max=2**32 - 1),
    _opt("sample_steps", "Sample steps", "int", 20, "samples", "DDIM steps for each sample image.",
         min=1, max=1000),
    _opt("sample_guidance", "Sample guidance scale", "float", 7.5, "samples", "Guidance scale of the sample images.",
         min=1.0, max=50.0),
    _opt("monitor_every_n_steps", "Learning monitor every N steps", "int", 0, "samples",
         "How often the learning monitor measures whether the model is still learning, has learned, copies the "
         "training photos, forgets the class or ignores prompts (a few fixed denoising passes and one 8-step "
         "render, no images written). It always measures the base model, every saved result and the end; 0: also "
         "every tenth of the run; N: also every N steps; -1: off.", min=-1, max=10_000_000),
    _opt("monitor_prompts", "Learning monitor prompt contexts", "text", "in a watercolor painting\non a beach",
         "samples",
         "One context per line that the learning monitor adds to the training captions, to measure whether prompts "
         "still change the subject (e.g. a style or a place). Empty: that signal is not measured."),
    _opt("stop_when_memorizing", "Stop when it copies the photos", "bool", False, "samples",
         "Stop the run early, as a finished one, when the learning monitor finds its renders copying the training "
         "photos: the result is saved at that step (and the monitor's best step is in its metadata). The monitor "
         "then renders at each of its points, not only at saves and the end. Needs `monitor_every_n_steps` 0 or "
         "more."),
    _opt("validation_dir", "Held-out photos folder", "path", "", "samples",
         "A folder of other photos of the subject, never trained on, captioned as the training images are (by "
         "the first concept's rules). The learning monitor measures its fit on them too and reports the held-out "
         "gap: their loss over the training photos' (near 1: it learns the subject; growing: it learns these "
         "photos only). Must be outside every training and class images folder."),
    _opt("hold_out_photos", "Hold out one photo in 8", "bool", False, "samples",
         "Keep one training photo in 8 (the 8th, 16th, ... of each concept's folder in name order, for a concept "
         "with 8 or more) out of training, for the learning monitor's held-out gap (as `validation_dir`, whose "
         "photos it adds to). Needs `monitor_every_n_steps` 0 or more."),
)

# The tab's "Lowest memory" button: every option that lowers peak memory, set the way that lowers it most (each
# option's help says what it saves). Trades speed (checkpointing) and some precision (bf16) for memory.
LOWEST_MEMORY = {
    "mixed_precision": "bf16", "weights_dtype": "bf16", "optimizer": "adafactor", "fused_backward": True,
    "max_grad_norm": 0.0, "gradient_checkpointing": "on", "cache_latents": True, "precompute_text_embeddings": True,
    "train_text_encoder": False, "ema_on_cpu": True, "train_batch_size": 1, "gradient_accumulation_steps": 1,
}

_PY_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "text": str, "path": str, "choice": str}


def _make_record(name: str, options: tuple[Option, ...], extra: list | None = None) -> type:
    fields = [(o.name, _PY_TYPES[o.kind], field(default=o.default)) for o in options]
    record = dataclasses.make_dataclass(name, fields + (extra or []))
    record.__module__ = __name__
    return record


Concept = _make_record("Concept", CONCEPT_OPTIONS)
Config = _make_record("Config", OPTIONS, [("concepts", list, field(default_factory=list))])
Concept.__doc__ = "One subject to learn: its images, token, class word and class images."
Config.__doc__ = "Every option of a training run; build with `from_dict`, check with `validate`."

OPTIONS_BY_NAME = {o.name: o for o in OPTIONS}
CONCEPT_OPTIONS_BY_NAME = {o.name: o for o in CONCEPT_OPTIONS}


# ----------------------------------------------------------------------------------------------------------
# Converting and checking values


def coerce(option: Option, value: Any) -> Any:
    """Turn a JSON/form/command-line value into the option's type; raises ValueError with a reason."""
    kind = option.kind
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.strip().lower() in ("true", "1", "yes", "on")
        raise ValueError("expected true or false")
    if kind == "int":
        if isinstance(value, bool):
            raise ValueError("expected a whole number")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise ValueError("expected a whole number") from None
            if number.is_integer():
                return int(number)
        raise ValueError("expected a whole number")
    if kind == "float":
        if isinstance(value, bool):
            raise ValueError("expected a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError("expected a number") from None
    if value is None:
        return ""
    if kind == "choice" and is_switch(option):
        return _switch_value(value)
    if not isinstance(value, str):
        raise ValueError("expected text")
    return value


def is_switch(option: Option) -> bool:
    """An on/off option with an `auto` setting (it was a plain true/false option once)."""
    return option.kind == "choice" and set(option.choices) == {"auto", "on", "off"}


def _switch_value(value: Any) -> Any:
    """true/false (JSON, older project files, a bare command-line flag) as on/off."""
    if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
        return "on" if value else "off"
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return "on" if value.strip().lower() in ("true", "1", "yes") else "off"
    if isinstance(value, str):
        return value.strip().lower()
    raise ValueError("expected auto, on or off")


def check(option: Option, value: Any) -> str | None:
    """Return why `value` is out of the option's range or choices, or None when it is fine."""
    if option.kind == "choice" and value not in option.choices:
        return f"must be one of {', '.join(option.choices)}"
    if option.kind in ("int", "float"):
        if value != value:  # NaN
            return "must be a number"
        if option.auto is not None and value == option.auto:
            return None
        low = option.min is not None and value < option.min
        high = option.max is not None and value > option.max
        auto = "" if option.auto is None else f" (or {option.auto:g}: the base model's own)"
        if (low or high) and option.min is not None and option.max is not None:
            return f"must be between {option.min:g} and {option.max:g}{auto}"
        if low:
            return f"must be at least {option.min:g}{auto}"
        if high:
            return f"must be at most {option.max:g}{auto}"
    return None


def _read_fields(options: dict[str, Option], data: dict, where: str, problems: list[str]) -> dict:
    values = {}
    for key, raw in data.items():
        option = options.get(key)
        if option is None:
            problems.append(f"{where}{key}: unknown option (value {raw!r}); check its spelling")
            continue
        try:
            value = coerce(option, raw)
        except ValueError as exc:
            problems.append(f"{where}{key} = {raw!r}: {exc}")
            continue
        reason = check(option, value)
        if reason:
            problems.append(f"{where}{key} = {raw!r}: {reason}")
            continue
        values[key] = value
    return values


def from_dict(data: dict) -> Config:
    """Build a Config from plain data (JSON, API, form), reporting every bad field at once."""
    if not isinstance(data, dict):
        raise ConfigError([f"the configuration must be a JSON object, got {type(data).__name__}"])
    data = dict(data)
    data.pop("schema_version", None)
    problems: list[str] = []
    raw_concepts = data.pop("concepts", [])
    values = _read_fields(OPTIONS_BY_NAME, data, "", problems)
    concepts = []
    if not isinstance(raw_concepts, list):
        problems.append(f"concepts = {raw_concepts!r}: must be a list of concepts")
        raw_concepts = []
    for i, raw in enumerate(raw_concepts):
        if not isinstance(raw, dict):
            problems.append(f"concepts[{i}] = {raw!r}: must be an object with instance_dir, token, class_word...")
            continue
        concepts.append(Concept(**_read_fields(CONCEPT_OPTIONS_BY_NAME, raw, f"concepts[{i}].", problems)))
    if problems:
        raise ConfigError(problems + _problems_besides(values, concepts, problems))
    return Config(**values, concepts=concepts)


def _problems_besides(values: dict, concepts: list[Concept], found: list[str]) -> list[str]:
    """The problems of the fields that were read (a bad field takes its default here), so that one reply lists
    every problem; those naming a field already reported are left out (its default would be judged instead)."""
    bad = {problem.split(" = ")[0].split(":")[0] for problem in found}
    named = re.compile("|".join(rf"(?<![\w.\[]){re.escape(name)}(?!\w)" for name in bad))
    return [problem for problem in config_problems(Config(**values, concepts=concepts)) if not named.search(problem)]


def to_dict(config: Config) -> dict:
    """Plain data with the schema version, ready for JSON."""
    return {"schema_version": SCHEMA_VERSION, **dataclasses.asdict(config)}


def gpu_list(value: str) -> list[int] | None:
    """The gpus option: [] for one device (empty), None for every GPU ("all"), else the GPU numbers (two or
    more, each once); raises ValueError saying what is wrong."""
    value = value.strip().lower()
    if not value:
        return []
    if value == "all":
        return None
    try:
        numbers = [int(part) for part in value.replace(" ", "").split(",")]
    except ValueError:
        raise ValueError("give GPU numbers separated by commas (e.g. 0,1), or all") from None
    if len(numbers) < 2 or len(set(numbers)) != len(numbers) or min(numbers) < 0:
        raise ValueError("name two or more different GPUs (e.g. 0,1); for one GPU, leave gpus empty and set device")
    return numbers


def zero_problems(config: Config) -> list[str]:
    """What DeepSpeed ZeRO cannot train, each with its fix."""
    problems = []
    if config.fused_backward:
        problems.append("fused_backward: DeepSpeed steps the optimizer itself; turn fused_backward off")
    if config.weights_dtype != "fp32":
        problems.append(f"weights_dtype = {config.weights_dtype}: DeepSpeed keeps its own fp32 copy of the weights; "
                        "set weights_dtype fp32 (mixed_precision bf16 computes in bf16)")
    if config.optimizer != "adamw":
        problems.append(f"optimizer = {config.optimizer}: DeepSpeed hands the optimizer flat pieces of the weights "
                        "(Adafactor cannot factor them, 8-bit AdamW does not run on them); use adamw")
    if config.train_text_encoder and config.stop_text_encoder < 1:
        problems.append(f"stop_text_encoder = {config.stop_text_encoder:g}: DeepSpeed would go on updating the text "
                        "encoder with zero gradients; set it to 1 or turn train_text_encoder off")
    return problems


def validate(config: Config) -> Config:
    """Check the options together; raises ConfigError listing every problem. Returns the config."""
    problems = config_problems(config)
    if problems:
        raise ConfigError(problems)
    return config


def config_problems(config: Config) -> list[str]:
    """Every problem of the options, each alone and together (empty when there is none)."""
    problems: list[str] = []
    for option in OPTIONS:
        reason = check(option, getattr(config, option.name))
        if reason:
            problems.append(f"{option.name} = {getattr(config, option.name)!r}: {reason}")
    if config.resolution % 64:
        problems.append(f"resolution = {config.resolution}: must be a multiple of 64 (e.g. 512 or 768)")
    lora = config.train_mode == "lora"
    unet_lr, text_lr = ("lora_learning_rate", "lora_text_encoder_lr") if lora else ("learning_rate", "text_encoder_lr")
    if getattr(config, unet_lr) == 0:
        example = "1e-4 (LoRA)" if lora else "2e-6 (SD 1.5 and SDXL, full fine-tune) or 1e-6 (SD 2.x)"
        problems.append(f"{unet_lr} = 0: nothing would be learnt and the result would be a copy of the base model; "
                        f"use e.g. {example}")
    if config.train_text_encoder and getattr(config, text_lr) == 0:
        problems.append(f"{text_lr} = 0 with train_text_encoder on: the text encoder would not change; turn "
                        f"train_text_encoder off, or use e.g. {'5e-5' if lora else '1e-6'}")
    if config.fused_backward and config.max_grad_norm > 0:
        problems.append(f"fused_backward with max_grad_norm = {config.max_grad_norm:g}: clipping needs every "
                        "gradient at once, which a fused backward never holds; set max_grad_norm to 0")
    if config.fused_backward and config.mixed_precision == "fp16":
        problems.append("fused_backward with mixed_precision = fp16: fp16 loss scaling must see every gradient "
                        "before any weight changes; use mixed_precision bf16 (or no)")
    if config.weights_dtype == "bf16" and config.mixed_precision != "bf16":
        problems.append(f"weights_dtype = bf16 with mixed_precision = {config.mixed_precision}: bf16 weights "
                        "compute in bf16; set mixed_precision to bf16")
    if config.gpus.strip():
        try:
            gpu_list(config.gpus)
        except ValueError as exc:
            problems.append(f"gpus = {config.gpus!r}: {exc}")
        if config.fused_backward:
            problems.append("gpus with fused_backward: a fused backward updates each weight before the GPUs' "
                            "gradients could be averaged; turn fused_backward off")
    if config.deepspeed_offload:
        problems.extend(f"deepspeed_offload with {problem}" for problem in zero_problems(config))
    problems.extend(_schedule_problems(config))
    if config.max_train_steps == 0 and config.num_train_epochs == 0:
        problems.append("max_train_steps = 0 and num_train_epochs = 0: set one of them to say when to stop")
    if not config.project_name.strip() or not _is_plain_name(config.project_name):
        problems.append(f"project_name = {config.project_name!r}: use letters, digits, spaces, '-', '_' or '.' "
                        "(it becomes a folder and file name)")
    else:
        from .train.guard import project_name_problem  # the one home of what a run writes (no torch there)

        problems.extend(filter(None, [project_name_problem(config)]))
    if not config.concepts:
        problems.append("concepts = []: add at least one concept with the folder of your training images "
                        "(instance_dir)")
    for i, concept in enumerate(config.concepts):
        for option in CONCEPT_OPTIONS:
            reason = check(option, getattr(concept, option.name))
            if reason:
                problems.append(f"concepts[{i}].{option.name} = {getattr(concept, option.name)!r}: {reason}")
        if not concept.instance_dir:
            problems.append(f"concepts[{i}].instance_dir = '': give the folder of the training images")
        for name in ("instance_prompt", "class_prompt"):
            template = getattr(concept, name)
            if "{token}" in template and not concept.token.strip():
                problems.append(f"concepts[{i}].token = '': {name} {template!r} uses {{token}}; set a token "
                                "such as 'ohwx'")
            if "{class}" in template and not concept.class_word.strip() and not concept.token_only:
                problems.append(f"concepts[{i}].class_word = '': {name} {template!r} uses {{class}}; set a "
                                "class word such as 'person'")
        if config.prior_preservation and not concept.token_only and not concept.class_prompt.strip():
            problems.append(f"concepts[{i}].class_prompt = '': prior preservation needs a class prompt")
    problems.extend(_overlap_problems(config))
    problems.extend(_monitor_problems(config))
    return problems


def _monitor_problems(config: Config) -> list[str]:
    """Options that only the learning monitor uses, with the monitor off; a held-out folder that does not exist,
    holds no image or overlaps the training or class images."""
    problems = [f"{name} with monitor_every_n_steps = -1: {why}; set monitor_every_n_steps to 0 (or N), or turn "
                f"{name} off" for name, why in (
                    ("stop_when_memorizing", "only the learning monitor can find the renders copying the photos"),
                    ("hold_out_photos", "the held-out photos would be kept out of training for nothing"))
                if getattr(config, name) and config.monitor_every_n_steps < 0]
    if config.validation_dir:
        problems.extend(_validation_dir_problems(config))
    return problems


def _validation_dir_problems(config: Config) -> list[str]:
    from .inputs import image_files  # no torch there

    folder = Path(config.validation_dir).expanduser()
    if not folder.is_dir():
        return [f"validation_dir = {config.validation_dir!r}: the folder does not exist or is not a folder; give a "
                "folder of held-out photos of the subject, or leave it empty"]
    if not image_files(folder):
        return [f"validation_dir = {config.validation_dir!r} holds no image; put a few photos of the subject that "
                "are not among the training images there, or leave it empty"]
    held, problems = resolved(folder), []
    for i, concept in enumerate(config.concepts):
        folders = [("instance_dir", concept.instance_dir)]
        if concept.class_dir and uses_class_images(config, concept):
            folders.append(("class_dir", concept.class_dir))
        for name, value in folders:
            other = resolved(value) if value else None
            if other is not None and (contains(other, held) or contains(held, other)):
                problems.append(
                    f"validation_dir = {_as_found(config.validation_dir, held)} and concepts[{i}].{name} = "
                    f"{_as_found(value, other)} overlap (each folder is read with its sub-folders), so the held-out "
                    f"photos would be trained on, or other images measured as held out; give validation_dir a "
                    "folder of its own outside the training and class images")
    return problems


# diffusers' polynomial schedule decays to this rate and refuses a starting rate that is not above it.
POLYNOMIAL_LR_END = 1e-7


def _schedule_problems(config: Config) -> list[str]:
    """What the learning-rate schedule cannot run with. Only the UNet's rate counts: diffusers decays from the
    optimizer's own rate (the UNet group's) and scales the text encoder's by the same factor."""
    unet_lr = "lora_learning_rate" if config.train_mode == "lora" else "learning_rate"
    rate = getattr(config, unet_lr)
    if config.lr_scheduler == "polynomial" and 0 < rate <= POLYNOMIAL_LR_END:
        return [f"{unet_lr} = {rate:g} with lr_scheduler polynomial: the polynomial schedule decays to "
                f"{POLYNOMIAL_LR_END:g} and needs a learning rate above that (up to 1); raise {unet_lr}, or use "
                "lr_scheduler constant or linear"]
    return []


def uses_class_images(config: Config, concept: Concept) -> bool:
    """Whether the run reads (and may write) the concept's class folder."""
    return config.prior_preservation and not concept.token_only and concept.num_class_images > 0


def resolved(folder: str | os.PathLike) -> Path:
    """The folder as the file system sees it: absolute, symlinks followed, case folded where the system ignores
    case (it need not exist yet)."""
    return Path(os.path.normcase(Path(folder).expanduser().resolve()))


def contains(outer: Path, inner: Path) -> bool:
    """Whether resolved folder `inner` is `outer` or inside it."""
    return inner == outer or outer in inner.parents


def _overlap_problems(config: Config) -> list[str]:
    """A class folder that is, holds or sits in a training folder (of any concept): both are read with their
    sub-folders, so the subject's photos would count as class images, or class images (generated ones too, which
    are written there) would be trained as the subject."""
    problems = []
    for j, concept in enumerate(config.concepts):
        if not concept.class_dir or not uses_class_images(config, concept):
            continue
        class_folder = resolved(concept.class_dir)
        for i, other in enumerate(config.concepts):
            if other.instance_dir:
                problem = _overlap(f"concepts[{j}].class_dir", concept.class_dir, class_folder,
                                   f"concepts[{i}].instance_dir", other.instance_dir, resolved(other.instance_dir))
                if problem:
                    problems.append(problem)
    return problems


def _overlap(class_name: str, class_value: str, class_folder: Path, instance_name: str, instance_value: str,
             instance_folder: Path) -> str | None:
    both = (f"{class_name} = {_as_found(class_value, class_folder)} and {instance_name} = "
            f"{_as_found(instance_value, instance_folder)}")
    if class_folder == instance_folder:
        harm = ("are the same folder: your subject's photos would count as class images, and generated class "
                "images would be written among them and trained as your subject next time")
    elif contains(instance_folder, class_folder):
        harm = ("overlap: the class folder is inside the training images folder, whose sub-folders are read too, so "
                "the class images (generated ones too) would be trained as your subject")
    elif contains(class_folder, instance_folder):
        harm = ("overlap: the training images folder is inside the class folder, whose sub-folders are read too, so "
                "your subject's photos would count as class images")
    else:
        return None
    return (f"{both} {harm}; give {class_name} a folder of its own outside the training images (or leave it "
            "empty: a folder in the project's work folder)")


def _as_found(value: str, folder: Path) -> str:
    """A folder as typed, and where it leads when that differs (a relative path, a symlink)."""
    return repr(value) if os.path.normcase(os.path.normpath(value)) == str(folder) else f"{value!r} ({folder})"


def _is_plain_name(name: str) -> bool:
    return (name == name.strip() and name not in (".", "..")
            and all(ch.isalnum() or ch in " -_." for ch in name))


def fill_prompt(template: str, concept: Concept) -> str:
    """Fill {token} and {class} in a prompt template; token_only concepts drop the class word."""
    class_word = "" if concept.token_only else concept.class_word
    text = template.replace("{token}", concept.token).replace("{class}", class_word)
    return " ".join(text.split())


# ----------------------------------------------------------------------------------------------------------
# Files: our JSON, JoePenna's config JSON, ShivamShrirao's concepts_list.json


def load_json(path: str | os.PathLike) -> Config:
    """Read a project file in our format, JoePenna's config format or a concepts_list.json."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"config file {str(path)!r} does not exist; check the path"]) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"config file {str(path)!r} is not valid JSON ({exc}); fix or re-save it"]) from None
    if isinstance(data, list):
        return from_concepts_list(data)
    if isinstance(data, dict) and "schema_version" not in data and _looks_like_joepenna(data):
        return from_joepenna(data)
    if isinstance(data, dict):
        version = data.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ConfigError([f"schema_version = {version!r}: this version reads schema {SCHEMA_VERSION}; "
                               "update the extension or re-save the project"])
    return from_dict(data)


def save_json(config: Config, path: str | os.PathLike) -> Path:
    """Write the config as JSON (atomically, so a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(to_dict(config), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


_JOEPENNA_KEYS = {"class_word", "training_images_folder_path", "regularization_images_folder_path",
                  "max_training_steps", "save_every_x_steps", "flip_percent", "model_path", "token_only"}


def _looks_like_joepenna(data: dict) -> bool:
    return len(_JOEPENNA_KEYS & data.keys()) >= 2


def from_joepenna(data: dict) -> Config:
    """Import JoePenna's config JSON (his main.py --config_file_path format)."""
    problems = []
    if data.get("model_repo_id") and not data.get("model_path"):
        problems.append(f"model_repo_id = {data['model_repo_id']!r}: models cannot be downloaded here; set "
                        "model_path to a checkpoint file")
    if problems:
        raise ConfigError(problems)
    regularization = data.get("regularization_images_folder_path") or ""
    concept = {
        **regularization_folder(regularization),
        "instance_dir": data.get("training_images_folder_path") or "",
        "token": data.get("token", CONCEPT_OPTIONS_BY_NAME["token"].default),
        "class_word": data.get("class_word", CONCEPT_OPTIONS_BY_NAME["class_word"].default),
        "token_only": data.get("token_only", False),
        "class_dir": regularization,
        # JoePenna's default caption is "<token> <class>"; his folder of regularization images is captioned
        # with the class word alone.
        "instance_prompt": "{token} {class}",
        "class_prompt": "{class}",
    }
    mapped = {
        "project_name": data.get("project_name"),
        "base_model": data.get("model_path"),
        "max_train_steps": data.get("max_training_steps"),
        "save_every_n_steps": data.get("save_every_x_steps"),
        "learning_rate": data.get("learning_rate"),
        "seed": data.get("seed"),
        "flip_p": data.get("flip_percent", data.get("flip_p")),
        "device": device_for_gpu(data.get("gpu")),
        "prior_preservation": bool(regularization) and not data.get("token_only", False),
    }
    values = {k: v for k, v in mapped.items() if v is not None}
    if "project_name" in values:
        values["project_name"] = _safe_project_name(str(values["project_name"]))
    values["concepts"] = [concept]
    return from_dict(values)


def regularization_folder(folder: str) -> dict:
    """A concept's fields for a regularization folder in JoePenna's sense: its images are the class images, all
    of them, and nothing is ever rendered into it."""
    if not folder:
        return {}
    from .inputs import image_files

    count = len(image_files(folder))
    fields: dict[str, Any] = {"class_dir": folder, "generate_class_images": False}
    if count:
        fields["num_class_images"] = count
    return fields


def device_for_gpu(gpu: Any) -> str | None:
    """JoePenna's "gpu" (and --gpu): 0, his default, is our auto (the first GPU, or the CPU where there is
    none); another number is that CUDA GPU."""
    if not isinstance(gpu, int) or isinstance(gpu, bool):
        return None
    return "auto" if gpu == 0 else f"cuda:{gpu}"


def token_and_class(instance_prompt: str, class_prompt: str) -> tuple[str, str]:
    """ShivamShrirao's prompts name the token only inside them: "photo of sks dog" against "photo of a dog"
    gives ("sks", "dog") (the instance prompt's words the class prompt lacks; the class prompt's last word)."""
    class_words = class_prompt.split()
    token = " ".join(w for w in instance_prompt.split() if w not in class_words)
    return token, (class_words[-1].strip(",.;:") if class_words else "")


def from_concepts_list(items: list) -> Config:
    """Import ShivamShrirao's concepts_list.json: a list of instance/class prompts and folders."""
    concepts = []
    problems = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "instance_data_dir" not in item:
            problems.append(f"concepts_list[{i}] = {item!r}: needs instance_data_dir and instance_prompt")
            continue
        token, class_word = token_and_class(item.get("instance_prompt", ""), item.get("class_prompt", ""))
        concepts.append({
            "instance_dir": item.get("instance_data_dir", ""),
            "instance_prompt": item.get("instance_prompt", ""),
            "class_dir": item.get("class_data_dir", ""),
            "class_prompt": item.get("class_prompt", ""),
            "token": token,
            "class_word": class_word,
        })
    if problems:
        raise ConfigError(problems)
    has_class = any(c["class_prompt"] for c in concepts)
    return from_dict({"concepts": concepts, "prior_preservation": has_class})


def _safe_project_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return cleaned or "my_project"


def default_config(**overrides: Any) -> Config:
    """The defaults with one default concept, then `overrides` applied (checked like any input)."""
    data = {"concepts": [{}], **overrides}
    return from_dict(data)
