"""Sealing (Tink streaming AEAD, the data key): its raw throughput, and what it costs the two
stages that do it, each against the same work unsealed in the same run.

    python bench/bench_seal.py --out bench/results.json

1. For 1 MB and 4 KB segments: seal a --mb MB object to a file, and open (read back and
   authenticate) it, each the median of --repeats timed runs after one warm-up, in GB/s; the
   baseline reads the plaintext file (page cache), and each ratio is its time over the plain
   read's.
2. ``make_shards_sealed_vs_unsealed_ratio``: img/s of make_shards (DALI CPU decoder) on --images
   photo-like JPEGs at 224 px, ``--seal`` over not, runs alternating, medians of --repeats.
3. ``loader_sealed_vs_unsealed_ratio``: img/s of the training loader (2 workers, batch 64) over
   those shards sealed and not, alternating, medians of --repeats.
4. ``dali_loader_sealed_vs_unsealed_ratio``: the DALI loader (CPU) over the same shards for one
   epoch, from its construction (sealed: the shards opened into /dev/shm first) to the last
   batch, sealed over unsealed.
5. ``make_shards_{sealed,unsealed}_peak_rss_mb``: the peak RSS (VmHWM) of a fresh process that
   runs make_shards once, sealed and not.
Results merge into the flat JSON object in --out.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pipeline import save_key
from pipeline.cipher.seal import (
    generate_data_key,
    object_ad,
    opening_reader,
    save_data_key,
    sealing_writer,
)

sys.path.insert(0, str(Path(__file__).parent))
from bench_encrypt import median_seconds  # noqa: E402
from results import merge_results  # noqa: E402

CHUNK = 1 << 20
AD = object_ad(output_id="bench", split="train", name="shard-000000.tar")


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


def stages(images: int, repeats: int) -> dict[str, float]:
    """make_shards and the loader, sealed over unsealed, on the same photos in the same run."""
    import logging
    import shutil

    from bench_loader import loader_img_s
    from bench_make_shards import make_source

    from pipeline import Key
    from pipeline.offline.build import BuildStats, ShardConfig, build_shards

    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-seal-"))
    key, data_key = Key.generate(), generate_data_key()
    runs: dict[str, list[float]] = {name: [] for name in ("made", "made_sealed", "read",
                                    "read_sealed", "dali", "dali_sealed")}  # fmt: skip
    try:
        src = make_source(work / "src", images)
        key_file = save_key(key, work / "k.bin")
        data_key_file = save_data_key(data_key, work / "data.key")
        peak = {sealed: peak_rss_mb(src, work / f"peak-{sealed}", key_file,
                                    data_key_file if sealed else None)
                for sealed in (False, True)}  # fmt: skip
        for r in range(repeats):
            for sealed in (False, True):
                out = work / f"{'sealed' if sealed else 'plain'}-{r}"
                stats = BuildStats()
                config = ShardConfig(src=str(src), out=str(out), splits=("train",), size=224,
                                     decoder="dali", device="cpu", shard_size="100")  # fmt: skip
                build_shards(config, key, stats=stats, data_key=data_key if sealed else None)
                runs["made_sealed" if sealed else "made"].append(stats.images / stats.seconds)
            for sealed in (False, True):
                out = work / f"{'sealed' if sealed else 'plain'}-{r}"
                img_s = loader_img_s(str(out), 3, data_key if sealed else None)
                runs["read_sealed" if sealed else "read"].append(img_s)
                img_s = dali_epoch_img_s(str(out), data_key if sealed else None)
                runs["dali_sealed" if sealed else "dali"].append(img_s)
            for name in ("plain", "sealed"):
                shutil.rmtree(work / f"{name}-{r}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {name: statistics.median(values) for name, values in runs.items()}
    return {
        "make_shards_unsealed_img_s": round(med["made"], 1),
        "make_shards_sealed_img_s": round(med["made_sealed"], 1),
        "make_shards_sealed_vs_unsealed_ratio": round(med["made_sealed"] / med["made"], 3),
        "loader_unsealed_img_s": round(med["read"], 1),
        "loader_sealed_img_s": round(med["read_sealed"], 1),
        "loader_sealed_vs_unsealed_ratio": round(med["read_sealed"] / med["read"], 3),
        "dali_loader_unsealed_img_s": round(med["dali"], 1),
        "dali_loader_sealed_img_s": round(med["dali_sealed"], 1),
        "dali_loader_sealed_vs_unsealed_ratio": round(med["dali_sealed"] / med["dali"], 3),
        "make_shards_unsealed_peak_rss_mb": round(peak[False], 1),
        "make_shards_sealed_peak_rss_mb": round(peak[True], 1),
    }


def dali_epoch_img_s(shards: str, data_key) -> float:
    """One epoch of the DALI loader (CPU), from its construction to the last batch."""
    from pipeline.stream.dali import DaliShardLoader
    from pipeline.stream.dataset import LoaderConfig

    started, count = time.perf_counter(), 0
    loader = DaliShardLoader(shards, "train", config=LoaderConfig(batch_size=64, num_workers=2),
                             data_key=data_key)  # fmt: skip
    for images, _, valid in loader:
        count += int(valid.sum())
        del images
    seconds = time.perf_counter() - started
    del loader
    return count / seconds


PEAK = """
import sys
from pipeline import load_key
from pipeline.cipher.seal import load_data_key
from pipeline.offline.build import ShardConfig, build_shards
src, out, key_file, data_key_file = sys.argv[1:5]
config = ShardConfig(src=src, out=out, splits=("train",), size=224, decoder="dali", device="cpu",
                     shard_size="100")
build_shards(config, load_key(key_file),
             data_key=load_data_key(data_key_file) if data_key_file != "-" else None)
print(int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024)
"""


def peak_rss_mb(src: Path, out: Path, key_file: Path, data_key_file: Path | None) -> float:
    """The peak RSS of a fresh process that makes the shards once."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", PEAK, str(src), str(out), str(key_file), str(data_key_file or "-")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=256, help="object size in MB")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure")
    parser.add_argument("--images", type=int, default=600, help="photos for the stage figures")
    parser.add_argument("--out", default="bench/results.json", help="results file to merge into")
    args = parser.parse_args(argv)

    from importlib.metadata import version

    results = {**run(args.mb, args.repeats), **stages(args.images, args.repeats)}
    note = (
        f"{platform.machine()}, {os.cpu_count()} cores, tink {version('tink')}, "
        f"{args.mb} MB object, AES256-GCM-HKDF streaming; stages: {args.images} photo-like "
        f"JPEGs at 224 px, 100 per shard, DALI CPU decoder, loader 2 workers, medians of "
        f"{args.repeats} alternating runs"
    )
    out = merge_results(args.out, results, note_key="seal_bench_machine", note=note)
    print(
        f"open 1 MB segments {results['open_1mb_gb_s']:.2f} GB/s "
        f"({results['open_1mb_vs_read_ratio']:.1f}x a plain read); sealed over unsealed: "
        f"make_shards {results['make_shards_sealed_vs_unsealed_ratio']:.3f}x, loader "
        f"{results['loader_sealed_vs_unsealed_ratio']:.3f}x; wrote {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
