"""The embedded default data set: scikit-learn's handwritten digits as an ImageNet-style tree.

``load_digits`` ships 1,797 real 8x8 digits inside scikit-learn. They are written out once as
``ROOT/{train,val}/{0..9}/NNNN.png`` (upscaled bilinearly, 3 channels), so that the embedded
default goes through exactly the code path ImageNet does. Every fifth image of each class (in
scikit-learn's order) is validation; the rest is training.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

DIGITS_TREE_VERSION = 1
VAL_EVERY = 5


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "keyprotect"


def write_digits_tree(root: str | os.PathLike | None = None, *, size: int = 64) -> Path:
    """Write the digits tree under ``root`` (default: the user cache) unless already complete.

    The tree appears atomically: it is built in a temporary folder and renamed into place.
    """
    root = Path(root) if root is not None else default_cache_dir() / f"digits-{size}"
    marker = root / "DONE.json"
    if marker.exists():
        return root
    from sklearn.datasets import load_digits

    digits = load_digits()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        seen = np.zeros(10, int)
        for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
            split = "val" if seen[label] % VAL_EVERY == VAL_EVERY - 1 else "train"
            seen[label] += 1
            gray = Image.fromarray((image * (255.0 / 16.0)).round().astype(np.uint8))
            rgb = gray.resize((size, size), Image.Resampling.BILINEAR).convert("RGB")
            folder = tmp / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            rgb.save(folder / f"{i:04d}.png", optimize=False)
        info = {"version": DIGITS_TREE_VERSION, "size": size, "images": len(digits.images)}
        (tmp / "DONE.json").write_text(json.dumps(info) + "\n")
        if marker.exists():  # another process (e.g. a torchrun rank) finished it meanwhile
            return root
        if root.exists():  # an incomplete earlier attempt (no marker): replace it
            shutil.rmtree(root)
        try:
            os.replace(tmp, root)
        except OSError:  # a non-empty folder got there first: fine if it is complete
            if not marker.exists():
                raise
            return root
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "wrote the embedded digits tree (%d images, %dx%d) to %s",
        len(digits.images),
        size,
        size,
        root,
    )
    return root
