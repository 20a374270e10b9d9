"""Source matching: public images are known plaintext even when the shards name no source.

Entry point::

    result = source_matching_attack(encrypted, public, block_size=4)
    result.pairs            # ((encrypted index, public index), ...) matched uniquely
    result.solution.op      # the solved encryption (a BlockOp), None when nothing matched
    result.recovery         # KeyRecovery against ``truth`` when the caller knows the key

Inputs: ``encrypted`` (N, H, W, 3) uint8, images encrypted with one unknown key of the
scheme (leaked shards, in any order); ``public`` (P, H', W', 3) uint8, candidate plain images
(a public dataset, already resized and cropped as the offline stage does); the block size and
transforms (manifests state them). Output: a ``SourceMatch`` record (pairs, ambiguity counts,
the known-plaintext solution, seconds; pairs correct and key recovery when ``truth`` is given).

Why it works. Every block is encrypted with the same per-position maps: cipher position ``i``
takes plain position ``index[i]`` (a permutation of the L = 3*M*M positions of the block,
channels included: the shuffle mixes them) through a byte bijection ``G_i`` (identity,
negation, or the shared FFX table with negations around it, chosen per position). Block ``b``
of the plain image becomes block ``b`` of the encrypted one. So for each position, the
partition of the image's blocks by equal value at that position is kept (a bijection renames
the values, it never merges or splits them), and the shuffle only reorders the positions.
``signature`` is that invariant made canonical: each position's column of values relabelled
by order of first appearance over the blocks, the L columns sorted. It is the complete
invariant for any permutation of positions and any per-position byte bijections, so it is
strictly finer than the sorted value-count profiles (which forget which blocks are equal).
Images that differ only by per-position bijections (an image and its negative; a constant
image of another colour) share a signature: such public images are ambiguous and never
matched.

Matching: equal signatures (same image shape). A match counts only when every public image
with that signature has the same pixels (so the plaintext is determined); otherwise the
encrypted image is counted ambiguous. The pairs then go to the known-plaintext solver
(``attacks.known_plaintext.solve_key``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from attacks.keyspace import KeyRecovery, key_recovery, to_blocks
from attacks.known_plaintext import Solution, solve_key
from pipeline import TRANSFORMS, BlockOp, apply_op
from pipeline.cipher.blockwise import check_block_size, check_transforms

logger = logging.getLogger(__name__)


def canonical_form(image: np.ndarray, block_size: int) -> np.ndarray:
    """(L, blocks) uint8: each block position's values over the blocks, relabelled 0, 1, ...
    by order of first appearance, rows sorted lexicographically. Unchanged by any key."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"image must be uint8 HWC with 3 channels, got {image.dtype} {image.shape}"
        )
    m = check_block_size(block_size)
    if image.shape[0] % m or image.shape[1] % m:
        raise ValueError(f"image size {image.shape[:2]} is not divisible by block size {m}")
    cols = np.ascontiguousarray(to_blocks(image[None], m).T)  # (L, blocks)
    width, count = cols.shape
    codes = (np.arange(width, dtype=np.int64)[:, None] * 256 + cols).reshape(-1)
    uniq, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
    position = uniq // 256  # the row each distinct (position, value) belongs to
    order = np.lexsort((first, position))  # by row, then by first appearance in the row
    rank = np.empty(order.size, np.int64)
    rank[order] = np.arange(order.size)
    starts = np.searchsorted(position[order], position[order], side="left")
    label = rank - starts[rank]  # 0, 1, ... within each row
    labels = label[inverse].reshape(width, count).astype(np.uint8)  # <= 256 values per row
    return labels[np.lexsort(labels.T[::-1])]


def signature(image: np.ndarray, block_size: int) -> bytes:
    """A key-invariant digest of a uint8 HWC image: SHA-256 of its shape and canonical form.

    Equal for an image and its encryption under any key of block size ``block_size``."""
    form = canonical_form(image, block_size)
    head = np.array([*image.shape, block_size], np.int64).tobytes()
    return hashlib.sha256(head + form.tobytes()).digest()


@dataclass(frozen=True)
class Matches:
    pairs: tuple[tuple[int, int], ...]  # (encrypted index, public index), unique matches only
    ambiguous: int  # encrypted images whose signature several distinct public images share
    unmatched: int  # encrypted images no public image matches


def match_sources(
    encrypted: np.ndarray, public: np.ndarray, block_size: int
) -> list[tuple[int, int]]:
    """(encrypted index, public index) for every encrypted image with one plaintext among the
    public images (equal signatures; public images sharing one must be pixel-identical)."""
    return list(find_matches(encrypted, public, block_size).pairs)


def find_matches(encrypted: np.ndarray, public: np.ndarray, block_size: int) -> Matches:
    """``match_sources`` with the counts of ambiguous and unmatched encrypted images."""
    by_signature: dict[bytes, list[int]] = {}
    for j, image in enumerate(public):
        by_signature.setdefault(signature(image, block_size), []).append(j)
    pairs, ambiguous, unmatched = [], 0, 0
    for i, image in enumerate(encrypted):
        found = by_signature.get(signature(image, block_size))
        if not found:
            unmatched += 1
        elif all(np.array_equal(public[found[0]], public[j]) for j in found[1:]):
            pairs.append((i, found[0]))
        else:
            ambiguous += 1
    return Matches(tuple(pairs), ambiguous, unmatched)


def _most_informative(
    pairs: tuple[tuple[int, int], ...], public: np.ndarray, count: int
) -> tuple[tuple[int, int], ...]:
    """The ``count`` pairs whose plain images show the most distinct byte values (each value
    seen is an FFX table entry solved rather than guessed)."""
    spread = [np.unique(public[j]).size for _, j in pairs]
    best = sorted(range(len(pairs)), key=lambda k: -spread[k])[:count]
    return tuple(pairs[k] for k in sorted(best))


@dataclass(frozen=True)
class SourceMatch:
    """What source matching found and what the known-plaintext solver made of it."""

    encrypted: int  # encrypted images searched
    public: int  # public images searched
    pairs: tuple[tuple[int, int], ...]  # every unique match
    ambiguous: int
    pairs_used: int  # pairs given to the solver (at most ``max_pairs``)
    solution: Solution | None  # None when nothing matched
    seconds_matching: float
    seconds_solving: float
    pairs_correct: int | None = None  # pairs whose public image encrypts to the encrypted one
    recovery: KeyRecovery | None = None  # against ``truth``; None without it or without pairs

    @property
    def seconds(self) -> float:
        return self.seconds_matching + self.seconds_solving

    @property
    def matched(self) -> float:
        """Share of the encrypted images matched to a source."""
        return len(self.pairs) / self.encrypted if self.encrypted else 0.0


def source_matching_attack(
    encrypted: np.ndarray,
    public: np.ndarray,
    block_size: int,
    *,
    transforms: Sequence[str] = TRANSFORMS,
    max_pairs: int = 4,
    truth: BlockOp | None = None,
) -> SourceMatch:
    """Pair leaked encrypted images with public sources, then solve the key from the pairs.

    ``max_pairs`` bounds the pairs the solver gets (a few give the whole key; more only cost
    time); those whose plain images show the most distinct byte values are chosen. ``truth``
    (the true encryption, known in an audit) adds ``pairs_correct`` and ``recovery``; the
    attack itself never uses it.
    """
    names = check_transforms(transforms)
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be at least 1, got {max_pairs}")
    start = time.perf_counter()
    found = find_matches(encrypted, public, block_size)
    matching = time.perf_counter() - start
    used = _most_informative(found.pairs, public, max_pairs)
    solution = None
    if used:
        enc_idx, pub_idx = (list(x) for x in zip(*used, strict=True))
        solution = solve_key(public[pub_idx], encrypted[enc_idx], block_size, names)
    solving = time.perf_counter() - start - matching
    correct = recovery = None
    if truth is not None:
        correct = sum(
            np.array_equal(apply_op(public[j], truth), encrypted[i]) for i, j in found.pairs
        )
        if solution is not None:
            recovery = key_recovery(solution.op, truth, names)
    logger.info(
        "source matching: %d/%d encrypted images matched (%d ambiguous) against %d public "
        "images in %.2f s; solved from %d pairs in %.2f s",
        len(found.pairs),
        len(encrypted),
        found.ambiguous,
        len(public),
        matching,
        len(used),
        solving,
    )
    return SourceMatch(
        encrypted=len(encrypted),
        public=len(public),
        pairs=found.pairs,
        ambiguous=found.ambiguous,
        pairs_used=len(used),
        solution=solution,
        seconds_matching=matching,
        seconds_solving=solving,
        pairs_correct=correct,
        recovery=recovery,
    )
