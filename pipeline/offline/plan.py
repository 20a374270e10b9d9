"""What a make_shards run would make, without making it (``make_shards --dry-run``): per split
the images selected, the shards and their size, and for the run the decoder, the workers and
the staging disk each rank needs. It lists the source as the run does and writes nothing."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.cipher.keys import Key
from pipeline.offline.build import ShardConfig, _plan_split, _State, choose_decoder

BLOCK, RECORD = 512, 10240  # tar's block, and the record its end is padded to


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
        plan = _plan_split(config, split, key)
        plans.append(
            PlannedSplit(
                split=split,
                images=len(plan.items),
                classes=len(plan.identity.classes),
                skipped=len(plan.source_rejects),
                shards=plan.n_shards,
                per_shard=plan.per_shard,
                sample_bytes=sample_bytes(plan.shape),
            )
        )
    return plans


def found(out: str, split: str) -> str:
    """What ``out`` already holds of ``split``: a manifest, progress records, or nothing. A run
    checks that they were made with the same key and options; this does not."""
    from pipeline.shards.manifest import manifest_name
    from pipeline.storage import Storage

    storage = Storage(out)
    if storage.exists(manifest_name(split)):
        return "; the output has its manifest: a run with the same key and options does nothing"
    made = len(_State(storage, split).recorded())
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
    decoder, device = choose_decoder(config.decoder, config.device)
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
