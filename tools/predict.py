"""Authorized inference: classify ordinary image files with a protected model and its key.

    python tools/predict.py --key k.bin --checkpoint runs/protected/checkpoint.pt \\
        a.jpg b.png                                               # top-5 table per image
    python tools/predict.py --key k.bin --checkpoint CKPT --topk 3 --json *.png

Each image is decoded, resized and cropped as make_shards.py stored the training images (with
the same decoder, DALI or PIL, when the checkpoint records it), cropped as the loader
evaluates, encrypted with the key and classified. The key must be the one the model was trained
with (its fingerprint is checked against the checkpoint's); a model trained on plain shards is
run without --key. Errors (wrong key, missing or undecodable file, missing checkpoint) print
one line starting "predict: error:" and exit with code 2. A file whose size is far from the
training images' (shorter side under half, or longer side over 4x, the stored side) gets a
"note:" line under its name: the model has never seen anything like it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline import cli, paths
from pipeline.device import DEVICE_CHOICES
from pipeline.model.classifier import ProtectedClassifier
from pipeline.offline.decode import DEFAULT_MAX_PIXELS

logger = logging.getLogger("predict")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser(__doc__)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files to classify")
    parser.add_argument(
        "--checkpoint",
        default=paths.CHECKPOINT,
        help="the trained model's checkpoint.pt",
    )
    parser.add_argument(
        "--key", help="the key file the model was trained with (leave out for a plain model)"
    )
    parser.add_argument(
        "--topk",
        type=positive_int,
        default=5,
        help="classes to show per image (at most the number of classes)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--batch-size", type=positive_int, default=64, help="images decoded and classified at once"
    )
    parser.add_argument(
        "--device", default="auto", help=f"{DEVICE_CHOICES} (auto: CUDA when there)"
    )
    parser.add_argument(
        "--max-pixels",
        type=positive_int,
        default=DEFAULT_MAX_PIXELS,
        help="refuse larger images (width x height) before decoding them",
    )
    return parser


def table(
    paths: list[str], results: list[list[tuple[str, float]]], remarks: list[str | None]
) -> str:
    lines = []
    for path, top, remark in zip(paths, results, remarks, strict=True):
        lines += [cli.one_line(path)]
        if remark:
            lines += [f"  note: {remark}"]
        lines += ["  rank  probability  class"]
        lines += [
            f"  {rank:4d}  {100 * p:10.2f}%  {cli.one_line(name)}"
            for rank, (name, p) in enumerate(top, 1)
        ]
    return "\n".join(lines) + "\n"


def as_json(
    clf: ProtectedClassifier, paths: list[str], results: list, remarks: list[str | None]
) -> str:
    return json.dumps({
        "checkpoint": clf.checkpoint,
        "key_fingerprint": clf.key_fingerprint,
        "predictions": [
            {"file": path, "top": [{"class": name, "probability": p} for name, p in top],
             **({"note": remark} if remark else {})}
            for path, top, remark in zip(paths, results, remarks, strict=True)
        ],
    }, indent=1) + "\n"  # fmt: skip


def predict(
    images: list[str],
    *,
    checkpoint: str,
    key: str | None,
    device: str,
    topk: int,
    batch_size: int,
    max_pixels: int,
    as_json_output: bool,
) -> None:
    clf = ProtectedClassifier.load(checkpoint, key, device=device)
    results = clf.predict_files(images, k=topk, batch_size=batch_size, max_pixels=max_pixels)
    remarks = clf.remarks(images)
    if as_json_output:
        out = as_json(clf, images, results, remarks)
    else:
        out = table(images, results, remarks)
    print(out, end="", flush=True)
    far = sum(r is not None for r in remarks)
    logger.info(
        "predict: %d image(s), key %s, on %s%s",
        len(images),
        clf.key_fingerprint or "none (plain model)",
        clf.device,
        f"; {far} far from the training images (see their notes)" if far else "",
    )


def main(argv: list[str] | None = None) -> int:
    cli.setup_logging()
    args = build_parser().parse_args(argv)
    return cli.run(
        "predict",
        lambda: predict(
            args.images,
            checkpoint=args.checkpoint,
            key=args.key,
            device=args.device,
            topk=args.topk,
            batch_size=args.batch_size,
            max_pixels=args.max_pixels,
            as_json_output=args.json,
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
