"""The frontier's cost: seconds of the ciphertext-only estimate per 10^6 leaked blocks, per
block size, so that a run on ImageNet-scale shards can be planned.

    python bench/bench_frontier.py --out bench/results.json

For each block size the estimate runs (one fresh key, the embedded photos, statistics from
other photos) on two small numbers of leaked blocks; the time is fitted as a fixed cost plus a
cost per block, and the figure per 10^6 blocks is that line EXTRAPOLATED (labelled so in the
names): a few minutes on 2 cores cannot run 10^6 blocks at every block size. The estimate reads
at most 50 million cipher bytes (about 1M blocks at M=4, 260k at M=8, 65k at M=16; beyond them
only histograms grow), so the line stops at that cap. The measured times are written too. An
estimate that runs past --time-budget-s is recorded as null (not measured), never as a time.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from attacks.ciphertext_only import MAX_VALUES, EstimateTimeout, estimate_key
from attacks.frontier import FrontierConfig
from attacks.keyspace import random_material, to_blocks
from pipeline import apply_op
from pipeline.cipher.blockwise import TRANSFORMS, block_length
from pipeline.offline.photos import split_photos

sys.path.insert(0, str(Path(__file__).parent))
from results import merge_results  # noqa: E402

# leaked blocks per measurement: a small number and one 15-16x larger, so that the cost per
# block shows above the fixed cost
SIZES = {4: (4_000, 64_000), 8: (2_000, 32_000), 16: (1_000, 16_000)}


def time_estimate(
    block_size: int, blocks: int, statistics_blocks: int, budget_s: float
) -> float | None:
    """Seconds of one estimate on ``blocks`` leaked blocks, or None past ``budget_s``."""
    photos = split_photos(seed=0)
    rng = np.random.default_rng([block_size, blocks])
    truth = random_material(block_size, TRANSFORMS, rng).encrypt_op
    leaked = to_blocks(photos.leaked, block_size)
    leaked = leaked[rng.choice(len(leaked), blocks, replace=False)]
    m = block_size
    cipher = to_blocks(apply_op(leaked.reshape(-1, m, m, 3), truth), m)
    stats = to_blocks(photos.statistics, block_size)
    stats = stats[rng.choice(len(stats), min(statistics_blocks, len(stats)), replace=False)]
    started = time.perf_counter()
    try:
        estimate_key(cipher, stats, m, TRANSFORMS, rng=rng, time_budget_s=budget_s)
    except EstimateTimeout:
        return None
    return time.perf_counter() - started


def run(
    block_sizes: list[int],
    statistics_blocks: int,
    budget_s: float,
    sizes: tuple[int, int] | None = None,
) -> dict:
    results: dict[str, float | None] = {}
    for m in block_sizes:
        small, large = sizes or SIZES[m]
        t_small = time_estimate(m, small, statistics_blocks, budget_s)
        t_large = None if t_small is None else time_estimate(m, large, statistics_blocks, budget_s)
        results[f"frontier_m{m}_estimate_s_at_{small}_blocks"] = _round(t_small)
        results[f"frontier_m{m}_estimate_s_at_{large}_blocks"] = _round(t_large)
        per_million = None
        if t_small is not None and t_large is not None:
            per_block = max(0.0, (t_large - t_small) / (large - small))
            fixed = max(0.0, t_small - per_block * small)
            # past the estimate's cap the extra blocks only enter histograms (linear, cheap)
            per_million = fixed + per_block * min(1e6, capped_blocks(m))
        results[f"frontier_m{m}_s_per_1e6_blocks_extrapolated"] = _round(per_million)
    return results


def capped_blocks(block_size: int) -> int:
    """Leaked blocks the estimate reads at most (its ``max_values`` bytes, L per block)."""
    return MAX_VALUES // block_length(block_size)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--block-sizes", default="4,8,16")
    parser.add_argument("--statistics-blocks", type=int, default=FrontierConfig.statistics_blocks,
                        help="as the frontier's default")  # fmt: skip
    parser.add_argument("--time-budget-s", type=float, default=150.0,
                        help="per estimate; longer ones are recorded as null")  # fmt: skip
    parser.add_argument("--blocks", help="SMALL,LARGE leaked blocks at every block size "
                        "(default: per block size, about the same bytes)")  # fmt: skip
    parser.add_argument("--out", default="bench/results.json")
    args = parser.parse_args(argv)
    sizes = tuple(int(n) for n in args.blocks.split(",")) if args.blocks else None
    if sizes is not None and (len(sizes) != 2 or not 0 < sizes[0] < sizes[1]):
        parser.error(f"--blocks {args.blocks!r}: give SMALL,LARGE with 0 < SMALL < LARGE")
    block_sizes = [int(m) for m in args.block_sizes.split(",") if m]
    unknown = [m for m in block_sizes if m not in SIZES]
    if unknown:
        parser.error(f"--block-sizes: {unknown} not in {sorted(SIZES)}")
    started = time.perf_counter()
    results = run(block_sizes, args.statistics_blocks, args.time_budget_s, sizes)
    note = (
        f"{platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}; the "
        f"ciphertext-only estimate (shuffle+np+ffx, one fresh key) on the embedded photos with "
        f"{args.statistics_blocks} statistics blocks; per-1e6 figures extrapolated linearly "
        f"(fixed + per-block cost) from the two measured sizes, the per-block cost up to the "
        f"estimate's cap of read blocks; null: past the "
        f"{args.time_budget_s:g} s budget, not measured"
    )
    out = merge_results(args.out, results, note_key="frontier_bench_machine", note=note)
    print(f"frontier bench: {time.perf_counter() - started:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
