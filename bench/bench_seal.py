"""Sealing throughput (Tink streaming AEAD, the data key) against a plain read of the same bytes.

    python bench/bench_seal.py --out bench/results.json

For 1 MB and 4 KB segments: seal a --mb MB object to a file, and open (read back and
authenticate) it, each the median of --repeats timed runs after one warm-up, in GB/s; the
baseline reads the plaintext file (page cache) in the same run, and each ratio is its time over
the plain read's. Results merge into the flat JSON object in --out.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.cipher.seal import generate_data_key, object_ad, opening_reader, sealing_writer

sys.path.insert(0, str(Path(__file__).parent))
from results import merge_results  # noqa: E402

CHUNK = 1 << 20
AD = object_ad(output_id="bench", split="train", name="shard-000000.tar")


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_all(f) -> None:
    with f:
        while f.read(CHUNK):
            pass


def run(mb: int, repeats: int) -> dict[str, float]:
    data = os.urandom(mb << 20)
    gb = len(data) / 1e9
    with tempfile.TemporaryDirectory() as tmp:
        plain, sealed = Path(tmp) / "plain", Path(tmp) / "sealed"
        plain.write_bytes(data)
        read = median_seconds(lambda: read_all(plain.open("rb")), repeats)
        results = {"seal_plain_read_gb_s": gb / read}
        for segment in ("1MB", "4KB"):
            key = generate_data_key(segment=segment)

            def seal(key=key) -> None:
                with sealing_writer(key, sealed.open("wb"), associated_data=AD) as w:
                    for i in range(0, len(data), CHUNK):
                        w.write(data[i : i + CHUNK])

            t_seal = median_seconds(seal, repeats)
            t_open = median_seconds(
                lambda key=key: read_all(
                    opening_reader(key, sealed.open("rb"), associated_data=AD)
                ),
                repeats,
            )
            tag = segment.lower()
            results[f"seal_{tag}_gb_s"] = gb / t_seal
            results[f"open_{tag}_gb_s"] = gb / t_open
            results[f"seal_{tag}_vs_read_ratio"] = t_seal / read
            results[f"open_{tag}_vs_read_ratio"] = t_open / read
    return {k: round(v, 3) for k, v in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=256, help="object size in MB")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure")
    parser.add_argument("--out", default="bench/results.json", help="results file to merge into")
    args = parser.parse_args(argv)

    import tink

    results = run(args.mb, args.repeats)
    note = (
        f"{platform.machine()}, {os.cpu_count()} cores, tink {getattr(tink, '__version__', '?')}, "
        f"{args.mb} MB object, AES256-GCM-HKDF streaming"
    )
    out = merge_results(args.out, results, note_key="seal_bench_machine", note=note)
    print(
        f"open 1 MB segments {results['open_1mb_gb_s']:.2f} GB/s "
        f"({results['open_1mb_vs_read_ratio']:.1f}x a plain read); wrote {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
