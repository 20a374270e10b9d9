"""Where shards go: a local folder or any fsspec URL (s3://, gs://, ...), written atomically.

A file becomes visible under its final name only when complete: locally by ``os.replace`` from a
temporary name in the same folder; on object stores by one upload (a PUT is atomic there).
S3 credentials and endpoint come from the standard AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), so MinIO, moto and AWS all work unchanged.

On S3 every request counts (make_shards pays some per shard, and the rest in every run): a
file's existence is one HEAD, a removal one DELETE and a listing by name prefix one LIST, where
s3fs's generic calls add a "folder" probe (a HEAD and a LIST) to each.

A store that does not answer is a :class:`StorageError` naming the object, the endpoint and
what to do, in one line: a lost connection after the client's own retries, and a stalled one
after ``$KEYPROTECT_STORAGE_TIMEOUT`` seconds (default 60) per attempt, about four attempts.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import posixpath
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.atomic import atomic_write
from pipeline.errors import KeyprotectError

if TYPE_CHECKING:
    from pipeline.cipher.seal import Sealer

logger = logging.getLogger(__name__)

TIMEOUT_VAR = "KEYPROTECT_STORAGE_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0


class StorageError(KeyprotectError, OSError):
    """The store did not answer (connection refused or lost, or a stall past the timeout)."""


def storage_timeout() -> float:
    """Seconds a request to an object store may wait for an answer ($KEYPROTECT_STORAGE_TIMEOUT)."""
    text = os.environ.get(TIMEOUT_VAR)
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise StorageError(f"{TIMEOUT_VAR}={text!r}: not a positive number of seconds")
    return value


def storage_options(url: str) -> dict:
    """fsspec options for ``url``: on S3, requests that wait at most the storage timeout, and
    two attempts, so a stalled endpoint ends in a stated time instead of botocore's minutes."""
    if not url.startswith(("s3://", "s3a://")):
        return {}
    timeout = storage_timeout()
    return {
        "config_kwargs": {
            "connect_timeout": timeout,
            "read_timeout": timeout,
            "retries": {"max_attempts": 2, "mode": "standard"},
        }
    }


def filesystem(url: str):
    """``(fs, path)`` for ``url``, with :func:`storage_options`."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options(url))
    if hasattr(fs, "retries"):  # s3fs's own retries, each of botocore's two attempts
        fs.retries = 2
    return fs, path


def connection_errors() -> tuple[type[BaseException], ...]:
    """What the transports raise when a store does not answer (not an ``OSError`` for all)."""
    errors: list[type[BaseException]] = [TimeoutError, ConnectionError]
    with contextlib.suppress(ImportError):
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        errors += [BotoConnectionError, HTTPClientError]
    with contextlib.suppress(ImportError):
        from aiohttp import ClientConnectionError

        errors.append(ClientConnectionError)
    return tuple(errors)


def unreachable(where: str, exc: BaseException) -> StorageError:
    """The one-line error for a store that did not answer about ``where``."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or "the store"
    detail = " ".join(str(exc).split()) or type(exc).__name__
    return StorageError(
        f"{where}: {endpoint} did not answer ({detail}; a request waits {storage_timeout():g} s "
        f"per attempt, ${TIMEOUT_VAR}, over a few attempts); check the endpoint and your "
        "network, then rerun: what was finished is kept"
    )


class Storage:
    """A folder of named files behind fsspec, with atomic puts.

    With a ``sealer`` (a sealed output, see ``pipeline.shards.sealing``) every object read or
    written through ``read_bytes``, ``write_bytes``, ``create`` and ``open`` is sealed at rest
    and opened on the way in; ``put`` moves a file its writer already sealed.
    """

    def __init__(self, url: str | os.PathLike, *, sealer: Sealer | None = None) -> None:
        self.url = str(url)
        self.sealer = sealer
        self._fs, self.root = filesystem(self.url)
        self._pid = os.getpid()
        self.is_local = isinstance(self._fs, LocalFileSystem)
        protocols = self._fs.protocol
        self._s3 = "s3" in (protocols if isinstance(protocols, (tuple, list)) else (protocols,))
        # every call to an async store (s3fs) ends by this deadline, whatever the transport does
        # (a PUT to a stalled endpoint waits forever otherwise): botocore's attempts and s3fs's
        is_async = getattr(self._fs, "async_impl", False)
        self._t = {"timeout": 5 * storage_timeout()} if is_async else {}
        self._staging: Path | None = None

    @property
    def fs(self):
        """The fsspec filesystem, made anew in a forked process (async ones are not fork-safe,
        and DataLoader workers are forks)."""
        if os.getpid() != self._pid:
            self._fs, _ = filesystem(self.url)
            self._pid = os.getpid()
        return self._fs

    @contextlib.contextmanager
    def talking(self, name: str):
        """Turn a store that does not answer about ``name`` into one :class:`StorageError`."""
        if self.is_local:
            yield
            return
        try:
            yield
        except connection_errors() as exc:
            raise unreachable(self.uri(name), exc) from None

    def path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def uri(self, name: str) -> str:
        """The full URL of ``name`` (what error messages and readers should show)."""
        return self.path(name) if self.is_local else self.fs.unstrip_protocol(self.path(name))

    def exists(self, name: str) -> bool:
        """Whether the file ``name`` is there (on S3 one HEAD: a folder is not a file)."""
        with self.talking(name):
            if self._s3 and name:
                return self._head(name)
            return self._there(self.path(name))

    def _there(self, full: str) -> bool:
        """``fs.exists`` without the bare ``except`` of fsspec's generic one, which swallowed
        a Ctrl-C that landed in its ``stat``: the run went on as if never interrupted. s3fs's
        own catches exceptions only."""
        if self._s3:
            return self.fs.exists(full, **self._t)
        try:
            self.fs.info(full, **self._t)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    def _head(self, name: str) -> bool:
        bucket, key, _ = self.fs.split_path(self.path(name))
        try:
            self.fs.call_s3("head_object", getattr(self.fs, "req_kw", {}), Bucket=bucket,
                            Key=key, **self._t)  # fmt: skip
        except FileNotFoundError:
            return False
        return True

    def size(self, name: str) -> int:
        with self.talking(name):
            return int(self.fs.size(self.path(name), **self._t))

    def read_bytes(self, name: str) -> bytes:
        data = self.read_raw(name)
        return data if self.sealer is None else self.sealer.open(name, data)

    def read_raw(self, name: str) -> bytes:
        """The bytes at rest (sealed, on a sealed output)."""
        with self.talking(name):
            return self.fs.cat_file(self.path(name), **self._t)

    def open(self, name: str, mode: str = "rb"):
        """``name`` for reading (its plaintext, on a sealed output) or writing (plain only)."""
        with self.talking(name):
            f = self.fs.open(self.path(name), mode)
        if self.sealer is None:
            return f
        if mode != "rb":
            f.close()
            raise ValueError(f"{self.uri(name)}: a sealed output is written by put/write_bytes")
        return self.sealer.reader(name, f)

    def remove(self, name: str) -> None:
        """Remove ``name`` if it is there (on S3 one DELETE, which succeeds either way)."""
        with self.talking(name):
            if self._s3 or self._there(self.path(name)):
                self.fs.rm_file(self.path(name), **self._t)

    def remove_many(self, names: list[str]) -> None:
        """Remove files (one bulk request on object stores)."""
        if names:
            with self.talking(names[0]):
                self.fs.rm([self.path(n) for n in names], **self._t)

    def list(self) -> builtins.list[str]:
        with self.talking(""):
            if not self._there(self.root):
                return []
            listed = self.fs.ls(self.root, detail=False, **self._t)
        return sorted(posixpath.basename(p) for p in listed)

    def list_prefix(self, prefix: str) -> builtins.list[str]:
        """Names (relative to the root) of the files in ``prefix``'s folder that start with it."""
        folder, leaf = posixpath.split(prefix)
        full = self.path(folder) if folder else self.root
        with self.talking(folder):
            if self._s3 and leaf:  # one LIST of the keys that start with the prefix
                listed = self.fs.find(full, maxdepth=1, withdirs=True, prefix=leaf, **self._t)
                names = [posixpath.join(folder, posixpath.basename(p)) for p in listed]
                return sorted(n for n in names if n.startswith(prefix))
            if not self._there(full):
                return []
            listed = self.fs.ls(full, detail=False, **self._t)
        names = [posixpath.join(folder, posixpath.basename(p)) for p in listed]
        return sorted(n for n in names if n.startswith(prefix))

    def remove_folder_if_empty(self, name: str) -> None:
        full = self.path(name)
        if self.is_local and self._there(full) and not self.fs.ls(full):
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
        """Move a finished local file to ``name``; it appears there complete or not at all
        (locally: synced to disk first, so a crash leaves no named file short of its bytes)."""
        if self.is_local:
            with open(local, "rb") as f:
                os.fsync(f.fileno())
            os.replace(local, self.path(name))
        else:
            with self.talking(name):
                self.fs.put_file(str(local), self.path(name), **self._t)
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
        with self.talking(name):
            try:
                self.fs.pipe_file(self.path(name), data, mode="create", **self._t)
            except FileExistsError:
                return False
            except TypeError:  # a backend without exclusive writes
                if self.exists(name):
                    return False
                self.fs.pipe_file(self.path(name), data, **self._t)
        return True

    def modified(self, name: str) -> float:
        """When ``name`` was last written (seconds since the epoch, the store's clock)."""
        with self.talking(name):
            return self.fs.modified(self.path(name)).timestamp()

    def write_bytes(self, name: str, data: bytes, *, raw: bool = False) -> None:
        """Write a small file atomically (sealed on a sealed output, unless ``raw``)."""
        if self.sealer is not None and not raw:
            data = self.sealer.seal(name, data)
        tmp = self.staging_path(name)
        tmp.write_bytes(data)
        self.put(tmp, name)
