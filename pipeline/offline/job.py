"""The offline stage as one call: resolve the settings, build the shards, write the owner's
source map, and say in one line what was made (what ``tools/make_shards.py`` runs)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pipeline.cipher.keys import Key
from pipeline.cipher.seal import DataKey
from pipeline.offline.build import build_shards
from pipeline.offline.config import BuildStats, ShardConfig
from pipeline.offline.digits import write_digits_tree
from pipeline.offline.sourcemap import check_location, write_source_map
from pipeline.offline.sources import SourceItem
from pipeline.offline.workgroup import WorkGroup
from pipeline.shards.manifest import Manifest

logger = logging.getLogger("make_shards")

EMBEDDED_SIZE = 64  # the digits' stored size: fine-tuning on a CPU takes minutes
EMBEDDED_SHARD_SIZE = "256"  # several shards per split, so ranks x workers all get some
DEFAULT_SIZE = 224
DEFAULT_SHARD_SIZE = "1000"


def _rejected(manifests) -> str:
    """Files that could not be decoded, and entries of --src that are not images: together
    with the images they account for every entry of the source tree's splits."""
    manifests = list(manifests)
    undecodable = sum(len(m.rejects) for m in manifests)
    other = sum(m.source_rejects_total for m in manifests)
    if not other:
        return f"{undecodable} rejected"
    return f"{undecodable + other} rejected ({other} not images; each named in the log)"


def resolve_sources(
    src: str | None, size: int | None, shard_size: str | None
) -> tuple[str, int, str]:
    """``--src``, ``--size`` and ``--shard-size`` with their defaults: the embedded digits
    (written out as an ImageNet-style tree, 64 px, 256 per shard) when there is no ``--src``."""
    if src is None:
        return (
            str(write_digits_tree(size=EMBEDDED_SIZE)),
            size or EMBEDDED_SIZE,
            shard_size or EMBEDDED_SHARD_SIZE,
        )
    return src, size or DEFAULT_SIZE, shard_size or DEFAULT_SHARD_SIZE


@dataclass
class ShardJob:
    """A make_shards run as it goes: what it made so far (for the summary and for Ctrl-C)."""

    config: ShardConfig
    key: Key | None
    source_map: str | None = None
    data_key: DataKey | None = field(default=None, repr=False)  # seals the output (--seal)
    stats: BuildStats = field(default_factory=BuildStats)

    def run(self, group: WorkGroup) -> dict[str, Manifest]:
        """Build every split, then (rank 0, once all are finished) the source map."""
        if self.source_map:  # before any work
            check_location(self.source_map, self.config.out)
        selected: dict[str, list[SourceItem]] = {}  # the map's rows, without a second listing
        manifests = build_shards(self.config, self.key, data_key=self.data_key, stats=self.stats,
                                 group=group, selected=selected)  # fmt: skip
        if self.source_map and group.is_primary:
            write_source_map(self.source_map, src=self.config.src, out=self.config.out,
                             key=self.key, splits=self.config.splits,
                             classes_file=self.config.classes_file,
                             data_key=self.data_key, selected=selected)  # fmt: skip
        if group.is_primary:
            logger.info("%s", self.summary(manifests, group))
        return manifests

    def summary(self, manifests: dict[str, Manifest], group: WorkGroup) -> str:
        by = f" by {group.world_size} ranks" if group.world_size > 1 else ""
        made = self.stats.job_images
        return (
            f"make_shards: {sum(m.total_samples for m in manifests.values())} images in "
            f"{sum(len(m.shards) for m in manifests.values())} shards ({made} "
            f"made now{by}, {made / max(self.stats.seconds, 1e-9):.0f} img/s), "
            f"{_rejected(manifests.values())}, "
            f"{sum(m.total_bytes for m in manifests.values()) / 1e6:.1f} MB at "
            f"{self.config.out} ({'plain' if self.key is None else f'key {self.key.fingerprint}'}"
            f"{'' if self.data_key is None else f', sealed with {self.data_key.keyset_id}'})"
        )

    def progress(self) -> str:
        """What this process made so far, for the line printed on Ctrl-C."""
        return (
            f"{self.stats.shards} shard(s) of {self.stats.images} image(s) made by this run are "
            f"kept in {self.config.out}"
        )
