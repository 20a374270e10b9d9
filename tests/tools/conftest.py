"""Fixtures shared by the tools' tests: a JPEG source tree, a key and reference shards."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import Key, save_key
from tests.conftest import FIXED_SECRET, write_jpeg_tree

ROOT = Path(__file__).resolve().parents[2]


def tool(name: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def shard_args(tree: Path, key_file: Path, out: Path | str) -> list[str]:
    return ["--src", str(tree), "--key", str(key_file), "--out", str(out), "--size", "96",
            "--shard-size", "4", "--batch-size", "2", "--decoder", "pil"]  # fmt: skip


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="session")
def tree(tmp_path_factory) -> Path:
    return write_jpeg_tree(
        tmp_path_factory.mktemp("src"), classes=4, train=12, val=4, size=(320, 240)
    )


@pytest.fixture(scope="session")
def key_file(tmp_path_factory) -> Path:
    return save_key(Key(FIXED_SECRET), tmp_path_factory.mktemp("key") / "k.bin")


@pytest.fixture(scope="session")
def reference(tree, key_file, tmp_path_factory) -> Path:
    """The shards of an uninterrupted local run, to compare others with."""
    out = tmp_path_factory.mktemp("reference")
    done = tool("make_shards.py", *shard_args(tree, key_file, out))
    assert done.returncode == 0, done.stderr
    assert "make_shards: 64 images" in done.stderr and "0 rejected" in done.stderr
    return out
