"""Reading training images into RGB pictures and pixel tensors in [-1, 1] (no torchvision)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import DreamboothError
from ..inputs import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)


_CROPS = ("center", "random")
# Modes holding more than 8 bits per channel, which Image.convert("RGB") would clip instead of scale.
_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file name has one of the accepted image extensions (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image as 8-bit RGB, turned upright by its EXIF orientation; transparency becomes white."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            upright = ImageOps.exif_transpose(image)
            return to_rgb(upright)
    except FileNotFoundError:
        raise DreamboothError(f"image {str(path)!r} does not exist; check the folder or remove it from the "
                              "list") from None
    # Corrupt files make PIL's decoders raise many kinds of errors (OSError, SyntaxError, struct.error...);
    # all of them mean the same thing to the user.
    except Exception as exc:  # noqa: BLE001
        raise DreamboothError(f"image {str(path)!r} cannot be read ({type(exc).__name__}: {exc}); re-save it "
                              "as PNG or JPEG, or delete it") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: alpha composited on white, 16-bit and float data scaled."""
    if image.mode in _WIDE_MODES:
        return _wide_to_rgb(image)
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "RGB":
        return image.copy()
    return image.convert("RGB")


def _wide_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        # Float images (TIFF, EXR-like) are usually 0..1; anything larger is taken as already 0..255.
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
    else:
        # 16-bit PNG/TIFF open as "I" or "I;16" with values 0..65535: 65535 / 257 = 255 exactly.
        peak = float(values.max()) if values.size else 0.0
        scale = 1.0 / 257.0 if peak <= 65535 else 255.0 / peak
    gray = np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")


@dataclass(frozen=True)
class Fit:
    """How a picture of `original` (width, height) becomes `target` (width, height): resized to `resized`, then
    the window at (`left`, `top`) cut out. SDXL conditions on exactly these numbers."""

    original: tuple[int, int]
    resized: tuple[int, int]
    left: int
    top: int
    target: tuple[int, int]

    @staticmethod
    def whole(width: int, height: int) -> Fit:
        """A picture made at its final size (a generated image): nothing resized, nothing cut."""
        return Fit(original=(width, height), resized=(width, height), left=0, top=0, target=(width, height))

    def mirrored(self) -> Fit:
        """The same fit after a left-right flip: the window now starts as far from the left edge as it ended
        from the right one."""
        left = self.resized[0] - self.left - self.target[0]
        return Fit(original=self.original, resized=self.resized, left=left, top=self.top, target=self.target)


def fit_geometry(original: tuple[int, int], width: int, height: int, crop: str = "center",
                 generator: torch.Generator | None = None) -> Fit:
    """Cover width x height keeping the aspect ratio, then a center or random window of exactly that size."""
    if crop not in _CROPS:
        raise ValueError(f"crop = {crop!r}: must be one of {', '.join(_CROPS)}")
    if width < 1 or height < 1:
        raise ValueError(f"size {width}x{height}: both sides must be at least 1 pixel")
    src_w, src_h = original
    scale = max(width / src_w, height / src_h)
    # max() guards against rounding leaving the covering side one pixel short.
    new_w, new_h = max(width, round(src_w * scale)), max(height, round(src_h * scale))
    left = _offset(new_w - width, crop, generator)
    top = _offset(new_h - height, crop, generator)
    return Fit(original=(src_w, src_h), resized=(new_w, new_h), left=left, top=top, target=(width, height))


def fit_image(image: Image.Image, width: int, height: int, crop: str = "center",
              generator: torch.Generator | None = None) -> Image.Image:
    """Resize to cover width x height keeping the aspect ratio, then crop (center or random) to exactly that."""
    return apply_fit(image, fit_geometry(image.size, width, height, crop, generator))


def apply_fit(image: Image.Image, fit: Fit) -> Image.Image:
    """Resize and crop a picture as `fit` says."""
    width, height = fit.target
    if fit.resized != fit.original:
        # Lanczos is sharpest for shrinking; bicubic rings less when enlarging small images.
        resample = Image.LANCZOS if fit.resized[0] < fit.original[0] else Image.BICUBIC
        image = image.resize(fit.resized, resample=resample)
    if (fit.left, fit.top, *fit.resized) == (0, 0, width, height):
        return image
    return image.crop((fit.left, fit.top, fit.left + width, fit.top + height))


def _offset(slack: int, crop: str, generator: torch.Generator | None) -> int:
    if slack <= 0:
        return 0
    if crop == "center":
        return slack // 2
    return int(torch.randint(0, slack + 1, (1,), generator=generator).item())


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB picture -> float32 tensor [3, H, W] in [-1, 1], the range the VAE expects."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    array = array / 127.5 - 1.0
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def tensor_to_image(tensor: torch.Tensor) -> Image.Image:
    """Inverse of image_to_tensor: [3, H, W] (or [1, 3, H, W]) in [-1, 1] -> RGB picture, values clamped."""
    if tensor.dim() == 4 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        raise ValueError(f"expected a [3, H, W] tensor, got shape {tuple(tensor.shape)}")
    pixels = ((tensor.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy(), "RGB")


def prepare_image(path: str | os.PathLike, size: tuple[int, int], crop: str = "center", flip: bool = False,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Load, fit to size (width, height), optionally mirror, and return the [3, H, W] tensor in [-1, 1]."""
    return prepare_picture(path, size, crop, flip, generator)[0]


def prepare_picture(path: str | os.PathLike, size: tuple[int, int], crop: str = "center", flip: bool = False,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, Fit]:
    """`prepare_image`, and the fit it made (after the flip, if any)."""
    image = load_image(path)
    fit = fit_geometry(image.size, *size, crop=crop, generator=generator)
    image = apply_fit(image, fit)
    if flip:
        image, fit = image.transpose(Image.FLIP_LEFT_RIGHT), fit.mirrored()
    return image_to_tensor(image), fit
