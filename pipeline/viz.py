"""Figures users look at: grids of images (plain, encrypted, decrypted)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_open

logger = logging.getLogger(__name__)


def save_image_grid(
    rows: Sequence[Sequence[np.ndarray]],
    path: str | os.PathLike,
    *,
    col_titles: Sequence[str] = (),
    row_titles: Sequence[str] = (),
    cell_inches: float = 1.8,
    title: str | None = None,
    perm: int = 0o644,
) -> Path:
    """Save uint8 HWC images laid out as ``rows`` (a list of rows) to a PNG, atomically,
    with file mode ``perm`` (0o600 for a figure that shows a secret)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(cell_inches * n_cols, cell_inches * n_rows), squeeze=False
    )
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(row):
                ax.imshow(row[j], interpolation="nearest")
            else:
                ax.axis("off")
            if i == 0 and j < len(col_titles):
                ax.set_title(col_titles[j], fontsize=9)
            if j == 0 and i < len(row_titles):
                ax.set_ylabel(row_titles[i], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_open(path, perm=perm) as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)
    return Path(path)
