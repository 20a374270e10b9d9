"""tools/encryption_grid.py: the demo's picture of plain, encrypted and decrypted images."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import Key, save_key

ROOT = Path(__file__).resolve().parents[2]


def test_writes_a_grid_and_decrypts_exactly(tmp_path):
    save_key(Key.generate(block_size=8), tmp_path / "k.bin")
    out = tmp_path / "grid.png"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "encryption_grid.py"),
            "--key",
            str(tmp_path / "k.bin"),
            "--out",
            str(out),
            "--digits",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "exactly for 4/4" in done.stderr
    image = np.asarray(Image.open(out))
    assert image.shape[0] > 200 and image.shape[1] > 400
    assert image.std() > 10  # a picture, not a blank canvas


def test_missing_key_is_a_clear_error(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "encryption_grid.py"),
            "--key",
            str(tmp_path / "no.bin"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "not found" in done.stderr and "Traceback" not in done.stderr
