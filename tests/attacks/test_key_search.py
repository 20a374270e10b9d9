"""Key search against a model trained in the test: the oracle finds the key when it can."""

from __future__ import annotations

import numpy as np
import pytest

from attacks.key_search import _neighbour, fitness, heuristic_key_search, random_key_search
from attacks.keyspace import random_material
from pipeline import Key, decrypt
from pipeline.evaluation import load_model, load_split
from tests.conftest import FIXED_SECRET


@pytest.fixture(scope="module")
def attacker(protected_run, digit_shards):
    model, _ = load_model(str(protected_run / "checkpoint.pt"))
    key = Key(FIXED_SECRET)
    train = load_split(str(digit_shards), "train", limit=64)
    return model, decrypt(train.images, key), train.labels, key


def test_random_search_with_the_true_key_among_its_candidates_finds_it(attacker):
    model, images, labels, key = attacker
    found = random_key_search(model, images, labels, (4, key.transforms), keys=5,
                              rng=np.random.default_rng(0), extra=[key.material])  # fmt: skip
    assert found.material is key.material and found.tried == 6
    assert found.accuracy == fitness(model, images, labels, key.material)[0]


def test_heuristic_search_never_loses_accuracy(attacker):
    model, images, labels, key = attacker
    start = random_material(4, key.transforms, np.random.default_rng(1))
    found = heuristic_key_search(model, images, labels, (4, key.transforms), steps=15,
                                 rng=np.random.default_rng(2), start=start)  # fmt: skip
    assert found.tried == 16 and 0 <= found.accepted <= 15
    assert found.accuracy >= fitness(model, images, labels, start)[0]


def test_a_move_changes_one_part_of_the_key():
    rng = np.random.default_rng(3)
    key = random_material(4, ("shuffle", "np", "ffx"), rng)
    for _ in range(30):
        moved = _neighbour(key, rng)
        changed = [
            not np.array_equal(getattr(moved, part), getattr(key, part))
            for part in ("permutation", "np_mask", "ffx_mask", "ffx_table")
        ]
        assert sum(changed) == 1
