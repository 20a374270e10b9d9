"""Make a secret key, or inspect one.

    python tools/make_key.py k.bin                          # M=4, shuffle,np,ffx
    python tools/make_key.py k.bin --block-size 8 --transforms shuffle,np
    python tools/make_key.py k.bin --force                  # replace an existing key
    python tools/make_key.py --inspect k.bin                # JSON: parameters + derived material

The key file holds a 256-bit secret (mode 0600). Keep it safe and backed up: a model trained
with it is useless without it. The --inspect output is key material too; do not publish it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline import cli
from pipeline.cipher.blockwise import TRANSFORMS, check_block_size, check_transforms
from pipeline.cipher.keys import Key, load_key, save_key

logger = logging.getLogger("make_key")


def parse_transforms(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    try:
        return check_transforms(names)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (e.g. --transforms shuffle,np,ffx)") from None


def build_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser(__doc__)
    parser.add_argument("path", help="key file to write (or to read, with --inspect)")
    parser.add_argument("--block-size", type=int, default=4, help="block size M, in pixels")
    parser.add_argument(
        "--transforms",
        type=parse_transforms,
        default=",".join(TRANSFORMS),
        help="ordered, comma-separated subset of shuffle,np,ffx",
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing key file")
    parser.add_argument(
        "--inspect", action="store_true", help="print the key's parameters and material as JSON"
    )
    return parser


def make_key(path: str, *, block_size: int, transforms: tuple[str, ...], force: bool) -> None:
    key = Key.generate(block_size=block_size, transforms=transforms)
    save_key(key, path, overwrite=force)
    bits = key.key_space_bits()
    logger.info(
        "wrote %s: fingerprint %s, block size %d, transforms %s, key space 2^%.0f "
        "(secret 2^256). Back it up: models trained with it need it.",
        path,
        key.fingerprint,
        key.block_size,
        ",".join(key.transforms),
        bits["total"],
    )


def main(argv: list[str] | None = None) -> int:
    cli.setup_logging()
    args = build_parser().parse_args(argv)
    try:
        check_block_size(args.block_size)
    except ValueError as exc:
        build_parser().error(f"--block-size: {exc}")
    if args.inspect:
        return cli.run("make_key", lambda: print(json.dumps(load_key(args.path).inspect())))
    return cli.run(
        "make_key",
        lambda: make_key(
            args.path, block_size=args.block_size, transforms=args.transforms, force=args.force
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
