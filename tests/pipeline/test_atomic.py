"""Atomic writes: complete or absent, the old file kept, and a failed write names its file."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.atomic import atomic_open, atomic_write


def _small_file_limit() -> None:
    """Files over 1 kB fail with EFBIG, the write error a full disk gives as ENOSPC."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


# The limit is set in a child process: set in pytest's own process it also stops pytest
# writing its report once that passes 1 kB (CI sends the report to a file).
_WRITE_OVER_LIMIT = """
import sys
from pipeline.atomic import atomic_write
try:
    atomic_write(sys.argv[1], b"x" * 4096)
except OSError as error:
    print(error.errno, error.filename, sep="\\n")
"""


def test_a_failed_write_names_the_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"old")
    done = subprocess.run(
        [sys.executable, "-c", _WRITE_OVER_LIMIT, str(target)],
        preexec_fn=_small_file_limit,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str(errno.EFBIG), str(target)]
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
