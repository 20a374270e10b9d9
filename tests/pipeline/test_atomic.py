"""Atomic writes: complete or absent, the old file kept, and a failed write names its file."""

from __future__ import annotations

import resource
import signal

import pytest

from pipeline.atomic import atomic_open, atomic_write


@pytest.fixture
def small_file_limit():
    """Files over 1 kB fail with EFBIG, the write error a full disk gives as ENOSPC."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))
    yield
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, handler)


def test_a_failed_write_names_the_file_and_keeps_the_old_one(tmp_path, small_file_limit):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="File too large") as info:
        atomic_write(target, b"x" * 4096)
    assert info.value.filename == str(target)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_an_error_in_the_block_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_open(tmp_path / "a.json", "w") as f:
        f.write("half")
        raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []


def test_exclusive_refuses_an_existing_name_and_perm_is_set(tmp_path):
    atomic_write(tmp_path / "k.bin", b"1", perm=0o600, exclusive=True)
    with pytest.raises(FileExistsError):
        atomic_write(tmp_path / "k.bin", b"2", exclusive=True)
    assert (tmp_path / "k.bin").read_bytes() == b"1"
    assert (tmp_path / "k.bin").stat().st_mode & 0o777 == 0o600
