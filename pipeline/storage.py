"""Where shards go: a local folder or any fsspec URL (s3://, gs://, ...), written atomically.

A file becomes visible under its final name only when complete: locally by ``os.replace`` from a
temporary name in the same folder; on object stores by one upload (a PUT is atomic there).
S3 credentials and endpoint come from the standard AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), so MinIO, moto and AWS all work unchanged.
"""

from __future__ import annotations

import builtins
import logging
import os
import posixpath
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.atomic import atomic_write

if TYPE_CHECKING:
    from pipeline.cipher.seal import Sealer

logger = logging.getLogger(__name__)


class Storage:
    """A folder of named files behind fsspec, with atomic puts.

    With a ``sealer`` (a sealed output, see ``pipeline.shards.sealing``) every object read or
    written through ``read_bytes``, ``write_bytes``, ``create`` and ``open`` is sealed at rest
    and opened on the way in; ``put`` moves a file its writer already sealed.
    """

    def __init__(self, url: str | os.PathLike, *, sealer: Sealer | None = None) -> None:
        self.url = str(url)
        self.sealer = sealer
        self._fs, self.root = fsspec.core.url_to_fs(self.url)
        self._pid = os.getpid()
        self.is_local = isinstance(self._fs, LocalFileSystem)
        self._staging: Path | None = None

    @property
    def fs(self):
        """The fsspec filesystem, made anew in a forked process (async ones are not fork-safe,
        and DataLoader workers are forks)."""
        if os.getpid() != self._pid:
            self._fs, _ = fsspec.core.url_to_fs(self.url)
            self._pid = os.getpid()
        return self._fs

    def path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def uri(self, name: str) -> str:
        """The full URL of ``name`` (what error messages and readers should show)."""
        return self.path(name) if self.is_local else self.fs.unstrip_protocol(self.path(name))

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def size(self, name: str) -> int:
        return int(self.fs.size(self.path(name)))

    def read_bytes(self, name: str) -> bytes:
        data = self.fs.cat_file(self.path(name))
        return data if self.sealer is None else self.sealer.open(name, data)

    def read_raw(self, name: str) -> bytes:
        """The bytes at rest (sealed, on a sealed output)."""
        return self.fs.cat_file(self.path(name))

    def open(self, name: str, mode: str = "rb"):
        """``name`` for reading (its plaintext, on a sealed output) or writing (plain only)."""
        f = self.fs.open(self.path(name), mode)
        if self.sealer is None:
            return f
        if mode != "rb":
            f.close()
            raise ValueError(f"{self.uri(name)}: a sealed output is written by put/write_bytes")
        return self.sealer.reader(name, f)

    def remove(self, name: str) -> None:
        if self.fs.exists(self.path(name)):
            self.fs.rm_file(self.path(name))

    def remove_many(self, names: list[str]) -> None:
        """Remove files (one bulk request on object stores)."""
        if names:
            self.fs.rm([self.path(n) for n in names])

    def list(self) -> builtins.list[str]:
        if not self.fs.exists(self.root):
            return []
        return sorted(posixpath.basename(p) for p in self.fs.ls(self.root, detail=False))

    def list_prefix(self, prefix: str) -> builtins.list[str]:
        """Names (relative to the root) of the files in ``prefix``'s folder that start with it."""
        folder = posixpath.dirname(prefix)
        full = self.path(folder) if folder else self.root
        if not self.fs.exists(full):
            return []
        names = [
            posixpath.join(folder, posixpath.basename(p)) for p in self.fs.ls(full, detail=False)
        ]
        return sorted(n for n in names if n.startswith(prefix))

    def remove_folder_if_empty(self, name: str) -> None:
        full = self.path(name)
        if self.is_local and self.fs.exists(full) and not self.fs.ls(full):
            self.fs.rmdir(full)

    def staging_dir(self) -> Path:
        """A local folder for unfinished files: the output folder itself when local (so the
        final rename is atomic), a private temporary folder otherwise."""
        if self._staging is None:
            if self.is_local:
                self.fs.makedirs(self.root, exist_ok=True)
                self._staging = Path(self.root)
            else:
                self._staging = Path(tempfile.mkdtemp(prefix="keyprotect-staging-"))
        return self._staging

    def staging_path(self, name: str) -> Path:
        """Where ``name`` is written before ``put``: a dot-name beside it, invisible to globs."""
        folder, leaf = posixpath.split(name)
        path = self.staging_dir() / folder / f".{leaf}.partial"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def put(self, local: Path, name: str) -> None:
        """Move a finished local file to ``name``; it appears there complete or not at all."""
        if self.is_local:
            os.replace(local, self.path(name))
        else:
            self.fs.put_file(str(local), self.path(name))
            local.unlink()

    def create(self, name: str, data: bytes) -> bool:
        """Write a small file only if ``name`` does not exist; False if it does. Atomic locally
        (a hard link) and on S3 (a conditional PUT); elsewhere a check, then a write."""
        if self.sealer is not None:
            data = self.sealer.seal(name, data)
        if self.is_local:
            try:
                atomic_write(self.path(name), data, exclusive=True)  # complete, or not there
            except FileExistsError:
                return False
            return True
        try:
            self.fs.pipe_file(self.path(name), data, mode="create")
        except FileExistsError:
            return False
        except TypeError:  # a backend without exclusive writes
            if self.exists(name):
                return False
            self.fs.pipe_file(self.path(name), data)
        return True

    def modified(self, name: str) -> float:
        """When ``name`` was last written (seconds since the epoch, the store's clock)."""
        return self.fs.modified(self.path(name)).timestamp()

    def write_bytes(self, name: str, data: bytes, *, raw: bool = False) -> None:
        """Write a small file atomically (sealed on a sealed output, unless ``raw``)."""
        if self.sealer is not None and not raw:
            data = self.sealer.seal(name, data)
        tmp = self.staging_path(name)
        tmp.write_bytes(data)
        if self.is_local:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        self.put(tmp, name)
