"""The frontier's plain images: the embedded photos split by photo, or ``--data`` (an image
folder or plain shards, local or a URL) split by image; the leaked ones and the attacker's
statistics ones never overlap."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from attacks.frontier.config import FrontierConfig, FrontierError, _rng


@dataclass
class Inputs:
    """Plain images: the leaked ones (encrypted with each fresh key) and the statistics ones."""

    leaked: np.ndarray
    statistics: np.ndarray
    description: str
    meta: dict = field(default_factory=dict)


def load_inputs(config: FrontierConfig) -> Inputs:
    """The embedded photos split by photo, or ``--data`` (an image folder or plain shards)
    split by image, sampled to what the largest budget needs at the smallest block size."""
    if config.data is None:
        from pipeline.offline.photos import split_photos

        split = split_photos(seed=config.seed)
        return Inputs(
            split.leaked,
            split.statistics,
            f"the embedded photos ({len(split.leaked)} crops of "
            f"{', '.join(split.leaked_photos)} leaked; statistics from "
            f"{len(split.statistics)} crops of {', '.join(split.statistics_photos)})",
            {
                "leaked_photos": list(split.leaked_photos),
                "statistics_photos": list(split.statistics_photos),
            },
        )
    return _load_data(config)


def _images_needed(config: FrontierConfig, size: int) -> int:
    per_image = (size // min(config.block_sizes)) ** 2
    return max(1, math.ceil(max(config.budgets) / per_image))


def _load_data(config: FrontierConfig) -> Inputs:
    from pipeline.storage import Storage

    data = config.data
    assert data is not None
    if Storage(data).exists("train.manifest.json"):  # sealed or not, the name is there
        return _load_shards(config, data)
    if "://" not in data and not Path(data).exists():
        raise FrontierError(
            f"--data {data}: not found; pass an image folder (SRC/train/<class>/<image>) or "
            "plain shards (a folder or URL with train.manifest.json)"
        )
    if "://" in data:
        raise FrontierError(
            f"{data}: no train.manifest.json there; remote --data must be shards "
            "(tools/make_shards.py --plain), image folders only locally"
        )
    return _load_folder(config, Path(data))


def _load_folder(config: FrontierConfig, root: Path) -> Inputs:
    from pipeline.offline.decode import decode_pil
    from pipeline.offline.sources import find_classes, list_split

    split = "train" if (root / "train").is_dir() else "val"
    items = list_split(root, split, find_classes(root, split))
    order = _rng(config, "data").permutation(len(items))
    n_stats = config.statistics_images
    n_leaked = _images_needed(config, config.image_size)
    if len(items) <= n_stats:
        raise FrontierError(
            f"{root / split}: {len(items)} images, but --statistics-images {n_stats} plus leaked "
            "images need more; lower --statistics-images"
        )
    chosen = [items[i] for i in order[: n_stats + n_leaked]]

    def decode(item) -> np.ndarray:
        path = root / item.path
        try:
            return decode_pil(path.read_bytes(), config.image_size)
        except Exception as exc:
            raise FrontierError(
                f"{path}: cannot decode it ({exc}); remove or replace the file"
            ) from None

    images = np.stack([decode(item) for item in tqdm(chosen, desc="images", leave=False)])
    return Inputs(
        images[n_stats:],
        images[:n_stats],
        f"`{root}` ({split}: {len(images) - n_stats} of {len(items)} images leaked, statistics "
        f"from {n_stats} other images, {config.image_size}x{config.image_size} centre crops)",
    )


def _load_shards(config: FrontierConfig, data: str) -> Inputs:
    from pipeline.model.evaluation import load_split
    from pipeline.shards.manifest import load_manifest
    from pipeline.shards.sealing import open_output

    manifest = load_manifest(open_output(data, config.data_key), "train")
    if manifest.encrypted:
        raise FrontierError(
            f"{data}: shards encrypted with key {manifest.key_fingerprint}; the frontier "
            "encrypts with fresh keys itself and needs plain shards (tools/make_shards.py "
            "--plain), or use --checkpoint/--key/--model-data for an encrypted model's own data"
        )
    size = manifest.image_shape[0]
    n_stats = config.statistics_images
    limit = n_stats + _images_needed(config, size)
    # shards are in the offline stage's hashed order, so the first images are a sample
    images = load_split(data, "train", limit=limit, data_key=config.data_key).images
    if len(images) <= n_stats:
        raise FrontierError(
            f"{data}: {len(images)} train images, too few for --statistics-images {n_stats}"
        )
    return Inputs(
        images[n_stats:],
        images[:n_stats],
        f"`{data}` (plain shards: {len(images) - n_stats} of {manifest.total_samples} train "
        f"images leaked, statistics from {n_stats} other images)",
    )
