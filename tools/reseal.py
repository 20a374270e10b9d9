"""Rotate the data key of a sealed output (make_shards --seal), object by object.

    python tools/make_data_key.py new.key
    python tools/reseal.py shards --data-key old.key --new-data-key new.key
    python tools/reseal.py s3://bucket/imagenet-10pct --data-key old.key --new-data-key new.key

Every object is opened with the old key and sealed with the new one into OUT/_reseal/ first
(the output stays whole and readable with the old key meanwhile); then the copies replace the
originals, manifests last and OUT/_sealed.json at the very end. The block-wise layer is not
touched: what the objects open to is the same. Interrupted, the same command continues. Run it
when no job reads the output: a reader with the old key fails on the objects already moved.
"""

from __future__ import annotations

import logging
import sys

from pipeline import cli
from pipeline.cipher.seal import load_data_key
from pipeline.shards.sealing import reseal_output

logger = logging.getLogger("reseal")


def build_parser():
    parser = cli.build_parser(__doc__)
    parser.add_argument("out", help="the sealed output folder or URL (make_shards --out)")
    parser.add_argument("--data-key", required=True, help="the data key that sealed it")
    parser.add_argument("--new-data-key", required=True, help="the data key to seal it with")
    return parser


def main(argv: list[str] | None = None) -> int:
    cli.setup_logging()
    args = build_parser().parse_args(argv)

    def job() -> None:
        old, new = load_data_key(args.data_key), load_data_key(args.new_data_key)
        reseal_output(args.out, old, new)

    return cli.run("reseal", job)


if __name__ == "__main__":
    sys.exit(main())
