"""Known-plaintext key recovery: the key, solved from k (plain image, encrypted image) pairs.

The attacker holds a few plain images and their encryptions: for example the public files that
version 1 shards named in every sample. Every block of every image is encrypted with the same
per-position maps (``BlockOp``: ciphertext position ``i`` takes plain position ``index[i]``
through a byte bijection ``G_i``), so the blocks of k images give many (plain, cipher) value
pairs per position, and the key is solved rather than estimated:

1. **Permutation.** For the true source ``j`` of cipher position ``i`` the cipher byte is a
   function of the plain byte, one to one: the pairs ``(P[:, j], C[:, i])`` contain no
   conflict (a plain value seen with two cipher values, or the reverse), and the two positions
   have the same value counts up to renaming. For every (i, j) whose counts match, the number
   of conflicts is counted; an assignment (Hungarian) of least conflicts gives the
   permutation. Positions whose plain bytes are equal in every known block (grey images: the
   three channels) cannot be told apart, and need not be: they encrypt those images alike.
2. **Byte maps.** Each position's observed pairs fix its map on the values seen. A position
   whose pairs all read ``c == p`` or ``c == 255 - p`` is the identity or a negation (one value
   fixes it everywhere); the others apply the one shared FFX table, with a negation before
   and/or after it. Their partial maps are merged into one table, choosing for each position
   the negations that agree with the entries already known.
3. **Completion.** Table entries no known pair shows are filled with the unused outputs, in
   order: a guess, counted as wrong by ``key_recovery`` when it is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from attacks.keyspace import to_blocks
from pipeline import BlockOp
from pipeline.cipher.blockwise import block_length

logger = logging.getLogger(__name__)

_XORS = ((0, 0), (0xFF, 0), (0, 0xFF), (0xFF, 0xFF))  # (xor_in, xor_out) around the table


@dataclass(frozen=True)
class Solution:
    op: BlockOp  # the solved encryption
    pairs: int  # known (plain, cipher) images used
    blocks: int  # distinct known block pairs
    table_observed: float  # share of the FFX table's 256 entries the pairs showed (1 if no FFX)


def _histograms(blocks: np.ndarray) -> np.ndarray:
    """(L, 256): each position's value counts, sorted (a bijection of bytes keeps them)."""
    return np.sort([np.bincount(col, minlength=256) for col in blocks.T], axis=1)


def _pair_conflicts(p: np.ndarray, c: np.ndarray) -> int:
    pairs = np.unique(p.astype(np.int64) * 256 + c).size
    return pairs - max(np.unique(p).size, np.unique(c).size)


def conflicts(plain: np.ndarray, cipher: np.ndarray) -> np.ndarray:
    """(L, L): ``out[i, j]`` counts the value pairs of (plain position j, cipher position i)
    beyond a one-to-one map: 0 for the true source of i. Only sources with the same sorted
    value counts as ``i`` can be it (a byte bijection keeps them), so only those are counted
    (all, where none matches: pairs with errors); the rest get more than any count."""
    width = plain.shape[1]
    hist_p, hist_c = _histograms(plain), _histograms(cipher)
    out = np.full((width, width), len(plain) + 1, np.int64)
    for i in range(width):
        candidates = np.flatnonzero((hist_p == hist_c[i]).all(1))
        for j in candidates if candidates.size else range(width):
            out[i, j] = _pair_conflicts(plain[:, j], cipher[:, i])
    return out


def _observed_maps(plain: np.ndarray, cipher: np.ndarray, index: np.ndarray) -> np.ndarray:
    """(L, 256) int: the cipher byte most often seen with each plain byte, -1 where unseen."""
    width = cipher.shape[1]
    maps = np.full((width, 256), -1, np.int64)
    for i in range(width):
        codes = plain[:, index[i]].astype(np.int64) * 256 + cipher[:, i]
        counts = np.bincount(codes, minlength=65536).reshape(256, 256)
        seen = counts.sum(1) > 0
        maps[i, seen] = counts[seen].argmax(1)
    return maps


def _linear(observed: np.ndarray) -> int | None:
    """0x00 or 0xFF if the observed map is the identity or the negation, else None."""
    values = np.flatnonzero(observed >= 0)
    for xor in (0, 0xFF):
        if values.size and np.array_equal(observed[values], values ^ xor):
            return xor
    return None


def _merge_tables(
    maps: np.ndarray, positions: list[int]
) -> tuple[np.ndarray, dict[int, tuple[int, int]]]:
    """One table from the partial maps of the table positions: ``table[v]`` (-1 unknown) and
    each position's (xor_in, xor_out), chosen to agree with the entries already known."""
    table = np.full(256, -1, np.int64)
    xors: dict[int, tuple[int, int]] = {}
    todo = sorted(positions, key=lambda i: -(maps[i] >= 0).sum())
    while todo:
        best: tuple[tuple[int, int], int, int, int] | None = None
        for i in todo:
            values = np.flatnonzero(maps[i] >= 0)
            for xi, xo in _XORS:
                known = table[values ^ xi]
                shown = known >= 0
                agree = int((known[shown] == (maps[i, values[shown]] ^ xo)).sum())
                clash = int(shown.sum()) - agree
                score = (agree - 4 * clash, values.size)
                if best is None or score > best[0]:
                    best = (score, i, xi, xo)
        assert best is not None  # todo is not empty
        _, i, xi, xo = best
        if not xors:  # the first position fixes the representation: table = its map
            xi = xo = 0
        xors[i] = (xi, xo)
        todo.remove(i)
        used = set(table[table >= 0].tolist())
        for v in np.flatnonzero(maps[i] >= 0):
            out = int(maps[i, v]) ^ xo
            if table[v ^ xi] < 0 and out not in used:
                table[v ^ xi] = out
                used.add(out)
    return table, xors


def _complete(table: np.ndarray) -> np.ndarray:
    """A bijection of 0..255 that keeps the known entries (unknown ones take unused outputs)."""
    free = iter(sorted(set(range(256)) - set(table[table >= 0].tolist())))
    return np.array([v if v >= 0 else next(free) for v in table], np.uint8)


def solve_key(
    plain: np.ndarray, cipher: np.ndarray, block_size: int, transforms: tuple[str, ...]
) -> Solution:
    """The encryption of (N, H, W, 3) uint8 ``cipher = E(plain)`` for a key of the scheme."""
    if plain.shape != cipher.shape:
        raise ValueError(f"plain {plain.shape} and cipher {cipher.shape} images differ in shape")
    width = block_length(block_size)
    pairs = np.unique(
        np.concatenate([to_blocks(plain, block_size), to_blocks(cipher, block_size)], 1), axis=0
    )
    p, c = pairs[:, :width], pairs[:, width:]
    if "shuffle" in transforms:
        _, index = linear_sum_assignment(conflicts(p, c))
    else:
        index = np.arange(width)
    maps = _observed_maps(p, c, index)
    xor_in = np.zeros(width, np.uint8)
    xor_out = np.zeros(width, np.uint8)
    table_mask = np.zeros(width, bool)
    table = np.arange(256, dtype=np.int64)
    for i in range(width):
        linear = _linear(maps[i])
        if linear is not None or "ffx" not in transforms:
            xor_out[i] = linear if linear is not None else 0
        else:
            table_mask[i] = True
    observed = 1.0
    if table_mask.any():
        table, xors = _merge_tables(maps, np.flatnonzero(table_mask).tolist())
        observed = float((table >= 0).mean())
        for i, (xi, xo) in xors.items():
            xor_in[i], xor_out[i] = xi, xo
    op = BlockOp(block_size, index.astype(np.int64), xor_in, table_mask, _complete(table), xor_out)
    logger.debug("known plaintext: %d block pairs, table %.0f%% observed", len(p), 100 * observed)
    return Solution(op=op, pairs=len(plain), blocks=len(p), table_observed=observed)
