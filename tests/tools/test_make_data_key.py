"""tools/make_data_key.py as a user runs it: a real process, its exit code, output and file."""

from __future__ import annotations

import base64
import json
import stat
import subprocess
import sys
from pathlib import Path

from pipeline.cipher.seal import load_data_key
from tools.make_data_key import build_parser

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_data_key.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_every_option_has_help():
    for action in build_parser()._actions:
        assert action.help, action.dest


def test_make_inspect_refuse(tmp_path):
    path = tmp_path / "data.key"
    made = run(str(path))
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = load_data_key(path)
    assert key.keyset_id in made.stderr
    shown = run(str(path), "--inspect")
    assert shown.returncode == 0 and shown.stdout.strip() == key.keyset_id
    material = json.loads(path.read_text())["key"][0]["keyData"]["value"]
    raw = base64.b64decode(material)
    for text in (made.stdout, made.stderr, shown.stdout, shown.stderr):
        assert material not in text and raw.hex() not in text

    before = path.read_bytes()
    again = run(str(path))
    assert again.returncode == 2
    assert "already exists" in again.stderr and "--force" in again.stderr
    assert path.read_bytes() == before
    assert run(str(path), "--force").returncode == 0
    assert path.read_bytes() != before


def test_missing_file_is_one_line(tmp_path):
    res = run(str(tmp_path / "none.key"), "--inspect")
    assert res.returncode == 2
    assert "make_data_key: error:" in res.stderr and "Traceback" not in res.stderr
