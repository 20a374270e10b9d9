"""Who reads what: every rank, then every DataLoader worker, gets one equal contiguous range.

Each epoch the shard order is shuffled by (seed, epoch); the samples, numbered in that order,
are cut into ``ranks`` equal ranges, and each of those into ``workers`` ranges. Sizes differ by
one at most, so every stream is padded to the same length (see ``ShardDataset``).
"""

from __future__ import annotations

import random

from pipeline.shards.manifest import Manifest

Piece = tuple[str, int, int]  # (shard name, first sample, end sample)


def cut(pieces: list[Piece], parts: int, part: int) -> list[Piece]:
    """Part ``part`` of ``parts`` equal contiguous ranges over the samples of ``pieces``
    (sizes differ by one at most; ``ceil(total / parts)`` is the padded length)."""
    total = sum(stop - start for _, start, stop in pieces)
    lo, hi = part * total // parts, (part + 1) * total // parts
    out, offset = [], 0
    for name, start, stop in pieces:
        a, b = max(lo, offset), min(hi, offset + stop - start)
        if a < b:
            out.append((name, start + a - offset, start + b - offset))
        offset += stop - start
    return out


def epoch_pieces(manifest: Manifest, *, epoch: int, seed: int, shuffle: bool) -> list[Piece]:
    """Every shard, whole, in this epoch's order (shuffled by (seed, epoch))."""
    pieces = [(s.name, 0, s.samples) for s in manifest.shards]
    if shuffle:
        random.Random(f"{seed}/{epoch}/shards").shuffle(pieces)
    return pieces
