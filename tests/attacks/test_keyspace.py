"""Keys as byte maps: the model every attack relies on, checked against real encryption."""

from __future__ import annotations

import numpy as np
import pytest

from attacks.keyspace import byte_maps, key_recovery, random_material, to_blocks
from pipeline import BlockOp, Key, encrypt
from tests.conftest import ALL_ORDERS, FIXED_SECRET


@pytest.mark.parametrize("transforms", ALL_ORDERS)
def test_blocks_of_the_ciphertext_are_byte_maps_of_the_source_positions(transforms, rng):
    key = Key(FIXED_SECRET, 2, transforms)
    op = key.material.encrypt_op
    images = rng.integers(0, 256, (3, 8, 6, 3), dtype=np.uint8)
    plain, cipher = to_blocks(images, 2), to_blocks(encrypt(images, key), 2)
    expected = byte_maps(op)[np.arange(12), plain[:, op.index]]
    assert np.array_equal(cipher, expected)


def test_the_true_key_is_fully_recovered_and_a_random_one_is_not(rng):
    key = Key(FIXED_SECRET, 4)
    truth = key.material.encrypt_op
    full = key_recovery(truth, truth, key.transforms)
    assert full.key_recovered == 1.0 and set(full.parts.values()) == {1.0}
    guess = random_material(4, key.transforms, rng).encrypt_op
    chance = key_recovery(guess, truth, key.transforms)
    assert chance.key_recovered < 0.1
    assert 0.2 < chance.parts["np_mask"] < 0.8  # about half the bits agree by chance


def test_an_equivalent_representation_counts_as_the_same_key():
    # the table composed with a negation, with every NP bit under the table flipped, encrypts
    # identically: the measure compares functions, not representations
    truth = Key(FIXED_SECRET, 4, ("shuffle", "np", "ffx")).material.encrypt_op
    neg = np.arange(256, dtype=np.uint8) ^ 0xFF
    flipped_in = np.where(truth.table_mask, truth.xor_in ^ 0xFF, truth.xor_in).astype(np.uint8)
    twin = BlockOp(truth.block_size, truth.index, flipped_in, truth.table_mask,
                   truth.table[neg], truth.xor_out)  # fmt: skip
    assert np.array_equal(byte_maps(twin), byte_maps(truth))
    result = key_recovery(twin, truth, ("shuffle", "np", "ffx"))
    assert result.key_recovered == 1.0 and result.parts["ffx_table"] == 1.0
