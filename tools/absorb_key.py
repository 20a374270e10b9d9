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
import logging
import sys
from pathlib import Path

from pipeline.cipher.keys import KeyFileError, load_key
from pipeline.model.checkpoint import Checkpoint, CheckpointError
from pipeline.model.patch import PatchAlignmentError, absorb_checkpoint

logger = logging.getLogger("absorb_key")

# float32 rounding through a few layers; a wrong absorption is off by whole units
TOLERANCE = 1e-3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="a plain model's checkpoint.pt")
    parser.add_argument("--key", required=True, help="key file (block size = patch size)")
    parser.add_argument("--out", required=True, help="the protected checkpoint to write")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        out = Path(args.out)
        if out.exists() and not args.force:
            raise FileExistsError(f"{out}: exists; choose another --out or pass --force")
        key = load_key(args.key)
        saved = Checkpoint.load(args.checkpoint)
        absorbed, summary = absorb_checkpoint(saved, key, source=args.checkpoint)
        if not summary["max_logit_error"] < TOLERANCE:
            raise PatchAlignmentError(
                f"{args.checkpoint}: the absorbed model differs from the plain one by up to "
                f"{summary['max_logit_error']:.3g} in its logits; not written"
            )
        absorbed.save(out)
    except (CheckpointError, KeyFileError, PatchAlignmentError, ValueError, OSError) as exc:
        logger.error("absorb_key: error: %s", exc)
        return 2
    logger.info(
        "absorb_key: key %s (block size %d, %s) absorbed into %s of %s; largest logit change "
        "on encrypted random images %.1e; wrote %s",
        key.fingerprint, key.block_size, "+".join(key.transforms), summary["layer"],
        saved.model_name, summary["max_logit_error"], out,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
