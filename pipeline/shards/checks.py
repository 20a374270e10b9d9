"""The checks every reader of shards makes, in one place: verify_shards and both loaders.

Per sample: its files are exactly ``SAMPLE_EXTENSIONS``, its image holds exactly
``prod(image_shape)`` bytes, its ``.cls`` is an integer class in ``0..classes-1``. Per shard:
its DALI index lists exactly the manifest's number of samples, and a reader gets exactly that
many. Each check is O(1) per sample (no hashing: that is verify_shards' job).

A check that fails raises :class:`ShardError` with the sample's own words ("sample KEY: ...");
a caller adds where (the shard's URI) and what to do with :func:`at_shard`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from pipeline.errors import KeyprotectError
from pipeline.shards.format import SAMPLE_EXTENSIONS

_EXPECTED = frozenset(SAMPLE_EXTENSIONS)


class ShardError(KeyprotectError, ValueError):
    """A shard, its index or one of its samples that does not match its manifest; the message
    names the shard and the sample and says what to do.

    Raised in a DataLoader worker, it reaches the main process as a ``ShardError`` with the
    worker's one line (``KeyprotectError`` unwraps torch's message).
    """


def at_shard(uri: str, error: ShardError, hint: str) -> ShardError:
    """``error`` of a sample or index, located: "URI: what; HINT"."""
    return ShardError(f"{uri}: {error}; {hint}")


def repair_hint(data: str) -> str:
    """What to do about a damaged shard under ``data``."""
    return (
        f"run `python tools/verify_shards.py {data}` to list every damaged shard, then remake "
        "them with tools/make_shards.py (--overwrite)"
    )


def image_bytes(image_shape: Sequence[int]) -> int:
    """The size of one stored image: ``prod(image_shape)`` bytes (uint8 HWC)."""
    return math.prod(image_shape)


def check_files(key: str, extensions: Collection[str]) -> None:
    """A sample's files are exactly ``SAMPLE_EXTENSIONS``."""
    if len(extensions) != len(_EXPECTED) or not _EXPECTED.issuperset(extensions):
        raise ShardError(
            f"sample {key} has files {sorted(extensions)}, expected {list(SAMPLE_EXTENSIONS)}"
        )


def check_image(key: str, size: int, image_shape: Sequence[int]) -> None:
    """A sample's ``.u8`` holds exactly one image of ``image_shape``."""
    expected = image_bytes(image_shape)
    if size != expected:
        raise ShardError(
            f"sample {key}: {size} image bytes, expected {expected} for shape {list(image_shape)}"
        )


def check_label(key: str, data: bytes | memoryview, classes: int) -> int:
    """The class index in a sample's ``.cls``: an ASCII integer in ``0..classes-1``."""
    try:
        label = int(bytes(data).decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ShardError(
            f"sample {key}: {key}.cls is not a class index ({bytes(data[:20])!r})"
        ) from None
    if not 0 <= label < classes:
        raise ShardError(f"sample {key}: class {label} outside 0..{classes - 1}")
    return label


def check_count(got: int, expected: int, what: str) -> None:
    """A shard yields (or its index lists) as many samples as its manifest says."""
    if got != expected:
        raise ShardError(f"{what} {got} samples, the manifest says {expected}")


@dataclass(frozen=True)
class IndexedSample:
    """One line of a DALI index: the sample's key and, per extension, (data offset, size)."""

    key: str
    files: dict[str, tuple[int, int]]


def parse_index(data: bytes, *, samples: int, image_shape: Sequence[int]) -> list[IndexedSample]:
    """A shard's DALI index (``wds2idx`` v1.2), checked: its header and its lines count the
    manifest's ``samples``, and every line lists the sample's files with an image of the
    right size. O(1) per sample, no data read."""
    try:
        lines = data.decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise ShardError("the DALI index is not text") from None
    check_count(len(lines) - 1, samples, "the DALI index lists")
    if lines[0] != f"v1.2 {samples}":
        raise ShardError(f"DALI index header {lines[0][:40]!r}, expected 'v1.2 {samples}'")
    out = []
    for number, line in enumerate(lines[1:]):
        t = line.split()
        try:
            if len(t) % 4:
                raise ValueError(line)
            files = {t[i]: (int(t[i + 1]), int(t[i + 2])) for i in range(0, len(t), 4)}
        except ValueError:
            raise ShardError(f"DALI index line {number + 1} is malformed ({line[:60]!r})") from None
        key = t[3].partition(".")[0] if t else f"#{number}"
        if any(t[i + 3] != f"{key}.{t[i]}" for i in range(0, len(t), 4)):
            raise ShardError(f"DALI index line {number + 1} mixes samples ({line[:60]!r})")
        check_files(key, files)
        check_image(key, files["u8"][1], image_shape)
        out.append(IndexedSample(key, files))
    return out
