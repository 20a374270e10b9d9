"""Re-read shards and check them against their manifest: hash, size, sample count, shapes."""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from pipeline.cipher.seal import SealError
from pipeline.shards.checks import (
    ShardError,
    check_count,
    check_files,
    check_image,
    check_label,
    parse_index,
)
from pipeline.shards.format import ShardRecord, index_name
from pipeline.shards.manifest import (
    Manifest,
    ManifestError,
    load_manifest,
    manifest_name,
    why_no_manifest,
)
from pipeline.shards.sealing import open_output
from pipeline.storage import Storage

logger = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    checked_shards: int = 0
    checked_samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class _Hasher:
    """Reads a stream for tarfile while hashing and counting every byte."""

    def __init__(self, f) -> None:
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha256.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _samples(tar: tarfile.TarFile, seen: list[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples in tar order; ``seen`` collects each member's "ext offset size name" entry."""
    current: str | None = None
    files: dict[str, bytes] = {}
    for member in tar:
        if not member.isfile():
            raise ValueError(f"unexpected tar member {member.name!r} (type {member.type!r})")
        key, _, ext = member.name.partition(".")
        seen.append(f"{ext} {member.offset_data} {member.size} {member.name}")
        if key != current:
            if current is not None:
                yield current, files
            current, files = key, {}
        data = tar.extractfile(member)
        assert data is not None  # a regular file: checked above
        files[ext] = data.read()
    if current is not None:
        yield current, files


def _check_sample(key: str, files: dict[str, bytes], manifest: Manifest) -> str | None:
    """The loaders' checks (files, image size, class), and the sample's JSON."""
    try:
        check_files(key, files)
        check_image(key, len(files["u8"]), manifest.image_shape)
        check_label(key, files["cls"], len(manifest.classes))
    except ShardError as exc:
        return str(exc)
    try:
        meta = json.loads(files["json"].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return f"sample {key}: {key}.json is not JSON ({type(exc).__name__})"
    if not isinstance(meta, dict):
        return f"sample {key}: {key}.json holds a {type(meta).__name__}, expected an object"
    if meta.get("shape") != list(manifest.image_shape):
        return (
            f"sample {key}: shape {meta.get('shape')} is not the manifest's {manifest.image_shape}"
        )
    if manifest.encrypted and manifest.version >= 2 and "source" in meta:
        return f"sample {key}: names its source file in encrypted shards (known plaintext)"
    return None


def verify_shard(
    storage: Storage, record: ShardRecord, manifest: Manifest
) -> tuple[list[str], int]:
    """Problems found in one shard (empty if it is sound) and the samples read."""
    uri = storage.uri(record.name)
    if not storage.exists(record.name):
        return [f"{uri}: missing"], 0
    problems: list[str] = []
    members: list[str] = []
    count = 0
    if record.sealed_bytes is not None and storage.size(record.name) != record.sealed_bytes:
        problems.append(
            f"{uri}: {storage.size(record.name)} bytes at rest, manifest says "
            f"{record.sealed_bytes} (truncated or replaced?)"
        )
    with storage.open(record.name, "rb") as f:
        hasher = _Hasher(f)
        try:
            with tarfile.open(fileobj=hasher, mode="r|") as tar:  # type: ignore[call-overload]
                for key, files in _samples(tar, members):
                    count += 1
                    issue = _check_sample(key, files, manifest)
                    if issue:
                        problems.append(f"{uri}: {issue}")
            hasher.drain()
        except SealError as exc:
            return [*problems, f"{uri}: {exc}"], count
        except (tarfile.TarError, ValueError, OSError) as exc:
            problems.append(f"{uri}: unreadable tar ({type(exc).__name__}: {exc})")
            hasher.drain()
    if hasher.size != record.bytes:
        problems.append(f"{uri}: {hasher.size} bytes, manifest says {record.bytes} (truncated?)")
    if hasher.sha256.hexdigest() != record.sha256:
        problems.append(f"{uri}: SHA-256 mismatch (the file was changed or damaged)")
    try:
        check_count(count, record.samples, "the tar holds")
    except ShardError as exc:
        problems.append(f"{uri}: {exc}")
    if not problems:
        problems.extend(_check_index(storage, record, manifest, members))
    return problems, count


def _check_index(
    storage: Storage, record: ShardRecord, manifest: Manifest, members: list[str]
) -> list[str]:
    """The DALI index must pass the loaders' checks and list exactly the tar's members, at
    their offsets."""
    name = index_name(record.name)
    uri = storage.uri(name)
    if not storage.exists(name):
        return [f"{uri}: missing DALI index of {record.name}"]
    try:
        data = storage.read_bytes(name)
    except SealError as exc:
        return [f"{uri}: {exc}"]
    try:
        parse_index(data, samples=record.samples, image_shape=manifest.image_shape)
    except ShardError as exc:
        return [f"{uri}: {exc}; rerun make_shards"]
    lines = data.decode("ascii").splitlines()
    tokens = [line.split() for line in lines[1:]]
    listed = [" ".join(t[i : i + 4]) for t in tokens for i in range(0, len(t), 4)]
    if sorted(listed) != sorted(members):
        return [f"{uri}: DALI index does not match {record.name}; rerun make_shards"]
    return []


def verify_shards(
    url: str, splits: tuple[str, ...] = ("train", "val"), *, data_key: str | None = None
) -> VerifyReport:
    """Check every shard of every split that has a manifest under ``url`` (a sealed output
    opens with ``data_key``, else ``$KEYPROTECT_DATA_KEY``; without either, one SealError)."""
    storage, report = open_output(url, data_key), VerifyReport()
    found = [s for s in splits if storage.exists(manifest_name(s))]
    if not found:
        report.problems.append(why_no_manifest(storage, splits[0]))
        return report
    for split in found:
        try:
            manifest = load_manifest(storage, split)
        except (ManifestError, SealError) as exc:
            report.problems.append(str(exc))
            continue
        if manifest.encrypted and manifest.version < 2:
            logger.warning(
                "%s: made by an older version whose encrypted samples name their source files "
                "(known plaintext for anyone who can fetch them); rebuild with make_shards "
                "--overwrite and keep the --source-map with the key",
                storage.uri(manifest_name(split)),
            )
        for record in manifest.shards:
            problems, count = verify_shard(storage, record, manifest)
            report.problems.extend(problems)
            report.checked_shards += 1
            report.checked_samples += count
    return report
