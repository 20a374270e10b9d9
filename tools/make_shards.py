"""Encrypt an ImageNet-style folder (or the embedded digits) into WebDataset shards + manifest.

    python tools/make_shards.py --key k.bin                       # embedded digits -> ./shards
    python tools/make_shards.py --key k.bin --src /data/imagenet --per-class 130 \\
        --out s3://bucket/imagenet-10pct --shard-size 200MB
    python tools/make_shards.py --plain --out shards-plain        # non-protected baseline
    python tools/make_shards.py --key k.bin --src /data/imagenet --source-map k.sources.parquet
    torchrun --standalone --nproc_per_node=8 tools/make_shards.py --key k.bin \\
        --src /data/imagenet --out s3://bucket/x                  # one rank per GPU
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HEAD:29500 \\
        tools/make_shards.py ...                                  # many nodes

Killed and rerun with the same arguments (under torchrun: any world size), it resumes and ends
with the same bytes. Rejected files (unreadable, truncated, too large) are named in the log and
listed in the manifest (by sample key only, when encrypted); more than --max-reject-fraction of
them fails the run. Encrypted shards name no source file: --source-map writes the owner's
sample-to-source table (mode 0600; keep it with the key), also for output made earlier with the
same arguments. One run at a time writes an output (OUT/_lock.json names the holder).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pipeline import paths
from pipeline.cipher.keys import KeyFileError, load_key
from pipeline.offline.build import BuildStats, ShardBuildError, ShardConfig, build_shards
from pipeline.offline.dali import DaliUnavailableError
from pipeline.offline.decode import DEFAULT_MAX_PIXELS
from pipeline.offline.digits import write_digits_tree
from pipeline.offline.outlock import OutputLockError
from pipeline.offline.sourcemap import SourceMapError, check_location, write_source_map
from pipeline.offline.sources import SPLITS, SourceError
from pipeline.offline.workgroup import WorkGroup, WorkGroupError
from pipeline.shards.manifest import ManifestError

logger = logging.getLogger("make_shards")

EMBEDDED_SIZE = 64  # the digits' stored size: fine-tuning on a CPU takes minutes
EMBEDDED_SHARD_SIZE = "256"  # several shards per split, so ranks x workers all get some


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--key", help="key file (tools/make_key.py); required unless --plain")
    p.add_argument("--plain", action="store_true", help="write unencrypted shards (baseline)")
    p.add_argument("--src", help="ImageNet-style root SRC/{train,val}/<class>/*; default: digits")
    p.add_argument(
        "--out", default=paths.SHARDS, help=f"output folder or fsspec URL (default {paths.SHARDS})"
    )
    p.add_argument("--split", choices=[*SPLITS, "all"], default="all")
    p.add_argument("--size", type=int, help="stored image size (default 224; 64 for the digits)")
    p.add_argument("--per-class", type=int, help="keep at most N images per class")
    p.add_argument("--fraction", type=float, help="keep this fraction of each class (0..1]")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset choice and order")
    p.add_argument("--classes", help="file listing class folder names in label order")
    p.add_argument(
        "--shard-size", help="samples per shard, or bytes: 200MB (default 1000; 256 for digits)"
    )
    p.add_argument("--decoder", choices=["dali", "pil"], default="dali")
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "gpu"],
        default="auto",
        help="where DALI decodes (gpu: this rank's GPU, LOCAL_RANK; auto: gpu when CUDA is there)",
    )
    p.add_argument(
        "--encrypt-device",
        default="auto",
        help="auto (where the decoder leaves the images), cpu, cuda or cuda:N: e.g. PIL "
        "decoding with encryption on a GPU (under torchrun cuda is the rank's GPU); the bytes "
        "are the same",
    )
    p.add_argument("--max-reject-fraction", type=float, default=0.01)
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.add_argument("--batch-size", type=int, default=64, help="images decoded per batch")
    p.add_argument("--threads", type=int, default=2, help="decoder threads")
    p.add_argument("--overwrite", action="store_true", help="replace shards made differently")
    p.add_argument(
        "--source-map",
        help="also write the sample-to-source table here (Parquet, local or fsspec URL, mode "
        "0600); it names every source file: keep it with the key, not with the shards",
    )
    p.add_argument(
        "--force-unlock",
        action="store_true",
        help="take over OUT/_lock.json from another run (only if that run is dead)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> ShardConfig:
    src, size, shard_size = args.src, args.size, args.shard_size
    if src is None:
        src = str(write_digits_tree(size=EMBEDDED_SIZE))
        size = size or EMBEDDED_SIZE
        shard_size = shard_size or EMBEDDED_SHARD_SIZE
    return ShardConfig(
        src=src,
        out=args.out,
        splits=SPLITS if args.split == "all" else (args.split,),
        size=size or 224,
        per_class=args.per_class,
        fraction=args.fraction,
        seed=args.seed,
        classes_file=args.classes,
        shard_size=shard_size or "1000",
        decoder=args.decoder,
        device=args.device,
        encrypt_device=args.encrypt_device,
        plain=args.plain,
        max_reject_fraction=args.max_reject_fraction,
        max_pixels=args.max_pixels,
        batch_size=args.batch_size,
        num_threads=args.threads,
        overwrite=args.overwrite,
        force_unlock=args.force_unlock,
    )


def main(argv: list[str] | None = None) -> int:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    # under torchrun: progress from rank 0, warnings and errors from every rank, tagged
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, format=f"{prefix}%(message)s"
    )
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plain == bool(args.key):
        parser.error("pass --key FILE to encrypt, or --plain for unencrypted shards (not both)")
    stats = BuildStats()
    group = None
    try:
        if args.source_map:  # before any work
            check_location(args.source_map, args.out)
        key = None if args.plain else load_key(args.key)
        config = config_from_args(args)
        group = WorkGroup.from_env()
        manifests = build_shards(config, key, stats=stats, group=group)
        if args.source_map and group.is_primary:  # rank 0, once every split is finished
            write_source_map(args.source_map, src=config.src, out=config.out, key=key,
                             splits=config.splits, classes_file=config.classes_file)  # fmt: skip
    except (
        KeyFileError,
        SourceError,
        SourceMapError,
        ShardBuildError,
        ManifestError,
        DaliUnavailableError,
        OutputLockError,
        WorkGroupError,
        OSError,  # a file where --out's folder goes, disk full, permission denied
        ValueError,
    ) as exc:
        logger.error("make_shards: error: %s", exc)
        return 2
    finally:
        if group is not None:
            group.close()
    if not group.is_primary:
        logger.debug("make_shards: rank %d made %d images", group.rank, stats.images)
        return 0
    by = f" by rank 0 of {group.world_size}" if group.world_size > 1 else ""
    logger.info(
        "make_shards: %d images in %d shards (%d made now%s, %.0f img/s), %d rejected, "
        "%.1f MB at %s (%s)",
        sum(m.total_samples for m in manifests.values()),
        sum(len(m.shards) for m in manifests.values()),
        stats.images,
        by,
        stats.images / max(stats.seconds, 1e-9),
        sum(len(m.rejects) for m in manifests.values()),
        sum(m.total_bytes for m in manifests.values()) / 1e6,
        args.out,
        "plain" if key is None else f"key {key.fingerprint}",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
