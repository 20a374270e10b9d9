"""One writer per output: the lock refuses a live holder, recognises stale ones, and notices a
take-over; locally and on a loopback S3 server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from pipeline.offline import outlock
from pipeline.offline.outlock import LOCK_NAME, OutputLock, OutputLockError
from pipeline.storage import Storage


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_holder(storage: Storage, **holder) -> None:
    storage.write_bytes(LOCK_NAME, json.dumps(holder).encode())


def test_a_live_holder_is_refused_by_name_then_released(tmp_path):
    storage = Storage(tmp_path)
    with OutputLock(storage) as first:
        held = json.loads((tmp_path / LOCK_NAME).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(OutputLockError, match=f"another make_shards run.*pid {os.getpid()}"):
            OutputLock(storage).acquire()
        first.check()  # still ours
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_dead_pid_on_this_host_is_taken_over(tmp_path, caplog):
    storage = Storage(tmp_path)
    write_holder(storage, host=socket.gethostname(), pid=dead_pid(), started="x", token="t")
    with OutputLock(storage):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text


def test_an_old_lock_from_another_host_needs_force_unlock(tmp_path):
    storage = Storage(tmp_path)
    write_holder(storage, host="node-7", pid=1234, started="2026-01-01T00:00:00", token="t")
    old = time.time() - 2 * outlock.STALE_AFTER_S
    os.utime(tmp_path / LOCK_NAME, (old, old))
    with pytest.raises(OutputLockError, match="node-7 pid 1234.*probably dead.*--force-unlock"):
        OutputLock(storage).acquire()
    write_holder(storage, host="node-7", pid=1234, started="2026-01-01T00:00:00", token="t")
    with pytest.raises(OutputLockError, match="node-7.*last refreshed"):  # fresh: a live run
        OutputLock(storage).acquire()
    with OutputLock(storage, force=True):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_the_same_torchrun_job_takes_over_its_own_lock(tmp_path):
    storage = Storage(tmp_path)
    write_holder(storage, host="node-7", pid=1234, started="x", run_id="job-1", token="t")
    with pytest.raises(OutputLockError):
        OutputLock(storage, run_id="job-2").acquire()
    with OutputLock(storage, run_id="job-1"):
        pass


@pytest.mark.parametrize("run_id", ["none", "", None])
def test_another_job_without_a_unique_rdzv_id_is_refused(tmp_path, run_id):
    """torchrun's default rendezvous id is "none": two jobs share it, so it proves nothing."""
    storage = Storage(tmp_path)
    write_holder(storage, host="node-7", pid=1234, started="x", run_id=run_id, token="t")
    with pytest.raises(OutputLockError, match="node-7 pid 1234.*unique --rdzv-id.*--force-unlock"):
        OutputLock(storage, run_id=run_id).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == 1234  # left as it was


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_a_malformed_lock_file_is_named_with_what_to_do(tmp_path, content):
    storage = Storage(tmp_path)
    (tmp_path / LOCK_NAME).write_bytes(content)
    with pytest.raises(OutputLockError) as caught:
        OutputLock(storage).acquire()
    message = str(caught.value)
    assert LOCK_NAME in message and "not a make_shards lock" in message
    assert "--force-unlock" in message and "\n" not in message
    with OutputLock(storage, force=True):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_holder_that_loses_its_lock_notices(tmp_path, monkeypatch):
    monkeypatch.setattr(outlock, "REFRESH_S", 0.05)
    storage = Storage(tmp_path)
    with OutputLock(storage) as first:
        with OutputLock(storage, force=True):
            assert first.lost_event.wait(timeout=10)  # its refresher saw the new holder
            with pytest.raises(OutputLockError, match="taken over by host"):
                first.check()
        assert not (tmp_path / LOCK_NAME).exists()  # released by the new holder only


def test_s3_lock_is_exclusive(s3_env):
    storage = Storage(f"s3://{s3_env}/out")
    with OutputLock(storage):
        assert storage.exists(LOCK_NAME)
        with pytest.raises(OutputLockError, match="another make_shards run"):
            OutputLock(storage).acquire()
    assert not storage.exists(LOCK_NAME)


def test_a_holder_name_cannot_forge_a_line(tmp_path):
    storage = Storage(tmp_path)
    write_holder(storage, host="node-7\nINFO done", pid=1234, started="x", token="t")
    with pytest.raises(OutputLockError) as caught:
        OutputLock(storage).acquire()
    assert "\n" not in str(caught.value) and "node-7\\nINFO done" in str(caught.value)
