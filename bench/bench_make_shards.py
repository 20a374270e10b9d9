"""make_shards throughput against a naive single-process loop, measured in the same run.

    python bench/bench_make_shards.py --out bench/results.json

Source: --images distinct JPEGs of about 500x375 (random crops and rescales of scikit-learn's two
sample photos, quality 90), in an ImageNet-style tree. Both sides store 224x224, encrypt with the
same key and write one shard. The naive baseline: PIL decode + resize + crop, the same numpy
encryption one image at a time, and webdataset.TarWriter, in one process. Figures are medians of
--repeats runs, alternating the two.

make_shards_threads_2_vs_1_ratio: img/s of make_shards with --threads 2 over --threads 1, PIL
decoder, on --threads-images photos in shards of 50 (enough that the processes' start is a small
part of a run), alternating, the median of --threads-repeats paired ratios (each pair measured
back to back, so the shared machine's slow minutes fall on both sides). With PIL and CPU
encryption each of --threads processes builds whole shards (decode, encrypt, write), and this
process only publishes them, so one process is one core's work and the ceiling is 2.

encrypt_time_fraction is encryption's share of the run's CPU time (the encrypting thread's CPU
seconds over the process's, all threads): stages overlap, so wall time inside encrypt() also
counts waiting for a core. encrypt_wall_fraction is that wall time over the run's.

make_shards_s3_vs_local_ratio: the same make_shards of --s3-images JPEGs (DALI CPU decoder,
--s3-shard-size samples per shard, so uploads overlap decoding; the dozen requests at the start
and end of a run do not, which a run of seconds still feels) into a loopback S3 server
(moto_server in its own process, started here) over the same into a local folder, alternating,
medians of --s3-repeats runs, each in a fresh process (DALI and s3fs imported, and the S3 client
made, before the clock starts: one-off costs of a process, not of uploads).
A real object store does not run on the client's cores, and moto spends more CPU per upload than
the client (about 1.7 CPU seconds per run here, MD5 of every body included), so the server is
pinned to the last core of this process's CPU set and make_shards, on both sides, to the others:
the ratio is then what S3 costs make_shards itself (the client's hashing, signing and requests,
and any wait on an upload). make_shards_s3_vs_local_ratio_shared_cores is the same comparison
with the server on make_shards' cores (--s3-shared-repeats runs each), which on a small machine
also measures the server. make_shards_s3_vs_local_cpu_seconds_ratio compares make_shards' own
CPU seconds (S3 / local); moto_server_cpu_seconds is the server's per S3 run;
make_shards_peak_rss_mb is the largest peak RSS (VmHWM) of those processes, by output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported; bars would interleave

from pipeline import Key, encrypt, save_key
from pipeline.offline.build import BuildStats, ShardConfig, build_shards
from pipeline.offline.decode import decode_pil
from pipeline.offline.sources import find_classes, list_split
from pipeline.testing import LoopbackS3

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


SHARD_SAMPLES = "50"  # 10 shards of the 500 photos: PIL's processes build whole shards


def make_shards(
    src: Path, out: Path, key: Key, size: int, decoder: str, threads: int = 2
) -> tuple[float, float, float]:
    stats = BuildStats()
    config = ShardConfig(src=str(src), out=str(out), splits=("train",), size=size,
                         decoder=decoder, device="cpu", shard_size=SHARD_SAMPLES,
                         num_threads=threads)  # fmt: skip
    build_shards(config, key, stats=stats)
    return (
        stats.images / stats.seconds,
        stats.encrypt_cpu_seconds / stats.cpu_seconds,
        (stats.encrypt_seconds / stats.seconds),
    )


CHILD = """
import json, sys
import nvidia.dali.fn, s3fs  # imported before timing, for both sides: not part of a build
from pipeline import load_key
from pipeline.offline.build import BuildStats, ShardConfig, build_shards
src, out, key_file, size, shard_size = sys.argv[1:6]
if out.startswith("s3://"):  # create make_shards' client (botocore loads its models) before the
    from pipeline.storage import filesystem  # clock: its options, so fsspec's cache reuses it
    fs, path = filesystem(out)
    fs.ls(path.split("/")[0])
stats = BuildStats()
config = ShardConfig(src=src, out=out, splits=("train",), size=int(size), decoder="dali",
                     device="cpu", shard_size=shard_size)
build_shards(config, load_key(key_file), stats=stats)
# VmHWM, not ru_maxrss: Linux carries the forking parent's RSS into ru_maxrss across exec
status = open("/proc/self/status").read().split("VmHWM:")[1]
peak_kb = int(status.split()[0])
print(json.dumps({"img_s": stats.images / stats.seconds, "cpu_s": stats.cpu_seconds,
                  "peak_rss_mb": peak_kb / 1024}))
"""


def split_cores() -> tuple[set[int], set[int]] | None:
    """(make_shards' cores, the server's core): the last core of this process's CPU set for the
    server, the rest for make_shards; None with a single core."""
    cores = sorted(os.sched_getaffinity(0))
    return (set(cores[:-1]), {cores[-1]}) if len(cores) > 1 else None


def pin(cores: set[int] | None):
    """A ``preexec_fn`` that runs the child on ``cores`` (None: wherever it likes)."""
    return None if cores is None else lambda: os.sched_setaffinity(0, cores)


def make_shards_child(src: Path, out: str, key_file: Path, size: int, shard_size: int,
                      env: dict[str, str], cores: set[int] | None = None) -> dict:  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), out, str(key_file), str(size), str(shard_size)],
        capture_output=True, text=True, env={**env, "TQDM_DISABLE": "1"}, check=False,
        preexec_fn=pin(cores),
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"make_shards into {out} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def s3_vs_local(work: Path, src: Path, key_file: Path, args: argparse.Namespace,
                repeats: int, cores: tuple[set[int], set[int]] | None,
                ) -> dict[str, list[dict]]:  # fmt: skip
    """make_shards into a local folder and into a loopback S3 server, alternating; with
    ``cores``, make_shards (both sides) and the server each on their own cores."""
    import boto3

    client_cores, server_cores = cores or (None, None)
    runs: dict[str, list[dict]] = {"local": [], "s3": []}
    with LoopbackS3(cores=server_cores) as server:
        server_env = server.env()
        bucket = boto3.resource("s3", endpoint_url=server.url,
                                region_name="us-east-1", aws_access_key_id="bench",
                                aws_secret_access_key="bench").Bucket("bench")  # fmt: skip
        bucket.create()
        for r in range(repeats):
            local = work / f"local-{r}"
            for name, out in (("local", str(local)), ("s3", f"s3://bench/{r}")):
                server_cpu = server.cpu_seconds()
                run = make_shards_child(src, out, key_file, args.size, args.s3_shard_size,
                                        server_env, client_cores)  # fmt: skip
                run["server_cpu_s"] = server.cpu_seconds() - server_cpu
                runs[name].append(run)
            shutil.rmtree(local)
            bucket.objects.filter(Prefix=f"{r}/").delete()  # the server keeps objects on disk
    return runs


def s3_figures(pinned: dict[str, list[dict]], shared: dict[str, list[dict]]) -> dict:
    def median(runs: dict[str, list[dict]], name: str, figure: str) -> float:
        return statistics.median(run[figure] for run in runs[name])

    def ratio(runs: dict[str, list[dict]], figure: str) -> float:
        return round(median(runs, "s3", figure) / median(runs, "local", figure), 3)

    return {
        "make_shards_local_img_s": round(median(pinned, "local", "img_s"), 1),
        "make_shards_s3_img_s": round(median(pinned, "s3", "img_s"), 1),
        "make_shards_s3_vs_local_ratio": ratio(pinned, "img_s"),
        "make_shards_s3_vs_local_cpu_seconds_ratio": ratio(pinned, "cpu_s"),
        "make_shards_s3_vs_local_ratio_shared_cores": ratio(shared, "img_s"),
        "moto_server_cpu_seconds": round(median(pinned, "s3", "server_cpu_s"), 2),
        "make_shards_peak_rss_mb": {
            name: round(
                max(run["peak_rss_mb"] for runs in (pinned, shared) for run in runs[name]), 1
            )
            for name in ("local", "s3")
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads-images", type=int, default=1500, help="for 2 threads vs 1")
    parser.add_argument("--threads-repeats", type=int, default=3, help="pairs of runs")
    parser.add_argument("--s3-images", type=int, default=1500, help="for S3 vs local")
    parser.add_argument("--s3-shard-size", type=int, default=50, help="samples per shard")
    parser.add_argument("--s3-repeats", type=int, default=5, help="S3 and local runs, each")
    parser.add_argument("--s3-shared-repeats", type=int, default=3,
                        help="the same with the server on make_shards' cores")  # fmt: skip
    parser.add_argument("--out", default="bench/results.json")
    args = parser.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-make-shards-"))
    try:
        sources: dict[int, Path] = {}

        def source(images: int) -> Path:  # one photo tree per size, made once
            if images not in sources:
                sources[images] = make_source(work / f"src-{images}", images)
            return sources[images]

        src = source(args.images)
        key = Key.generate()
        runs: dict[str, list[float]] = {"naive": [], "dali": [], "cpu": [], "wall": [], "pil": [],
                                        "pil_1_thread": [], "threads_ratio": []}  # fmt: skip
        for r in range(args.repeats):
            for name in ("naive", "dali"):
                out = work / f"{name}-{r}"
                out.mkdir()
                if name == "naive":
                    runs["naive"].append(naive(src, out, key, args.size))
                else:
                    img_s, cpu_share, wall_share = make_shards(src, out, key, args.size, name)
                    runs[name].append(img_s)
                    runs["cpu"].append(cpu_share)
                    runs["wall"].append(wall_share)
                shutil.rmtree(out)
        for r in range(args.threads_repeats):
            pair = {}
            for threads, name in ((1, "pil_1_thread"), (2, "pil")):
                out = work / f"{name}-{r}"
                out.mkdir()
                pair[threads] = make_shards(source(args.threads_images), out, key, args.size,
                                            "pil", threads=threads)[0]  # fmt: skip
                runs[name].append(pair[threads])
                shutil.rmtree(out)
            runs["threads_ratio"].append(pair[2] / pair[1])
        src = source(args.s3_images)
        key_file = save_key(key, work / "k.bin")
        cores = split_cores()
        pinned = s3_vs_local(work, src, key_file, args, args.s3_repeats, cores)
        shared = s3_vs_local(work, src, key_file, args, args.s3_shared_repeats, None)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {name: statistics.median(values) for name, values in runs.items()}
    results = {
        "make_shards_img_s": round(med["dali"], 1),
        "make_shards_pil_img_s": round(med["pil"], 1),
        "make_shards_pil_1_thread_img_s": round(med["pil_1_thread"], 1),
        "make_shards_threads_2_vs_1_ratio": round(med["threads_ratio"], 3),
        "make_shards_threads_2_vs_1_ratios": [round(x, 3) for x in runs["threads_ratio"]],
        "naive_img_s": round(med["naive"], 1),
        "make_shards_vs_naive_ratio": round(med["dali"] / med["naive"], 2),
        "encrypt_time_fraction": round(med["cpu"], 3),
        "encrypt_wall_fraction": round(med["wall"], 3),
        **s3_figures(pinned, shared),
    }
    where = (
        f"make_shards on cores {sorted(cores[0])}, the server on core {min(cores[1])}"
        if cores
        else "one core: the server shares it"
    )
    note = (
        f"{args.images} JPEGs ~500x375 -> {args.size}x{args.size}, {os.cpu_count()} cores, "
        f"DALI CPU decoder, median of {args.repeats}; threads 2 vs 1: PIL decoder, "
        f"{args.threads_images} JPEGs, 50 per shard, --threads 2 over --threads 1, median of "
        f"{args.threads_repeats} paired ratios; S3 vs local: moto_server on "
        f"loopback, "
        f"{args.s3_images} JPEGs, {args.s3_shard_size} per shard, a fresh process per run, "
        f"median of {args.s3_repeats} ({where}; shared cores: median of "
        f"{args.s3_shared_repeats})"
    )
    out = merge_results(args.out, results, note_key="make_shards_bench", note=note)
    print(
        f"make_shards {results['make_shards_img_s']:.0f} img/s = "
        f"{results['make_shards_vs_naive_ratio']:.2f}x the naive loop "
        f"({results['naive_img_s']:.0f} img/s); PIL --threads 2 / 1 "
        f"{results['make_shards_threads_2_vs_1_ratio']:.2f}x; encryption "
        f"{100 * results['encrypt_time_fraction']:.1f}% of its CPU time; into loopback S3 "
        f"{results['make_shards_s3_vs_local_ratio']:.2f}x its local speed "
        f"({results['make_shards_s3_vs_local_ratio_shared_cores']:.2f}x with the server on its "
        f"cores); wrote {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
