"""A tiny stand-in for the WebUI's loaded model (`shared.sd_model`, an ldm LatentDiffusion).

It holds a checkpoint's tensors in nested modules so that `state_dict()` gives the LIVE layout of a running host:
the prompt hijack wraps the text encoder (`cond_stage_model.wrapped.…`; SDXL: each `conditioner.embedders.N.wrapped.…`)
and its token embedding (`….token_embedding.wrapped.weight`, sd_hijack.EmbeddingsWithFixes); for SDXL it also points
`cond_stage_model` at the conditioner (so its tensors are listed twice) and adds an empty `conditioner.wrapped`
(sd_models_xl.extend_sdxl, which also keeps `alphas_cumprod` as a plain fp32 attribute). Like the host it halves
everything but `alphas_cumprod` unless --no-half, can store Linear/Conv weights as fp8 (Settings > Optimizations >
FP8 weight),
and can carry in-place LoRA deltas with the attributes the built-in Lora extension leaves on patched layers
(`network_weights_backup`, `network_bias_backup`, `network_current_names`).
"""

from __future__ import annotations

import re

import torch

COND = "cond_stage_model."
_EMBEDDER = re.compile(r"^(conditioner\.embedders\.\d+\.)")
FP8 = torch.float8_e4m3fn
_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sigmas")
_LORA_TARGETS = ("to_q", "to_k", "to_v", "q_proj", "v_proj", "attn")


def live_key(key: str) -> str:
    """File layout -> the key the hijacked live model reports."""
    if key.startswith(COND):
        key = COND + "wrapped." + key[len(COND):]
    key = _EMBEDDER.sub(r"\1wrapped.", key)
    if key.endswith(".token_embedding.weight"):
        key = key[: -len("weight")] + "wrapped.weight"
    return key


class _Node(torch.nn.Module):
    """A plain container: one level of a state-dict key."""


class FrozenCLIPEmbedderWithCustomWords(torch.nn.Module):
    """Stand-in for the host's prompt-hijack wrapper: the real text encoder lives in `.wrapped`."""


class EmbeddingsWithFixes(torch.nn.Module):
    """Stand-in for sd_hijack.EmbeddingsWithFixes: the token embedding lives in `.wrapped`."""


def _node_for(path: str) -> torch.nn.Module:
    if path == "conditioner.embedders":
        return torch.nn.ModuleList()  # sgm's GeneralConditioner: a list the host iterates
    if path == "cond_stage_model" or re.fullmatch(r"conditioner\.embedders\.\d+", path):
        return FrozenCLIPEmbedderWithCustomWords()
    if path.endswith(".token_embedding"):
        return EmbeddingsWithFixes()
    return _Node()


def _standard_sigmas() -> torch.Tensor:
    """sgm's LegacyDDPMDiscretization: SD's scaled-linear schedule as sigmas."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt().float()


def _really_movable(device: torch.device) -> bool:
    return device.type in ("cpu", "meta") or (device.type == "cuda" and torch.cuda.is_available())


class FakeSDModel(torch.nn.Module):
    """The live model: fp32 CPU tensors at construction; `load_model_weights` of the stand-in halves them."""

    def __init__(self, state_dict: dict[str, torch.Tensor], *, checkpoint_info=None, parameterization: str = "eps"):
        super().__init__()
        keys = state_dict.keys()
        sgm = any(k.startswith("conditioner.") for k in keys)
        for key, value in state_dict.items():
            if sgm and "." not in key:
                continue  # sgm's DiffusionEngine has no top-level tensors: flags like v_pred are not loaded
            self._add(live_key(key), value)
        self.is_sdxl = any(k.startswith("conditioner.") for k in keys)
        self.is_sd2 = not self.is_sdxl and any(k.startswith(COND + "model.") for k in keys)
        self.is_sd1 = not (self.is_sdxl or self.is_sd2)
        self.is_ssd = self.is_sd3 = False
        if self.is_sdxl:
            self.cond_stage_model = self.conditioner  # sd_hijack: the conditioner stands in as cond_stage_model
            self.conditioner.wrapped = torch.nn.Module()  # extend_sdxl
            if "denoiser.sigmas" not in state_dict:  # the host's DiscreteDenoiser always has them
                self._add("denoiser.sigmas", _standard_sigmas())
            sigmas = self.denoiser.sigmas.double()
            self.alphas_cumprod = (1.0 / (1.0 + sigmas ** 2)).float()  # a plain attribute, never halved
        self.parameterization = parameterization
        self.cond_stage_key = "txt"
        self.latent_channels = 4
        self.lowvram = False
        self.used_config = ""
        self.sd_checkpoint_info = checkpoint_info
        self.sd_model_checkpoint = getattr(checkpoint_info, "filename", None)
        self.sd_model_hash = None
        self.base_vae = None
        self.loaded_vae_file = None
        self.moves: list[torch.device] = []
        self.placed_on = torch.device("cpu")

    # -- building --------------------------------------------------------------------------------------

    def _add(self, key: str, value: torch.Tensor) -> None:
        *parents, leaf = key.split(".")
        module: torch.nn.Module = self
        path = ""
        for part in parents:
            path = f"{path}.{part}" if path else part
            child = module._modules.get(part)
            if child is None:
                child = _node_for(path)
                module.add_module(part, child)
            module = child
        tensor = value.detach().clone()
        if leaf in _BUFFERS or leaf == "position_ids" or not tensor.is_floating_point():
            module.register_buffer(leaf, tensor)
        else:
            module.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))

    def load_file_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """What `load_model_weights` does with a file's dict: copy it in, through the hijacked key names."""
        self.load_state_dict({live_key(k): v for k, v in state_dict.items()}, strict=False)

    # -- precision, like sd_models.load_model_weights ----------------------------------------------------

    def half_like_host(self, *, keep_vae_fp32: bool = False) -> None:
        alphas_cumprod = self.alphas_cumprod
        vae = self.first_stage_model
        is_buffer = "alphas_cumprod" in self._buffers
        if is_buffer:
            self._buffers["alphas_cumprod"] = None
        if keep_vae_fp32:
            self._modules["first_stage_model"] = None
        self.half()
        if is_buffer:
            self._buffers["alphas_cumprod"] = alphas_cumprod
        self._modules["first_stage_model"] = vae
        self.alphas_cumprod_original = alphas_cumprod

    def to_fp8(self) -> None:
        """Settings > Optimizations > FP8 weight = Enable: Linear/Conv weights (not the VAE's) stored as fp8."""
        for name, module in self.named_modules():
            if name.startswith("first_stage_model") or "embedding" in name:
                continue
            weight = module._parameters.get("weight")
            if weight is None or weight.ndim not in (2, 4):
                continue
            for param in module._parameters.values():
                if param is not None:
                    param.data = param.data.to(FP8)

    # -- the built-in Lora extension -------------------------------------------------------------------

    def lora_layers(self) -> list[tuple[str, torch.nn.Module]]:
        """Attention projections of the UNet and text encoder: what a LoRA usually patches."""
        found = []
        for name, module in self.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            has_weight = "weight" in module._parameters or "in_proj_weight" in module._parameters
            if has_weight and leaf in _LORA_TARGETS and not name.startswith("first_stage_model"):
                found.append((name, module))
        return found

    def apply_lora(self, strength: float = 0.05, *, backup: bool = True, name: str = "my_lora",
                   seed: int = 0) -> list[str]:
        """Add a delta in place the way networks.network_apply_weights does, keeping (or not) the backups."""
        generator = torch.Generator().manual_seed(seed)
        wanted = ((name, 1.0, 1.0, None),)
        patched = []
        for layer_name, module in self.lora_layers():
            mha = "in_proj_weight" in module._parameters
            if backup and getattr(module, "network_weights_backup", None) is None:
                if mha:
                    module.network_weights_backup = (module.in_proj_weight.to("cpu", copy=True),
                                                     module.out_proj.weight.to("cpu", copy=True))
                    bias = getattr(module.out_proj, "bias", None)
                else:
                    module.network_weights_backup = module.weight.to("cpu", copy=True)
                    bias = module._parameters.get("bias")
                module.network_bias_backup = None if bias is None else bias.to("cpu", copy=True)
            weights = [module.in_proj_weight, module.out_proj.weight] if mha else [module.weight]
            with torch.no_grad():
                for weight in weights:
                    delta = torch.randn(weight.shape, generator=generator) * strength
                    weight.add_(delta.to(weight.dtype))
            module.network_layer_name = layer_name
            module.network_current_names = wanted
            patched.append(layer_name)
        return patched

    def generate_without_lora(self) -> None:
        """A generation with no <lora:...> in the prompt: weights restored from the backups, names cleared."""
        with torch.no_grad():
            for _, module in self.lora_layers():
                backup = getattr(module, "network_weights_backup", None)
                if backup is None:
                    continue
                if isinstance(backup, tuple):
                    module.in_proj_weight.copy_(backup[0])
                    module.out_proj.weight.copy_(backup[1])
                else:
                    module.weight.copy_(backup)
                bias_backup = getattr(module, "network_bias_backup", None)
                if bias_backup is not None:
                    target = module.out_proj.bias if isinstance(backup, tuple) else module.bias
                    target.copy_(bias_backup)
                module.network_current_names = ()

    # -- placement -------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.placed_on

    def to(self, *args, **kwargs):
        """Records every move; a device this machine lacks (cuda on a CPU box) is recorded but not applied."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        moves: dict = {}
        if device is not None:
            device = torch.device(device)
            self.moves.append(device)
            self.placed_on = device
            if _really_movable(device):
                moves["device"] = device
        if dtype is not None:
            moves["dtype"] = dtype
        return super().to(**moves) if moves else self
