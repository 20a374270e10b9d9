"""Encryption throughput on the CPU, against a plain numpy copy measured in the same run.

    python bench/bench_encrypt.py --out bench/results.json

A batch of 256 uint8 images of 224x224x3 (the layout encrypt() takes). Each figure is the median
of --repeats timed calls after one warm-up. The copy baseline allocates its output as encrypt
does. Results merge into the flat JSON object in --out (other benchmarks add their own names).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipeline import Key, decrypt, encrypt

sys.path.insert(0, str(Path(__file__).parent))
from results import merge_results  # noqa: E402


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: caches the per-size plan, faults in memory
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(batch: int, size: int, block_size: int, repeats: int) -> dict[str, float]:
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    key = Key.generate(block_size=block_size)
    enc = encrypt(images, key)
    timings = {
        "copy": median_seconds(lambda: images.copy(), repeats),
        "encrypt": median_seconds(lambda: encrypt(images, key), repeats),
        "decrypt": median_seconds(lambda: decrypt(enc, key), repeats),
    }
    for name in ("shuffle", "np", "ffx"):
        single = Key.generate(block_size=block_size, transforms=(name,))
        timings[f"encrypt_{name}"] = median_seconds(lambda k=single: encrypt(images, k), repeats)
    tensor = torch.from_numpy(images)
    timings["encrypt_torch_cpu"] = median_seconds(lambda: encrypt(tensor, key), repeats)

    copy = timings["copy"]
    results = {
        "encrypt_img_s": batch / timings["encrypt"],
        "copy_img_s": batch / copy,
        "encrypt_vs_copy_ratio": timings["encrypt"] / copy,
        "decrypt_img_s": batch / timings["decrypt"],
        "decrypt_vs_copy_ratio": timings["decrypt"] / copy,
        "encrypt_torch_cpu_img_s": batch / timings["encrypt_torch_cpu"],
    }
    for name in ("shuffle", "np", "ffx"):
        results[f"encrypt_{name}_only_vs_copy_ratio"] = timings[f"encrypt_{name}"] / copy
    return {k: round(v, 2) for k, v in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results.json")
    args = parser.parse_args(argv)

    results = run(args.batch, args.size, args.block_size, args.repeats)
    note = (
        f"{platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}, "
        f"torch {torch.__version__}, {args.batch}x{args.size}x{args.size}x3, M={args.block_size}"
    )
    out = merge_results(args.out, results, note_key="encrypt_bench_machine", note=note)
    print(
        f"encrypt {results['encrypt_img_s']:.0f} img/s = {results['encrypt_vs_copy_ratio']:.1f}x "
        f"the time of a numpy copy ({results['copy_img_s']:.0f} img/s); wrote {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
