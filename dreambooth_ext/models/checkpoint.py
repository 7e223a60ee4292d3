"""Reading checkpoint files safely: .safetensors, and pickled .ckpt/.pt/.pth through a restricted unpickler.

Old Stable Diffusion .ckpt files are whole pytorch-lightning training states: besides the weights they pickle
the lightning callbacks and numpy scalars, which torch's `weights_only` loader refuses. Rather than trusting
the file (a pickle can run any code), we allow only what rebuilds tensors and a few harmless types, and turn
the lightning classes into an inert placeholder.
"""

from __future__ import annotations

import _compat_pickle
import hashlib
import logging
import os
import pickle
import types
from pathlib import Path
from typing import Any

import torch

from ..errors import DreamboothError
from ..inputs import SAFETENSORS_SUFFIX, checkpoint_suffix

logger = logging.getLogger(__name__)


VAE_PREFIX = "first_stage_model."
_VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_VAE_DROP = ("loss.", "model_ema.")

# Module/name pairs a state dict pickle may reference. Everything here only rebuilds data.
_ALLOWED_GLOBALS = frozenset({
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Tensor"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch.nn.parameter", "Parameter"),
    ("torch.storage", "UntypedStorage"),
    ("torch.storage", "TypedStorage"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # protocol-2 pickles spell bytes (e.g. of numpy scalars) this way
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("builtins", "bytearray"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
})

# Lightning training state we never use; mapped to a placeholder so the weights beside it can be read.
_PLACEHOLDER_MODULES = ("pytorch_lightning.callbacks", "lightning.pytorch.callbacks")


class _Placeholder:
    """Stands in for a pickled lightning callback class or instance; keeps nothing and runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _resolve_global(module: str, name: str) -> Any:
    if module.startswith(_PLACEHOLDER_MODULES):
        return _Placeholder
    if (module, name) in _ALLOWED_GLOBALS:
        return _import_attr(module, name)
    if module == "torch" and (name.endswith("Storage") or isinstance(getattr(torch, name, None), torch.dtype)):
        return getattr(torch, name)
    if module.startswith("numpy.dtypes") and name.endswith("DType"):
        return _import_attr(module, name)
    raise DreamboothError(
        f"Refused to load the global '{module}.{name}' from the pickled checkpoint: loading it could run code, "
        "so only weights are read from .ckpt files. Convert the file to .safetensors with a tool you trust "
        "(or download the .safetensors version of the model) and use that instead.")


def _import_attr(module: str, name: str) -> Any:
    import importlib

    return getattr(importlib.import_module(module), name)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # torch saves with protocol 2, which spells Python 3 names the Python 2 way (__builtin__.set); the base
        # find_class would translate them, so we do too before checking.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        return _resolve_global(module, name)


def _restricted_pickle_module() -> types.SimpleNamespace:
    """A stand-in for the `pickle` module that torch.load uses for this one call (no global changes)."""

    def load(file: Any, **kwargs: Any) -> Any:
        return _RestrictedUnpickler(file, **kwargs).load()

    return types.SimpleNamespace(__name__="dreambooth_restricted_pickle", Unpickler=_RestrictedUnpickler,
                                 load=load, UnpicklingError=pickle.UnpicklingError)


def _load_pickled(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        logger.info("%s needs more than torch's weights_only loader (%s); using the restricted loader",
                    path.name, str(exc).splitlines()[0][:200])
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module())


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    # Lightning checkpoints keep the weights under "state_dict"; some tools nest it once more.
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise DreamboothError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict of weights; "
                              "pick a Stable Diffusion checkpoint file")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise DreamboothError(f"{str(path)!r} contains no weights (keys: {list(obj)[:5]}); "
                              "pick a Stable Diffusion checkpoint file")
    return tensors


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the tensors of a .safetensors or .ckpt/.pt/.pth file onto the CPU, without running pickled code."""
    path = Path(path)
    suffix = checkpoint_suffix(path)
    try:
        if suffix == SAFETENSORS_SUFFIX:
            import safetensors.torch

            obj = safetensors.torch.load_file(str(path), device="cpu")
        else:
            obj = _load_pickled(path)
    except DreamboothError:
        raise
    except Exception as exc:  # corrupt or truncated files raise many different types
        raise DreamboothError(f"Could not read checkpoint {str(path)!r} ({type(exc).__name__}: {exc}); the file "
                              "may be incomplete or damaged: download or copy it again") from exc
    return _unwrap(obj, path)


def read_checkpoint_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]] | None:
    """Each tensor's name and shape, from a checkpoint's header alone (None for pickled files, which must be read
    whole)."""
    path = Path(path)
    if checkpoint_suffix(path) != SAFETENSORS_SUFFIX:
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as exc:
        raise DreamboothError(f"Could not read checkpoint {str(path)!r} ({type(exc).__name__}: {exc}); the file "
                              "may be incomplete or damaged: download or copy it again") from exc


def read_named_tensors(path: str | os.PathLike, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors of `names` a .safetensors file has, read alone ({} for other files or on any error)."""
    if not names or checkpoint_suffix(Path(path)) != SAFETENSORS_SUFFIX:
        return {}
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as handle:
            present = set(handle.keys())
            return {name: handle.get_tensor(name) for name in names if name in present}
    except Exception as exc:
        logger.warning("Could not read %s from %s: %s", ", ".join(names), path, exc)
        return {}


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a .safetensors file's header ({} for other files or when it has none)."""
    path = Path(path)
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        return {}
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:
        logger.warning("Could not read the metadata of %s: %s", path, exc)
        return {}


def read_vae(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a standalone VAE file; keys come back prefixed `first_stage_model.` like in a full checkpoint."""
    state_dict = read_checkpoint(path)
    vae: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith(VAE_PREFIX):
            key = key[len(VAE_PREFIX):]
        if key.startswith(_VAE_PARTS):
            vae[VAE_PREFIX + key] = value
        elif not key.startswith(_VAE_DROP):
            logger.debug("Ignoring %s in VAE file %s", key, path)
    if not any(k.startswith(VAE_PREFIX + "decoder.") for k in vae):
        raise DreamboothError(f"{str(path)!r} is not a VAE: it has no decoder weights (first keys: "
                              f"{list(state_dict)[:4]}); pick a VAE file such as vae-ft-mse-840000-ema-pruned")
    return vae


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of the file as full hex, read in chunks so multi-GB checkpoints need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def short_hash(sha256: str) -> str:
    """The 10-character form the WebUI shows next to checkpoint names."""
    return sha256[:10]
