"""What a frontier run is given (``FrontierConfig``), the error a user can cause, and the
seeded random streams every draw comes from."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from pipeline.cipher.blockwise import TRANSFORMS
from pipeline.errors import KeyprotectError


class FrontierError(KeyprotectError, ValueError):
    """A frontier that cannot run: no images, encrypted shards, a README without the block..."""


@dataclass(frozen=True)
class FrontierConfig:
    block_sizes: tuple[int, ...] = (4, 8, 16)
    transforms: tuple[str, ...] = TRANSFORMS
    keys: int = 3
    budgets: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    time_budget_s: float = 600.0
    data: str | None = None  # None: the embedded photos
    image_size: int = 224  # --data image folders: shorter side resized, centre crop
    statistics_images: int = 200  # --data: images whose plain statistics the attacker holds
    statistics_blocks: int = 200_000  # at most this many statistics blocks (a random subset)
    checkpoints: tuple[str, ...] = ()
    model_keys: tuple[str, ...] = ()
    model_data: tuple[str, ...] = ()
    data_key: str | None = None  # sealed --data / --model-data (else $KEYPROTECT_DATA_KEY)
    out: str = "report/frontier"
    page: str | None = None  # a results page whose frontier-report block is replaced
    seed: int = 0
    device: str = "auto"


def _rng(config: FrontierConfig, *names: object) -> np.random.Generator:
    """An independent, reproducible stream per purpose (``names``), from ``--seed``."""
    tag = hashlib.sha256(repr(names).encode()).digest()
    return np.random.default_rng([config.seed, int.from_bytes(tag[:8], "little")])
