"""Re-read every shard under OUT (local or any fsspec URL) and check it against the manifest.

    python tools/verify_shards.py                     # ./shards, where make_shards.py writes
    python tools/verify_shards.py s3://bucket/imagenet-10pct
    python tools/verify_shards.py sealed --data-key data.key   # make_shards --seal output

Checks each shard's SHA-256, byte size and sample count, and that every sample holds an image of
the manifest's shape and a valid class; on a sealed output also that every object opens with
the data key (it authenticates) and has the sealed size the manifest records. Exit 0 only if
everything holds; otherwise each bad shard is named and the exit code is 1 (2 for a bad
argument or an unreadable store).
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline import cli, paths
from pipeline.shards.verify import verify_shards

logger = logging.getLogger("verify_shards")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser(__doc__)
    parser.add_argument(
        "out",
        nargs="?",
        default=paths.SHARDS,
        help="shard folder or URL, as given to make_shards.py --out",
    )
    parser.add_argument(
        "--split", choices=["train", "val", "all"], default="all", help="which split to check"
    )
    cli.add_data_key(parser, "a sealed output")
    return parser


def verify(out: str, splits: tuple[str, ...], data_key: str | None = None) -> int:
    report = verify_shards(out, splits, data_key=data_key)
    for problem in report.problems:
        logger.error("BAD %s", cli.one_line(problem))
    logger.info(
        "verify_shards: %d shards, %d samples checked, %d problem(s): %s",
        report.checked_shards,
        report.checked_samples,
        len(report.problems),
        "OK" if report.ok else "FAILED",
    )
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    cli.setup_logging()
    args = build_parser().parse_args(argv)
    splits = ("train", "val") if args.split == "all" else (args.split,)
    return cli.run("verify_shards", lambda: verify(args.out, splits, args.data_key))


if __name__ == "__main__":
    sys.exit(main())
