"""Writing WebDataset shards reproducibly: GNU tar, fixed metadata, hashed while written.

Per sample, in this order inside the tar: ``KEY.cls`` (ASCII class index), ``KEY.json``
(``{"shape": [H, W, 3], "split": ...}``, plus ``"source"``, the path relative to SRC, in plain
shards only: in encrypted ones a public file name would be known plaintext) and ``KEY.u8`` (the
raw HWC uint8 bytes of the image, encrypted unless the shards are plain). Every member has mtime 0,
owner 0:0 with empty names and mode 0644, so the same samples give byte-identical shards.
GNU format, never PAX (DALI cannot read PAX headers). Each shard also gets a DALI index
(``NAME.idx``, the ``wds2idx`` v1.2 format: a line per sample listing each file's extension,
data offset, size and name) so DALI's reader can seek in remote shards without a scan.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

if TYPE_CHECKING:
    from pipeline.cipher.seal import Sealer

TAR_FORMAT = tarfile.GNU_FORMAT
SAMPLE_EXTENSIONS = ("cls", "json", "u8")
BLOCK = tarfile.BLOCKSIZE
NUL = b"\0"
MAX_NAME = 99  # longer names need GNU long-name headers, which break the offsets below


@dataclass(frozen=True)
class ShardRecord:
    """What the manifest says of one finished shard."""

    name: str
    samples: int
    bytes: int  # the tar's own size and hash (on a sealed output: of the opened shard)
    sha256: str
    sealed_bytes: int | None = None  # the size at rest of a sealed shard

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.sealed_bytes is None:
            del data["sealed_bytes"]
        return data

    @property
    def stored_bytes(self) -> int:
        """The size of the object in storage."""
        return self.bytes if self.sealed_bytes is None else self.sealed_bytes


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def index_name(name: str) -> str:
    """The DALI index file of shard ``name`` (``train-000000.tar`` -> ``train-000000.idx``)."""
    return name[: -len(".tar")] + ".idx" if name.endswith(".tar") else name + ".idx"


def sample_files(image: np.ndarray, label: int, source: str | None, split: str) -> dict[str, bytes]:
    """A sample's files; ``source=None`` (encrypted shards) leaves the source out."""
    meta = {"shape": list(image.shape), "split": split}
    if source is not None:
        meta["source"] = source
    return {
        "cls": str(int(label)).encode("ascii"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
        "u8": np.ascontiguousarray(image, dtype=np.uint8).tobytes(),
    }


@functools.lru_cache(maxsize=1024)
def _header_without_name(size: int) -> tuple[bytes, int]:
    """The GNU header tarfile writes for a member of ``size`` bytes with the writer's metadata
    and an empty name, and its checksum (the sum of its bytes, the checksum field as spaces)."""
    info = tarfile.TarInfo("")
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    header = info.tobuf(tarfile.GNU_FORMAT, tarfile.ENCODING, "surrogateescape")
    return header, int(header[148:154], 8)


def member_header(name: str, size: int) -> bytes:
    """The 512-byte GNU header tarfile writes for member ``name`` of ``size`` bytes (mtime 0,
    0:0, mode 0644): a cached header per size with the name and its checksum put in. tarfile
    builds each header in Python (about 25 us, three per sample), which held the GIL that the
    offline stage's decoding threads need."""
    encoded = name.encode(tarfile.ENCODING, "surrogateescape")
    if len(encoded) > MAX_NAME:
        raise ValueError(f"member name {name!r} is over {MAX_NAME} bytes")
    header, checksum = _header_without_name(size)
    checksum += sum(encoded)
    return b"".join((encoded, header[len(encoded) : 148], b"%06o\0" % checksum, header[155:]))


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, raw: BinaryIO | io.BufferedWriter) -> None:
        self.raw, self.sha256, self.size = raw, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        written = self.raw.write(data)
        written = len(data) if written is None else written
        self.sha256.update(memoryview(data)[:written])
        self.size += written
        return written


class _SyncOnClose(io.RawIOBase):
    """The file under a sealing stream, which closes it: flushed (and, with ``sync``, synced
    to disk) first."""

    def __init__(self, raw: io.BufferedWriter, sync: bool = True) -> None:
        self.raw, self.sync = raw, sync

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self.raw.write(data)

    def close(self) -> None:
        if not self.closed and not self.raw.closed:
            self.raw.flush()
            if self.sync:
                os.fsync(self.raw.fileno())
            self.raw.close()
        super().close()


class ShardWriter:
    """Write one shard to ``path`` (a local file); ``close()`` returns its ``ShardRecord``.

    ``name`` is the shard's final name, recorded in the manifest; the caller moves the file
    there once it is complete, so no partial shard ever carries a final name. With a
    ``sealer`` the tar is sealed as it is written: no plaintext byte reaches the disk.
    ``sync=False`` leaves the file unsynced at ``close()``, for a caller that syncs it later on
    another thread (``Storage.put`` does, before a local file takes its final name).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        name: str,
        *,
        sealer: Sealer | None = None,
        sync: bool = True,
    ) -> None:
        self.path, self.name, self.samples, self.sync = Path(path), name, 0, sync
        self._raw = open(self.path, "wb")  # noqa: SIM115 - closed by close() or abort()
        self._sealed = None
        if sealer is not None:
            self._sealed = sealer.writer(name, _SyncOnClose(self._raw, sync))
        self._hashing = _HashingFile(self._raw if self._sealed is None else self._sealed)
        self.record: ShardRecord | None = None
        self._offset = 0  # where the next header goes
        self._index: list[str] = []

    def write(self, key: str, files: dict[str, bytes]) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        entries = []
        for ext in sorted(files):
            name, size = f"{key}.{ext}", len(files[ext])
            # the bytes tarfile's addfile writes, without its stream mode's 10 kB re-buffering
            # (which made the writer thread the offline stage's limit at ~1,400 img/s)
            self._put(member_header(name, size))
            self._put(files[ext])
            self._put(NUL * (-size % BLOCK))
            entries.append(f"{ext} {self._offset + BLOCK} {size} {name}")
            self._offset += BLOCK + -(-size // BLOCK) * BLOCK  # header + padded data
        self._index.append(" ".join(entries))
        self.samples += 1

    def _put(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self._hashing.write(view) :]

    def _end(self) -> None:
        """The end of archive tarfile writes: two zero blocks, then zeros to a whole record."""
        self._put(NUL * (2 * BLOCK))
        self._put(NUL * (-self._hashing.size % tarfile.RECORDSIZE))

    def index_text(self) -> str:
        """This shard's DALI index (wds2idx v1.2 format)."""
        return f"v1.2 {len(self._index)}\n" + "".join(line + "\n" for line in self._index)

    def close(self) -> ShardRecord:
        if self.record is None:
            self._end()
            if self._sealed is not None:
                self._sealed.close()  # the last segment, then the file flushed and closed
            else:
                self._raw.flush()
                if self.sync:
                    os.fsync(self._raw.fileno())
                self._raw.close()
            self.record = ShardRecord(
                self.name,
                self.samples,
                self._hashing.size,
                self._hashing.sha256.hexdigest(),
                None if self._sealed is None else self.path.stat().st_size,
            )
        return self.record

    def abort(self) -> None:
        """Close and delete the unfinished file."""
        if self._sealed is not None:
            with contextlib.suppress(Exception):  # the file is deleted anyway
                self._sealed.close()
        self._raw.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
