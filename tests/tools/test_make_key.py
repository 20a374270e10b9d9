"""tools/make_key.py as a user runs it: a real process, its exit code, its output and its file."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

from pipeline import load_key
from tests.pipeline.cipher.test_keys import secret_forms

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_key.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_make_and_inspect(tmp_path):
    path = tmp_path / "k.bin"
    made = run(str(path), "--block-size", "8", "--transforms", "np,shuffle")
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = load_key(path)
    assert key.block_size == 8 and key.transforms == ("np", "shuffle")
    assert key.fingerprint in made.stderr

    shown = run("--inspect", str(path))
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["fingerprint"] == key.fingerprint
    assert info["block_size"] == 8 and info["transforms"] == ["np", "shuffle"]
    assert info["permutation"] == key.material.permutation.tolist()
    assert info["np_mask"] == key.material.np_mask.tolist()
    assert info["key_space_log2"]["np"] == 192
    for form in secret_forms(key.secret):
        assert form not in made.stdout + made.stderr + shown.stdout + shown.stderr


def test_defaults_are_m4_all_transforms(tmp_path):
    assert run(str(tmp_path / "k.bin")).returncode == 0
    key = load_key(tmp_path / "k.bin")
    assert key.block_size == 4 and key.transforms == ("shuffle", "np", "ffx")


def test_refuses_to_overwrite_unless_forced(tmp_path):
    path = tmp_path / "k.bin"
    assert run(str(path)).returncode == 0
    before = path.read_bytes()
    again = run(str(path))
    assert again.returncode == 2
    assert "already exists" in again.stderr and "--force" in again.stderr
    assert path.read_bytes() == before
    forced = run(str(path), "--force")
    assert forced.returncode == 0 and path.read_bytes() != before


def test_damaged_key_is_a_clear_error_not_a_traceback(tmp_path):
    path = tmp_path / "k.bin"
    assert run(str(path)).returncode == 0
    data = bytearray(path.read_bytes())
    data[30] ^= 0xFF
    path.write_bytes(bytes(data))
    shown = run("--inspect", str(path))
    assert shown.returncode == 2
    assert "Traceback" not in shown.stderr
    assert str(path) in shown.stderr and "damaged" in shown.stderr


def test_bad_options(tmp_path):
    bad = run(str(tmp_path / "k.bin"), "--transforms", "shuffle,rotate")
    assert bad.returncode == 2 and "rotate" in bad.stderr and "ffx" in bad.stderr
    bad = run(str(tmp_path / "k.bin"), "--block-size", "0")
    assert bad.returncode == 2 and "1..255" in bad.stderr
    assert not (tmp_path / "k.bin").exists()
