"""Aspect-ratio buckets (kohya-style): sizes of about resolution^2 pixels so images need little cropping."""

from __future__ import annotations

import logging
import math

logger = logging.getLogger(__name__)


def make_buckets(resolution: int, step: int = 64, min_side: int = 256,
                 max_side: int | None = None) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of `step`, area <= resolution^2, sorted; always has the square."""
    if step < 1 or resolution < step:
        raise ValueError(f"resolution {resolution} and step {step}: need step >= 1 and resolution >= step")
    # Below min_side (tiny test resolutions) the smallest side is one step, so a few shapes still exist.
    low = step if resolution < min_side else _round_up(min_side, step)
    high = max_side if max_side is not None else 2 * resolution
    high = max(high // step * step, resolution)
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    for width in range(low, high + 1, step):
        # The tallest height that keeps the area within budget, for every width: kohya's construction.
        height = min(high, area // width // step * step)
        if height >= low:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width:height (log-ratio distance); ties -> larger area."""
    if not buckets:
        raise ValueError("no buckets to choose from")
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height}: both sides must be at least 1 pixel")
    ratio = math.log(width / height)

    def key(bucket: tuple[int, int]) -> tuple[float, int]:
        # Rounded so buckets of the same shape tie exactly despite float noise.
        return round(abs(math.log(bucket[0] / bucket[1]) - ratio), 9), -bucket[0] * bucket[1]

    return min(buckets, key=key)


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step
