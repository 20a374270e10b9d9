"""Crops that commute with the key: sizes and offsets on the block grid.

Cropping an encrypted image at a multiple of the block size equals encrypting the crop of the
plain one, so training can crop encrypted images and the model still sees the key's blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.errors import ConfigError
from pipeline.shards.manifest import Manifest


def crop_geometry(
    manifest: Manifest, *, crop_size: int | None = None, crop_grid: int | None = None
) -> tuple[int, int]:
    """(crop size, crop grid) for these shards, checked: crops must commute with the key."""
    return check_crop(
        manifest.image_shape, manifest.block_size, crop_size=crop_size, crop_grid=crop_grid
    )


def check_crop(
    image_shape: Sequence[int],
    block_size: int | None,
    *,
    crop_size: int | None = None,
    crop_grid: int | None = None,
) -> tuple[int, int]:
    """(crop size, crop grid) for images of ``image_shape`` (HWC) encrypted with blocks of
    ``block_size`` (None: plain), checked: crops must commute with the key."""
    height, width, _ = image_shape
    grid = crop_grid or block_size or 1
    crop = crop_size or height
    if block_size and grid % block_size:
        raise ConfigError(
            f"crop grid {grid} is not a multiple of the key's block size "
            f"{block_size}; crops would not commute with the encryption"
        )
    if crop > min(height, width) or crop % grid:
        raise ConfigError(
            f"crop size {crop} must be at most the stored size {height} and a multiple "
            f"of the block size {grid} (so crops commute with the encryption)"
        )
    return crop, grid


def centre_crop(images: np.ndarray, crop: int, grid: int) -> np.ndarray:
    """The evaluation crop of HWC or NHWC images: ``crop x crop`` at the centre, its offsets
    rounded down to the grid (a view; the images themselves when nothing is cut)."""
    height, width = images.shape[-3:-1]
    top = (height - crop) // 2 // grid * grid
    left = (width - crop) // 2 // grid * grid
    return images[..., top : top + crop, left : left + crop, :]
