"""Key search against a model trained in the test: the oracle finds the key when it can."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks.key_search import _neighbour, fitness, heuristic_key_search, random_key_search
from attacks.keyspace import random_material
from pipeline import Key, decrypt
from pipeline.model.evaluation import load_model, load_split
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


class _LinearOracle(torch.nn.Module):
    """A fixed linear classifier over the 48 inputs of one 4 x 4 block: a planted model whose
    labels are its own outputs on images encrypted with the true key."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(
            torch.randn(classes, 48, generator=torch.Generator().manual_seed(0))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 4 * x.permute(0, 2, 3, 1).reshape(len(x), -1) @ self.weight.T


def test_heuristic_search_repairs_a_planted_key():
    from pipeline.cipher.blockwise import KeyMaterial

    rng = np.random.default_rng(4)
    true = random_material(4, ("np",), rng)
    images = rng.integers(0, 256, (256, 4, 4, 3), dtype=np.uint8)
    model = _LinearOracle().eval()
    labels = predict_labels(model, images, true)
    wrong = rng.choice(48, size=6, replace=False)
    mask = true.np_mask.copy()
    mask[wrong] ^= 1
    start = KeyMaterial(4, ("np",), true.permutation, mask, true.ffx_mask, true.ffx_table)
    start_accuracy = fitness(model, images, labels, start)[0]
    found = heuristic_key_search(model, images, labels, (4, ("np",)), steps=300,
                                 rng=np.random.default_rng(5), start=start)  # fmt: skip
    assert start_accuracy < 0.9 < found.accuracy
    wrong_after = int((found.material.np_mask != true.np_mask).sum())
    assert wrong_after < 3 and found.accepted > 0


def predict_labels(model, images, material) -> np.ndarray:
    from pipeline import encrypt
    from pipeline.model.evaluation import predict

    return predict(model, encrypt(images, material)).argmax(1)
