"""Ciphertext-only key estimation: the key, from leaked encrypted shards and image statistics.

The attacker knows the algorithm and the scheme (block size, transforms, their order: all in
the manifest), holds encrypted images, and knows what natural images look like (here: the
statistics of a small set of plain images of the same kind). Every block of every image is
encrypted with the same per-position maps, so the leaked blocks are many samples of one
function of a natural block. The estimate proceeds in three steps:

1. **Permutation.** Mutual information between two byte positions does not change under any
   per-position bijection (NP or FFX), so the (L, L) mutual-information matrix of the
   ciphertext is the plain one with rows and columns permuted. The permutation is found by
   matching the two matrices (a quadratic assignment, solved by best-swap local search from
   random starts).
2. **Byte maps.** Each position's inverse map is estimated by regression on its neighbours:
   output values are ranked by the mean plain-value estimate of the positions that are most
   correlated with it in natural images, and the ranks are matched to the plain value
   distribution of that position (histogram specification). A few rounds refine all positions
   together. NP bits show up as decreasing maps; FFX positions as scrambled ones.
3. **Structure.** The maps are projected onto the scheme: each position is the identity or a
   negation, or the FFX table with its NP bit; one shared table is fitted to all table
   positions (a 256 x 256 assignment).

Correlations cannot tell the colour channels apart; once the maps have settled, the channels
are named by the value distributions of the linear positions (red, green and blue differ in
photos). Natural-image statistics cannot tell a block from its mirror images or rotations, nor
the channels apart when images are grey, and only the value distribution tells an image from
its negative (every NP bit flipped); when a scorer is given (the protected model's mean
confidence on unlabelled plain images) it chooses among those candidates: the 48 block
symmetries, each also negated.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from attacks.keyspace import byte_maps
from pipeline import BlockOp
from pipeline.cipher.blockwise import block_length

logger = logging.getLogger(__name__)

_VALUES = np.arange(256)
LINEAR_TOLERANCE = 16.0  # mean |map - identity| (grey levels) under which a map is always linear


class EstimateTimeout(TimeoutError):
    """The estimate ran out of its time budget: the point says nothing about the key."""


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise EstimateTimeout("the ciphertext-only estimate ran out of its time budget")


@dataclass(frozen=True)
class Estimate:
    op: BlockOp  # the estimated encryption
    candidates: int  # symmetric candidates the scorer chose among (1: no scorer)


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def mutual_information(blocks: np.ndarray, *, deadline: float | None = None) -> np.ndarray:
    """(L, L) plug-in mutual information (nats) between the byte positions of (n, L) blocks."""
    codes = blocks.astype(np.int32)
    n_pos = codes.shape[1]
    single = [_entropy(np.bincount(codes[:, i], minlength=256)) for i in range(n_pos)]
    mi = np.zeros((n_pos, n_pos))
    for i in range(n_pos):
        _check_deadline(deadline)
        high = codes[:, i] * 256
        for j in range(i + 1, n_pos):
            joint = _entropy(np.bincount(high + codes[:, j], minlength=65536))
            mi[i, j] = mi[j, i] = single[i] + single[j] - joint
    return mi


def _descend(a: np.ndarray, b: np.ndarray, p: np.ndarray, tol: float) -> np.ndarray:
    """Best-improvement pair swaps until none helps; the gain of every swap at once comes
    from one matrix product (a, b symmetric with zero diagonals)."""
    while True:
        bp = b[np.ix_(p, p)]
        c = a @ bp
        d = np.diag(c)
        gain = 2 * (c + c.T - d[:, None] - d[None, :] + 2 * a * bp)
        np.fill_diagonal(gain, 0)
        r, s = np.unravel_index(int(np.argmax(gain)), gain.shape)
        if gain[r, s] <= tol:
            return p
        p[[r, s]] = p[[s, r]]


def match_structure(
    cipher: np.ndarray,
    plain: np.ndarray,
    rng: np.random.Generator,
    *,
    restarts: int = 4,
    kicks: int = 500,
    deadline: float | None = None,
) -> np.ndarray:
    """The permutation p maximising sum_ij cipher[i, j] * plain[p[i], p[j]].

    Iterated local search: descend by pair swaps, then repeatedly perturb the best solution
    with a few random swaps and descend again; a few independent starts.
    """
    a, b = cipher.copy(), plain.copy()
    np.fill_diagonal(a, 0)
    np.fill_diagonal(b, 0)
    n = len(a)
    tol = 1e-9 * max(1.0, float(np.abs(a).sum() * np.abs(b).max()))

    def score(p: np.ndarray) -> float:
        return float((a * b[np.ix_(p, p)]).sum())

    best, best_score = np.arange(n), -np.inf
    for _ in range(restarts):
        current = _descend(a, b, rng.permutation(n), tol)
        current_score = score(current)
        for _ in range(kicks):
            _check_deadline(deadline)
            trial = current.copy()
            for _ in range(3):
                i, j = rng.choice(n, size=2, replace=False)
                trial[[i, j]] = trial[[j, i]]
            trial = _descend(a, b, trial, tol)
            trial_score = score(trial)
            if trial_score > current_score + tol:
                current, current_score = trial, trial_score
        if current_score > best_score:
            best, best_score = current, current_score
    return best


def block_symmetries(block_size: int) -> list[np.ndarray]:
    """Position maps of the 8 rotations/reflections of a block times the 6 channel orders."""
    m = block_size
    r, c = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
    spatial = []
    for k in range(4):
        for flip in (False, True):
            rr, cc = (r, c) if not flip else (r, m - 1 - c)
            for _ in range(k):
                rr, cc = cc, m - 1 - rr
            spatial.append((rr.reshape(-1), cc.reshape(-1)))
    out, seen = [], set()
    for rr, cc in spatial:
        for order in itertools.permutations(range(3)):
            pixel = (rr * m + cc)[:, None] * 3 + np.array(order)[None, :]
            sigma = pixel.reshape(-1)  # plain position q -> its image under the symmetry
            if sigma.tobytes() not in seen:
                seen.add(sigma.tobytes())
                out.append(sigma)
    return out


def _cdf(hist: np.ndarray) -> np.ndarray:
    return np.cumsum(hist) / max(1, hist.sum())


def _specify(order_key: np.ndarray, counts: np.ndarray, target_cdf: np.ndarray) -> np.ndarray:
    """Inverse-map estimate: observed values ranked by ``order_key``, matched to a target
    distribution (histogram specification). Unobserved values map to themselves."""
    inv = _VALUES.astype(np.float64).copy()
    seen = np.flatnonzero(counts)
    ranked = seen[np.argsort(order_key[seen], kind="stable")]
    mass = counts[ranked].astype(np.float64)
    middle = (np.cumsum(mass) - mass / 2) / mass.sum()
    inv[ranked] = np.minimum(np.searchsorted(target_cdf, middle), 255)
    return inv


def _w1(hist_a: np.ndarray, hist_b: np.ndarray) -> float:
    return float(np.abs(_cdf(hist_a) - _cdf(hist_b)).sum())


def _split_point(values: np.ndarray) -> float:
    """Threshold between the linear positions (maps near the identity or a negation) and the
    table positions: the split of the sorted values with the largest between-class variance
    (Otsu). Where all values are small, everything is linear."""
    ordered = np.sort(values)
    if ordered[-1] <= LINEAR_TOLERANCE:
        return LINEAR_TOLERANCE
    best, threshold = -1.0, LINEAR_TOLERANCE
    for k in range(1, len(ordered)):
        low, high = ordered[:k], ordered[k:]
        between = k * (len(ordered) - k) * (high.mean() - low.mean()) ** 2
        if between > best:
            best, threshold = between, (ordered[k - 1] + ordered[k]) / 2
    return max(threshold, LINEAR_TOLERANCE)


def _np_first(transforms: tuple[str, ...]) -> bool:
    """Whether the NP bits act before the FFX table (inside it) or after it."""
    return transforms.index("np") < transforms.index("ffx")


class _ByteMapFit:
    """Estimates of every position's inverse byte map, given the source positions."""

    def __init__(
        self,
        cipher: np.ndarray,
        plain: np.ndarray,
        index: np.ndarray,
        block_size: int,
        transforms: tuple[str, ...],
        neighbours: int = 6,
    ) -> None:
        self.cipher, self.transforms, self.block_size = cipher, transforms, block_size
        self.n_neighbours = neighbours
        n_pos = cipher.shape[1]
        self.counts = np.stack([np.bincount(cipher[:, i], minlength=256) for i in range(n_pos)])
        self.plain_hist = np.stack([np.bincount(plain[:, q], minlength=256) for q in range(n_pos)])
        self.corr = np.nan_to_num(np.corrcoef(plain.T.astype(np.float64)))
        np.fill_diagonal(self.corr, -np.inf)
        self.set_index(index)

    def set_index(self, index: np.ndarray) -> None:
        """Take ``index`` as the source positions: each position's target distribution, and
        its neighbours (the positions reading the plain positions most correlated with its own
        source position in natural images)."""
        self.index = index
        self.target_hist = self.plain_hist[index]
        self.target_cdf = np.stack([_cdf(h) for h in self.target_hist])
        source_of = np.argsort(index)  # cipher position reading each plain position
        near = np.argsort(-self.corr, axis=1)[:, : self.n_neighbours]
        self.neighbours = source_of[near[index]]
        self.weights = np.clip(self.corr[index[:, None], near[index]], 0.05, None)

    def channel_order(self, op: BlockOp) -> np.ndarray:
        """The source positions with the colour channels renamed as the linear positions'
        value distributions say. Correlations cannot tell the channels apart; their value
        distributions can (in photos red, green and blue differ)."""
        maps = byte_maps(op)
        linear = ~op.table_mask
        flipped = maps[:, 0] == 255  # a linear map sending 0 to 255 is a negation
        hists = np.where(flipped[:, None], self.counts[:, ::-1], self.counts)
        pixel = self.index // 3 * 3
        best, best_cost = self.index, np.inf
        for order in itertools.permutations(range(3)):
            candidate = pixel + np.array(order)[self.index % 3]
            cost = sum(_w1(hists[i], self.plain_hist[candidate[i]]) for i in np.flatnonzero(linear))
            if cost < best_cost:
                best, best_cost = candidate, cost
        return best

    def initial(self) -> np.ndarray:
        """Identity or negation per position, whichever fits the plain histogram better."""
        inv = np.tile(_VALUES.astype(np.float64), (len(self.counts), 1))
        if "np" not in self.transforms:
            return inv
        for i, hist in enumerate(self.counts):
            if _w1(hist[::-1], self.target_hist[i]) < _w1(hist, self.target_hist[i]):
                inv[i] = 255 - _VALUES
        return inv

    def refine(self, inv: np.ndarray) -> np.ndarray:
        """One round: rank each position's values by its neighbours' current estimates."""
        n_pos = len(inv)
        estimates = np.empty(self.cipher.shape, np.float32)
        for j in range(n_pos):
            estimates[:, j] = inv[j][self.cipher[:, j]]
        new = np.empty_like(inv)
        for i in range(n_pos):
            w = self.weights[i]
            reference = estimates[:, self.neighbours[i]] @ (w / w.sum()).astype(np.float32)
            sums = np.bincount(self.cipher[:, i], weights=reference, minlength=256)
            key = sums / np.maximum(self.counts[i], 1)
            new[i] = _specify(key, self.counts[i], self.target_cdf[i])
        return new

    def project(self, inv: np.ndarray) -> BlockOp:
        """The maps as an op of the scheme: linear positions, and one shared FFX table."""
        n_pos, counts = len(inv), self.counts
        mass = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        off_id = (mass * np.abs(inv - _VALUES)).sum(1)
        off_neg = (mass * np.abs(inv - (255 - _VALUES))).sum(1)
        flip = (off_neg < off_id) if "np" in self.transforms else np.zeros(n_pos, bool)
        table_pos = np.zeros(n_pos, bool)
        if "ffx" in self.transforms:
            off = np.minimum(off_id, off_neg) if "np" in self.transforms else off_id
            table_pos = off > _split_point(off)
        xor_in = np.zeros(n_pos, np.uint8)
        xor_out = np.where(flip & ~table_pos, 0xFF, 0).astype(np.uint8)
        table = np.arange(256, dtype=np.uint8)
        if table_pos.any():
            table, rel = self._fit_table(inv[table_pos], counts[table_pos])
            positions = np.flatnonzero(table_pos)
            if "np" in self.transforms and _np_first(self.transforms):
                xor_in[positions] = np.where(rel, 0xFF, 0)
            elif "np" in self.transforms:
                xor_out[positions] = np.where(rel, 0xFF, 0)
        return BlockOp(self.block_size, self.index.copy(), xor_in, table_pos, table, xor_out)

    def _fit_table(self, inv: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One table for all table positions, and each position's NP bit relative to the
        first. NP before FFX negates the table's output (inverse side); after FFX, its input."""
        has_np = "np" in self.transforms
        inside = has_np and _np_first(self.transforms)
        ref = int(np.argmax((counts > 0).sum(1)))  # the position with the most values seen

        def flipped(k: int) -> np.ndarray:
            return 255 - inv[k] if inside else inv[k][255 - _VALUES]

        rel = np.zeros(len(inv), bool)
        if has_np:
            for k in range(len(inv)):
                w = np.minimum(counts[k], counts[ref])
                if w.sum():
                    straight = (w * np.abs(inv[k] - inv[ref])).sum()
                    rel[k] = (w * np.abs(flipped(k) - inv[ref])).sum() < straight
        total, weight = np.zeros(256), np.zeros(256)
        for k in range(len(inv)):
            value = flipped(k) if rel[k] else inv[k]
            w = counts[k] if not (rel[k] and not inside) else counts[k][255 - _VALUES]
            total += w * value
            weight += w
        inverse_guess = total / np.maximum(weight, 1)
        # the bijection closest to the guess, where each output value counts by its frequency
        cost = (weight[:, None] + 1e-6) * (inverse_guess[:, None] - _VALUES[None, :]) ** 2
        _, inverse = linear_sum_assignment(cost)
        return np.argsort(inverse).astype(np.uint8), rel


def estimate_key(
    cipher_blocks: np.ndarray,
    plain_blocks: np.ndarray,
    block_size: int,
    transforms: tuple[str, ...],
    *,
    rng: np.random.Generator,
    scorer: Callable[[BlockOp], float] | None = None,
    rounds: int = 8,
    restarts: int = 4,
    max_values: int = 50_000_000,
    time_budget_s: float | None = None,
) -> Estimate:
    """Estimate the encryption from (n, L) cipher blocks and (m, L) natural plain blocks.

    At most ``max_values`` cipher bytes are used (a random subset of the blocks), which bounds
    the memory of the regression and the time of the mutual information at large block sizes.
    Past ``time_budget_s`` seconds it raises ``EstimateTimeout``.
    """
    deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
    n_pos = block_length(block_size)
    if cipher_blocks.shape[1] != n_pos or plain_blocks.shape[1] != n_pos:
        raise ValueError(f"blocks must have {n_pos} bytes for block size {block_size}")
    if len(cipher_blocks) * n_pos > max_values:
        keep = rng.choice(len(cipher_blocks), size=max_values // n_pos, replace=False)
        cipher_blocks = cipher_blocks[np.sort(keep)]
    if "shuffle" in transforms:
        index = match_structure(
            mutual_information(cipher_blocks, deadline=deadline),
            mutual_information(plain_blocks, deadline=deadline),
            rng,
            restarts=restarts,
            deadline=deadline,
        )
    else:
        index = np.arange(n_pos)
    fit = _ByteMapFit(cipher_blocks, plain_blocks, index, block_size, transforms)
    inv = fit.initial()
    op = None
    for step in range(rounds):
        _check_deadline(deadline)
        inv = fit.refine(inv)
        op = fit.project(inv)
        if "shuffle" in transforms and step == rounds // 2:  # once the maps have settled
            fit.set_index(fit.channel_order(op))
            op = _with_index(op, fit.index)
        inv = _inverse_maps(op)  # refine from the structured estimate
    assert op is not None
    candidates = 1
    if scorer is not None and ("shuffle" in transforms or "np" in transforms):
        indices = [op.index]
        if "shuffle" in transforms:
            indices = [sigma[op.index] for sigma in block_symmetries(block_size)]
        negatives = (0, 0xFF) if "np" in transforms else (0,)
        options = [
            BlockOp(block_size, index, op.xor_in ^ np.uint8(neg), op.table_mask, op.table,
                    op.xor_out)
            for index in indices
            for neg in negatives
        ]  # fmt: skip
        scores = [scorer(o) for o in options]
        op, candidates = options[int(np.argmax(scores))], len(options)
    return Estimate(op, candidates)


def _inverse_maps(op: BlockOp) -> np.ndarray:
    forward = byte_maps(op)
    return np.argsort(forward, axis=1).astype(np.float64)


def _with_index(op: BlockOp, index: np.ndarray) -> BlockOp:
    return BlockOp(op.block_size, index, op.xor_in, op.table_mask, op.table, op.xor_out)
