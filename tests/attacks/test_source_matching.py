"""Source matching: key-invariant signatures pair leaked encrypted images with public sources,
and the pairs give the key away."""

from __future__ import annotations

import numpy as np
import pytest

from attacks.source_matching import (
    canonical_form,
    find_matches,
    match_sources,
    signature,
    source_matching_attack,
)
from pipeline import Key, apply_op, encrypt
from tests.conftest import ALL_ORDERS


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """The embedded digits as the digits tree writes them: 64x64 RGB, upscaled bilinearly."""
    from PIL import Image
    from sklearn.datasets import load_digits

    out = []
    for image in load_digits().images[:400]:
        gray = Image.fromarray((image * (255.0 / 16.0)).round().astype(np.uint8))
        rgb = gray.resize((64, 64), Image.Resampling.BILINEAR).convert("RGB")
        out.append(np.asarray(rgb))
    return np.stack(out)


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """64x64 crops of the embedded photos (scikit-learn's and scikit-image's)."""
    from pipeline.offline.photos import load_photos, photo_crops

    crops = [
        photo_crops(p, size=64, scales=(0.5,), shifts=((0, 0), (1, 2)))
        for group in load_photos().values()
        for p in group
    ]
    return np.concatenate(crops)


@pytest.mark.parametrize("block_size", [2, 4, 8, 16])
def test_no_key_changes_the_signature(photo, rng, block_size):
    image = photo[:128, :128]
    for transforms in ALL_ORDERS[-6:]:  # the six orders of the full scheme
        key = Key(rng.bytes(32), block_size, transforms)
        assert signature(encrypt(image, key), block_size) == signature(image, block_size)
        assert np.array_equal(
            canonical_form(encrypt(image, key), block_size), canonical_form(image, block_size)
        )


def test_distinct_images_have_distinct_signatures(photos, digits):
    for images in (photos, digits[:200]):
        distinct = np.unique(images.reshape(len(images), -1), axis=0).reshape(-1, 64, 64, 3)
        assert len(distinct) > 100
        signatures = {signature(image, 4) for image in distinct}
        assert len(signatures) == len(distinct)
    moved = signature(photos[0][1:-3, 2:-2], 4)  # another block alignment: another signature
    assert moved != signature(photos[0][:60, :60], 4)


@pytest.mark.parametrize("block_size", [4, 8])
def test_photos_are_matched_and_give_the_whole_key(photos, rng, block_size):
    key = Key(rng.bytes(32), block_size)
    secret = rng.permutation(len(photos))[:40]  # the owner's subset, in a secret order
    leaked = encrypt(np.ascontiguousarray(photos[secret]), key)
    extra = rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)  # not public: no match
    leaked = np.concatenate([leaked, encrypt(extra, key)])
    result = source_matching_attack(
        leaked, photos, block_size, truth=key.material.encrypt_op, max_pairs=3
    )
    assert sorted(result.pairs) == [(i, int(j)) for i, j in enumerate(secret)]
    assert result.pairs_correct == 40 and result.ambiguous == 0 and result.pairs_used == 3
    assert result.recovery is not None and result.recovery.key_recovered == 1.0
    assert result.solution is not None
    decrypted = apply_op(leaked[-5:], result.solution.op.inverse())
    assert np.array_equal(decrypted, extra)  # images no one published, decrypted exactly
    assert result.seconds > 0 and result.matched == pytest.approx(40 / 45)


def test_digits_are_matched_and_the_key_decrypts_every_digit(digits, rng):
    """Grey digits hide which channel is which (``key_recovered`` stays low), and it does not
    matter: the solved key decrypts every digit exactly."""
    key = Key(rng.bytes(32), 4)
    public, private = digits[:300], digits[300:]
    secret = rng.permutation(len(public))[:60]
    leaked = encrypt(np.ascontiguousarray(public[secret]), key)
    result = source_matching_attack(leaked, public, 4, truth=key.material.encrypt_op)
    assert result.pairs_correct == len(result.pairs) and len(result.pairs) >= 0.95 * len(leaked)
    for i, j in result.pairs:  # a repeated digit may match its twin: the same pixels
        assert np.array_equal(public[j], public[secret[i]])
    assert result.solution is not None and result.recovery is not None
    assert result.recovery.parts["byte_maps"] == 1.0
    decrypted = apply_op(encrypt(private, key), result.solution.op.inverse())
    assert np.array_equal(decrypted, private)


def test_lookalikes_are_ambiguous_and_strangers_unmatched(photos, rng):
    """An image and its negative share every signature (a negation is a byte bijection): such
    a public pair matches nothing. An image with no public source matches nothing."""
    key = Key(rng.bytes(32), 4)
    public = np.stack([photos[0], 255 - photos[0], photos[1], photos[1]])  # photos[1] twice
    leaked = encrypt(np.stack([photos[0], photos[1], photos[2]]), key)
    found = find_matches(leaked, public, 4)
    assert found.pairs == ((1, 2),) and found.ambiguous == 1 and found.unmatched == 1
    assert match_sources(leaked, public, 4) == [(1, 2)]
    nothing = source_matching_attack(leaked[2:], public, 4, truth=key.material.encrypt_op)
    assert nothing.pairs == () and nothing.solution is None and nothing.recovery is None


def test_inputs_are_checked(photos):
    with pytest.raises(ValueError, match="not divisible by block size 6"):
        signature(photos[0], 6)
    with pytest.raises(ValueError, match="uint8 HWC"):
        signature(photos[0].astype(np.float32), 4)
    with pytest.raises(ValueError, match="max_pairs"):
        source_matching_attack(photos[:1], photos[:1], 4, max_pairs=0)
