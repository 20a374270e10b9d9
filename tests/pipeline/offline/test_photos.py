"""The embedded photos: real colour photos from the installed packages, cut into crops, split by
photo so that the leaked and the statistics images never share one."""

from __future__ import annotations

import hashlib
import json

import numpy as np
from PIL import Image

from pipeline.offline.photos import (
    GROUPS,
    load_photos,
    photo_crops,
    split_photos,
    write_photos_tree,
)


def _hashes(crops: np.ndarray) -> list[str]:
    return sorted(hashlib.sha256(c.tobytes()).hexdigest() for c in crops)


def test_the_photos_are_colour_photos_shipped_in_the_packages():
    photos = load_photos()
    assert sorted(photos) == sorted(GROUPS)
    for images in photos.values():
        for image in images:
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            assert min(image.shape[:2]) >= 256
            # colour: the channels differ (not a grey image stored as RGB)
            assert np.abs(image[..., 0].astype(int) - image[..., 2]).mean() > 3


def test_crops_are_slices_of_the_rescaled_photo():
    photo = np.random.default_rng(0).integers(0, 256, (100, 130, 3), dtype=np.uint8)
    crops = photo_crops(photo, size=32, scales=(1.0,), shifts=((0, 0), (1, 2)))
    # rows: (100 - dy - 32) // 32 + 1 = 3 for both shifts; columns 4 and 4
    assert crops.shape == (2 * 3 * 4, 32, 32, 3)
    assert np.array_equal(crops[0], photo[:32, :32])
    assert np.array_equal(crops[12], photo[1:33, 2:34])
    assert photo_crops(photo, size=64, scales=(0.5,)).shape[0] == 0  # 50x65 holds no 64 crop


def test_the_split_never_shares_a_photo_and_is_deterministic():
    a = split_photos(seed=0, size=64, shifts=((0, 0),))
    again = split_photos(seed=0, size=64, shifts=((0, 0),))
    assert np.array_equal(a.leaked, again.leaked)
    assert np.array_equal(a.statistics, again.statistics)
    assert not set(a.leaked_photos) & set(a.statistics_photos)
    assert sorted(a.leaked_photos + a.statistics_photos) == sorted(GROUPS)
    assert a.leaked.dtype == np.uint8 and a.leaked.shape[1:] == (64, 64, 3)
    # every crop of each set comes from that set's photos, and from no other photo
    photos = load_photos()

    def crops_of(names):
        return np.concatenate(
            [photo_crops(p, size=64, shifts=((0, 0),)) for n in names for p in photos[n]]
        )

    assert _hashes(a.leaked) == _hashes(crops_of(a.leaked_photos))
    assert _hashes(a.statistics) == _hashes(crops_of(a.statistics_photos))
    # another seed draws another split (or at least another order)
    b = split_photos(seed=1, size=64, shifts=((0, 0),))
    assert b.leaked_photos != a.leaked_photos or not np.array_equal(b.leaked, a.leaked)


def test_the_photos_tree_is_an_imagenet_style_folder(tmp_path):
    root = write_photos_tree(tmp_path / "photos", size=32, scales=(0.5,))
    assert json.loads((root / "DONE.json").read_text())["size"] == 32
    assert sorted(p.name for p in (root / "train").iterdir()) == sorted(GROUPS)
    first = next((root / "val" / "china").iterdir())
    assert Image.open(first).size == (32, 32) and Image.open(first).mode == "RGB"
    stamp = (root / "DONE.json").stat().st_mtime_ns
    assert write_photos_tree(root, size=32, scales=(0.5,)) == root  # complete: kept as it is
    assert (root / "DONE.json").stat().st_mtime_ns == stamp
