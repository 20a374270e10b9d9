"""The offline stage's source listing: microseconds per file, against a bare directory walk.

One make_shards rank per node lists the source tree before anything is built (the listing's
digest checks that the ranks see the same files): ``select_split`` sorts each folder, rejects
what is not an image (each named, with why), reads every file's size, and orders the selection
by a keyed hash. On ImageNet-21k (14.2M files) each microsecond per file is 14 s per node. The
baseline, measured in the same run, is the least any listing does: ``os.scandir`` over the
same tree plus one ``stat`` per file for its size.

source_listing_us_per_file: ``select_split`` (keyed order, the encrypted case) per file;
source_listing_vs_bare_walk_ratio: its time over the bare walk's (1.0 would be free).
Medians of --repeats, on a tree of --classes x --per-class empty ``.JPEG`` files.

    python bench/bench_listing.py --out bench/results.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pipeline import Key
from pipeline.offline.sources import select_split

sys.path.insert(0, str(Path(__file__).parent))
from results import merge_results  # noqa: E402


def make_tree(root: Path, classes: int, per_class: int) -> Path:
    for c in range(classes):
        folder = root / "train" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"n{c:08d}_{i}.JPEG").touch()
    return root


def bare_walk(root: Path) -> int:
    """The floor: every entry of every class folder, and each file's size."""
    count = 0
    with os.scandir(root / "train") as classes:
        for folder in classes:
            with os.scandir(folder.path) as files:
                for entry in files:
                    entry.stat()
                    count += 1
    return count


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--per-class", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results.json")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-listing-"))
    try:
        root = make_tree(work, args.classes, args.per_class)
        order_key = Key.generate().order_key
        files = args.classes * args.per_class
        assert bare_walk(root) == files
        listing, walk = [], []
        for _ in range(args.repeats):  # alternating, so both see the same cache state
            listing.append(timed(lambda: select_split(root, "train", order_key=order_key)))
            walk.append(timed(lambda: bare_walk(root)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds, floor = statistics.median(listing), statistics.median(walk)
    results = {
        "source_listing_us_per_file": round(seconds / files * 1e6, 2),
        "source_listing_vs_bare_walk_ratio": round(seconds / floor, 2),
    }
    note = (
        f"{args.classes} x {args.per_class} empty .JPEG files on the local disk (page cache "
        f"warm), {os.cpu_count()} cores, keyed order, median of {args.repeats}"
    )
    out = merge_results(args.out, results, note_key="listing_bench_machine", note=note)
    per_21k = seconds / files * 14.2e6
    print(f"listing {results['source_listing_us_per_file']} us/file, "
          f"{results['source_listing_vs_bare_walk_ratio']}x a bare walk (ImageNet-21k: about "
          f"{per_21k / 60:.1f} min per node at this rate); wrote {out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
