"""One writer per output: ``OUT/_lock.json``, held by a live make_shards run.

The lock names its holder (host, pid, start time, torchrun run id) and is created atomically
(locally a hard link from a complete temporary file; on S3 a conditional PUT,
``If-None-Match: *``). The holder rewrites it every ``REFRESH_S`` seconds and removes it when
done. Another run into the same output is refused with the holder named, unless the lock is
stale:

- its pid is not running on this host (a killed run: taken over, with a warning);
- it belongs to this same torchrun job (``TORCHELASTIC_RUN_ID``: a restarted worker group),
  only when that id is unique: torchrun's default rendezvous id is ``"none"``, shared by every
  job started without ``--rdzv-id``, so ``"none"`` (or no id) never counts as the same job;
- it was not refreshed for ``STALE_AFTER_S`` seconds (a run on another host that died): refused,
  with how to take over (``--force-unlock``), since a paused run elsewhere cannot be told apart.

``--force-unlock`` takes over any lock; the run that loses its lock notices at its next refresh
or shard and stops. A lock file that is not valid JSON object is refused, naming the file.

The lock records the host name and pid on purpose, also in an S3 bucket after a crash: the pid
is what lets a run on the same host recognise a killed holder, and the host name is what a user
needs to find a live one. Nothing else about the machine is recorded.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Any

from pipeline.cli import one_line
from pipeline.errors import KeyprotectError
from pipeline.storage import Storage

logger = logging.getLogger(__name__)

LOCK_NAME = "_lock.json"
REFRESH_S = 30.0
STALE_AFTER_S = 600.0
SHARED_RUN_IDS = frozenset({"", "none"})  # torchrun's default --rdzv-id: not one job's own


class OutputLockError(KeyprotectError, RuntimeError):
    """The output is held by another run (or this run lost it); the message names the holder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


class OutputLock:
    """Hold ``LOCK_NAME`` in ``storage`` for this run (a context manager)."""

    def __init__(self, storage: Storage, *, run_id: str | None = None, force: bool = False):
        self.storage, self.run_id, self.force = storage, run_id, force
        self.holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "run_id": run_id,
            "token": secrets.token_hex(8),
        }
        self.lost: str | None = None  # why this run no longer holds the lock
        self.lost_event = threading.Event()  # set when ``lost`` is
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.release()
            return
        try:  # the run is failing already: its error is the one to report
            self.release()
        except Exception as again:  # noqa: BLE001 - e.g. the store that failed the run
            logger.warning(
                "could not remove %s (%s); a rerun on this host takes it over",
                self.storage.uri(LOCK_NAME),
                one_line(str(again)),
            )

    def _data(self) -> bytes:
        return (json.dumps(self.holder, sort_keys=True) + "\n").encode()

    def _read(self) -> dict | None:
        """The holder; ``{}`` when the file is not a JSON object (not a make_shards lock)."""
        try:
            holder = json.loads(self.storage.read_bytes(LOCK_NAME))
        except FileNotFoundError:
            return None
        except ValueError:  # also UnicodeDecodeError
            return {}
        return holder if isinstance(holder, dict) else {}

    def acquire(self) -> None:
        for _ in range(3):  # a holder may release between our attempt and our read
            if self.storage.create(LOCK_NAME, self._data()):
                break
            other = self._read()
            if other is None:
                continue
            self._take_over_or_refuse(other)
            self.storage.write_bytes(LOCK_NAME, self._data())
            break
        else:
            raise OutputLockError(f"{self.storage.uri(LOCK_NAME)}: could not take the lock")
        self._thread = threading.Thread(target=self._refresh, name="out-lock", daemon=True)
        self._thread.start()

    def _take_over_or_refuse(self, other: dict) -> None:
        where = self.storage.uri(LOCK_NAME)
        who = describe(other)
        age = self._age()
        if self.force:
            logger.warning("%s: taking over the lock of %s (--force-unlock)", where, who)
            return
        if not other:
            raise OutputLockError(
                f"{where}: not a make_shards lock (not a JSON object with a holder). If no run "
                "is writing this output, delete that file or pass --force-unlock"
            )
        if self.run_id not in SHARED_RUN_IDS | {None} and other.get("run_id") == self.run_id:
            logger.info("%s: taking over the lock of this torchrun job's earlier attempt", where)
            return
        if other.get("host") == socket.gethostname() and not _pid_alive(int(other.get("pid", 0))):
            logger.warning(
                "%s: taking over the stale lock of %s (that process is gone)", where, who
            )
            return
        if age is not None and age > STALE_AFTER_S:
            raise OutputLockError(
                f"{where}: held by {who}, not refreshed for {age:.0f} s (a live run refreshes it "
                f"every {REFRESH_S:.0f} s), so that run is probably dead. If no run is writing "
                "this output, take over with --force-unlock (or delete the lock file)"
            )
        raise OutputLockError(
            f"{where}: another make_shards run is writing this output: {who}"
            + ("" if age is None else f", last refreshed {age:.0f} s ago")
            + ". Wait for it to finish, or choose another --out; a restarted torchrun job is "
            "recognised only when started with a unique --rdzv-id (the default id 'none' is "
            "shared by every job); if that run is dead, pass --force-unlock"
        )

    def _age(self) -> float | None:
        try:
            modified = self.storage.modified(LOCK_NAME)
        except (OSError, NotImplementedError):
            return None
        return time.time() - modified

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_S):
            try:
                current = self._read()
                if current is None or current.get("token") != self.holder["token"]:
                    self.lost = f"taken over by {describe(current or {})}"
                    self.lost_event.set()
                    return
                self.storage.write_bytes(LOCK_NAME, self._data())
            except OSError as exc:
                logger.warning(
                    "%s: could not refresh the lock (%s)", self.storage.uri(LOCK_NAME), exc
                )

    def check(self) -> None:
        """Raise ``OutputLockError`` if another run took this run's lock."""
        if self.lost:
            raise OutputLockError(
                f"{self.storage.uri(LOCK_NAME)}: this run's lock was {self.lost}; stopping so that "
                "two runs never write one output. Finished shards are kept"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            current = self._read()
            if current is not None and current.get("token") == self.holder["token"]:
                self.storage.remove(LOCK_NAME)


def describe(holder: dict) -> str:
    if not holder:
        return "an unknown holder (unreadable lock)"
    text = f"host {holder.get('host')} pid {holder.get('pid')}, started {holder.get('started')}"
    text += f", torchrun run {holder['run_id']}" if holder.get("run_id") else ""
    return one_line(text)  # the lock file is anyone's text: no forged log lines
