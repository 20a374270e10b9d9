"""Encrypt an ImageNet-style folder (or the embedded digits) into WebDataset shards + manifest.

    python tools/make_shards.py --key k.bin                       # embedded digits -> ./shards
    python tools/make_shards.py --key k.bin --src /data/imagenet --per-class 130 \\
        --out s3://bucket/imagenet-10pct --shard-size 200MB
    python tools/make_shards.py --plain --out shards-plain        # non-protected baseline
    python tools/make_shards.py --key k.bin --src /data/imagenet --source-map k.sources.parquet
    python tools/make_shards.py --key k.bin --src /data/imagenet --dry-run   # the plan only
    torchrun --standalone --nproc_per_node=8 tools/make_shards.py --key k.bin \\
        --src /data/imagenet --out s3://bucket/x                  # one rank per GPU
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HEAD:29500 \\
        tools/make_shards.py ...                                  # many nodes

Killed and rerun with the same arguments (under torchrun: any world size), it resumes and ends
with the same bytes. Rejected files (unreadable, truncated, too large) are named in the log and
listed in the manifest (by sample key only, when encrypted); more than --max-reject-fraction of
them fails the run. Encrypted shards name no source file: --source-map writes the owner's
sample-to-source table (mode 0600; keep it with the key), also for output made earlier with the
same arguments. One run at a time writes an output (OUT/_lock.json names the holder). Ctrl-C
stops it with one line that says what was kept and the command that resumes.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from pipeline import cli, paths
from pipeline.cipher.keys import load_key
from pipeline.cipher.seal import load_data_key
from pipeline.offline.config import DECODERS, ShardConfig
from pipeline.offline.decode import DEFAULT_MAX_PIXELS
from pipeline.offline.job import ShardJob, resolve_sources
from pipeline.offline.plan import describe, plan_splits
from pipeline.offline.sources import SPLITS
from pipeline.offline.workgroup import WorkGroup, cores_per_rank

# --device: one vocabulary across tools (auto|cpu|cuda); "gpu" is still read, as cuda. The
# manifest keeps recording the decode device as it always has ("cpu"/"gpu").
DEVICE_NAMES = {"auto": "auto", "cpu": "cpu", "cuda": "gpu", "gpu": "gpu"}


def device_name(text: str) -> str:
    if text not in DEVICE_NAMES:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of auto, cpu, cuda")
    return text


def threads_count(text: str) -> int:
    """``--threads``: a positive count, or ``auto`` (``cores_per_rank``)."""
    if text == "auto":
        return cores_per_rank()
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive count or auto")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = cli.build_parser(__doc__)
    p.add_argument("--key", help="key file (tools/make_key.py); required unless --plain")
    p.add_argument("--plain", action="store_true", help="write unencrypted shards (baseline)")
    p.add_argument(
        "--src",
        help="ImageNet-style root SRC/{train,val}/<class>/*; left out: the embedded digits",
    )
    p.add_argument("--out", default=paths.SHARDS, help="output folder or fsspec URL")
    p.add_argument(
        "--split", choices=[*SPLITS, "all"], default="all", help="which split(s) to make"
    )
    p.add_argument(
        "--size", type=int, help="stored image side in pixels; left out: 224 (64 for the digits)"
    )
    p.add_argument("--per-class", type=int, help="keep at most N images per class; left out: all")
    p.add_argument(
        "--fraction", type=float, help="keep this fraction (0..1] of each class; left out: all"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the subset choice and order")
    p.add_argument(
        "--classes", help="file listing class folder names in label order; left out: sorted"
    )
    p.add_argument(
        "--shard-size",
        help="samples per shard, or bytes such as 200MB; left out: 1000 (256 for the digits)",
    )
    p.add_argument(
        "--decoder",
        choices=DECODERS,
        default="auto",
        help="image decoder: dali (GPU or CPU), nvjpeg (torchvision's, GPU only), pil (CPU "
        "only); auto: the one an existing output was made with, where it can run, else DALI on "
        "the GPU, else nvJPEG on the GPU, else DALI's CPU decoder, else PIL",
    )
    p.add_argument(
        "--device",
        type=device_name,
        default="auto",
        metavar="{auto,cpu,cuda}",
        help="where DALI decodes (cuda: this rank's GPU, LOCAL_RANK; auto: cuda when there); "
        "--decoder auto with cpu picks a CPU decoder",
    )
    p.add_argument(
        "--encrypt-device",
        default="auto",
        help="auto (where the decoder leaves the images), cpu, cuda or cuda:N: e.g. PIL "
        "decoding with encryption on a GPU (under torchrun cuda is the rank's GPU); the bytes "
        "are the same",
    )
    p.add_argument(
        "--max-reject-fraction",
        type=float,
        default=0.01,
        help="fail the run when more than this fraction of a split's files cannot be decoded",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="reject images larger than this (width x height) before decoding them",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images decoded per batch")
    p.add_argument(
        "--threads",
        type=threads_count,
        default="auto",
        help="decoding workers: DALI's or nvJPEG's CPU threads; with --decoder pil, processes "
        "that each build whole shards; auto: this rank's share of the cores it may use (its "
        "CPU affinity over the ranks on the node)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace shards made differently")
    p.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="use files and class folders under --src that are symlinks pointing outside it "
        "(refused otherwise, each named as a rejected entry)",
    )
    p.add_argument(
        "--seal",
        metavar="DATAKEY",
        help="seal every object written with this data key (tools/make_data_key.py): the "
        "bucket then learns object names and sizes only; readers need --data-key DATAKEY",
    )
    p.add_argument(
        "--source-map",
        help="also write the sample-to-source table here (Parquet, local or fsspec URL, mode "
        "0600); it names every source file: keep it with the key, not with the shards",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list the source and print what would be made (images, shards, sizes, decoder, "
        "staging disk per rank), then stop; writes nothing",
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="also log each shard as it is finished"
    )
    p.add_argument(
        "--force-unlock",
        action="store_true",
        help="take over OUT/_lock.json from another run (only if that run is dead)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> ShardConfig:
    src, size, shard_size = resolve_sources(args.src, args.size, args.shard_size)
    return ShardConfig(
        src=src,
        out=args.out,
        splits=SPLITS if args.split == "all" else (args.split,),
        size=size,
        per_class=args.per_class,
        fraction=args.fraction,
        seed=args.seed,
        classes_file=args.classes,
        shard_size=shard_size,
        decoder=args.decoder,
        device=DEVICE_NAMES[args.device],
        encrypt_device=args.encrypt_device,
        plain=args.plain,
        max_reject_fraction=args.max_reject_fraction,
        max_pixels=args.max_pixels,
        batch_size=args.batch_size,
        num_threads=args.threads,
        overwrite=args.overwrite,
        force_unlock=args.force_unlock,
        follow_symlinks=args.follow_symlinks,
    )


def resume_command(argv: list[str] | None) -> str:
    """The command line that resumes this run: the same one (under torchrun, its own)."""
    args = sys.argv[1:] if argv is None else argv
    launcher = "torchrun ... " if "TORCHELASTIC_RUN_ID" in os.environ else "python "
    return launcher + shlex.join(["tools/make_shards.py", *args])


def dry_run(args: argparse.Namespace) -> None:
    """``--dry-run``: the plan, printed (by rank 0 alone under torchrun); nothing is written."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    key = None if args.plain else load_key(args.key)
    config = config_from_args(args)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    for line in describe(config, plan_splits(config, key), world_size=world_size):
        print(line)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.setup_logging(verbose=args.verbose)
    if args.plain == bool(args.key):
        parser.error("pass --key FILE to encrypt, or --plain for unencrypted shards (not both)")
    if args.dry_run:
        return cli.run("make_shards", lambda: dry_run(args))
    job: ShardJob | None = None
    group: WorkGroup | None = None

    def make() -> None:
        nonlocal job, group
        key = None if args.plain else load_key(args.key)
        data_key = None if args.seal is None else load_data_key(args.seal)
        job = ShardJob(config_from_args(args), key, source_map=args.source_map, data_key=data_key)
        group = WorkGroup.from_env()
        job.run(group)

    def interrupted() -> str:
        done = job.progress() if job is not None else "nothing was written yet"
        return f"{done}; to resume, run the same command again: {resume_command(argv)}"

    code = 1
    try:
        rank = int(os.environ.get("RANK", "0"))  # rank 0 speaks for a torchrun job
        code = cli.run("make_shards", make, interrupted=interrupted, quiet_interrupt=rank != 0)
        return code
    finally:
        if group is not None:
            group.close(finished=code == 0)


if __name__ == "__main__":
    sys.exit(main())
