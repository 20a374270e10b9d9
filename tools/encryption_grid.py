"""Encrypt a few real images and save a PNG grid: plain | encrypted | decrypted.

    python tools/encryption_grid.py --key k.bin --out runs/demo/encryption_grid.png
    python tools/encryption_grid.py --key k.bin --owner-key --out private/grid.png

The images are scikit-learn's two sample photos and a few of its handwritten digits (the
embedded default data set), resized to a multiple of the key's block size. A fourth column
decrypts with a freshly generated wrong key of the same scheme, to show what an attacker sees.

By default the images are encrypted with an *illustration key*: a fresh random key of the
scheme ``--key`` names (block size and transforms), made in memory and never saved; the
figure's title says so. Plain images beside their encryptions are known plaintext, and one
such pair gives the whole key away, so a figure under the owner's key would publish it.
``--owner-key`` draws with the owner's key instead (to check that very key); the PNG is then
written with mode 0600, and is as secret as the key file.
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np
from PIL import Image

from pipeline import Key, cli, decrypt, encrypt, load_key
from pipeline.viz import save_image_grid

logger = logging.getLogger("encryption_grid")


def _round_up(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def sample_images(photo_size: int, digit_size: int, n_digits: int) -> list[tuple[str, np.ndarray]]:
    """scikit-learn's sample photos (centre-cropped) and digits, as uint8 RGB arrays."""
    from sklearn.datasets import load_digits, load_sample_images

    photos = load_sample_images()
    out = []
    for name, img in zip(photos.filenames, photos.images, strict=True):
        h, w = img.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        crop = Image.fromarray(img[top : top + side, left : left + side])
        resized = crop.resize((photo_size, photo_size), Image.Resampling.BILINEAR)
        out.append((name.rsplit("/", 1)[-1], np.asarray(resized)))
    digits = load_digits()
    for i in range(n_digits):
        gray = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
        big = Image.fromarray(gray).resize((digit_size, digit_size), Image.Resampling.BILINEAR)
        out.append((f"digit {digits.target[i]}", np.asarray(big.convert("RGB"))))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser(__doc__)
    parser.add_argument("--key", required=True, help="key file (from tools/make_key.py)")
    parser.add_argument("--out", default="runs/demo/encryption_grid.png", help="PNG to write")
    parser.add_argument("--digits", type=int, default=3, help="how many digits to show")
    parser.add_argument(
        "--owner-key",
        action="store_true",
        help="encrypt with the key file's own key, not a fresh illustration key of its scheme; "
        "the PNG then gives the key away and is written with mode 0600",
    )
    return parser


def encryption_grid(key_file: str, out: str, *, digits: int, owner_key: bool = False) -> int:
    """Write the grid; 0 when every image decrypts back exactly, else 1.

    The key file supplies the scheme; the images are encrypted with a fresh illustration key of
    that scheme (never saved) unless ``owner_key``, when the PNG is written with mode 0600.
    """
    owner = load_key(key_file)
    if owner_key:
        key, perm = owner, 0o600
        title = f"owner's key {owner.fingerprint}: this figure gives the key away"
        logger.warning(
            "--owner-key: %s shows plain images beside their encryptions under key %s, from "
            "which the key can be read back; writing it with mode 0600: keep it as secret as "
            "the key file",
            out,
            owner.fingerprint,
        )
    else:
        key, perm = Key.generate(owner.block_size, owner.transforms), 0o644
        title = "illustration key, not yours (a fresh random key of the same scheme)"
    m = key.block_size
    images = sample_images(_round_up(224, m), _round_up(64, m), digits)
    wrong = Key.generate(key.block_size, key.transforms)
    rows, exact = [], 0
    for _, img in images:
        enc = encrypt(img, key)
        dec = decrypt(enc, key)
        exact += int(np.array_equal(dec, img))
        rows.append([img, enc, dec, decrypt(enc, wrong)])
    save_image_grid(
        rows,
        out,
        col_titles=["plain", f"encrypted (M={m})", "decrypted, key", "decrypted, wrong key"],
        row_titles=[name for name, _ in images],
        title=title,
        perm=perm,
    )
    logger.info(
        "wrote %s: %d images encrypted with %s (M=%d, %s); decrypt(encrypt(x)) == x "
        "exactly for %d/%d",
        out,
        len(images),
        f"the owner's key {owner.fingerprint}" if owner_key else "an illustration key, not yours",
        m,
        "+".join(key.transforms),
        exact,
        len(images),
    )
    return 0 if exact == len(images) else 1


def main(argv: list[str] | None = None) -> int:
    cli.setup_logging()
    args = build_parser().parse_args(argv)
    return cli.run(
        "encryption_grid",
        lambda: encryption_grid(args.key, args.out, digits=args.digits, owner_key=args.owner_key),
    )


if __name__ == "__main__":
    sys.exit(main())
