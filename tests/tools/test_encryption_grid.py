"""tools/encryption_grid.py: the demo's picture of plain, encrypted and decrypted images."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tools.encryption_grid as grid
from attacks.keyspace import key_recovery
from attacks.known_plaintext import solve_key
from pipeline import Key, apply_op, encrypt, save_key

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
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


@pytest.fixture
def drawn(monkeypatch):
    """The grid's rows and options as the tool hands them to ``save_image_grid``, and every
    key the tool generates."""
    calls: list[dict] = []
    made: list[Key] = []
    real_save, real_generate = grid.save_image_grid, Key.generate

    def save(rows, path, **kwargs):
        calls.append({"rows": rows, **kwargs})
        return real_save(rows, path, **kwargs)

    def generate(*args, **kwargs):
        made.append(real_generate(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(grid, "save_image_grid", save)
    monkeypatch.setattr(Key, "generate", generate)
    return calls, made


def test_the_default_figure_does_not_show_the_owners_key(tmp_path, drawn):
    """The figure is known plaintext: what it gives away is the illustration key, not the
    owner's (the solver reads a key back from it, and that key is not the owner's)."""
    calls, made = drawn
    owner = Key.generate(block_size=8)
    save_key(owner, tmp_path / "k.bin")
    assert grid.main(["--key", str(tmp_path / "k.bin"), "--out", str(tmp_path / "g.png")]) == 0
    (call,) = calls
    assert "illustration key, not yours" in call["title"] and call["perm"] == 0o644
    illustration = made[1]  # made[0] is the owner's, made[2] the wrong-key column's
    assert illustration.secret != owner.secret
    assert (illustration.block_size, illustration.transforms) == (8, owner.transforms)
    for plain, shown, *_ in call["rows"]:
        assert np.array_equal(shown, encrypt(plain, illustration))
        assert not np.array_equal(shown, encrypt(plain, owner))
    photos = [row for row in call["rows"] if row[0].shape[0] == 224]
    plain, shown = (np.stack([row[i] for row in photos]) for i in (0, 1))
    read_back = solve_key(plain, shown, 8, owner.transforms).op
    assert np.array_equal(apply_op(plain, read_back), shown)  # the figure does give a key away
    stolen = key_recovery(read_back, owner.material.encrypt_op, owner.transforms)
    assert stolen.key_recovered < 0.05  # ... but not the owner's: about a random key's 1/L
    shown_key = key_recovery(read_back, illustration.material.encrypt_op, owner.transforms)
    assert shown_key.key_recovered > 0.9


def test_owner_key_figure_is_written_0600_and_says_why(tmp_path, drawn):
    calls, _ = drawn
    owner = Key.generate(block_size=4)
    save_key(owner, tmp_path / "k.bin")
    out = tmp_path / "owner.png"
    out.write_bytes(b"an earlier, public figure")
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "encryption_grid.py"),
            "--key",
            str(tmp_path / "k.bin"),
            "--out",
            str(out),
            "--digits",
            "1",
            "--owner-key",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert "--owner-key" in done.stderr and "mode 0600" in done.stderr
    assert "read back" in done.stderr
    assert grid.main(["--key", str(tmp_path / "k.bin"), "--out", str(out), "--owner-key"]) == 0
    (call,) = calls
    assert call["perm"] == 0o600 and "illustration" not in call["title"]
    for plain, shown, *_ in call["rows"]:
        assert np.array_equal(shown, encrypt(plain, owner))


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
