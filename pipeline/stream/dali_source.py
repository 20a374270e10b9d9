"""The DALI loader's ``sealed_source="stream"``: sealed shards opened while they are read and fed
to DALI by ``fn.external_source``, with no opened copy anywhere.

Rank r reads the samples DALI's own reader would give it (``shard_id``/``num_shards``: part r
of ``world_size`` contiguous parts of the shards in manifest order). Each shard is opened from
its start and its tar walked as it streams (a sealed stream cannot seek: a part that starts
inside a shard reads past the samples before it). Every sample is checked against the manifest
(its files, its image size, its class); a damaged one ends in one ``ShardError`` naming the
shard and the sample, a tampered segment in the reader's ``SealError``. Order: the part's
pieces in a (seed, epoch, rank) order, then a shuffle buffer of ``shuffle_buffer`` samples
seeded the same way, so unlike DALI's reader the order is a pure function of (seed, epoch,
rank) and a resumed epoch replays it (the crops stay DALI's). The part is padded to whole
batches with its last sample, as DALI's ``pad_last_batch`` does.
"""

from __future__ import annotations

import itertools
import random
import tarfile
from collections.abc import Iterator, Sequence

import numpy as np
import webdataset as wds

from pipeline.shards.checks import (
    ShardError,
    at_shard,
    check_count,
    check_files,
    check_image,
    check_label,
    repair_hint,
)
from pipeline.shards.manifest import Manifest
from pipeline.storage import Storage
from pipeline.stream.dataset import LoaderConfig
from pipeline.stream.pieces import cut
from pipeline.stream.remote import open_shard

Sample = tuple[bytes, bytes]  # (image bytes, the .cls bytes): what DALI's reader hands out
Batch = tuple[list[np.ndarray], list[np.ndarray]]
Files = list[tuple[str, bytes]]  # (extension, data) of one sample, in tar order


def _grouped(tar: tarfile.TarFile) -> Iterator[tuple[str, Files]]:
    """(key, [(extension, data), ...]) per sample, in tar order (each member read while it is
    the stream's current one)."""
    key = ""
    files: Files = []
    for member in tar:
        if not member.isfile():
            continue
        name, _, ext = member.name.partition(".")
        if files and name != key:
            yield key, files
            files = []
        key = name
        reader = tar.extractfile(member)
        assert reader is not None  # a regular file
        files.append((ext, reader.read()))
    if files:
        yield key, files


def read_shard(
    storage: Storage,
    name: str,
    start: int,
    stop: int,
    *,
    samples: int,
    image_shape: Sequence[int],
    classes: int,
) -> Iterator[Sample]:
    """Samples ``start..stop-1`` of shard ``name`` (``samples`` in all, says the manifest),
    each checked: its files, an image of ``image_shape``, a class in ``0..classes-1``."""
    count, stream = 0, open_shard(storage, name)
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for number, (key, files) in enumerate(_grouped(tar)):
                count = number + 1
                if number >= stop and stop < samples:
                    break  # the rest is another part's
                if not start <= number < stop:
                    continue  # before the part, or past the manifest's count: counted below
                where, data = f"{key} (#{number})", dict(files)
                check_files(where, [ext for ext, _ in files])
                check_image(where, len(data["u8"]), image_shape)
                check_label(where, data["cls"], classes)
                yield data["u8"], data["cls"]
            else:
                # read to the end: the object's last segment authenticates its end
                while stream.read(1 << 20):
                    pass
                check_count(count, samples, "the tar holds")
    except (tarfile.TarError, EOFError) as exc:  # a damaged header, data cut short
        why = exc.args[0] if exc.args else type(exc).__name__
        error = ShardError(f"unreadable tar after {count} samples ({why})")
        raise at_shard(storage.uri(name), error, repair_hint(storage.url)) from None
    except ShardError as exc:
        raise at_shard(storage.uri(name), exc, repair_hint(storage.url)) from None


class StreamSource:
    """One rank's batches for ``fn.external_source``: ``start(epoch)`` before each pass, then
    DALI calls ``next_batch`` (ahead of ``run``: it prefetches) until ``StopIteration``."""

    def __init__(
        self,
        storage: Storage,
        manifest: Manifest,
        *,
        config: LoaderConfig,
        rank: int,
        world_size: int,
        batches: int,
    ) -> None:
        self.storage, self.manifest, self.config = storage, manifest, config
        self.rank, self.batches = rank, batches
        shards = [(s.name, 0, s.samples) for s in manifest.shards]
        self.part = cut(shards, world_size, rank)  # the same cut as DALI's shard_id/num_shards
        self._counts = {s.name: s.samples for s in manifest.shards}
        self._batches: Iterator[Batch] = iter(())

    def start(self, epoch: int) -> None:
        self._batches = self._epoch(epoch)

    def next_batch(self) -> Batch:
        return next(self._batches)

    def _read(self, name: str, start: int, stop: int) -> Iterator[Sample]:
        return read_shard(self.storage, name, start, stop, samples=self._counts[name],
                          image_shape=self.manifest.image_shape,
                          classes=len(self.manifest.classes))  # fmt: skip

    def _samples(self, epoch: int) -> Iterator[Sample]:
        cfg = self.config
        rng = random.Random(f"{cfg.seed}/{epoch}/{self.rank}/dali-stream")
        pieces = list(self.part)
        if cfg.train:
            rng.shuffle(pieces)
        stream: Iterator[Sample] = (s for piece in pieces for s in self._read(*piece))
        if cfg.train and cfg.shuffle_buffer > 1:
            stream = wds.filters._shuffle(stream, bufsize=cfg.shuffle_buffer, rng=rng)
        return stream

    def _padded(self, samples: Iterator[Sample], length: int) -> Iterator[Sample]:
        count, last = 0, None
        for last in samples:
            yield last
            count += 1
        if last is None:  # an empty part (more ranks than samples): the split's first sample
            last = next(self._read(self.manifest.shards[0].name, 0, 1))
        for _ in range(length - count):
            yield last

    def _epoch(self, epoch: int) -> Iterator[Batch]:
        size = self.config.batch_size
        samples = self._padded(self._samples(epoch), self.batches * size)
        for _ in range(self.batches):
            chunk = list(itertools.islice(samples, size))
            yield ([np.frombuffer(image, np.uint8) for image, _ in chunk],
                   [np.frombuffer(label, np.uint8) for _, label in chunk])  # fmt: skip
