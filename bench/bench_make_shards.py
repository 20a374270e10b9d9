"""make_shards throughput against a naive single-process loop, measured in the same run.

    python bench/bench_make_shards.py --out bench/results.json

Source: --images distinct JPEGs of about 500x375 (random crops and rescales of scikit-learn's two
sample photos, quality 90), in an ImageNet-style tree. Both sides store 224x224, encrypt with the
same key and write one shard. The naive baseline: PIL decode + resize + crop, the same numpy
encryption one image at a time, and webdataset.TarWriter, in one process. Figures are medians of
--repeats runs, alternating the two.

encrypt_time_fraction is encryption's share of the run's CPU time (the encrypting thread's CPU
seconds over the process's, all threads): stages overlap, so wall time inside encrypt() also
counts waiting for a core. encrypt_wall_fraction is that wall time over the run's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported; bars would interleave

from pipeline import Key, encrypt
from pipeline.decode import decode_pil
from pipeline.offline import BuildStats, ShardConfig, build_shards
from pipeline.sources import find_classes, list_split

sys.path.insert(0, str(Path(__file__).parent))
from results import merge_results  # noqa: E402


def make_source(root: Path, n_images: int, n_classes: int = 10, seed: int = 0) -> Path:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    for i in range(n_images):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch = int(rng.integers(200, h))
        cw = min(w, int(ch * rng.uniform(1.2, 1.5)))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = Image.fromarray(photo[top : top + ch, left : left + cw])
        size = (500, 375) if rng.random() < 0.8 else (375, 500)  # some portrait, as ImageNet
        folder = root / "train" / f"n{i % n_classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        crop.resize(size, Image.Resampling.BICUBIC).save(folder / f"{i:05d}.JPEG", quality=90)
    return root


def naive(src: Path, out: Path, key: Key, size: int) -> float:
    """One process: PIL, per-image encryption, webdataset.TarWriter."""
    import webdataset as wds

    items = list_split(src, "train", find_classes(src, "train"))
    started = time.perf_counter()
    with wds.TarWriter(str(out / "naive-000000.tar")) as sink:
        for i, item in enumerate(items):
            image = encrypt(decode_pil((src / item.path).read_bytes(), size), key)
            meta = {"shape": list(image.shape), "source": item.path, "split": "train"}
            sink.write({"__key__": f"{i:08d}", "u8": image.tobytes(), "cls": str(item.label),
                        "json": json.dumps(meta)})  # fmt: skip
    return len(items) / (time.perf_counter() - started)


def make_shards(src: Path, out: Path, key: Key, size: int, decoder: str) -> tuple[float, float]:
    stats = BuildStats()
    config = ShardConfig(src=str(src), out=str(out), splits=("train",), size=size,
                         decoder=decoder, device="cpu", shard_size="1000")  # fmt: skip
    build_shards(config, key, stats=stats)
    return (
        stats.images / stats.seconds,
        stats.encrypt_cpu_seconds / stats.cpu_seconds,
        (stats.encrypt_seconds / stats.seconds),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results.json")
    args = parser.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-make-shards-"))
    try:
        src = make_source(work / "src", args.images)
        key = Key.generate()
        runs: dict[str, list[float]] = {"naive": [], "dali": [], "pil": [], "cpu": [], "wall": []}
        for r in range(args.repeats):
            for name in ("naive", "dali", "pil"):
                out = work / f"{name}-{r}"
                out.mkdir()
                if name == "naive":
                    runs["naive"].append(naive(src, out, key, args.size))
                else:
                    img_s, cpu_share, wall_share = make_shards(src, out, key, args.size, name)
                    runs[name].append(img_s)
                    if name == "dali":
                        runs["cpu"].append(cpu_share)
                        runs["wall"].append(wall_share)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {name: statistics.median(values) for name, values in runs.items()}
    results = {
        "make_shards_img_s": round(med["dali"], 1),
        "make_shards_pil_img_s": round(med["pil"], 1),
        "naive_img_s": round(med["naive"], 1),
        "make_shards_vs_naive_ratio": round(med["dali"] / med["naive"], 2),
        "encrypt_time_fraction": round(med["cpu"], 3),
        "encrypt_wall_fraction": round(med["wall"], 3),
    }
    note = (
        f"{args.images} JPEGs ~500x375 -> {args.size}x{args.size}, {os.cpu_count()} cores, "
        f"DALI CPU decoder, median of {args.repeats}"
    )
    out = merge_results(args.out, results, note_key="make_shards_bench", note=note)
    print(
        f"make_shards {results['make_shards_img_s']:.0f} img/s = "
        f"{results['make_shards_vs_naive_ratio']:.2f}x the naive loop "
        f"({results['naive_img_s']:.0f} img/s); encryption "
        f"{100 * results['encrypt_time_fraction']:.1f}% of its CPU time; wrote {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
