"""Ciphertext-only key estimation: the key, from leaked encrypted shards and image statistics.

The attacker knows the algorithm and the scheme (block size, transforms, their order: all in
the manifest), holds encrypted images, and knows what natural images look like (here: the
statistics of plain images of the same kind, never the leaked ones). Every block of every
image is encrypted with the same per-position maps, so the leaked blocks are many samples of
one function of a natural block. The estimate:

1. **Table positions.** A natural histogram is smooth, and stays so under a negation; the FFX
   table scrambles it. Positions split by the roughness of their histograms.
2. **The table, roughly.** At a table position, the mean of its most dependent other
   positions given each cipher byte is a monotone function of the plain byte; such profiles,
   pooled over table positions (NP bits flip them), rank the cipher bytes, and matched to the
   plain value distribution give the inverse table up to a negation. A few rounds, each also
   reading the table positions decoded by the last.
3. **Permutation.** Every position decoded to a monotone function of its plain byte, the
   partial correlations between positions draw the block's grid: in natural images they are
   large between neighbouring pixels and between the channels of a pixel, near zero beyond
   (a Markov field), whatever the image. The cipher graph is laid onto the plain one (a
   quadratic assignment): a spectral first placement (the slowest modes of a grid-like graph
   are the cosines along y and x), refined by graduated assignment (softassign) and a pair-swap
   descent whose every step costs O(L^2), with a few random restarts where L is small.
4. **Byte maps.** Each position's inverse map is estimated by regression on its neighbours:
   output values are ranked by the mean plain-value estimate of the positions that are most
   correlated with it in natural images, and the ranks are matched to the plain value
   distribution of that position (histogram specification). A few rounds refine all positions
   together; then the maps are projected onto the scheme: each position is the identity or a
   negation, or the FFX table with its NP bit, and one shared table is fitted to all table
   positions (a 256 x 256 assignment).
5. A second pass repeats 3 and 4 with the positions decoded through the fitted maps, which are
   closer than the rough table of step 2, its placement search also starting from the first
   pass's. It can still land in a worse placement (at M=4 on 10^5 photo blocks it did for half
   the keys), so the pass kept is the one whose decryption of the leaked blocks has
   correlations closest to natural ones (no key needed).

Cost: histograms are linear in the leaked blocks; steps 2 and 3 read at most
``dependence_blocks`` of them (a random sample) and cost O(n L^2) for the correlations plus
O(L^3) per placement iteration; step 4 reads at most ``max_values`` bytes. So the time grows
with L^3 (about 64x from M=4 to M=16 for the placement) and stops growing with the leaked data
past those caps. ``time_budget_s`` bounds it: past it, ``EstimateTimeout`` (a point not
measured says nothing about the key).

Limits, measured on photos with statistics from other photos: second-order statistics cannot
tell a block from its mirror images or rotations (a stationary image looks the same turned by
180 degrees), so the permutation comes out up to one of 48 symmetries (with the channel
orders), and only the value distribution tells an image from its negative. ``Estimate.options``
lists all 96 candidates: an attacker who can tell an upright photo from a turned one picks the
right one; when a scorer is given (the protected model's mean confidence on unlabelled plain
images) it chooses among them. Correlations cannot name the colour channels; once the maps
have settled, the value distributions of the linear positions do (red, green and blue differ
in photos).
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
MAX_VALUES = 50_000_000  # cipher bytes the estimate reads at most (a random sample of blocks)


@dataclass(frozen=True)
class Estimate:
    op: BlockOp  # the estimated encryption
    candidates: int  # symmetric candidates the scorer chose among (1: no scorer)
    # the estimate under every block symmetry and global negation, which natural-image
    # statistics barely tell apart: an attacker who can tell an upright photo from a turned
    # one (by eye, or with a model) picks the right one
    options: tuple[BlockOp, ...] = ()


class EstimateTimeout(RuntimeError):
    """The estimate ran past its time budget: the point is not measured (it says nothing about
    what the key resists)."""


class _Clock:
    def __init__(self, budget_s: float | None) -> None:
        self.budget_s = budget_s
        self.start = time.monotonic()
        self.deadline = None if budget_s is None else time.monotonic() + budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def check(self, step: str) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise EstimateTimeout(f"the ciphertext-only estimate ran past its time budget of "
                                  f"{self.budget_s:g} s during {step}")  # fmt: skip


def _roughness(counts: np.ndarray) -> np.ndarray:
    """Total variation of each value histogram: natural histograms are smooth, and stay so
    under a negation; the FFX table scrambles them."""
    h = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    return np.abs(np.diff(h, axis=1)).sum(1)


def _otsu(values: np.ndarray) -> float:
    """The split of the sorted values with the largest between-class variance."""
    ordered = np.sort(values)
    k = np.arange(1, len(ordered))
    csum = np.cumsum(ordered)
    low = csum[:-1] / k
    high = (csum[-1] - csum[:-1]) / (len(ordered) - k)
    best = int(np.argmax(k * (len(ordered) - k) * (high - low) ** 2))
    return float((ordered[best] + ordered[best + 1]) / 2)


def table_positions(counts: np.ndarray) -> np.ndarray:
    """Which positions go through the FFX table, from the roughness of their histograms."""
    rough = _roughness(counts)
    if len(rough) < 2:
        return np.zeros(len(rough), bool)
    return rough > _otsu(rough)


def _conditional_means(key: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(256, k) mean of the columns of x for each value of ``key``, and the value counts."""
    order = np.argsort(key, kind="stable")
    counts = np.bincount(key, minlength=256)
    seen = counts > 0
    sums = np.zeros((256, x.shape[1]))
    starts = np.searchsorted(key[order], _VALUES[seen])
    sums[seen] = np.add.reduceat(x[order], starts, axis=0)
    return sums / np.maximum(counts, 1)[:, None], counts


def estimate_table_inverse(
    cipher: np.ndarray,
    table: np.ndarray,
    plain_hist: np.ndarray,
    inside: bool,
    rng: np.random.Generator,
    *,
    references: int = 48,
    partners: int = 4,
    iterations: int = 3,
    clock: _Clock | None = None,
) -> np.ndarray:
    """The shared FFX table's inverse (cipher byte -> plain byte), up to a negation.

    For some table positions, the mean of the most dependent other positions given each
    cipher byte is a monotone function of the plain byte where those positions are linear
    (the identity or a negation); these profiles, aligned to one another (NP bits flip them),
    are pooled, ranked and matched to the plain value distribution. The first round reads
    only the linear positions; later ones also the table positions, decoded by the last
    round's estimate (a table position's best partners are often table positions too).
    """
    chosen = rng.choice(np.flatnonzero(table), size=min(references, int(table.sum())),
                        replace=False)  # fmt: skip
    inverse = None
    for _ in range(iterations):
        if inverse is None:
            x = cipher[:, ~table].astype(np.float32)
        else:
            x = decode_linear(cipher, table, inverse, inside)
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        profiles = []
        for i in chosen:
            if clock is not None:
                clock.check("the table estimate")
            means, counts = _conditional_means(cipher[:, i], x)
            w = counts / counts.sum()
            strength = (w[:, None] * means**2).sum(0)  # variance explained, per position
            if inverse is not None:
                strength[i] = -np.inf  # not itself
            best = np.argsort(-strength)[:partners]
            first = means[:, best[0]]
            profile = sum(np.sign((w * means[:, j] * first).sum()) * strength[j] * means[:, j]
                          for j in best) / strength[best].sum()  # fmt: skip
            profiles.append((profile, counts))
        ref, ref_counts = profiles[0]
        total, weight = ref * ref_counts, ref_counts.astype(np.float64)
        for profile, counts in profiles[1:]:
            options = [(profile, counts)]
            if not inside:  # NP after FFX flips the cipher byte: align on the flipped one too
                options.append((profile[::-1], counts[::-1]))
            scores = [(np.minimum(c, ref_counts) * p * ref).sum() for p, c in options]
            k = int(np.argmax(np.abs(scores)))
            sign = 1.0 if scores[k] >= 0 else -1.0
            total += sign * options[k][0] * options[k][1]
            weight += options[k][1]
        inverse = _specify(total / np.maximum(weight, 1), weight, _cdf(plain_hist))
    assert inverse is not None
    return inverse


def decode_linear(cipher: np.ndarray, table: np.ndarray, table_inverse: np.ndarray,
                  inside: bool) -> np.ndarray:  # fmt: skip
    """(n, L) float32: every position made a monotone function of its plain byte (up to a
    negation): the table positions through the estimated inverse table."""
    out = cipher.astype(np.float32)
    inv = table_inverse.astype(np.float32)
    for i in np.flatnonzero(table):
        values = cipher[:, i]
        if not inside:  # NP after FFX: undo it first where that makes the histogram smoother
            counts = np.bincount(values, minlength=256)
            straight, flipped = np.bincount(inv.astype(np.int64), weights=counts, minlength=256), \
                np.bincount(inv[::-1].astype(np.int64), weights=counts, minlength=256)  # fmt: skip
            if _roughness(flipped[None])[0] < _roughness(straight[None])[0]:
                values = 255 - values
        out[:, i] = inv[values]
    return out


def correlation(blocks: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    """(L, L) Pearson correlation of the columns of (n, L) blocks, in float32 chunks (one
    BLAS product per chunk); constant columns correlate 0 with everything."""
    mean = blocks.mean(0, dtype=np.float64).astype(np.float32)
    gram = np.zeros((blocks.shape[1],) * 2)
    for start in range(0, len(blocks), chunk):
        x = blocks[start : start + chunk].astype(np.float32) - mean
        gram += x.T @ x
    scale = np.sqrt(np.diag(gram))
    scale[scale == 0] = np.inf
    return (gram / scale[:, None] / scale[None, :]).astype(np.float32)


def dependence(blocks: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    """(L, L) absolute partial correlations between the positions of (n, L) blocks.

    Partial correlations of natural images are local (a Markov field): large between
    neighbouring pixels and between the channels of one pixel, near zero beyond, so they
    draw the block's grid; the plain correlations themselves stay large across a block.
    """
    return partial_correlation(correlation(blocks), ridge)


def partial_correlation(corr: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    """``dependence`` from an (L, L) correlation matrix already computed."""
    r = corr.astype(np.float64)
    precision = np.linalg.inv(r + ridge * np.eye(len(r)))
    d = np.sqrt(np.abs(np.diag(precision)))
    out = np.abs(precision / d[:, None] / d[None, :])
    np.fill_diagonal(out, 0)
    return out


def spectral_placement(
    a: np.ndarray, b: np.ndarray, block_size: int, *, modes: int = 5, angles: int = 45
) -> np.ndarray:
    """A first placement of the positions of dependence graph ``a`` on the block's grid.

    The slow modes of a grid-like graph include cos(pi (y + 1/2) / M) and the same in x,
    mixed by an unknown rotation (anisotropy and the channels can put other modes between
    them). For each pair of the slowest ``modes`` modes, the rotation whose coordinates best
    take M levels places the positions on pixels (three each) by a linear assignment; the
    pair whose placement scores best against the plain graph ``b`` wins. Channels within a
    pixel are left to the local search.
    """
    m, n_pos = block_size, len(a)
    if m < 2:
        return np.arange(n_pos)
    degree = np.maximum(a.sum(1), 1e-12)
    _, vectors = np.linalg.eigh(a / np.sqrt(degree[:, None] * degree[None, :]))
    slow = vectors[:, ::-1][:, 1 : modes + 1] / np.sqrt(degree)[:, None]  # no constant mode
    levels = np.cos(np.pi * (np.arange(m) + 0.5) / m)
    target = np.repeat(levels, 3 * m)
    levels = (levels - target.mean()) / target.std()
    target = np.sort((target - target.mean()) / target.std())
    py, px = np.divmod(np.arange(m * m), m)
    # the plain graph between pixels, channels pooled: the channels are not placed yet
    pixel_graph = b.reshape(m * m, 3, m * m, 3).sum((1, 3))
    best, best_score = np.arange(n_pos), -np.inf
    for j, k in itertools.combinations(range(slow.shape[1]), 2):
        v = slow[:, [j, k]]
        fit, fit_residual = v, np.inf
        for theta in np.linspace(0, np.pi / 2, angles, endpoint=False):
            rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
            uv = v @ rotation
            uv = (uv - uv.mean(0)) / np.maximum(uv.std(0), 1e-12)
            residual = float(((np.sort(uv, axis=0) - target[:, None]) ** 2).sum())
            if residual < fit_residual:
                fit, fit_residual = uv, residual
        cost = (fit[:, :1] - levels[py][None, :]) ** 2 + (fit[:, 1:] - levels[px][None, :]) ** 2
        rows, cols = linear_sum_assignment(np.repeat(cost, 3, axis=1))  # pixel * 3 + slot
        index = np.empty(n_pos, np.int64)
        index[rows] = cols
        score = float((a * pixel_graph[np.ix_(index // 3, index // 3)]).sum())
        if score > best_score:
            best, best_score = index, score
    return best


def descend(
    a: np.ndarray, b: np.ndarray, p: np.ndarray, *, clock: _Clock | None = None,
    tol: float = 1e-9, max_steps: int | None = None,
) -> np.ndarray:  # fmt: skip
    """Best-improvement pair swaps for max sum_ij a[i, j] b[p[i], p[j]] (a, b symmetric, zero
    diagonals) until none gains more than ``tol`` (at most ``max_steps``, default 50 L). The
    gain of every swap comes from C = A B_p, which each swap changes by a rank-one update and
    a column swap: O(L^2) per step. C is kept in float64 and recomputed every L steps: with
    rounding drift, two near-tied swaps can each look like a gain and undo each other for ever
    (flat grey images, whose three channels are equal, did that)."""
    p = p.copy()
    a = a.astype(np.float64)
    n_pos = len(p)
    max_steps = 50 * n_pos if max_steps is None else max_steps
    bp = b[np.ix_(p, p)].astype(np.float64)
    c = a @ bp
    for step in range(max_steps):
        if clock is not None and step % 64 == 0:
            clock.check("the placement search")
        if step % n_pos == n_pos - 1:
            c = a @ bp
        d = np.diag(c)
        gain = c + c.T
        gain -= d[:, None]
        gain -= d[None, :]
        gain += 2 * a * bp
        np.fill_diagonal(gain, 0)
        u, v = divmod(int(np.argmax(gain)), n_pos)
        if gain[u, v] <= tol:
            break
        c += np.outer(a[:, u] - a[:, v], bp[v] - bp[u])
        c[:, [u, v]] = c[:, [v, u]]
        bp[[u, v]] = bp[[v, u]]
        bp[:, [u, v]] = bp[:, [v, u]]
        p[[u, v]] = p[[v, u]]
    return p


def graduated_assignment(
    a: np.ndarray,
    b: np.ndarray,
    start: np.ndarray,
    *,
    steps: int = 30,
    inner: int = 2,
    clock: _Clock | None = None,
) -> np.ndarray:
    """Softassign (Gold and Rangarajan's graduated assignment) for max sum a[i, j] b[p_i, p_j]:
    a doubly stochastic match, half ``start`` and half uniform at first, is moved along the
    objective's gradient and re-normalised (Sinkhorn) at a rising inverse temperature, then
    rounded by a linear assignment. Moving every position at once, it gets out of the local
    optima where pair swaps stop (a row of pixels one step off, say)."""
    n_pos = len(a)
    match = np.full((n_pos, n_pos), 0.5 / n_pos, np.float32)
    match[np.arange(n_pos), start] += 0.5
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    for beta in np.geomspace(0.5, 50.0, steps):
        if clock is not None:
            clock.check("the placement search")
        for _ in range(inner):
            gradient = a32 @ match @ b32
            gradient = (gradient - gradient.mean()) / (gradient.std() + 1e-12)
            match = np.exp(beta * (gradient - gradient.max(1, keepdims=True))) + 1e-30
            for _ in range(10):  # Sinkhorn
                match /= match.sum(1, keepdims=True)
                match /= match.sum(0, keepdims=True)
    _, cols = linear_sum_assignment(-match)
    return cols


def place_positions(
    a: np.ndarray,
    b: np.ndarray,
    block_size: int,
    rng: np.random.Generator,
    *,
    restarts: int | None = None,
    previous: np.ndarray | None = None,
    clock: _Clock | None = None,
) -> np.ndarray:
    """The permutation p (cipher position -> plain position) that lays the cipher dependence
    graph ``a`` onto the plain one ``b``, the best of: a spectral first placement refined by
    a swap descent; the same refined by graduated assignment, then the descent; and
    ``restarts`` graduated assignments from random placements, each then descended (by
    default ceil(768 / L): many where they are cheap, one at M=16). Of the 48 block
    symmetries, the one ``b`` prefers (natural images are not quite isotropic)."""
    a, b = a.copy(), b.copy()
    np.fill_diagonal(a, 0)
    np.fill_diagonal(b, 0)
    n_pos = len(a)
    tol = 1e-6 * max(1.0, float(np.abs(a).sum() * np.abs(b).max()))
    if restarts is None:
        restarts = -(-768 // n_pos)

    def score(p: np.ndarray) -> float:
        return float((a * b[np.ix_(p, p)]).sum())

    start = spectral_placement(a, b, block_size)
    best, best_score = start, -np.inf
    firsts = [lambda: start, lambda: graduated_assignment(a, b, start, clock=clock)]
    firsts += [lambda: graduated_assignment(a, b, rng.permutation(n_pos), clock=clock)] * restarts
    if previous is not None:  # a later pass also starts from the last pass's placement
        firsts.append(lambda: previous)
    for first in firsts:
        found = descend(a, b, first(), clock=clock, tol=tol)
        if score(found) > best_score:
            best, best_score = found, score(found)
    candidates = [sigma[best] for sigma in block_symmetries(block_size)]
    return candidates[int(np.argmax([score(p) for p in candidates]))]


def block_symmetries(block_size: int) -> list[np.ndarray]:
    """Position maps of the 8 rotations/reflections of a block times the 6 channel orders."""
    m = block_size
    r, c = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
    spatial = []
    for k in range(4):
        for flip in (False, True):
            rows, cols = (r, c) if not flip else (r, m - 1 - c)
            for _ in range(k):
                rows, cols = cols, m - 1 - rows
            spatial.append((rows.reshape(-1), cols.reshape(-1)))
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
        table: np.ndarray,
        neighbours: int = 6,
    ) -> None:
        self.cipher, self.transforms, self.block_size = cipher, transforms, block_size
        self.table = table  # the table positions, from the histograms' roughness
        self.n_neighbours = neighbours
        n_pos = cipher.shape[1]
        self.counts = np.stack([np.bincount(cipher[:, i], minlength=256) for i in range(n_pos)])
        self.plain_hist = np.stack([np.bincount(plain[:, q], minlength=256) for q in range(n_pos)])
        self.corr = correlation(plain).astype(np.float64)
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

    def initial(self, table_inverse: np.ndarray) -> np.ndarray:
        """Identity or negation per position, whichever fits the plain histogram better; at
        the table positions, the estimated inverse table or its negation."""
        inv = np.tile(_VALUES.astype(np.float64), (len(self.counts), 1))
        for i, hist in enumerate(self.counts):
            options = [_VALUES.astype(np.float64)]
            if self.table[i]:
                options = [table_inverse, table_inverse[::-1]]
            if "np" in self.transforms:
                options += [255 - o for o in options]
            costs = [_w1(np.bincount(o.astype(np.int64), weights=hist, minlength=256),
                         self.target_hist[i]) for o in options]  # fmt: skip
            inv[i] = options[int(np.argmin(costs))]
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
        table_pos = self.table
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
    restarts: int | None = None,
    passes: int = 2,
    max_values: int = MAX_VALUES,
    dependence_blocks: int = 100_000,
    time_budget_s: float | None = None,
) -> Estimate:
    """Estimate the encryption from (n, L) cipher blocks and (m, L) natural plain blocks.

    At most ``max_values`` cipher bytes are used (a random subset of the blocks), which bounds
    the memory of the byte-map regression; the dependence graphs use at most
    ``dependence_blocks`` blocks of each side. Past ``time_budget_s`` seconds (checked between
    steps and inside the long loops) it raises ``EstimateTimeout``: a point it cannot reach
    is not measured, which says nothing about the key.
    """
    clock = _Clock(time_budget_s)
    n_pos = block_length(block_size)
    if cipher_blocks.shape[1] != n_pos or plain_blocks.shape[1] != n_pos:
        raise ValueError(f"blocks must have {n_pos} bytes for block size {block_size}")
    if len(cipher_blocks) == 0 or len(plain_blocks) < 2:
        raise ValueError("need leaked cipher blocks and at least two natural plain blocks")
    if len(cipher_blocks) * n_pos > max_values:
        keep = rng.choice(len(cipher_blocks), size=max(1, max_values // n_pos), replace=False)
        cipher_blocks = cipher_blocks[np.sort(keep)]
    tables = _table_stage(cipher_blocks, plain_blocks, transforms, dependence_blocks, rng, clock)
    op = _fit_passes(cipher_blocks, plain_blocks, block_size, transforms, tables,
                     dependence_blocks=dependence_blocks, rounds=rounds, restarts=restarts,
                     passes=passes, rng=rng, clock=clock)  # fmt: skip
    options = symmetric_candidates(op, block_size, transforms)
    if scorer is None or len(options) == 1:
        return Estimate(op, 1, options)
    scores = []
    for option in options:
        clock.check("the scorer's choice among symmetric candidates")
        scores.append(scorer(option))
    return Estimate(options[int(np.argmax(scores))], len(options), options)


@dataclass(frozen=True)
class _Tables:
    """The first stage's result: which positions go through the FFX table, the table's
    estimated inverse, whether NP acts inside it, and the sample for the dependence graphs."""

    table: np.ndarray  # (L,) bool
    inverse: np.ndarray  # (256,) float64
    inside: bool
    sample: np.ndarray  # cipher blocks for the dependence graphs


def _table_stage(
    cipher_blocks: np.ndarray,
    plain_blocks: np.ndarray,
    transforms: tuple[str, ...],
    dependence_blocks: int,
    rng: np.random.Generator,
    clock: _Clock,
) -> _Tables:
    """FFX positions from rough value histograms, and the shared table's inverse (up to a
    negation) from how the other positions vary with each cipher byte."""
    n_pos = cipher_blocks.shape[1]
    counts = np.stack([np.bincount(cipher_blocks[:, i], minlength=256) for i in range(n_pos)])
    table = table_positions(counts) if "ffx" in transforms else np.zeros(n_pos, bool)
    if table.all() or not table.any():
        table = np.zeros(n_pos, bool)  # nothing to anchor a table estimate: treat all as linear
    inside = "np" not in transforms or "ffx" not in transforms or _np_first(transforms)
    plain_hist = np.stack([np.bincount(plain_blocks[:, q], minlength=256) for q in range(n_pos)])
    sample = _subsample(cipher_blocks, dependence_blocks, rng)
    table_inverse = _VALUES.astype(np.float64)
    if table.any():
        table_inverse = estimate_table_inverse(sample, table, plain_hist.sum(0), inside, rng,
                                               clock=clock)  # fmt: skip
    clock.check("the table estimate")
    return _Tables(table, table_inverse, inside, sample)


def _fit_passes(
    cipher_blocks: np.ndarray,
    plain_blocks: np.ndarray,
    block_size: int,
    transforms: tuple[str, ...],
    tables: _Tables,
    *,
    dependence_blocks: int,
    rounds: int,
    restarts: int | None,
    passes: int,
    rng: np.random.Generator,
    clock: _Clock,
) -> BlockOp:
    """Placement (when shuffled) and the byte-map regression, ``passes`` times; the pass whose
    decryption has the most natural correlations is kept."""
    n_pos = cipher_blocks.shape[1]
    table, table_inverse, sample = tables.table, tables.inverse, tables.sample
    shuffled = "shuffle" in transforms
    if shuffled:
        decoded_corr = correlation(decode_linear(sample, table, table_inverse, tables.inside))
        natural_corr = correlation(_subsample(plain_blocks, dependence_blocks, rng))
        b = partial_correlation(natural_corr)
    op: BlockOp | None = None
    passes_done: list[tuple[float, int, BlockOp]] = []
    for _ in range(passes if shuffled else 1):
        index = np.arange(n_pos)
        if shuffled:
            a = partial_correlation(decoded_corr)
            clock.check("the dependence graphs")
            previous: np.ndarray | None = None if op is None else op.index
            index = place_positions(a, b, block_size, rng, restarts=restarts,
                                    previous=previous, clock=clock)  # fmt: skip
            logger.debug("placement done after %.1f s", clock.elapsed())
        op = _fit_byte_maps(cipher_blocks, plain_blocks, index, block_size, transforms,
                            table, table_inverse, rounds=rounds, shuffled=shuffled,
                            clock=clock)  # fmt: skip
        logger.debug("byte maps done after %.1f s", clock.elapsed())
        if shuffled:  # the next pass reads positions through the fitted maps
            fitted = np.argsort(byte_maps(op), axis=1).astype(np.float32)
            decoded_corr = correlation(fitted[np.arange(n_pos), sample])
            table_inverse = np.argsort(op.table).astype(np.float64)
            passes_done.append((_misfit(op, decoded_corr, natural_corr), len(passes_done), op))
    if passes_done:  # a later pass can also land in a worse placement: keep the best fit
        op = min(passes_done)[2]
    assert op is not None
    return op


def _fit_byte_maps(
    cipher_blocks: np.ndarray,
    plain_blocks: np.ndarray,
    index: np.ndarray,
    block_size: int,
    transforms: tuple[str, ...],
    table: np.ndarray,
    table_inverse: np.ndarray,
    *,
    rounds: int,
    shuffled: bool,
    clock: _Clock,
) -> BlockOp:
    """Each position's byte map for a placement: regression on the neighbours, projected on
    the scheme; the channel order is settled half-way."""
    fit = _ByteMapFit(cipher_blocks, plain_blocks, index, block_size, transforms, table)
    inv = fit.initial(table_inverse)
    op: BlockOp | None = None
    for step in range(rounds):
        clock.check("the byte-map regression")
        inv = fit.refine(inv)
        op = fit.project(inv)
        if shuffled and step == rounds // 2:  # once the maps have settled
            fit.set_index(fit.channel_order(op))
            op = _with_index(op, fit.index)
        inv = _inverse_maps(op)  # refine from the structured estimate
    assert op is not None
    return op


def symmetric_candidates(
    op: BlockOp, block_size: int, transforms: tuple[str, ...]
) -> tuple[BlockOp, ...]:
    """The keys that image statistics cannot tell from ``op``: the block's symmetries (with
    shuffling), each also negated (with NP); ``op`` itself first."""
    if "shuffle" not in transforms and "np" not in transforms:
        return (op,)
    indices = [op.index]
    if "shuffle" in transforms:
        indices = [sigma[op.index] for sigma in block_symmetries(block_size)]
    negatives = (0, 0xFF) if "np" in transforms else (0,)
    return tuple(
        BlockOp(block_size, index, op.xor_in ^ np.uint8(neg), op.table_mask, op.table, op.xor_out)
        for index in indices
        for neg in negatives
    )


def _misfit(op: BlockOp, decoded_corr: np.ndarray, natural_corr: np.ndarray) -> float:
    """How far the correlations of the cipher blocks decrypted by ``op`` (``decoded_corr``:
    every position through its fitted inverse map, still in cipher order) are from natural
    ones: the mean absolute difference of the two correlation matrices, in plain positions.
    It needs no key, so the attacker can rank its own estimates with it."""
    order = np.argsort(op.index)  # plain position -> the cipher position reading it
    return float(np.abs(decoded_corr[np.ix_(order, order)] - natural_corr).mean())


def _subsample(blocks: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    if len(blocks) <= limit:
        return blocks
    return blocks[np.sort(rng.choice(len(blocks), size=limit, replace=False))]


def _inverse_maps(op: BlockOp) -> np.ndarray:
    forward = byte_maps(op)
    return np.argsort(forward, axis=1).astype(np.float64)


def _with_index(op: BlockOp, index: np.ndarray) -> BlockOp:
    return BlockOp(op.block_size, index, op.xor_in, op.table_mask, op.table, op.xor_out)
