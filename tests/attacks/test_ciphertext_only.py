"""Ciphertext-only estimation: the structure matcher, and real leaked shards of the digits."""

from __future__ import annotations

import numpy as np
import pytest

from attacks.ciphertext_only import _descend, block_symmetries, estimate_key, match_structure
from attacks.keyspace import key_recovery, to_blocks
from pipeline import Key, decrypt, encrypt
from pipeline.model.evaluation import load_split
from tests.train.conftest import make_digit_shards


def _score(a, b, p):
    return float((a * b[np.ix_(p, p)]).sum())


def test_swap_gains_match_a_full_rescore(rng):
    # the descent trusts a closed form for every swap's gain: a local optimum must be one
    a = rng.random((12, 12))
    b = rng.random((12, 12))
    a, b = a + a.T, b + b.T
    np.fill_diagonal(a, 0)
    np.fill_diagonal(b, 0)
    p = _descend(a, b, rng.permutation(12), 1e-12)
    base = _score(a, b, p)
    for i in range(12):
        for j in range(i + 1, 12):
            q = p.copy()
            q[[i, j]] = q[[j, i]]
            assert _score(a, b, q) <= base + 1e-9


def test_a_planted_permutation_is_found(rng):
    b = rng.random((20, 20))
    b = b + b.T
    truth = rng.permutation(20)
    a = b[np.ix_(truth, truth)]
    found = match_structure(a, b, rng)
    assert _score(a, b, found) == pytest.approx(_score(a, b, truth))


def test_block_symmetries_are_48_distinct_position_maps():
    maps = block_symmetries(4)
    assert len(maps) == 48 and len({m.tobytes() for m in maps}) == 48
    assert all(np.array_equal(np.sort(m), np.arange(48)) for m in maps)


@pytest.fixture(scope="module")
def np_only_shards(tmp_path_factory):
    key = Key(bytes(range(1, 33)), 4, ("np",))
    return key, make_digit_shards(tmp_path_factory.mktemp("np") / "shards", key,
                                  shard_size="500")  # fmt: skip


def test_np_only_shards_give_up_their_mask(np_only_shards):
    key, shards = np_only_shards
    leaked = load_split(str(shards), "train").images  # the attacker's leaked ciphertext
    natural = decrypt(load_split(str(shards), "val", limit=40).images, key)  # plain statistics
    estimate = estimate_key(to_blocks(leaked, 4), to_blocks(natural, 4), 4, ("np",),
                            rng=np.random.default_rng(0))  # fmt: skip
    result = key_recovery(estimate.op, key.material.encrypt_op, ("np",))
    assert result["parts"]["np_mask"] >= 0.9  # chance: 0.5
    assert result["key_recovered"] >= 0.9


def test_full_scheme_estimate_beats_random_keys_on_byte_maps(digit_shards, rng):
    from attacks.keyspace import random_material
    from tests.conftest import FIXED_SECRET

    key = Key(FIXED_SECRET)
    leaked = load_split(str(digit_shards), "train").images
    natural = decrypt(load_split(str(digit_shards), "val", limit=40).images, key)
    estimate = estimate_key(to_blocks(leaked, 4), to_blocks(natural, 4), 4, key.transforms,
                            rng=np.random.default_rng(0))  # fmt: skip
    truth = key.material.encrypt_op
    found = key_recovery(estimate.op, truth, key.transforms)["parts"]
    chance = [
        key_recovery(random_material(4, key.transforms, rng).encrypt_op, truth, key.transforms)
        for _ in range(20)
    ]
    assert found["ffx_mask"] > max(c["parts"]["ffx_mask"] for c in chance)
    assert found["byte_maps"] > max(c["parts"]["byte_maps"] for c in chance)


def test_natural_photos_give_up_the_whole_scheme_without_the_model():
    """scikit-learn's two sample photos: left halves leaked encrypted, right halves as the
    natural statistics. No model is used, so every symmetry must be settled by statistics."""
    from sklearn.datasets import load_sample_images

    key = Key(bytes(range(32)), 4, ("shuffle", "np", "ffx"))
    halves = []
    for image in load_sample_images().images:
        image = image[: image.shape[0] // 4 * 4, : image.shape[1] // 4 * 4]
        middle = image.shape[1] // 8 * 4
        halves.append((image[None, :, :middle], image[None, :, middle:]))
    leaked = np.concatenate([to_blocks(encrypt(left, key), 4) for left, _ in halves])
    natural = np.concatenate([to_blocks(right, 4) for _, right in halves])
    estimate = estimate_key(leaked, natural, 4, key.transforms, rng=np.random.default_rng(0))
    parts = key_recovery(estimate.op, key.material.encrypt_op, key.transforms)["parts"]
    assert parts["permutation"] >= 0.9  # chance: 1/48
    assert parts["np_mask"] >= 0.9 and parts["ffx_mask"] >= 0.9  # chance: 0.5
    assert parts["ffx_table"] >= 0.1  # exact table entries; chance: 1/256
    assert parts["byte_maps"] >= 0.5  # the README's "64% of the byte maps exactly"
