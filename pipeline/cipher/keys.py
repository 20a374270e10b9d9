"""Secret keys: the key file format, the key-material derivation and the fingerprint.

Key file, format version 1 (all integers unsigned, little-endian)::

    offset  size  field
    0       8     magic b"BLOCKKEY"
    8       1     format version (1)
    9       1     block size M (1..255)
    10      1     number of transforms n (1..3)
    11      n     transform codes in order of application: 1 shuffle, 2 np, 3 ffx
    11+n    32    secret (256 bits from the OS CSPRNG)
    43+n    32    SHA-256 of all preceding bytes (detects a damaged or truncated file)

Derivation, version 1. Every part comes from its own SHAKE-256 stream::

    stream(label) = SHAKE-256(b"keyprotect/v1/" + label + b"/M=" + ascii(M) + b"\\x00" + secret)

- ``permutation`` (label ``permutation``): Fisher-Yates over ``[0, 1, ..., L-1]``; for
  ``i = L-1`` down to ``1``: read 4 bytes as a big-endian ``u``; if
  ``u >= 2**32 - (2**32 % (i+1))`` discard and read again (so the draw is unbiased); else
  ``j = u % (i+1)`` and swap entries ``i`` and ``j``.
- ``np_mask`` (label ``np_mask``) and ``ffx_mask`` (label ``ffx_mask``): read L bytes;
  ``mask[i] = byte[i] & 1``.
- ``ffx_table`` (label ``ffx_table``): an FFX-style format-preserving Feistel cipher on one byte.
  Read 160 bytes as round functions ``R[r][v] = byte[16*r + v] & 0x0F`` for 10 rounds. For each
  x in 0..255: ``left, right = x >> 4, x & 0x0F``; each round ``left, right = right,
  left ^ R[r][right]``; ``table[x] = left << 4 | right``. A Feistel network is a bijection, so
  the table maps 0..255 onto 0..255 (shards stay lossless and exactly invertible; the authors'
  pyffx version maps into 3 decimal digits instead).
- ``sample_order`` (label ``sample_order``): read 32 bytes, the *order key*. It is not key
  material of the transform: the offline stage ranks source files with
  ``HMAC-SHA256(order_key, ascii(seed) + b"\\x00" + path)`` to choose the subset and with
  ``HMAC-SHA256(order_key, ascii(seed) + b"\\x00order/" + path)`` to order the samples, and
  digests the source listing with ``HMAC-SHA256(order_key, listing)``, so that nobody without
  the key can tell which source file sits at which position of encrypted shards
  (``pipeline/offline/sources.py``).

Fingerprint: the first 16 bytes, in hex, of ``SHA-256(b"keyprotect/fingerprint/v1\\x00" + secret)``.
It names a key in manifests and checkpoints; it reveals nothing usable about the secret.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_write
from pipeline.cipher.blockwise import (
    TRANSFORMS,
    KeyMaterial,
    block_length,
    check_block_size,
    check_transforms,
)
from pipeline.errors import KeyprotectError

logger = logging.getLogger(__name__)

MAGIC = b"BLOCKKEY"
FORMAT_VERSION = 1
DERIVATION_VERSION = 1
SECRET_BYTES = 32
FFX_ROUNDS = 10
_CODES = {"shuffle": 1, "np": 2, "ffx": 3}
_NAMES = {code: name for name, code in _CODES.items()}
_DIGEST_BYTES = 32


class KeyFileError(KeyprotectError, ValueError):
    """A key file that cannot be used; the message names the file and says what to do."""


class _Stream:
    """Reads a SHAKE-256 output stream of unbounded length."""

    def __init__(self, secret: bytes, label: str, block_size: int) -> None:
        self._shake = hashlib.shake_256(
            b"keyprotect/v%d/%s/M=%d\x00" % (DERIVATION_VERSION, label.encode(), block_size)
        )
        self._shake.update(secret)
        self._buffer = b""
        self._pos = 0

    def read(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._buffer):  # SHAKE output is a prefix-stable stream: just read more
            self._buffer = self._shake.digest(max(2 * len(self._buffer), end, 1024))
        out = self._buffer[self._pos : end]
        self._pos = end
        return out

    def below(self, n: int) -> int:
        """An unbiased integer in [0, n) by rejection sampling of 32-bit draws."""
        limit = 2**32 - (2**32 % n)
        while True:
            u = int.from_bytes(self.read(4), "big")
            if u < limit:
                return u % n


def derive_permutation(secret: bytes, block_size: int) -> np.ndarray:
    stream = _Stream(secret, "permutation", block_size)
    perm = list(range(block_length(block_size)))
    for i in range(len(perm) - 1, 0, -1):
        j = stream.below(i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return np.array(perm, dtype=np.int64)


def derive_mask(secret: bytes, label: str, block_size: int) -> np.ndarray:
    raw = _Stream(secret, label, block_size).read(block_length(block_size))
    return np.frombuffer(raw, dtype=np.uint8) & 1


def derive_ffx_table(secret: bytes, block_size: int) -> np.ndarray:
    raw = np.frombuffer(_Stream(secret, "ffx_table", block_size).read(16 * FFX_ROUNDS), np.uint8)
    rounds = (raw & 0x0F).reshape(FFX_ROUNDS, 16)
    x = np.arange(256)
    left, right = x >> 4, x & 0x0F
    for r in range(FFX_ROUNDS):
        left, right = right, left ^ rounds[r][right]
    return (left << 4 | right).astype(np.uint8)


def derive_order_key(secret: bytes, block_size: int) -> bytes:
    """The 32-byte key of the sample order and subset choice (label ``sample_order``)."""
    return _Stream(secret, "sample_order", block_size).read(32)


def derive_material(secret: bytes, block_size: int, transforms: Sequence[str]) -> KeyMaterial:
    """All key material for ``secret``, by derivation version 1 (see the module docstring)."""
    return KeyMaterial(
        block_size=block_size,
        transforms=tuple(transforms),
        permutation=derive_permutation(secret, block_size),
        np_mask=derive_mask(secret, "np_mask", block_size),
        ffx_mask=derive_mask(secret, "ffx_mask", block_size),
        ffx_table=derive_ffx_table(secret, block_size),
    )


def fingerprint(secret: bytes) -> str:
    return hashlib.sha256(b"keyprotect/fingerprint/v1\x00" + secret).hexdigest()[:32]


@dataclass(frozen=True)
class Key:
    """A secret key and its scheme. ``repr`` and ``str`` show the fingerprint, never the secret."""

    secret: bytes = field(repr=False)
    block_size: int = 4
    transforms: tuple[str, ...] = TRANSFORMS

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) != SECRET_BYTES:
            raise ValueError(f"a key secret must be {SECRET_BYTES} bytes")
        check_block_size(self.block_size)
        object.__setattr__(self, "transforms", check_transforms(self.transforms))

    @classmethod
    def generate(cls, block_size: int = 4, transforms: Sequence[str] = TRANSFORMS) -> Key:
        """A new key with a 256-bit secret from the OS CSPRNG."""
        return cls(secrets.token_bytes(SECRET_BYTES), block_size, tuple(transforms))

    @cached_property
    def material(self) -> KeyMaterial:
        return derive_material(self.secret, self.block_size, self.transforms)

    @cached_property
    def fingerprint(self) -> str:
        return fingerprint(self.secret)

    @cached_property
    def order_key(self) -> bytes:
        """Keys the subset choice and sample order of encrypted shards (never stored)."""
        return derive_order_key(self.secret, self.block_size)

    def __repr__(self) -> str:
        return (
            f"Key(fingerprint={self.fingerprint!r}, block_size={self.block_size}, "
            f"transforms={self.transforms!r})"
        )

    __str__ = __repr__

    def to_bytes(self) -> bytes:
        body = (
            MAGIC
            + bytes([FORMAT_VERSION, self.block_size, len(self.transforms)])
            + bytes(_CODES[t] for t in self.transforms)
            + self.secret
        )
        return body + hashlib.sha256(body).digest()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> Key:
        def bad(reason: str) -> KeyFileError:
            return KeyFileError(f"{source}: {reason}")

        if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
            raise bad("not a key file (bad magic); make one with `python tools/make_key.py FILE`")
        if len(data) < 11:
            raise bad("key file is truncated; restore it from your backup")
        version, block_size, count = data[8], data[9], data[10]
        if version != FORMAT_VERSION:
            raise bad(
                f"key file format version {version} is not supported (this tool reads "
                f"version {FORMAT_VERSION}); use the release that wrote it"
            )
        expected = 11 + count + SECRET_BYTES + _DIGEST_BYTES
        if len(data) != expected:
            raise bad(
                f"key file is {len(data)} bytes, expected {expected}: truncated or damaged; "
                "restore it from your backup"
            )
        body, digest = data[:-_DIGEST_BYTES], data[-_DIGEST_BYTES:]
        if hashlib.sha256(body).digest() != digest:
            raise bad(
                "key file checksum mismatch: the file is damaged; restore it from your backup"
            )
        codes = data[11 : 11 + count]
        if any(c not in _NAMES for c in codes) or not 1 <= count <= len(TRANSFORMS):
            raise bad("key file lists an unknown transform code; restore it from your backup")
        secret = bytes(data[11 + count : 11 + count + SECRET_BYTES])
        try:
            return cls(secret, block_size, tuple(_NAMES[c] for c in codes))
        except ValueError as exc:
            raise bad(f"invalid key parameters ({exc})") from None

    def key_space_bits(self) -> dict[str, float]:
        """log2 of the key space of each transform in use, their total, and the secret's size."""
        n = block_length(self.block_size)
        parts = {
            "shuffle": math.lgamma(n + 1) / math.log(2),  # L! permutations
            "np": float(n),  # 2^L masks
            "ffx": float(n + 4 * 16 * FFX_ROUNDS),  # 2^L masks x Feistel round-function bits
        }
        used = {name: round(parts[name], 2) for name in self.transforms}
        total = round(sum(used.values()), 2)
        return {**used, "total": total, "secret": 8.0 * SECRET_BYTES}

    def inspect(self) -> dict:
        """Parameters and derived material, for the owner to audit (never the secret itself)."""
        material = self.material
        info: dict = {
            "version": DERIVATION_VERSION,
            "fingerprint": self.fingerprint,
            "block_size": self.block_size,
            "block_length": block_length(self.block_size),
            "transforms": list(self.transforms),
            "key_space_log2": self.key_space_bits(),
        }
        if "shuffle" in self.transforms:
            info["permutation"] = material.permutation.tolist()
        if "np" in self.transforms:
            info["np_mask"] = material.np_mask.tolist()
        if "ffx" in self.transforms:
            info["ffx_mask"] = material.ffx_mask.tolist()
            info["ffx_table"] = material.ffx_table.tolist()
        return info


def load_key(path: str | os.PathLike, *, expected: str | None = None) -> Key:
    """Read a key file; a missing, wrong or damaged file raises ``KeyFileError`` naming it.

    ``expected``: the fingerprint of the key a model or shards were made with, when the key is
    loaded to open them. A missing file then says so, instead of suggesting a new key (which
    could not open them).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if expected is not None:
            raise KeyFileError(
                f"{path}: key file not found; this needs the key it was made with (fingerprint "
                f"{expected}): pass that key file. A new key cannot open it"
            ) from None
        raise KeyFileError(
            f"{path}: key file not found; make one with `python tools/make_key.py {path}`"
        ) from None
    except IsADirectoryError:
        raise KeyFileError(f"{path}: is a directory, not a key file") from None
    except PermissionError:
        raise KeyFileError(f"{path}: permission denied reading the key file") from None
    return Key.from_bytes(data, source=str(path))


def save_key(key: Key, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``key`` atomically with mode 0600; refuse an existing file unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path}: a key file already exists; losing a key loses every model trained with it. "
            "Choose another path, or replace it on purpose with `make_key.py --force`"
        )
    try:
        atomic_write(path, key.to_bytes(), perm=0o600, exclusive=not overwrite)
    except FileExistsError:  # the name was taken meanwhile
        raise FileExistsError(
            f"{path}: a key file already exists; choose another path, or replace it on purpose "
            "with `make_key.py --force`"
        ) from None
    logger.debug("wrote key %s to %s", key.fingerprint, path)
    return path
