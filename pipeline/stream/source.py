"""What both loaders open first: a split's storage, its manifest and its crop geometry."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.shards.manifest import Manifest, load_manifest
from pipeline.shards.sealing import open_output
from pipeline.storage import Storage
from pipeline.stream.crop import crop_geometry


@dataclass(frozen=True)
class SplitSource:
    """One split of one shard folder or URL, as a loader reads it."""

    storage: Storage
    manifest: Manifest
    crop: int  # the side of the crops the loader hands out
    block: int  # crop offsets are multiples of this (the key's block size)


def open_split(
    data: str,
    split: str,
    *,
    data_key: str | None = None,
    crop_size: int | None = None,
    crop_grid: int | None = None,
) -> SplitSource:
    """The split's manifest (a clear error naming the folder when there is none) and its crop
    geometry, checked to commute with the key. A sealed output opens with ``data_key`` (a
    file; else ``$KEYPROTECT_DATA_KEY``)."""
    storage = open_output(data, data_key)
    manifest = load_manifest(storage, split)
    crop, block = crop_geometry(manifest, crop_size=crop_size, crop_grid=crop_grid)
    return SplitSource(storage, manifest, crop, block)
