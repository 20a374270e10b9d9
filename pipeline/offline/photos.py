"""The embedded natural photos: colour photos shipped inside scikit-learn and scikit-image.

The digits (``pipeline.offline.digits``) are grey, upscaled and flat, so they say nothing about
how the key holds on photos. These are real colour photos that ship in the wheels (no network): two
from scikit-learn's ``load_sample_images`` and six from ``skimage.data`` (the two stereo
motorcycle views are one scene, so one group). Each photo is cut into square crops at several
scales and the 16 pixel shifts of 0-3 px (each gives blocks of another alignment for block
sizes 4 to 16), as uint8 ``(N, S, S, 3)`` arrays.

``split_photos`` splits by photo: the leaked images and the attacker's statistics images never
come from the same photo (statistics from the leaked photos themselves overstate a
ciphertext-only attack). ``write_photos_tree`` writes the crops as an ImageNet-style tree
(one class per photo) for ``tools/make_shards.py --src``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from pipeline.errors import ConfigError
from pipeline.offline.digits import default_cache_dir

logger = logging.getLogger(__name__)

PHOTOS_TREE_VERSION = 1
# photo group -> the images of that scene; groups, not images, are split
SKLEARN_PHOTOS = {"china": ("china.jpg",), "flower": ("flower.jpg",)}
SKIMAGE_PHOTOS = {
    "astronaut": ("astronaut",),
    "coffee": ("coffee",),
    "chelsea": ("chelsea",),
    "rocket": ("rocket",),
    "motorcycle": ("motorcycle_left", "motorcycle_right"),
}
GROUPS = tuple(sorted({**SKLEARN_PHOTOS, **SKIMAGE_PHOTOS}))
SCALES = (1.0, 0.75, 0.5)
# every shift of 0-3 px: each gives blocks of another alignment for block sizes 4, 8 and 16
SHIFTS = tuple((dy, dx) for dy in range(4) for dx in range(4))


class PhotoSplit(NamedTuple):
    leaked: np.ndarray  # (N, S, S, 3) uint8
    statistics: np.ndarray  # (N', S, S, 3) uint8, from other photos
    leaked_photos: tuple[str, ...]
    statistics_photos: tuple[str, ...]


def load_photos() -> dict[str, list[np.ndarray]]:
    """Every photo group's (H, W, 3) uint8 images, read from the installed packages."""
    from sklearn.datasets import load_sample_image

    try:
        import skimage.data
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ImportError(
            "the embedded photos need scikit-image: pip install scikit-image"
        ) from exc

    photos = {g: [load_sample_image(f) for f in files] for g, files in SKLEARN_PHOTOS.items()}
    for group, names in SKIMAGE_PHOTOS.items():
        # read_image of the bundled files only: skimage.data never goes to the network for these
        photos[group] = [np.asarray(_skimage_photo(skimage.data, n), np.uint8) for n in names]
    return {g: photos[g] for g in GROUPS}


def _skimage_photo(module, name: str) -> np.ndarray:
    if name.startswith("motorcycle_"):
        left, right, _ = module.stereo_motorcycle()
        return left if name == "motorcycle_left" else right
    return getattr(module, name)()


def photo_crops(
    photo: np.ndarray,
    *,
    size: int,
    scales: tuple[float, ...] = SCALES,
    shifts: tuple[tuple[int, int], ...] = SHIFTS,
) -> np.ndarray:
    """All non-overlapping ``size`` x ``size`` crops of ``photo`` rescaled by each of
    ``scales``, the crop grid moved by each of ``shifts`` (pixels)."""
    crops = []
    h, w = photo.shape[:2]
    for scale in scales:
        sh, sw = round(h * scale), round(w * scale)
        image = photo
        if scale != 1.0:
            image = np.asarray(Image.fromarray(photo).resize((sw, sh), Image.Resampling.LANCZOS))
        for dy, dx in shifts:
            for y in range(dy, sh - size + 1, size):
                for x in range(dx, sw - size + 1, size):
                    crops.append(image[y : y + size, x : x + size])
    if not crops:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack(crops).astype(np.uint8)


@functools.lru_cache(maxsize=2)
def split_photos(
    *,
    seed: int = 0,
    size: int = 64,
    statistics_groups: int = 3,
    scales: tuple[float, ...] = SCALES,
    shifts: tuple[tuple[int, int], ...] = SHIFTS,
) -> PhotoSplit:
    """Crops of the embedded photos, split by photo: ``statistics_groups`` photo groups give
    the attacker's statistics images, the others the leaked images. Deterministic given
    ``seed``; the crops of each set are in a seeded random order. The arrays are read-only
    (one copy is cached per process)."""
    if not 1 <= statistics_groups < len(GROUPS):
        raise ConfigError(
            f"statistics_groups must be between 1 and {len(GROUPS) - 1}, got {statistics_groups}"
        )
    rng = np.random.default_rng([seed, 0x9E0705])
    order = [GROUPS[i] for i in rng.permutation(len(GROUPS))]
    stats_names = tuple(sorted(order[:statistics_groups]))
    leaked_names = tuple(sorted(order[statistics_groups:]))
    photos = load_photos()

    def crops(names: tuple[str, ...]) -> np.ndarray:
        parts = [
            photo_crops(p, size=size, scales=scales, shifts=shifts)
            for name in names
            for p in photos[name]
        ]
        stacked = np.concatenate(parts)
        shuffled = stacked[rng.permutation(len(stacked))]
        shuffled.flags.writeable = False
        return shuffled

    return PhotoSplit(crops(leaked_names), crops(stats_names), leaked_names, stats_names)


def write_photos_tree(
    root: str | os.PathLike | None = None,
    *,
    size: int = 64,
    scales: tuple[float, ...] = SCALES,
    val_every: int = 5,
) -> Path:
    """Write the crops as ``ROOT/{train,val}/<photo>/NNNNN.png`` (one class per photo group,
    every ``val_every``-th crop of a photo is val; unshifted crops only) unless already
    complete; the tree appears atomically. Crops of one photo fall in both splits: the tree
    feeds ``--src`` and ``python -m attacks.frontier --data``, not held-out accuracy claims."""
    root = Path(root) if root is not None else default_cache_dir() / f"photos-{size}"
    marker = root / "DONE.json"
    if marker.exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    total = 0
    try:
        for group, images in load_photos().items():
            crops = np.concatenate(
                [photo_crops(p, size=size, scales=scales, shifts=((0, 0),)) for p in images]
            )
            for i, crop in enumerate(crops):
                split = "val" if i % val_every == val_every - 1 else "train"
                folder = tmp / split / group
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(crop).save(folder / f"{i:05d}.png", optimize=False)
            total += len(crops)
        info = {"version": PHOTOS_TREE_VERSION, "size": size, "images": total}
        (tmp / "DONE.json").write_text(json.dumps(info) + "\n")
        if marker.exists():  # another process finished it meanwhile
            return root
        if root.exists():  # an incomplete earlier attempt (no marker): replace it
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote the embedded photos tree (%d crops, %dx%d) to %s", total, size, size, root)
    return root
