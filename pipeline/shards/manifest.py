"""The manifest: one JSON file per split that describes its shards, written last and atomically.

``OUT/{split}.manifest.json`` lists every shard (name, samples, bytes, SHA-256) and what shaped
the data: image shape, block size, transforms, key fingerprint (or ``encrypted: false``), class
names, the digest of the source listing, the rejected files with reasons, the options and the
tool version. It holds no timestamps, so a resumed run writes the same bytes.

Format version 2 (this version) names no source file in encrypted output: rejects are listed by
sample key (``{"key", "reason"}``), the samples table's ``source`` column is null and the source
digest is keyed (``pipeline/offline/sources.py``); the owner's map is
``pipeline/offline/sourcemap.py``. Plain output is as in version 1. Version 1 output
(encrypted samples naming their source) still reads; rebuild it to stop its names giving
known plaintext away.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipeline.errors import KeyprotectError
from pipeline.shards.format import ShardRecord
from pipeline.storage import Storage

MANIFEST_VERSION = 2
READABLE_VERSIONS = (1, 2)


class ManifestError(KeyprotectError, ValueError):
    """A manifest that is missing, unreadable or inconsistent; the message names it."""


def manifest_name(split: str) -> str:
    return f"{split}.manifest.json"


def samples_table_name(split: str) -> str:
    return f"{split}.samples.parquet"


SAMPLES_SCHEMA_FIELDS = (
    ("key", "string"),
    ("shard", "string"),
    ("label", "int32"),
    ("source", "string"),
)


def samples_table_bytes(rows: list[list]) -> bytes:
    """Parquet bytes of one row per sample: key, shard, label, source (path under SRC; null in
    encrypted output)."""
    return parquet_bytes(SAMPLES_SCHEMA_FIELDS, rows)


def parquet_bytes(fields: Sequence[tuple[str, str]], rows: list[list]) -> bytes:
    """Parquet bytes of ``rows`` with columns ``(name, pyarrow type name)``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in fields])
    columns: list[Sequence[object]] = (
        list(zip(*rows, strict=True)) if rows else [[] for _ in fields]
    )
    table = pa.Table.from_arrays(
        [pa.array(c, type=f.type) for c, f in zip(columns, schema, strict=True)], schema=schema
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


@dataclass(frozen=True)
class Manifest:
    split: str
    encrypted: bool
    key_fingerprint: str | None
    block_size: int | None
    transforms: list[str]
    image_shape: list[int]
    classes: list[str]
    source_digest: str
    options: dict
    tool_version: str
    shards: list[ShardRecord] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    samples_table: str | None = None  # Parquet: key, shard, label, source per sample
    # colour statistics of the plain images (a sample): what predict compares its inputs with;
    # None in manifests made before they were recorded
    input_stats: dict | None = None
    # entries of the source tree that are not images (not used): plain shards name them,
    # encrypted ones count them per reason
    source_rejects: list[dict] = field(default_factory=list)
    version: int = MANIFEST_VERSION

    @property
    def source_rejects_total(self) -> int:
        return sum(int(r.get("count", 1)) for r in self.source_rejects)

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_json(self) -> str:
        data = {
            "version": self.version,
            "tool_version": self.tool_version,
            "split": self.split,
            "encrypted": self.encrypted,
            "key_fingerprint": self.key_fingerprint,
            "block_size": self.block_size,
            "transforms": list(self.transforms),
            "image_shape": list(self.image_shape),
            "classes": list(self.classes),
            "source_digest": self.source_digest,
            "options": self.options,
            "total_samples": self.total_samples,
            "total_bytes": self.total_bytes,
            "shards": [s.to_dict() for s in self.shards],
            "rejects": self.rejects,
            "samples_table": self.samples_table,
        }
        if self.input_stats is not None:
            data["input_stats"] = self.input_stats
        if self.source_rejects:  # left out when empty: manifests without any stay as they were
            data["source_rejects"] = self.source_rejects
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "<manifest>") -> Manifest:
        try:
            data = json.loads(text)
            if data.get("version") not in READABLE_VERSIONS:
                raise ManifestError(
                    f"{source}: manifest version {data.get('version')!r} is not supported "
                    f"(this tool reads {', '.join(map(str, READABLE_VERSIONS))}); use the "
                    "release that wrote it"
                )
            shards = [ShardRecord(**s) for s in data["shards"]]
            manifest = cls(
                split=data["split"],
                encrypted=bool(data["encrypted"]),
                key_fingerprint=data["key_fingerprint"],
                block_size=data["block_size"],
                transforms=list(data["transforms"]),
                image_shape=list(data["image_shape"]),
                classes=list(data["classes"]),
                source_digest=data["source_digest"],
                options=dict(data["options"]),
                tool_version=data["tool_version"],
                shards=shards,
                rejects=list(data["rejects"]),
                samples_table=data.get("samples_table"),
                input_stats=data.get("input_stats"),
                source_rejects=list(data.get("source_rejects", [])),
                version=data["version"],
            )
        except ManifestError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise ManifestError(
                f"{source}: not a valid manifest ({type(exc).__name__}: {exc}); "
                "re-run tools/make_shards.py to rebuild it"
            ) from None
        if manifest.total_samples != data.get("total_samples"):
            raise ManifestError(f"{source}: total_samples disagrees with its shard list")
        check_names(manifest, source)
        return manifest


SPLIT_PATTERN = re.compile(r"[A-Za-z0-9_]{1,64}")


def check_names(manifest: Manifest, source: str = "<manifest>") -> None:
    """Refuse any name a reader would open that is not one of this split's own files.

    A manifest is untrusted input (it may come from a shared bucket): a shard named
    ``../other/x.tar`` or ``/etc/hostname`` would make the loaders and verify read outside
    the data folder. Every name must be ``{split}-NNNNNN.tar`` exactly.
    """
    if not SPLIT_PATTERN.fullmatch(manifest.split):
        raise ManifestError(
            f"{source}: split {manifest.split!r} is not a plain name (letters, digits, _)"
        )
    shard = re.compile(re.escape(manifest.split) + r"-\d{6}\.tar")
    for record in manifest.shards:
        if not isinstance(record.name, str) or not shard.fullmatch(record.name):
            raise ManifestError(
                f"{source}: shard name {record.name!r} is not {manifest.split}-NNNNNN.tar "
                "(no folders, no '..'); the manifest was edited or damaged: rebuild it "
                "with tools/make_shards.py"
            )
    expected_table = samples_table_name(manifest.split)
    if manifest.samples_table not in (None, expected_table):
        raise ManifestError(
            f"{source}: samples table {manifest.samples_table!r} is not {expected_table!r}"
        )


def why_no_manifest(storage: Storage, split: str) -> str:
    """Why ``split`` has no manifest under ``storage``, in words that send the user the right
    way: no such folder, an image tree meant for make_shards --src, or a folder of shards
    whose run has not finished."""
    name = manifest_name(split)
    names = storage.list()
    if not names:
        return (
            f"{storage.url}: no such folder (or an empty one); pass the --out of a finished "
            "tools/make_shards.py run"
        )
    if split in names and not any(n.endswith(".tar") for n in names):
        return (
            f"{storage.url}: an image tree ({split}/<class>/...), not shards; make shards from "
            f"it with `python tools/make_shards.py --src {storage.url} --key KEY --out SHARDS`, "
            "then pass SHARDS"
        )
    if any(n.startswith(f"{split}-") for n in names):
        return (
            f"{storage.uri(name)}: no manifest beside the {split} shards: their make_shards run "
            "has not finished (the manifest is written last); rerun it with the same arguments "
            "to resume"
        )
    return (
        f"{storage.uri(name)}: no manifest; this folder holds no {split} shards. Make them with "
        "tools/make_shards.py, or pass the folder that make_shards wrote (its --out)"
    )


def load_manifest(storage: Storage, split: str) -> Manifest:
    name = manifest_name(split)
    try:
        text = storage.read_bytes(name).decode("utf-8")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ManifestError(why_no_manifest(storage, split)) from None
    except UnicodeDecodeError:
        raise ManifestError(f"{storage.uri(name)}: manifest is not UTF-8 text") from None
    manifest = Manifest.from_json(text, source=storage.uri(name))
    if manifest.split != split:
        uri = storage.uri(name)
        raise ManifestError(f"{uri}: describes split {manifest.split!r}, not {split!r}")
    return manifest


def write_manifest(storage: Storage, manifest: Manifest) -> None:
    storage.write_bytes(manifest_name(manifest.split), manifest.to_json().encode("utf-8"))
