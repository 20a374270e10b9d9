"""Keys as an attacker handles them: random keys of a scheme, the encryption as per-position
byte maps, and how much of the true key an estimate recovers.

Every attack ends with an estimated encryption, a ``BlockOp``: for each block position ``i``,
the source position ``index[i]`` and a byte map ``G_i`` (identity, negation, the FFX table, or
the table with a negation before or after it). Two ops are compared through these maps, so
equivalent representations of one encryption count as equal (for example the FFX table ``T``
with negated NP bits is the same function as ``T`` composed with a negation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline import BlockOp, KeyMaterial
from pipeline.cipher.keys import derive_material

_VALUES = np.arange(256, dtype=np.uint8)


def random_material(
    block_size: int, transforms: tuple[str, ...], rng: np.random.Generator
) -> KeyMaterial:
    """A random key of the scheme: a random secret through the real derivation, so that the
    FFX table comes from the same Feistel family as the owner's."""
    return derive_material(rng.bytes(32), block_size, transforms)


def byte_maps(op: BlockOp) -> np.ndarray:
    """(L, 256) uint8: ``maps[i, v]`` is the output byte at position i for source byte v."""
    inner = op.xor_in[:, None] ^ _VALUES[None, :]
    mapped = np.where(op.table_mask[:, None], op.table[inner], inner)
    return mapped ^ op.xor_out[:, None]


def to_blocks(images: np.ndarray, block_size: int) -> np.ndarray:
    """(N, H, W, 3) uint8 images -> (N * H/M * W/M, L) blocks, each flattened (row, col, ch)."""
    n, h, w, c = images.shape
    m = block_size
    blocks = images.reshape(n, h // m, m, w // m, m, c).transpose(0, 1, 3, 2, 4, 5)
    return blocks.reshape(-1, m * m * c)


@dataclass(frozen=True)
class KeyRecovery:
    """How much of a true key an estimate recovered: overall (``key_recovered``) and per part
    of the scheme (``parts``: permutation, np_mask, ffx_mask, ffx_table, byte_maps)."""

    key_recovered: float
    parts: dict[str, float]

    def to_json(self) -> dict[str, float]:
        """The parts and the whole, flat (the frontier's point records)."""
        return {**self.parts, "key_recovered": self.key_recovered}


def key_recovery(estimate: BlockOp, truth: BlockOp, transforms: tuple[str, ...]) -> KeyRecovery:
    """How much of ``truth`` the estimate recovered, overall and per part of the scheme.

    ``key_recovered`` is the fraction of (block position, byte value) pairs that the estimate
    encrypts exactly as the true key does: right source position and right output byte. A random
    key of a scheme with shuffling scores about 1/L; the true key scores 1.
    """
    est_maps, true_maps = byte_maps(estimate), byte_maps(truth)
    same_source = estimate.index == truth.index
    same_byte = est_maps == true_maps
    parts: dict[str, float] = {}
    if "shuffle" in transforms:
        parts["permutation"] = float(same_source.mean())
    if "np" in transforms:  # NP bits are only separable from the table where no table applies
        plain = ~estimate.table_mask & ~truth.table_mask
        if plain.any():
            parts["np_mask"] = float((est_maps[plain, 0] == true_maps[plain, 0]).mean())
    if "ffx" in transforms:
        parts["ffx_mask"] = float((estimate.table_mask == truth.table_mask).mean())
        neg = _VALUES ^ 0xFF
        t = estimate.table
        variants = (t, t[neg], t ^ 0xFF, t[neg] ^ 0xFF)  # equivalent up to NP bits
        parts["ffx_table"] = max(float((v == truth.table).mean()) for v in variants)
    parts["byte_maps"] = float(same_byte.mean())
    return KeyRecovery(float((same_byte & same_source[:, None]).mean()), parts)
