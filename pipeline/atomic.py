"""Atomic local file writes: a file appears under its name complete, or not at all.

Every local output (checkpoints, keys, reports, figures, run metadata) goes through
``atomic_open``: the data goes to a hidden temporary name in the same folder, is flushed and
fsynced, then ``os.replace``-d (or hard-linked, for ``exclusive``) over the final name. On any
error the temporary file is removed and the old file, if any, is untouched. Shard storage, which
may be remote, has its own route (``pipeline.storage.Storage``).
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO)


@contextmanager
def atomic_open(
    path: str | os.PathLike, mode: str = "wb", *, perm: int = 0o644, exclusive: bool = False
) -> Iterator[IO]:
    """Open a temporary file to write ``path`` with; it replaces ``path`` when the block ends.

    ``perm`` is set whatever the umask (0o600 for secrets and protected models). ``exclusive``
    refuses to replace an existing file (FileExistsError), even one created meanwhile.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'wb' or 'w', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, perm)
    try:
        with os.fdopen(fd, mode, encoding="utf-8" if mode == "w" else None) as f:
            os.fchmod(f.fileno(), perm)
            yield f
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)  # atomic, and fails if the name is taken
        else:
            os.replace(tmp, path)
    except OSError as exc:
        if exc.filename is None and exc.errno in _FULL:  # write() errors name no file
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(
    path: str | os.PathLike, data: bytes | str, *, perm: int = 0o644, exclusive: bool = False
) -> Path:
    """Write ``data`` (bytes, or str as UTF-8) to ``path`` atomically; returns the path."""
    with atomic_open(path, "wb", perm=perm, exclusive=exclusive) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)
