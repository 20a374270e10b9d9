"""Known-plaintext key recovery on real photos: a few pairs give the whole key away."""

from __future__ import annotations

import numpy as np
import pytest

from attacks.keyspace import key_recovery, to_blocks
from attacks.known_plaintext import conflicts, solve_key
from pipeline import Key, apply_op, encrypt
from tests.conftest import ALL_ORDERS


@pytest.fixture(scope="module")
def other_photo() -> np.ndarray:
    """scikit-learn's second photo (flower.jpg): never a known pair, only a victim."""
    from sklearn.datasets import load_sample_images

    return np.ascontiguousarray(load_sample_images().images[1][None, :256, :256])


@pytest.mark.parametrize("block_size, crop", [(4, 64), (8, 128)])
def test_one_crop_of_one_photo_gives_the_whole_key(photo, other_photo, rng, block_size, crop):
    key = Key(rng.bytes(32), block_size)
    plain = photo[None, 100 : 100 + crop, 200 : 200 + crop]
    solved = solve_key(plain, encrypt(plain, key), block_size, key.transforms)
    recovered = key_recovery(solved.op, key.material.encrypt_op, key.transforms)
    assert solved.pairs == 1 and solved.blocks == (crop // block_size) ** 2
    assert recovered.key_recovered == 1.0, recovered
    stolen = encrypt(other_photo, key)  # any other image of these shards, decrypted exactly
    assert np.array_equal(apply_op(stolen, solved.op.inverse()), other_photo)


@pytest.mark.parametrize("transforms", ALL_ORDERS, ids="+".join)
def test_every_scheme_falls_to_one_small_crop(photo, other_photo, rng, transforms):
    key = Key(rng.bytes(32), 4, transforms)
    plain = photo[None, 100:164, 200:264]
    solved = solve_key(plain, encrypt(plain, key), 4, key.transforms)
    recovered = key_recovery(solved.op, key.material.encrypt_op, key.transforms)
    # Only FFX table entries no pair showed are guessed; the rest is solved exactly.
    assert recovered.key_recovered >= 0.95 and recovered.parts.get("permutation", 1) == 1
    assert solved.table_observed < 1 or recovered.key_recovered == 1
    decrypted = apply_op(encrypt(other_photo, key), solved.op.inverse())
    assert (decrypted == other_photo).mean() > 0.99


def test_true_sources_have_no_conflicts_and_others_do(photo, rng):
    key = Key(rng.bytes(32), 4)
    plain = photo[None, :64, :64]
    p, c = to_blocks(plain, 4), to_blocks(encrypt(plain, key), 4)
    table = conflicts(p, c)
    index = key.material.encrypt_op.index
    assert (table[np.arange(48), index] == 0).all()
    table[np.arange(48), index] = 10**9
    assert (table.min(1) > 0).all()  # a photo's positions are all told apart


def test_grey_images_hide_the_channels_but_the_solved_key_still_encrypts_them(photo, rng):
    """With R = G = B the channels cannot be told apart, nor do they need to be: the solved
    key encrypts grey images as the true key does (on every value the pairs showed)."""
    key = Key(rng.bytes(32), 4)
    grey = np.repeat(photo[None, :96, :96].mean(3, keepdims=True).astype(np.uint8), 3, axis=3)
    solved = solve_key(grey, encrypt(grey, key), 4, key.transforms)
    assert np.array_equal(apply_op(grey, solved.op), encrypt(grey, key))
    recovered = key_recovery(solved.op, key.material.encrypt_op, key.transforms)
    assert recovered.parts["permutation"] < 1


def test_pairs_must_match():
    with pytest.raises(ValueError, match="differ in shape"):
        solve_key(np.zeros((1, 8, 8, 3), np.uint8), np.zeros((2, 8, 8, 3), np.uint8), 4, ("np",))
