"""Shared fixtures: fixed keys, real images, and a CPU-friendly hypothesis profile."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from hypothesis import settings

from pipeline import TRANSFORMS, Key

settings.register_profile("ci", max_examples=60, deadline=None)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# Every ordered, non-empty combination of the three transforms (15 of them).
ALL_ORDERS = [
    order for r in range(1, len(TRANSFORMS) + 1) for order in itertools.permutations(TRANSFORMS, r)
]

FIXED_SECRET = bytes(range(32))


@pytest.fixture
def fixed_key() -> Key:
    return Key(FIXED_SECRET, block_size=4, transforms=TRANSFORMS)


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A real photo: scikit-learn's china.jpg, cropped to 424 x 640 (divisible by 4 and 8)."""
    from sklearn.datasets import load_sample_images

    return np.ascontiguousarray(load_sample_images().images[0][:424, :640])


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def random_images(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, size=shape, dtype=np.uint8)
