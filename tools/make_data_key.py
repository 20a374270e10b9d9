"""Make a data key (the key that seals shards at rest), or inspect one.

    python tools/make_data_key.py data.key                      # Tink keyset, mode 0600
    python tools/make_data_key.py data.key --force              # replace an existing one
    python tools/make_data_key.py data.key --kms-key-uri aws-kms://arn:aws:kms:REGION:ACCT:key/ID
    python tools/make_data_key.py data.key --inspect            # print its keyset id

The owner holds the data key and the model key; the training cluster holds the data key only;
the bucket holds neither. Only the keyset id is printed, never key material. See
docs/sealing.md.
"""

from __future__ import annotations

import logging
import sys

from pipeline import cli
from pipeline.cipher.seal import generate_data_key, load_data_key, save_data_key

logger = logging.getLogger("make_data_key")


def build_parser():
    parser = cli.build_parser(__doc__)
    parser.add_argument("path", help="data key file to write (or to read, with --inspect)")
    parser.add_argument(
        "--kms-key-uri",
        default=None,
        help="wrap the keyset with this AWS KMS key (aws-kms://arn:...); None: a plain keyset",
    )
    parser.add_argument("--segment", choices=("1MB", "4KB"), default="1MB", help="segment size")
    parser.add_argument("--force", action="store_true", help="overwrite an existing data key file")
    parser.add_argument("--inspect", action="store_true", help="print the keyset id of PATH")
    return parser


def main(argv: list[str] | None = None) -> int:
    cli.setup_logging()
    args = build_parser().parse_args(argv)

    def job() -> None:
        if args.inspect:
            print(load_data_key(args.path).keyset_id)
            return
        key = generate_data_key(segment=args.segment)
        save_data_key(key, args.path, overwrite=args.force, kms_key_uri=args.kms_key_uri)
        logger.info(
            "wrote %s: data key %s%s. Back it up: shards sealed with it need it.",
            args.path,
            key.keyset_id,
            f", wrapped by {args.kms_key_uri}" if args.kms_key_uri else "",
        )

    return cli.run("make_data_key", job)


if __name__ == "__main__":
    sys.exit(main())
