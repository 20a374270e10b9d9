"""The owner's sample-to-source map, kept apart from encrypted shards.

Encrypted shards, their index files, manifests and samples tables name no source file: for a
public dataset a file name is known plaintext, and a few (plain, cipher) pairs give the key away
(``python -m attacks`` measures it in its ``known_plaintext`` rows). Samples are keyed by
position instead, and the position of every source file comes from the key's order key, so the
owner (and only the owner) can always rebuild the map: sample ``k`` of a split is ``items[k]``
of ``select_split`` run with the same options and key. ``write_source_map`` does that and
writes one Parquet table (split, key, shard, label, source, rejected) with mode 0600; keep it
with the key, never with the shards. Plain shards keep ``source`` in each sample as before.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Sequence

from fsspec.implementations.local import LocalFileSystem

from pipeline.atomic import atomic_write
from pipeline.cipher.keys import Key
from pipeline.cipher.seal import DataKey
from pipeline.errors import KeyprotectError
from pipeline.offline.sources import SourceItem, listing_digest, select_split
from pipeline.shards.manifest import (
    Manifest,
    load_manifest,
    manifest_name,
    parquet_bytes,
    samples_table_name,
)
from pipeline.shards.sealing import open_output
from pipeline.storage import Storage, filesystem

logger = logging.getLogger(__name__)

SOURCE_MAP_FIELDS = (
    ("split", "string"),
    ("key", "string"),
    ("shard", "string"),  # null for a rejected file
    ("label", "int32"),
    ("source", "string"),  # path under SRC
    ("rejected", "string"),  # the reason a file was rejected; null for a sample
)


class SourceMapError(KeyprotectError, ValueError):
    """A source map that cannot be written; the message names the file and says what to do."""


def reject_entry(item: SourceItem, key: str, reason: str, *, encrypted: bool) -> dict:
    """A rejected file as the manifest records it: by sample key when encrypted."""
    if encrypted:
        return {"key": key, "reason": reason}
    return {"source": item.path, "reason": reason}


def reject_source(reject: dict, items: Sequence[SourceItem]) -> str:
    """The path of a rejected file, from its manifest entry (either form)."""
    return reject["source"] if "source" in reject else _item(items, reject["key"]).path


def _item(items: Sequence[SourceItem], key: object) -> SourceItem:
    """The source item of sample ``key`` (its position in the split's shard order)."""
    if isinstance(key, str) and key.isdigit() and int(key) < len(items):
        return items[int(key)]
    raise SourceMapError(
        f"sample key {key!r} is not a position among the {len(items)} selected files; the "
        "manifest or samples table was edited or damaged: rebuild the shards"
    )


def log_rejects(split: str, rejects: Sequence[dict], items: Sequence[SourceItem]) -> None:
    """Name every rejected file in the run's log (encrypted output does not name them)."""
    for reject in rejects:
        logger.warning("%s: rejected %s: %s", split, reject_source(reject, items), reject["reason"])


def check_location(source_map: str, out: str) -> None:
    """Refuse a source map inside the shards' folder: it must not travel with them."""
    where = posixpath.normpath(_absolute(source_map))
    folder = posixpath.normpath(_absolute(out))
    if where == folder or where.startswith(folder.rstrip("/") + "/"):
        raise SourceMapError(
            f"--source-map {source_map} is inside --out {out}: the map names every sample's "
            "source file, so it must not travel with the shards; keep it with the key"
        )


def _absolute(url: str) -> str:
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        return os.path.realpath(path)
    return fs.unstrip_protocol(path)


def source_map_rows(*, src: str, out: str, key: Key | None, splits: Sequence[str],
                    classes_file: str | None = None, data_key: DataKey | None = None,
                    selected: dict[str, list[SourceItem]] | None = None,
                    ) -> list[list]:  # fmt: skip
    """One row per sample and per rejected file of ``splits`` under ``out``: ``[split, key,
    shard, label, source, rejected]``. ``selected``: a split's items in shard order as the
    run that made it selected them (``build_shards``), instead of listing ``src`` again;
    checked against the manifest's listing digest either way."""
    storage, rows = open_output(out, data_key), []
    for split in splits:
        manifest = load_manifest(storage, split)
        _check_key(manifest, key, storage)
        table = _samples_table(storage, manifest)
        items: list[SourceItem] = []
        if any(r["source"] is None for r in table) or any("key" in r for r in manifest.rejects):
            items = _items(manifest, src, key, classes_file, storage,
                           (selected or {}).get(split))  # fmt: skip
        for row in table:
            source = row["source"] if row["source"] is not None else _item(items, row["key"]).path
            rows.append([split, row["key"], row["shard"], row["label"], source, None])
        for reject in manifest.rejects:
            label = _item(items, reject["key"]).label if "key" in reject else None
            rows.append(
                [split, reject.get("key"), None, label, reject_source(reject, items),
                 reject["reason"]]
            )  # fmt: skip
    return sorted(rows, key=lambda r: (r[0], r[1] or "", r[4]))


def _check_key(manifest: Manifest, key: Key | None, storage: Storage) -> None:
    def name(fingerprint: str | None) -> str:
        return "plain" if fingerprint is None else f"key {fingerprint}"

    fingerprint = None if key is None else key.fingerprint
    if manifest.key_fingerprint != fingerprint:
        raise SourceMapError(
            f"{storage.uri(manifest_name(manifest.split))}: these shards are "
            f"{name(manifest.key_fingerprint)}, not {name(fingerprint)}; pass the key (or "
            "--plain) they were made with"
        )


def _items(manifest: Manifest, src: str, key: Key | None, classes_file: str | None,
           storage: Storage, selected: list[SourceItem] | None = None,
           ) -> list[SourceItem]:  # fmt: skip
    """The split's items in shard order: ``selected``, or recomputed as the offline stage
    chose them."""
    order_key = None if key is None else key.order_key
    items = selected if selected is not None else _select(manifest, src, order_key, classes_file)
    if listing_digest(items, order_key=order_key) != manifest.source_digest:
        raise SourceMapError(
            f"{storage.uri(manifest_name(manifest.split))}: {src} no longer lists the files "
            "these shards were made from (files added, removed or changed, or other --per-class, "
            "--fraction, --seed or --classes); run with the tree and options they were made with"
        )
    return items


def _select(manifest: Manifest, src: str, order_key: bytes | None,
            classes_file: str | None) -> list[SourceItem]:  # fmt: skip
    options = manifest.options
    _, items, _ = select_split(
        src,
        manifest.split,
        classes_file=classes_file,
        per_class=options.get("per_class"),
        fraction=options.get("fraction"),
        seed=options.get("seed", 0),
        order_key=order_key,
        follow_symlinks=options.get("follow_symlinks", False),
    )
    return items


def _samples_table(storage: Storage, manifest: Manifest) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # read whole: Parquet seeks, and a sealed object opens as a stream
    data = storage.read_bytes(manifest.samples_table or samples_table_name(manifest.split))
    return pq.read_table(pa.BufferReader(data)).to_pylist()


def source_map_bytes(rows: list[list]) -> bytes:
    return parquet_bytes(SOURCE_MAP_FIELDS, rows)


def write_private(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` atomically; mode 0600 where the filesystem has modes."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        atomic_write(path, data, perm=0o600)
    else:
        with fs.open(path, "wb") as f:  # one upload: appears complete or not at all
            f.write(data)


def write_source_map(url: str, *, src: str, out: str, key: Key | None, splits: Sequence[str],
                     classes_file: str | None = None, data_key: DataKey | None = None,
                     selected: dict[str, list[SourceItem]] | None = None,
                     ) -> int:  # fmt: skip
    """Write the source map of the finished ``splits`` under ``out`` to ``url`` (local or any
    fsspec URL); returns its row count. Works on output made earlier too: the map is rebuilt
    from the source tree (or ``selected``: see :func:`source_map_rows`), the manifests and the
    key."""
    check_location(url, out)
    rows = source_map_rows(src=src, out=out, key=key, splits=splits, classes_file=classes_file,
                           data_key=data_key, selected=selected)  # fmt: skip
    write_private(url, source_map_bytes(rows))
    logger.info("wrote the source map of %d files to %s; keep it with the key", len(rows), url)
    return len(rows)
