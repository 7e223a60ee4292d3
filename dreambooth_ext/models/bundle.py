"""Everything training needs from one base checkpoint: its family, modules, tokenizers, noise schedule and the
original keys."""

from __future__ import annotations

import logging
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import DreamboothError
from .checkpoint import (
    file_sha256,
    read_checkpoint,
    read_checkpoint_shapes,
    read_safetensors_metadata,
    read_vae,
)
from .checkpoint import (
    short_hash as hash_prefix,
)
from .convert import (
    VAE_PREFIX,
    unet_config_from_ldm,
    unet_from_ldm,
    unet_to_ldm,
    vae_config_from_ldm,
    vae_from_ldm,
)
from .family import Conditioning, Family, detect_family, normalize_keys

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction")
# A v-model's output at the last timestep is far below its input; an epsilon model's is close to it.
V_PROBE_THRESHOLD = -1.0


class SourceInfo:
    """Where the base model came from, as the WebUI names it. The file's hash may still be being computed (off
    the training's critical path): reading `sha256` waits for it."""

    def __init__(self, name: str, path: str = "", sha256: str = "", short_hash: str = "", vae_name: str = "", *,
                 hash_file: bool = False):
        """`hash_file`: compute the file's sha256 (when it is not given) from `start_hashing` on."""
        self.name, self.path, self.vae_name = name, path, vae_name
        self._sha256, self._short_hash, self._hash_file = sha256, short_hash, hash_file
        self._hashing: Future[str] | None = None

    def start_hashing(self) -> None:
        """Hash the file in a thread of its own from now on (once the model has loaded: the two would share the
        CPU and the disk)."""
        if self._hash_file and not self._sha256 and self._hashing is None and self.path:
            self._hashing = _hash_in_background(Path(self.path))

    @property
    def sha256(self) -> str:
        self.start_hashing()
        if self._hashing is not None:
            self._sha256, self._hashing = self._hashing.result(), None
            self._short_hash = self._short_hash or hash_prefix(self._sha256)
        return self._sha256

    @property
    def known_sha256(self) -> str:
        """The hash if it is known by now, without waiting for it ("" while it is being computed)."""
        if self._hashing is not None and self._hashing.done():
            return self.sha256
        return self._sha256

    @property
    def short_hash(self) -> str:
        return self._short_hash or (hash_prefix(self.sha256) if self.sha256 else "")

    def __repr__(self) -> str:
        return f"SourceInfo({self.name!r}, path={self.path!r})"


def _hash_in_background(path: Path) -> Future[str]:
    """The file's sha256, computed by a thread of its own while the model loads and trains."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dreambooth-hash")
    future = pool.submit(file_sha256, path)
    pool.shutdown(wait=False)
    return future


@dataclass
class ModelBundle:
    """The base model, split into trainable modules, plus what is needed to write it back in the WebUI layout."""

    family: Family
    prediction_type: str
    base: dict[str, torch.Tensor]
    unet: Any  # fp32: it trains
    # The VAE and text encoders hold the checkpoint's own tensors, in its precision (fp16 for most files): a run
    # places them in the dtype it computes in, or casts a text encoder it trains to fp32.
    vae: Any
    text_encoders: tuple[Any, ...]  # the family's, in its order (one for SD1/SD2)
    tokenizers: tuple[Any, ...]  # one per text encoder
    noise_scheduler: Any
    source: SourceInfo
    unet_config: dict = field(default_factory=dict)
    vae_config: dict = field(default_factory=dict)
    # The ldm config the base model was loaded with (the .yaml beside its file, or the host's), if it has one:
    # a result of unusual shape loads in the WebUI only with the same config beside it.
    base_yaml: str | None = None
    # The size the checkpoint says it was made for (its modelspec.resolution), when it says so.
    declared_resolution: int | None = None
    # What loading found that the user should hear of (the run lists them in its warnings)
    notes: tuple[str, ...] = ()

    @property
    def native_resolution(self) -> int:
        """The image size the base model was trained at: what it declares, else 768 for SD2 768-v, 512 otherwise."""
        return BaseFacts(self.family, self.prediction_type, self.declared_resolution).native_resolution

    def drop_base_unet(self) -> None:
        """Let go of the base's UNet tensors that the trained UNet replaces on every export (a full fine-tune's):
        a fp16 .ckpt's would stay in memory beside the fp32 weights that train (1.7 GB for SD1.5; a .safetensors
        file's are pages of the file it maps, which the system can take back)."""
        for key in unet_to_ldm(self.unet.state_dict(), self.unet_config):
            self.base.pop(key, None)

    def encode(self, prompts: list[str]) -> Conditioning:
        """The UNet's conditioning for prompts, through the family's text encoders (placed already)."""
        return self.family.encode(self.tokenizers, self.text_encoders, prompts)


# ----------------------------------------------------------------------------------------------------------
# Prediction type


def _from_yaml(yaml_text: str) -> str | None:
    """"v_prediction"/"epsilon" from an ldm config (`parameterization`) or an sgm one (SDXL: its denoiser's
    scaling, VScaling or EpsScaling); None when the text is not one."""
    try:
        import yaml

        data = yaml.safe_load(yaml_text)
        params = data["model"]["params"]
        scaling = str(params.get("denoiser_config", {})["params"]["scaling_config"]["target"]) if isinstance(
            params.get("denoiser_config"), dict) else ""
    except Exception:
        # Unparsable or unusual files: fall back to looking for the lines that matter.
        if re.search(r"^\s*parameterization:\s*[\"']?v[\"']?\s*$|\.VScaling\s*$", yaml_text, re.MULTILINE):
            return "v_prediction"
        return None
    if not isinstance(params, dict):
        return None
    if scaling:
        return "v_prediction" if scaling.endswith(".VScaling") else "epsilon"
    return "v_prediction" if str(params.get("parameterization", "eps")).strip() == "v" else "epsilon"


def _from_metadata(metadata: dict[str, str] | None) -> str | None:
    value = str((metadata or {}).get("modelspec.prediction_type", "")).strip().lower()
    if value in ("v", "v_prediction", "v-prediction"):
        return "v_prediction"
    if value in ("epsilon", "eps"):
        return "epsilon"
    return None


def probe_v_prediction(unet: Any) -> float:
    """mean(output - input) of the UNet at t=999 on a constant input: strongly negative for v-prediction models.

    Near pure noise an epsilon model predicts about its input, while a v-model predicts about minus the clean
    image, so the difference is far below zero only for v-models.
    """
    config = unet.config
    param = next(unet.parameters())
    x = torch.full((1, config.in_channels, 8, 8), 0.5, dtype=param.dtype, device=param.device)
    cond = torch.full((1, 2, config.cross_attention_dim), 0.5, dtype=param.dtype, device=param.device)
    with torch.no_grad():
        out = unet(x, torch.tensor([999], device=param.device), encoder_hidden_states=cond).sample
    return float((out - x).float().mean())


def prediction_evidence(family: Family, *, keys: set[str], yaml_text: str | None = None,
                        metadata: dict[str, str] | None = None) -> tuple[str, str] | None:
    """The prediction type a checkpoint states (its family and keys, the yaml beside it, its metadata) and where
    that was read; None when nothing says."""
    if found := family.resolve_prediction(keys):
        return found
    if yaml_text and (found := _from_yaml(yaml_text)):
        return found, "from the .yaml beside the checkpoint"
    if found := _from_metadata(metadata):
        return found, "from the checkpoint's modelspec metadata"
    return None


def prediction_override(family: Family, requested: str, *, keys: set[str], yaml_text: str | None = None,
                        metadata: dict[str, str] | None = None) -> str | None:
    """What to tell a user whose explicit prediction_type contradicts what the checkpoint states (None if not)."""
    if requested not in PREDICTION_TYPES:
        return None
    evidence = prediction_evidence(family, keys=keys, yaml_text=yaml_text, metadata=metadata)
    if evidence is None or evidence[0] == requested:
        return None
    return (f"prediction_type = {requested} overrides the checkpoint's own {evidence[0]} ({evidence[1]}): it trains "
            f"as {requested}, and the result is saved so that the WebUI runs it as {requested}. Use auto unless the "
            "checkpoint is labelled wrongly.")


def resolve_prediction_type(family: Family, requested: str, *, yaml_text: str | None = None,
                            metadata: dict[str, str] | None = None, unet: Any = None,
                            keys: set[str] | None = None) -> str:
    """What the model predicts: an explicit choice wins; "auto" takes what the checkpoint states (see
    prediction_evidence), else probes the UNet where the family's checkpoints come unmarked, else epsilon."""
    if requested in PREDICTION_TYPES:
        return requested
    if requested != "auto":
        raise DreamboothError(f"prediction_type = {requested!r}: use auto, epsilon or v_prediction")
    if evidence := prediction_evidence(family, keys=keys or set(), yaml_text=yaml_text, metadata=metadata):
        logger.info("Prediction type: %s (%s)", *evidence)
        return evidence[0]
    if not family.probes_prediction:
        logger.info("Prediction type: epsilon (nothing in the checkpoint says otherwise)")
        return "epsilon"
    if unet is None:
        logger.warning("Prediction type: epsilon (nothing says otherwise; set prediction_type for a 768-v model)")
        return "epsilon"
    score = probe_v_prediction(unet)
    found = "v_prediction" if score < V_PROBE_THRESHOLD else "epsilon"
    logger.info("Prediction type: %s (probed the UNet: mean(out - x) = %.3f at t=999)", found, score)
    return found


@dataclass(frozen=True)
class BaseFacts:
    """What a base model is, known before its weights are read: its family and what decides its native size."""

    family: Family
    prediction_type: str | None = None  # None: not stated; known once the model has loaded
    declared_resolution: int | None = None

    @property
    def native_resolution(self) -> int:
        return self.declared_resolution or self.family.native_resolution(self.prediction_type or "epsilon")


# ----------------------------------------------------------------------------------------------------------
# Loading


def _apply_vae(base: dict[str, torch.Tensor], vae_state_dict: dict[str, torch.Tensor],
               family: Family) -> dict[str, torch.Tensor]:
    """Replace every first_stage_model.* key of the base with the override's (which may lack the prefix)."""
    vae = {(k if k.startswith(VAE_PREFIX) else VAE_PREFIX + k): v for k, v in vae_state_dict.items()}
    vae_config_from_ldm(vae, family)  # refuses a dict that is not a whole VAE before anything is replaced
    merged = {k: v for k, v in base.items() if not k.startswith(VAE_PREFIX)}
    merged.update(vae)
    return merged


def make_noise_scheduler(prediction_type: str, betas: torch.Tensor | None = None, *,
                         zero_terminal_snr: bool = False) -> Any:
    """SD's DDPM training schedule; a checkpoint's own betas are used as they are when it has them. Zero terminal
    SNR rescales the schedule so the last step is pure noise (models marked `ztsnr` were trained that way)."""
    from diffusers import DDPMScheduler

    kwargs: dict[str, Any] = {}
    steps = 1000
    if betas is not None:
        kwargs["trained_betas"] = betas.detach().double().cpu().numpy()
        steps = int(betas.numel())
    return DDPMScheduler(num_train_timesteps=steps, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, prediction_type=prediction_type,
                         rescale_betas_zero_snr=zero_terminal_snr, **kwargs)


def schedule_betas(base: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The checkpoint's noise schedule: its ldm `betas`, or the betas of an sgm file's `denoiser.sigmas`
    (sigma^2 = (1 - alphas_cumprod) / alphas_cumprod); None when it carries neither."""
    if "betas" in base:
        return base["betas"]
    sigmas = base.get("denoiser.sigmas")
    if sigmas is None or sigmas.dtype != torch.float32 or sigmas.numel() < 2:
        return None  # a half-precision copy would only add rounding to the standard schedule it holds
    alphas_cumprod = 1.0 / (1.0 + sigmas.double() ** 2)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return 1.0 - alphas_cumprod / previous


def load_bundle(state_dict: dict[str, torch.Tensor], *, vae_state_dict: dict[str, torch.Tensor] | None = None,
                prediction_type: str = "auto", source: SourceInfo | None = None, yaml_text: str | None = None,
                metadata: dict[str, str] | None = None, owned: bool = False) -> ModelBundle:
    """Split a WebUI-layout state dict (a file's or the live model's) into CPU modules: the UNet in fp32, the VAE
    and text encoders in the dict's own precision (no fp32 copy of frozen parts; a run casts what it uses).

    The modules take the dict's tensors as their weights without copying them (the UNet's where they are fp32),
    so `bundle.base` and the modules share memory (a trained module changes its part of `base`; exports take
    trained parts from the modules). `owned`: the dict is the caller's to give away (read from a file, copied
    from the host); otherwise its tensors are copied first and the caller's stay untouched."""
    base = {k: v for k, v in normalize_keys(state_dict).items() if isinstance(v, torch.Tensor)}
    if not owned:
        base = {k: v.clone() for k, v in base.items()}
    family = detect_family(base)
    if vae_state_dict is not None:
        base = _apply_vae(base, vae_state_dict, family)
    unet = unet_from_ldm(base, family)
    vae = vae_from_ldm(base, family, as_stored=True)
    text_encoders = family.text_encoders_from_ldm(base, as_stored=True)
    prediction = resolve_prediction_type(family, prediction_type, yaml_text=yaml_text, metadata=metadata, unet=unet,
                                         keys=set(base))
    override = prediction_override(family, prediction_type, keys=set(base), yaml_text=yaml_text, metadata=metadata)
    zero_terminal_snr = family.zero_terminal_snr_key in base
    logger.info("Loaded %s model %s (%s%s)", family, source.name if source else "(in memory)", prediction,
                ", zero terminal SNR" if zero_terminal_snr else "")
    return ModelBundle(
        family=family, prediction_type=prediction, base=base, unet=unet, vae=vae, text_encoders=text_encoders,
        tokenizers=family.tokenizers(),
        noise_scheduler=make_noise_scheduler(prediction, schedule_betas(base), zero_terminal_snr=zero_terminal_snr),
        source=source or SourceInfo(name="(in memory)"), unet_config=unet_config_from_ldm(base, family),
        vae_config=vae_config_from_ldm(base, family), base_yaml=yaml_text,
        declared_resolution=declared_resolution(metadata), notes=(override,) if override else ())


def declared_resolution(metadata: dict[str, str] | None) -> int | None:
    """modelspec.resolution "WxH" of a square model, e.g. "64x64" -> 64."""
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", str((metadata or {}).get("modelspec.resolution", "")))
    if match and match.group(1) == match.group(2):
        return int(match.group(1))
    return None


def load_bundle_from_file(path: str | os.PathLike, *, vae_path: str | os.PathLike | None = None,
                          prediction_type: str = "auto") -> ModelBundle:
    """Read a checkpoint (and optional VAE) file, with its hash and the `<name>.yaml` beside it if any."""
    path = Path(path)
    state_dict = read_checkpoint(path)
    yaml_path = path.with_suffix(".yaml")
    yaml_text = yaml_path.read_text(encoding="utf-8", errors="replace") if yaml_path.is_file() else None
    vae_state_dict = read_vae(vae_path) if vae_path else None
    source = SourceInfo(name=path.name, path=str(path), vae_name=Path(vae_path).name if vae_path else "",
                        hash_file=True)
    bundle = load_bundle(state_dict, vae_state_dict=vae_state_dict, prediction_type=prediction_type, source=source,
                         owned=True, yaml_text=yaml_text, metadata=read_safetensors_metadata(path))
    source.start_hashing()
    return bundle


def check_checkpoint_file(path: str | os.PathLike) -> BaseFacts | None:
    """Refuse a base model file that cannot be trained (missing, damaged, another family), reading only its
    header, and say what it is; a pickled .ckpt is checked when it loads (None)."""
    shapes = read_checkpoint_shapes(path)
    if shapes is None:
        return None
    family = detect_family(shapes)
    yaml_path = Path(path).with_suffix(".yaml")
    yaml_text = yaml_path.read_text(encoding="utf-8", errors="replace") if yaml_path.is_file() else None
    metadata = read_safetensors_metadata(path)
    evidence = prediction_evidence(family, keys=set(shapes), yaml_text=yaml_text, metadata=metadata)
    return BaseFacts(family, evidence[0] if evidence else None, declared_resolution(metadata))
