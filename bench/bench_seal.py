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
   batch, sealed over unsealed; ``dali_loader_sealed_stream_vs_cache_ratio``: its
   ``sealed_source="stream"`` (opened while read, fed by ``fn.external_source``) over the cache;
   ``*_next_epoch_*``: the same loaders' second epoch alone (the cache is made once, the stream
   opens the shards every epoch).
5. ``make_shards_{sealed,unsealed}_peak_rss_mb``: the peak RSS (VmHWM) of a fresh process that
   runs make_shards once, sealed and not.
6. ``loader_{sealed,unsealed}_peak_rss_mb`` and ``dali_loader_{unsealed,sealed_cache,
   sealed_stream}_peak_rss_mb``: the peak RSS of a fresh process that runs one epoch of a loader
   (the webdataset loader with 0 workers, so every byte it reads is in that process; DALI with 2
   threads), and ``dali_loader_sealed_cache_shm_mb``: the cache's opened copies in /dev/shm,
   which are shared memory and not in any process's RSS.
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
    dali = ("dali", "dali_sealed", "dali_stream")
    names = ("made", "made_sealed", "read", "read_sealed", *dali, *(f"{n}_next" for n in dali))
    runs: dict[str, list[float]] = {name: [] for name in names}
    loader_peak: dict[str, float] = {}
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
                first, later = dali_epoch_img_s(str(out), data_key if sealed else None)
                runs["dali_sealed" if sealed else "dali"].append(first)
                runs["dali_sealed_next" if sealed else "dali_next"].append(later)
            first, later = dali_epoch_img_s(str(work / f"sealed-{r}"), data_key, source="stream")
            runs["dali_stream"].append(first)
            runs["dali_stream_next"].append(later)
            if r == 0:  # this run's shards, before they go
                loader_peak = loader_peaks_mb(work / "plain-0", work / "sealed-0", data_key_file)
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
        "dali_loader_sealed_stream_img_s": round(med["dali_stream"], 1),
        "dali_loader_sealed_stream_vs_cache_ratio": round(
            med["dali_stream"] / med["dali_sealed"], 3
        ),
        "dali_loader_unsealed_next_epoch_img_s": round(med["dali_next"], 1),
        "dali_loader_sealed_next_epoch_img_s": round(med["dali_sealed_next"], 1),
        "dali_loader_sealed_stream_next_epoch_img_s": round(med["dali_stream_next"], 1),
        "dali_loader_sealed_stream_vs_cache_next_epoch_ratio": round(
            med["dali_stream_next"] / med["dali_sealed_next"], 3
        ),
        "make_shards_unsealed_peak_rss_mb": round(peak[False], 1),
        "make_shards_sealed_peak_rss_mb": round(peak[True], 1),
        **loader_peak,
    }


def dali_epoch_img_s(shards: str, data_key, *, source: str = "cache") -> tuple[float, float]:
    """The DALI loader (CPU): its first epoch, from its construction to the last batch (the
    cache is made then), and its second epoch alone (the cache is made once; the stream opens
    every epoch again)."""
    from pipeline.stream.dali import DaliShardLoader
    from pipeline.stream.dataset import LoaderConfig

    started, img_s = time.perf_counter(), []
    loader = DaliShardLoader(shards, "train", config=LoaderConfig(batch_size=64, num_workers=2),
                             data_key=data_key, sealed_source=source)  # fmt: skip
    for epoch in range(2):
        loader.set_epoch(epoch)
        count = 0
        for images, _, valid in loader:
            count += int(valid.sum())
            del images
        img_s.append(count / (time.perf_counter() - started))
        started = time.perf_counter()
    del loader
    return img_s[0], img_s[1]


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


LOADER_PEAK = """
import os, sys
from pipeline.stream.dataset import LoaderConfig, ShardDataset, make_loader
shards, data_key, kind = sys.argv[1], None if sys.argv[2] == "-" else sys.argv[2], sys.argv[3]
shm = 0
if kind == "webdataset":
    config = LoaderConfig(batch_size=64, num_workers=0)
    loader = make_loader(ShardDataset(shards, "train", config=config, data_key=data_key))
else:
    from pipeline.stream.dali import DaliShardLoader
    config = LoaderConfig(batch_size=64, num_workers=2)
    loader = DaliShardLoader(shards, "train", config=config, data_key=data_key,
                             sealed_source=kind.removeprefix("dali-"))
    if data_key and kind == "dali-cache":  # the opened copies (and indexes) in /dev/shm
        folder = loader._tmp.name
        shm = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
for batch in loader:
    del batch
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
print(hwm, shm / 1e6)
"""


def loader_peaks_mb(plain: Path, sealed: Path, data_key_file: Path) -> dict[str, float]:
    """The peak RSS of a fresh process that runs one epoch of each loader, sealed and not."""
    import subprocess

    def run(shards: Path, key: Path | None, kind: str) -> tuple[float, float]:
        done = subprocess.run(
            [sys.executable, "-c", LOADER_PEAK, str(shards), str(key or "-"), kind],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        hwm, shm = done.stdout.strip().splitlines()[-1].split()
        return round(float(hwm), 1), round(float(shm), 1)

    cache, shm = run(sealed, data_key_file, "dali-cache")
    return {
        "loader_unsealed_peak_rss_mb": run(plain, None, "webdataset")[0],
        "loader_sealed_peak_rss_mb": run(sealed, data_key_file, "webdataset")[0],
        "dali_loader_unsealed_peak_rss_mb": run(plain, None, "dali-cache")[0],
        "dali_loader_sealed_cache_peak_rss_mb": cache,
        "dali_loader_sealed_cache_shm_mb": shm,
        "dali_loader_sealed_stream_peak_rss_mb": run(sealed, data_key_file, "dali-stream")[0],
    }


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
        f"JPEGs at 224 px, 100 per shard, DALI CPU decoder, loader 2 workers, DALI loader 2 "
        f"threads (sealed: cache in /dev/shm, or streamed), medians of {args.repeats} "
        f"alternating runs; peak RSS: one epoch in a fresh process (webdataset loader 0 workers)"
    )
    out = merge_results(args.out, results, note_key="seal_bench_machine", note=note)
    print(
        f"open 1 MB segments {results['open_1mb_gb_s']:.2f} GB/s "
        f"({results['open_1mb_vs_read_ratio']:.1f}x a plain read); sealed over unsealed: "
        f"make_shards {results['make_shards_sealed_vs_unsealed_ratio']:.3f}x, loader "
        f"{results['loader_sealed_vs_unsealed_ratio']:.3f}x; DALI stream over cache "
        f"{results['dali_loader_sealed_stream_vs_cache_ratio']:.3f}x; wrote {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
