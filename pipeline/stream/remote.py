"""Remote shard files that survive dropped connections (any fsspec URL: s3://, gs://, ...)."""

from __future__ import annotations

import contextlib
import io
import logging
import time
from typing import BinaryIO

from pipeline.storage import (
    Storage,
    connection_errors,
    filesystem,
    storage_timeout,
    unreachable,
)

logger = logging.getLogger(__name__)


class ResumableFile(io.RawIOBase):
    """A read-only fsspec file that survives dropped connections: on an I/O error it reopens
    the object and continues from the byte where it broke, with backoff, ``retries`` times,
    for at most twice the storage timeout; then one ``StorageError`` naming the object."""

    def __init__(self, url: str, *, start: int = 0, retries: int = 5, backoff: float = 0.5) -> None:
        self.url, self.retries, self.backoff = url, retries, backoff
        self.fs, self.path = filesystem(url)
        self.position = start
        self.reopened = 0
        try:
            self._file = self._open()
        except connection_errors() as exc:  # the store stalls or refuses before the first read
            raise unreachable(url, exc) from None

    def _open(self):
        f = self.fs.open(self.path, "rb", block_size=8 << 20, cache_type="readahead")
        if self.position:
            f.seek(self.position)
        return f

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        deadline = None
        for attempt in range(self.retries + 1):
            try:
                data = self._file.read(len(buffer))
                break
            except Exception as exc:  # the transports raise many types; all mean "try again"
                now = time.monotonic()
                deadline = deadline or now + 2 * storage_timeout()
                if attempt == self.retries or now >= deadline:
                    raise unreachable(f"{self.url} (at byte {self.position})", exc) from None
                logger.warning("%s: %s at byte %d; reopening", self.url, exc, self.position)
                time.sleep(self.backoff * 2**attempt)
                with contextlib.suppress(Exception):  # the connection is gone anyway
                    self._file.close()
                self.fs.invalidate_cache()
                try:
                    self._file = self._open()
                except Exception as again:  # noqa: BLE001 - the next read tries again
                    logger.debug("%s: reopening failed: %s", self.url, again)
                self.reopened += 1
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)

    def close(self) -> None:
        self._file.close()
        super().close()


def open_remote(url: str, *, start: int = 0) -> io.BufferedReader:
    """``url`` opened for buffered reading from byte ``start``, with reconnects."""
    return io.BufferedReader(ResumableFile(url, start=start), buffer_size=1 << 20)


def open_shard(storage: Storage, name: str, *, start: int = 0) -> BinaryIO:
    """Shard ``name`` of ``storage`` for streaming from byte ``start`` of what is at rest: a
    local file, or the reconnecting remote reader; on a sealed output, opened (and
    authenticated segment by segment) through its sealer, from ``start`` = 0."""
    if storage.is_local:
        f: BinaryIO = open(storage.path(name), "rb")  # noqa: SIM115 - closed by the caller
        f.seek(start)
    else:
        f = open_remote(storage.uri(name), start=start)
    return f if storage.sealer is None else storage.sealer.reader(name, f)
