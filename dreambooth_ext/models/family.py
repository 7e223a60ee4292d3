"""Model families: one home each for what differs between Stable Diffusion generations.

A family knows how to recognise its checkpoints, its text encoders (how they are stored in the WebUI's layout,
built, tokenized, and turned into the UNet's conditioning), its UNet's attention convention, its latent scale,
native resolution, prediction type, and how a result is described (modelspec architecture, ldm yaml). The
loop, the data pipeline, sampling and the hosts ask the family; nothing else compares family names.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import DreamboothError

if TYPE_CHECKING:
    from ..data.images import Fit

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

# The WebUI's loaded model wraps its text encoder (FrozenCLIPEmbedderWithCustomWords), so a state dict taken
# from the live model has one extra level that files on disk do not.
_WRAPPED = "cond_stage_model.wrapped."
_TOKEN_EMBEDDING_WRAPPED = ".token_embedding.wrapped."
_CONDITIONER = "conditioner.embedders."
_EMBEDDER_WRAPPED = re.compile(r"^(conditioner\.embedders\.\d+\.)wrapped\.")
# The WebUI's own test for an SDXL refiner (sd_models.sdxl_refiner_clip_weight).
SDXL_REFINER_KEY = "conditioner.embedders.0.model.ln_final.weight"


@dataclass
class Conditioning:
    """What the UNet is conditioned on for a batch of prompts: the cross-attention context (and, for families
    that have them, extra inputs passed as `added_cond_kwargs`)."""

    context: torch.Tensor
    added: dict[str, torch.Tensor] | None = None

    def unet_kwargs(self, dtype: torch.dtype | None = None) -> dict[str, Any]:
        """The keyword arguments of a diffusers UNet call."""
        moved = self.to(dtype=dtype) if dtype is not None else self
        kwargs: dict[str, Any] = {"encoder_hidden_states": moved.context}
        if moved.added:
            kwargs["added_cond_kwargs"] = moved.added
        return kwargs

    def with_added(self, extra: dict[str, torch.Tensor] | None) -> Conditioning:
        """The same conditioning with more added inputs (e.g. each picture's size numbers)."""
        if not extra:
            return self
        return Conditioning(self.context, {**(self.added or {}), **extra})

    def zeros_like(self) -> Conditioning:
        added = {k: torch.zeros_like(v) for k, v in self.added.items()} if self.added else None
        return Conditioning(torch.zeros_like(self.context), added)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        added = {k: v.to(device=device, dtype=dtype) for k, v in self.added.items()} if self.added else None
        return Conditioning(self.context.to(device=device, dtype=dtype), added)

    def rows(self) -> list[Conditioning]:
        """One Conditioning per prompt of the batch."""
        return [Conditioning(self.context[i], {k: v[i] for k, v in self.added.items()} if self.added else None)
                for i in range(self.context.shape[0])]

    @staticmethod
    def stack(rows: list[Conditioning]) -> Conditioning:
        """The inverse of `rows`."""
        added = {k: torch.stack([r.added[k] for r in rows]) for k in rows[0].added} if rows[0].added else None
        return Conditioning(torch.stack([r.context for r in rows]), added)

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Batches one after the other (e.g. unconditional, then conditional)."""
        added = {k: torch.cat([p.added[k] for p in parts]) for k in parts[0].added} if parts[0].added else None
        return Conditioning(torch.cat([p.context for p in parts]), added)


def tokenize(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


class Family:
    """The SD 1.x family; the others override what differs."""

    name = "sd1"
    title = "Stable Diffusion 1.x"
    text_prefixes: tuple[str, ...] = (SD1_TEXT_PREFIX,)
    vae_scaling_factor = 0.18215
    # Its VAE encodes and decodes in fp16 without overflowing (SDXL's does not: it runs in fp32 or bf16).
    vae_fp16_safe = True
    # An empty negative prompt conditions on zeros rather than on the encoded empty text (the WebUI's SDXL).
    zero_empty_negative = False
    # A LoRA file's names of its text encoders' modules, one prefix per encoder, and the family it says it is for
    # (ss_base_model_version: the WebUI's Lora tab lists a LoRA only with checkpoints of its family).
    lora_text_prefixes: tuple[str, ...] = ("lora_te",)
    lora_base_version = "sd_v1"
    # Dropped from the base when a result is written: training state some checkpoints carry.
    dropped_prefixes = ("model_ema.", "optimizer", "lr_scheduler")

    def __repr__(self) -> str:
        return self.name

    def __str__(self) -> str:
        return self.name

    # -- recognising a checkpoint -----------------------------------------------------------------------

    def matches(self, keys: set[str]) -> bool:
        return any(k.startswith(SD1_TEXT_PREFIX + "text_model.") for k in keys)

    # -- the UNet -------------------------------------------------------------------------------------

    def unet_attention(self, block_out_channels: tuple[int, ...]) -> dict:
        """The attention settings of its UNet that tensor shapes do not show (diffusers' naming: heads)."""
        return {"attention_head_dim": 8, "use_linear_projection": False}

    def unet_added_conditioning(self, input_dim: int) -> dict:
        """The UNet config of an added conditioning vector of `input_dim` (families whose UNet has one)."""
        raise DreamboothError(f"{self.title} UNets have no added conditioning (label_emb); this checkpoint is "
                              "not a standard one of its family")

    # -- text encoders --------------------------------------------------------------------------------

    def text_encoders_from_ldm(self, sd: dict[str, torch.Tensor], *, as_stored: bool = False) -> tuple[Any, ...]:
        from .convert import clip_from_ldm

        return (clip_from_ldm(sd, SD1_TEXT_PREFIX, hidden_act="quick_gelu", as_stored=as_stored),)

    def text_encoders_to_ldm(self, state_dicts: tuple[dict[str, torch.Tensor], ...]) -> dict[str, torch.Tensor]:
        from .convert import clip_to_ldm

        return clip_to_ldm(state_dicts[0], SD1_TEXT_PREFIX)

    def tokenizers(self) -> tuple[Any, ...]:
        from .tokenizer import END_TOKEN, load_tokenizer

        return (load_tokenizer(pad=END_TOKEN),)  # OpenAI CLIP pads with <|endoftext|>

    def encode(self, tokenizers: tuple[Any, ...], encoders: tuple[Any, ...], prompts: list[str]) -> Conditioning:
        """The last hidden states (final layer norm applied), as the WebUI conditions SD1 and SD2."""
        encoder = encoders[0]
        device = next(encoder.parameters()).device
        return Conditioning(encoder(tokenize(tokenizers[0], prompts).to(device))[0])

    def size_conditioning(self, fits: list[Fit]) -> dict[str, torch.Tensor] | None:
        """Added conditioning taken from how each picture was fitted to its size (None: the family has none)."""
        return None

    # -- prediction, resolution, description of a result ----------------------------------------------

    # Whether a checkpoint that says nothing about its prediction type is probed (SD2 has both kinds, unmarked).
    probes_prediction = False
    # Flag tensors some checkpoints of the family carry (kept in the result; the WebUI drops them on load).
    marker_keys: tuple[str, ...] = ()
    # The marker of a zero-terminal-SNR noise schedule, which is then trained as such.
    zero_terminal_snr_key: str | None = None

    def resolve_prediction(self, keys: set[str]) -> tuple[str, str] | None:
        """What this family says about the prediction type from the checkpoint's keys alone, and why (None: look
        further)."""
        return "epsilon", "every SD 1.x model predicts noise"

    def native_resolution(self, prediction_type: str) -> int:
        return 512

    def architecture(self, prediction_type: str) -> str:
        return "stable-diffusion-v1"

    def ldm_cond_stage(self) -> dict | None:
        """The text encoder of an ldm config describing the family's models (None: not an ldm model)."""
        return {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}


class SD2(Family):
    name = "sd2"
    title = "Stable Diffusion 2.x"
    text_prefixes = (SD2_TEXT_PREFIX,)
    lora_base_version = "sd_v2"

    def matches(self, keys: set[str]) -> bool:
        return any(k.startswith(SD2_TEXT_PREFIX + "transformer.resblocks.") for k in keys)

    def unet_attention(self, block_out_channels: tuple[int, ...]) -> dict:
        # A fixed head size of 64 channels; its attention needs fp32 softmax to be stable.
        return {"attention_head_dim": tuple(max(1, c // 64) for c in block_out_channels),
                "upcast_attention": True, "use_linear_projection": True}

    def text_encoders_from_ldm(self, sd: dict[str, torch.Tensor], *, as_stored: bool = False) -> tuple[Any, ...]:
        from .convert import open_clip_from_ldm

        # The WebUI (and diffusers' SD2) take the penultimate layer's output, then ln_final: the last block and
        # the projection are unused.
        return (open_clip_from_ldm(sd, SD2_TEXT_PREFIX, skip_last_layer=True, as_stored=as_stored),)

    def text_encoders_to_ldm(self, state_dicts: tuple[dict[str, torch.Tensor], ...]) -> dict[str, torch.Tensor]:
        from .convert import open_clip_to_ldm

        return open_clip_to_ldm(state_dicts[0], SD2_TEXT_PREFIX)

    def tokenizers(self) -> tuple[Any, ...]:
        from .tokenizer import load_tokenizer

        return (load_tokenizer(pad="!"),)  # the WebUI's OpenCLIP path pads with id 0, the token "!"

    probes_prediction = True

    def resolve_prediction(self, keys: set[str]) -> tuple[str, str] | None:
        return None

    def native_resolution(self, prediction_type: str) -> int:
        return 768 if prediction_type == "v_prediction" else 512

    def architecture(self, prediction_type: str) -> str:
        return "stable-diffusion-v2-768-v" if prediction_type == "v_prediction" else "stable-diffusion-v2-512"

    def ldm_cond_stage(self) -> dict:
        return {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                "params": {"arch": "ViT-H-14", "freeze": True, "layer": "penultimate"}}


class SDXL(Family):
    """SDXL: two text encoders (CLIP ViT-L in Hugging Face's layout, OpenCLIP ViT-bigG with its projection), a UNet
    with per-level transformer depths and an added conditioning vector (pooled text embedding + size/crop
    embeddings), a VAE with its own latent scale that overflows in fp16."""

    name = "sdxl"
    title = "Stable Diffusion XL"
    text_prefixes = (SDXL_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX)
    vae_scaling_factor = 0.13025
    vae_fp16_safe = False
    zero_empty_negative = True
    lora_text_prefixes = ("lora_te1", "lora_te2")
    lora_base_version = "sdxl_base_v1-0"
    size_embedding_dim = 256  # each of the six size/crop numbers becomes a 256-wide sinusoidal embedding

    def matches(self, keys: set[str]) -> bool:
        return any(k.startswith(SDXL_OPEN_CLIP_PREFIX + "transformer.resblocks.") for k in keys) and any(
            k.startswith(SDXL_CLIP_PREFIX + "text_model.") for k in keys)

    def unet_attention(self, block_out_channels: tuple[int, ...]) -> dict:
        return {"attention_head_dim": tuple(max(1, c // 64) for c in block_out_channels),
                "use_linear_projection": True}

    def unet_added_conditioning(self, input_dim: int) -> dict:
        return {"addition_embed_type": "text_time", "addition_time_embed_dim": self.size_embedding_dim,
                "projection_class_embeddings_input_dim": input_dim}

    def text_encoders_from_ldm(self, sd: dict[str, torch.Tensor], *, as_stored: bool = False) -> tuple[Any, ...]:
        from .convert import clip_from_ldm, open_clip_from_ldm

        return (clip_from_ldm(sd, SDXL_CLIP_PREFIX, hidden_act="quick_gelu", as_stored=as_stored),
                open_clip_from_ldm(sd, SDXL_OPEN_CLIP_PREFIX, skip_last_layer=False, projection=True,
                                   as_stored=as_stored))

    def text_encoders_to_ldm(self, state_dicts: tuple[dict[str, torch.Tensor], ...]) -> dict[str, torch.Tensor]:
        from .convert import clip_to_ldm, open_clip_to_ldm

        return {**clip_to_ldm(state_dicts[0], SDXL_CLIP_PREFIX), **open_clip_to_ldm(state_dicts[1],
                                                                                       SDXL_OPEN_CLIP_PREFIX)}

    def tokenizers(self) -> tuple[Any, ...]:
        from .tokenizer import END_TOKEN, load_tokenizer

        return (load_tokenizer(pad=END_TOKEN), load_tokenizer(pad="!"))

    def encode(self, tokenizers: tuple[Any, ...], encoders: tuple[Any, ...], prompts: list[str]) -> Conditioning:
        """As the WebUI conditions SDXL: both encoders' penultimate hidden states side by side (768 + 1280 = 2048
        wide in the real model), and the pooled vector (OpenCLIP's final-layer-normed end token through its
        projection) as `text_embeds`. The size/crop numbers (`time_ids`) come from each picture, see time_ids."""
        clip, big = encoders
        device = next(clip.parameters()).device
        first = clip(tokenize(tokenizers[0], prompts).to(device), output_hidden_states=True)
        second = big(tokenize(tokenizers[1], prompts).to(device), output_hidden_states=True)
        context = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return Conditioning(context, {"text_embeds": second.text_embeds})

    def size_conditioning(self, fits: list[Fit]) -> dict[str, torch.Tensor] | None:
        return {"time_ids": torch.stack([self.time_ids(fit) for fit in fits])}

    @staticmethod
    def time_ids(fit: Fit) -> torch.Tensor:
        """SDXL's size conditioning of one picture: (original height, width, crop top, crop left, target height,
        width), from what the data pipeline did to it."""
        (orig_w, orig_h), (target_w, target_h) = fit.original, fit.target
        return torch.tensor([orig_h, orig_w, fit.top, fit.left, target_h, target_w], dtype=torch.float32)

    marker_keys = ("v_pred", "ztsnr")
    zero_terminal_snr_key = "ztsnr"

    def resolve_prediction(self, keys: set[str]) -> tuple[str, str] | None:
        """v-prediction SDXL fine-tunes (NoobAI-XL v-pred and the like) carry an empty `v_pred` tensor."""
        return ("v_prediction", "the checkpoint has a v_pred key") if "v_pred" in keys else None

    def native_resolution(self, prediction_type: str) -> int:
        return 1024

    def architecture(self, prediction_type: str) -> str:
        return "stable-diffusion-xl-v1-base"

    def ldm_cond_stage(self) -> dict | None:
        return None  # an sgm model: the WebUI ships its configs (sd_xl_base.yaml and the like)


SD1 = Family()
FAMILIES: tuple[Family, ...] = (SD1, SD2(), SDXL())
BY_NAME = {family.name: family for family in FAMILIES}


def family_named(name: str) -> Family:
    if name not in BY_NAME:
        raise DreamboothError(f"family = {name!r}: use one of {', '.join(BY_NAME)}")
    return BY_NAME[name]


def normalize_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return a new dict in the on-disk layout (same tensor objects).

    The WebUI's live model carries its prompt hijack's extra levels (sd_hijack.py): the text encoder wrapper's
    `wrapped.` (`cond_stage_model.wrapped.` for SD1/SD2, `conditioner.embedders.N.wrapped.` for SDXL) and the token
    embedding's `token_embedding.wrapped.`; all lose `wrapped.`. For SDXL the hijack also points
    `cond_stage_model` at the conditioner, so its tensors appear twice; the `cond_stage_model.` copies are dropped.
    """
    sdxl = any(k.startswith(_CONDITIONER) for k in sd)
    out = {}
    for key, value in sd.items():
        if sdxl and key.startswith("cond_stage_model."):
            continue
        if key.startswith(_WRAPPED):
            key = "cond_stage_model." + key[len(_WRAPPED):]
        key = _EMBEDDER_WRAPPED.sub(r"\1", key)
        out[key.replace(_TOKEN_EMBEDDING_WRAPPED, ".token_embedding.")] = value
    return out


def detect_family(sd: dict[str, Any]) -> Family:
    """The family of a WebUI-layout state dict (its keys, and the shape of the UNet's first layer; values are
    tensors or shapes); anything else is refused with why."""
    keys = set(sd.keys())
    _refuse_variants(sd, keys)
    has_unet = any(k.startswith(UNET_PREFIX) for k in keys)
    for family in FAMILIES:
        if has_unet and family.matches(keys):
            return family
    raise DreamboothError(f"This file is not a full Stable Diffusion checkpoint: it contains {_describe(sd)}. "
                          "Pick a full SD 1.x, 2.x or SDXL checkpoint (UNet, VAE and text encoders in one file), "
                          "not a LoRA, embedding or VAE file")


def _refuse_variants(sd: dict[str, Any], keys: set[str]) -> None:
    """Models of a known family that Dreambooth does not train: the SDXL refiner and inpainting models."""
    if SDXL_REFINER_KEY in keys:
        raise DreamboothError("This is the SDXL refiner (its only text encoder is conditioner.embedders.0.model, "
                              "OpenCLIP ViT-bigG). The refiner only polishes images another SDXL model made and is "
                              "not trained with Dreambooth: pick an SDXL base checkpoint or a fine-tune of one")
    first = sd.get(UNET_PREFIX + "input_blocks.0.0.weight")
    shape = tuple(first.shape) if isinstance(first, torch.Tensor) else tuple(first or ())
    if len(shape) == 4 and shape[1] == 9:
        raise DreamboothError("This is an inpainting model (its UNet takes 9 input channels: the latents, the mask "
                              "and the masked image). Dreambooth trains text-to-image models: pick the "
                              "non-inpainting version of this checkpoint (train that, then merge it into an "
                              "inpainting model with the WebUI's Checkpoint Merger if you need one)")


def _describe(sd: dict[str, Any]) -> str:
    if any("lora_" in k for k in sd):
        return f"LoRA weights ({len(sd)} tensors)"
    if any(k.startswith(("encoder.", "decoder.", "first_stage_model.")) for k in sd) and not any(
            k.startswith(UNET_PREFIX) for k in sd):
        return f"only VAE weights ({len(sd)} tensors)"
    if not any(k.startswith(UNET_PREFIX) for k in sd):
        return f"no UNet (no model.diffusion_model.* keys; {len(sd)} tensors, e.g. {sorted(sd)[:3]})"
    return f"a UNet but no text encoder it knows ({len(sd)} tensors, e.g. {sorted(sd)[:3]})"
