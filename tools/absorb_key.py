"""Absorb a key into a plain isotropic model: a protected model with no training at all.

    python tools/absorb_key.py --checkpoint runs/vit-plain/checkpoint.pt --key k8.bin \\
        --out runs/vit-absorbed.pt
    torchrun train/ddp.py --data shards-k8 --init checkpoint \\
        --init-checkpoint runs/vit-absorbed.pt ...                # fine-tune it (no key needed)

The model's first layer must be a linear patch embedding (ViT, DeiT, ConvMixer, MLP-Mixer:
a Conv2d with kernel = stride = P) and the key's block size must be P. Pixel shuffling and
negative/positive are then a permutation and a sign change of that layer's inputs, so its
weights and bias are rewritten to take them: the written model, on images encrypted with the
key, gives what the plain model gave on the plain images (checked here on random images). FFX
is not linear and is refused. The output is a train/ddp.py checkpoint (mode 0600) carrying
the key's fingerprint, never the key. Errors print one line starting "absorb_key: error:" and
exit with code 2.

Security cost: whoever holds the written model and the plain weights it came from (for a
public pre-trained model, everyone) recovers the key by matching the two patch embeddings
(`python -m attacks --scenarios weight_matching --reference ...`).
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from pathlib import Path

from pipeline import cli
from pipeline.cipher.keys import load_key
from pipeline.model.checkpoint import Checkpoint
from pipeline.model.patch import PatchAlignmentError, absorb_checkpoint

logger = logging.getLogger("absorb_key")

# float32 rounding through a few layers; a wrong absorption is off by whole units
TOLERANCE = 1e-3


def build_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="a plain model's checkpoint.pt")
    parser.add_argument("--key", required=True, help="key file (block size = patch size)")
    parser.add_argument("--out", required=True, help="the protected checkpoint to write")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    return parser


def absorb(checkpoint: str, key_file: str, out: str, *, force: bool) -> None:
    """Write the protected checkpoint ``out``: ``checkpoint``'s model with the key absorbed."""
    out_path = Path(out)
    if out_path.exists() and not force:
        raise FileExistsError(
            errno.EEXIST, "exists; choose another --out or pass --force to replace it", out
        )
    key = load_key(key_file)
    saved = Checkpoint.load(checkpoint)
    absorbed, summary = absorb_checkpoint(saved, key, source=checkpoint)
    if not summary["max_logit_error"] < TOLERANCE:
        raise PatchAlignmentError(
            f"{checkpoint}: the absorbed model differs from the plain one by up to "
            f"{summary['max_logit_error']:.3g} in its logits; not written"
        )
    absorbed.save(out_path)
    logger.info(
        "absorb_key: key %s (block size %d, %s) absorbed into %s of %s; largest logit change "
        "on encrypted random images %.1e; wrote %s",
        key.fingerprint, key.block_size, "+".join(key.transforms), summary["layer"],
        saved.model_name, summary["max_logit_error"], out_path,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    cli.setup_logging()
    args = build_parser().parse_args(argv)
    return cli.run(
        "absorb_key", lambda: absorb(args.checkpoint, args.key, args.out, force=args.force)
    )


if __name__ == "__main__":
    sys.exit(main())
