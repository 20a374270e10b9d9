"""What a make_shards run makes of each split: its plan (the selected items in their order, the
shard geometry and the identity that shapes the bytes: ``plan_split``), and what ``make_shards
--dry-run`` prints of it: per split the images selected, the shards and their size, and for the
run the decoder, the workers and the staging disk each rank needs. The dry run lists the source
as the run does and writes nothing."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from pipeline.cipher.keys import Key
from pipeline.errors import KeyprotectError
from pipeline.offline.config import ShardBuildError, ShardConfig, choose_decoder, samples_per_shard
from pipeline.offline.progress import Progress, record_bytes
from pipeline.offline.sources import (
    SourceItem,
    SourceReject,
    SourceScan,
    listing_digest,
    scan_source,
    select_split,
)
from pipeline.offline.workgroup import WorkGroup
from pipeline.shards.manifest import Manifest, load_manifest, manifest_name
from pipeline.storage import Storage

BLOCK, RECORD = 512, 10240  # tar's block, and the record its end is padded to


@dataclass(frozen=True)
class SplitIdentity:
    """Everything that shapes a split's bytes: the data options, the classes, the source
    listing's digest and the key's public parts. A finished split (its manifest), the options
    file of an unfinished run and every progress record are checked against it."""

    options: dict[str, Any]
    classes: tuple[str, ...]
    source_digest: str
    key_fingerprint: str | None
    block_size: int | None
    transforms: tuple[str, ...]

    @classmethod
    def of_manifest(cls, manifest: Manifest) -> SplitIdentity:
        return cls(options=manifest.options, classes=tuple(manifest.classes),
                   source_digest=manifest.source_digest,
                   key_fingerprint=manifest.key_fingerprint, block_size=manifest.block_size,
                   transforms=tuple(manifest.transforms))  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        """The form written to ``_progress/SPLIT.options.json`` (and digested)."""
        return {"options": self.options, "classes": list(self.classes),
                "source_digest": self.source_digest, "key_fingerprint": self.key_fingerprint,
                "block_size": self.block_size, "transforms": list(self.transforms)}  # fmt: skip

    def digest(self) -> str:
        """SHA-256 of the identity: progress records made under anything else never count."""
        return hashlib.sha256(record_bytes(self.to_json())).hexdigest()


@dataclass(frozen=True)
class SplitPlan:
    """One split's selected items, shard geometry and identity (what shapes its bytes)."""

    split: str
    items: list[SourceItem]
    shape: list[int]
    per_shard: int
    decoder: str  # the decoder that runs (never "auto")
    device: str  # where decoding runs
    identity: SplitIdentity = field(repr=False)
    source_rejects: list[SourceReject] = field(default_factory=list)  # not images, not used

    @cached_property
    def digest(self) -> str:
        return self.identity.digest()

    @property
    def n_shards(self) -> int:
        return math.ceil(len(self.items) / self.per_shard)

    def chunk(self, index: int) -> list[SourceItem]:
        return self.items[index * self.per_shard : (index + 1) * self.per_shard]


def plan_split(
    config: ShardConfig,
    split: str,
    key: Key | None,
    group: WorkGroup | None = None,
    made_with: tuple[str, str] | None = None,
) -> SplitPlan:
    """The split's plan: its source listed (once per node), selected and put in the key's
    order, cut into shards; the decoder ``choose_decoder`` picks (``made_with``: the one an
    existing output was made with) and the identity all of it gives the bytes."""
    order_key = None if key is None else key.order_key  # encrypted: an order nobody can redo
    group = group or WorkGroup()

    # one rank per node lists the tree (millions of stat calls on a shared file system); the
    # node's other ranks read its listing, then select and order it themselves (with the key)
    def listing() -> SourceScan:
        return scan_source(config.src, split, classes_file=config.classes_file,
                           follow_symlinks=config.follow_symlinks)  # fmt: skip

    scan = group.once_per_node(
        f"listing/{split}", listing, SourceScan.to_bytes, SourceScan.from_bytes
    )
    classes, items, source_rejects = select_split(
        config.src,
        split,
        per_class=config.per_class,
        fraction=config.fraction,
        seed=config.seed,
        order_key=order_key,
        scan=scan,
    )
    if not items:
        raise ShardBuildError(f"{split}: no source images selected under {config.src}/{split}")
    decoder, device = choose_decoder(config.decoder, config.device, made_with)
    shape = [config.size, config.size, 3]
    identity = SplitIdentity(
        options=config.data_options(decoder, device),
        classes=tuple(classes),
        source_digest=listing_digest(items, order_key=order_key),
        key_fingerprint=None if key is None else key.fingerprint,
        block_size=None if key is None else key.block_size,
        transforms=() if key is None else tuple(key.transforms),
    )
    per_shard = samples_per_shard(config.shard_size, int(np.prod(shape)))
    return SplitPlan(split, items, shape, per_shard, decoder, device, identity, source_rejects)


def sample_bytes(shape: list[int]) -> int:
    """A sample's bytes in the tar: three headers, the image padded to whole blocks, a block
    each for the class and the JSON (which fits one: plain shards name the source there, and a
    path over about 440 characters takes another)."""
    return 3 * BLOCK + -(-math.prod(shape) // BLOCK) * BLOCK + 2 * BLOCK


def tar_bytes(samples: int, per_sample: int) -> int:
    """A shard's size: its samples, then two zero blocks, padded to a whole record."""
    return -(-(samples * per_sample + 2 * BLOCK) // RECORD) * RECORD


@dataclass(frozen=True)
class PlannedSplit:
    """One split as a run would make it."""

    split: str
    images: int
    classes: int
    skipped: int  # source entries that are not images, or not readable as files
    shards: int
    per_shard: int
    sample_bytes: int  # the tar's bytes per sample: the image plus headers and metadata
    decoder: tuple[str, str]  # the decoder that would run, and where

    @property
    def shard_bytes(self) -> int:
        """The first shard's size (every shard's but the last)."""
        return tar_bytes(min(self.per_shard, self.images), self.sample_bytes)

    @property
    def total_bytes(self) -> int:
        """The split's shards together, if no file is rejected while decoding."""
        last = self.images - (self.shards - 1) * self.per_shard
        return (self.shards - 1) * self.shard_bytes + tar_bytes(last, self.sample_bytes)


def plan_splits(config: ShardConfig, key: Key | None) -> list[PlannedSplit]:
    """Each split of ``config`` as a run would make it (the same listing and selection)."""
    plans = []
    for split in config.splits:
        plan = plan_split(config, split, key, made_with=made_with(Storage(config.out), split))
        plans.append(
            PlannedSplit(
                split=split,
                images=len(plan.items),
                classes=len(plan.identity.classes),
                skipped=len(plan.source_rejects),
                shards=plan.n_shards,
                per_shard=plan.per_shard,
                sample_bytes=sample_bytes(plan.shape),
                decoder=(plan.decoder, plan.device),
            )
        )
    return plans


def made_with(storage: Storage, split: str) -> tuple[str, str] | None:
    """The decoder, and where it ran, that ``split`` of the output was made with: its
    manifest's, or an unfinished run's options; None for a new output, or one this process
    cannot read (sealed, and no data key)."""
    try:
        if storage.exists(manifest_name(split)):
            options = load_manifest(storage, split).options
        else:
            options = (Progress(storage, split).read_options() or {}).get("options", {})
    except (KeyprotectError, ValueError):
        return None
    decoder, where = options.get("decoder"), options.get("decode_device")
    return (decoder, where) if isinstance(decoder, str) and isinstance(where, str) else None


def found(out: str, split: str) -> str:
    """What ``out`` already holds of ``split``: a manifest, progress records, or nothing. A run
    checks that they were made with the same key and options; this does not."""
    storage = Storage(out)
    if storage.exists(manifest_name(split)):
        return "; the output has its manifest: a run with the same key and options does nothing"
    made = len(Progress(storage, split).recorded())
    return f"; the output has {made:,} of them made: a run resumes" if made else ""


def describe(config: ShardConfig, plans: list[PlannedSplit], *, world_size: int = 1) -> list[str]:
    """The lines ``--dry-run`` prints: a line per split, then how the run would go."""
    lines = [
        f"{p.split}: {p.images:,} images of {p.classes:,} classes ({p.skipped:,} source "
        f"entries skipped), {p.shards:,} shards of {p.per_shard:,} samples "
        f"({p.shard_bytes / 1e6:,.0f} MB each), {p.total_bytes / 1e9:,.2f} GB"
        f"{found(config.out, p.split)}"
        for p in plans
    ]
    decoder, device = plans[0].decoder
    total = sum(p.total_bytes for p in plans)
    largest = max(p.shard_bytes for p in plans)
    # staged at once per rank: PIL's shard processes keep --threads + 2 building or waiting to
    # be published, plus the publish queue's 2; a decoder feeding the rank's process, 3
    processes = decoder == "pil" and config.encrypt_device in ("auto", "cpu")
    staged = config.num_threads + 4 if processes else 3
    each = max(math.ceil(p.shards / world_size) for p in plans)  # a faster rank takes more
    workers = "processes" if decoder == "pil" else "CPU workers"
    lines.append(
        f"in all {total / 1e9:,.2f} GB to {config.out}; decoding with {decoder} on the "
        f"{device.upper()}, {config.num_threads} {workers} per rank, {world_size} rank(s): "
        f"about {each:,} shards of a split each; staging disk per rank: up to "
        f"{staged * largest / 1e9:,.2f} GB; nothing was written"
    )
    return lines
