"""Authorized inference: classify ordinary image files with a protected model and its key.

    python tools/predict.py --key k.bin --checkpoint runs/protected/checkpoint.pt \\
        a.jpg b.png                                               # top-5 table per image
    python tools/predict.py --key k.bin --checkpoint CKPT --topk 3 --json *.png

Each image is decoded, resized and cropped as make_shards.py stored the training images (with
the same decoder, DALI or PIL, when the checkpoint records it), cropped as the loader
evaluates, encrypted with the key and classified. The key must be the one the model was trained
with (its fingerprint is checked against the checkpoint's); a model trained on plain shards is
run without --key. Errors (wrong key, missing or undecodable file, missing checkpoint) print
one line starting "predict: error:" and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline import paths
from pipeline.cipher.keys import KeyFileError
from pipeline.device import DEVICE_CHOICES
from pipeline.model.checkpoint import CheckpointError
from pipeline.model.classifier import ImageFileError, ProtectedClassifier
from pipeline.offline.decode import DEFAULT_MAX_PIXELS

logger = logging.getLogger("predict")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files to classify")
    parser.add_argument(
        "--checkpoint",
        default=paths.CHECKPOINT,
        help=f"the trained model's checkpoint.pt (default {paths.CHECKPOINT})",
    )
    parser.add_argument(
        "--key", help="the key file the model was trained with (leave out for a plain model)"
    )
    parser.add_argument(
        "--topk",
        type=positive_int,
        default=5,
        help="classes to show per image (default 5; at most the number of classes)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument(
        "--device", default="auto", help=f"{DEVICE_CHOICES} (auto: CUDA when there)"
    )
    parser.add_argument(
        "--max-pixels",
        type=positive_int,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse larger images before decoding them (default {DEFAULT_MAX_PIXELS})",
    )
    return parser


def table(paths: list[str], results: list[list[tuple[str, float]]]) -> str:
    lines = []
    for path, top in zip(paths, results, strict=True):
        lines += [path, "  rank  probability  class"]
        lines += [f"  {rank:4d}  {100 * p:10.2f}%  {name}" for rank, (name, p) in enumerate(top, 1)]
    return "\n".join(lines) + "\n"


def as_json(clf: ProtectedClassifier, paths: list[str], results: list) -> str:
    return json.dumps({
        "checkpoint": clf.checkpoint,
        "key_fingerprint": clf.key_fingerprint,
        "predictions": [
            {"file": path, "top": [{"class": name, "probability": p} for name, p in top]}
            for path, top in zip(paths, results, strict=True)
        ],
    }, indent=1) + "\n"  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        clf = ProtectedClassifier.load(args.checkpoint, args.key, device=args.device)
        results = clf.predict_files(
            args.images, k=args.topk, batch_size=args.batch_size, max_pixels=args.max_pixels
        )
    except (CheckpointError, KeyFileError, ImageFileError, ValueError, OSError) as exc:
        logger.error("predict: error: %s", exc)
        return 2
    out = as_json(clf, args.images, results) if args.json else table(args.images, results)
    print(out, end="", flush=True)
    logger.info(
        "predict: %d image(s), key %s, on %s",
        len(args.images),
        clf.key_fingerprint or "none (plain model)",
        clf.device,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
