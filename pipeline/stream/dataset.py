"""Streaming shards into training: DDP-safe, seeded, resumable mid-epoch, local or any fsspec URL.

Built on webdataset's tar readers. Each epoch every rank and every DataLoader worker reads one
equal contiguous range of the samples (``pipeline.stream.pieces``). A range one sample short is
padded by repeating its first samples (flagged ``valid=False``, so evaluation never counts them
twice), so every rank and every worker yields exactly the same number of samples: no rank waits
for another at the end of an epoch, whatever the shard count. Within a worker, samples go
through a shuffle buffer seeded by (seed, epoch, rank, worker). Everything is a pure function of
(seed, epoch, rank, worker), so resuming at step k replays the streams and drops the first k
batches: the rest is exactly what an uninterrupted run would have seen.

Workers yield uint8 HWC images (no float work there); ``to_model_input`` converts on the
device, after the transfer. Crops stay on the block grid (``pipeline.stream.crop``).
"""

from __future__ import annotations

import math
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline.shards.checks import (
    IndexedSample,
    ShardError,
    at_shard,
    check_files,
    check_image,
    check_label,
    parse_index,
    repair_hint,
)
from pipeline.shards.format import index_name
from pipeline.stream.crop import centre_crop
from pipeline.stream.pieces import Piece, cut, epoch_pieces
from pipeline.stream.remote import open_shard
from pipeline.stream.source import open_split

# The input normalisation, ``(x/255 - mean)/std``: an image and its negative map to u and -u
INPUT_MEAN, INPUT_STD = 0.5, 0.5


@dataclass(frozen=True)
class LoaderConfig:
    batch_size: int = 64
    train: bool = True  # shuffle + random block-aligned crops; False: fixed order, centre crop
    crop_size: int | None = None  # None: the stored size
    seed: int = 0
    shuffle_buffer: int = 1000
    num_workers: int = 2
    crop_grid: int | None = None  # crop offsets are multiples of this; None: the block size


def _read_exactly(stream, n: int, key: str) -> memoryview:
    """``n`` bytes into a fresh buffer (its slices and numpy views share it: no more copies)."""
    data = bytearray(n)
    view, got = memoryview(data), 0
    while got < n:
        count = stream.readinto(view[got:])
        if not count:
            raise ShardError(f"sample {key}: the shard ends early ({got} of {n} bytes)")
        got += count
    return view


def _skip(stream, n: int, name: str) -> None:
    """Read past the first ``n`` bytes (a sealed stream cannot seek: its segments are opened
    in order; a worker does this at most once per shard it starts in the middle)."""
    buffer = memoryview(bytearray(min(n, 1 << 20) or 1))
    while n > 0:
        count = stream.readinto(buffer[: min(n, len(buffer))])
        if not count:
            raise OSError(f"{name}: shard ends early; run verify_shards")
        n -= count


class ShardDataset(torch.utils.data.IterableDataset):
    """Samples ``(image uint8 HWC, label, valid)`` of one rank, for a DataLoader with workers.

    ``set_epoch`` before each epoch; ``skip_batches`` to resume mid-epoch (set before the
    DataLoader iterator is created).
    """

    def __init__(
        self,
        data: str,
        split: str,
        *,
        config: LoaderConfig,
        rank: int = 0,
        world_size: int = 1,
        data_key: str | None = None,
    ) -> None:
        super().__init__()
        source = open_split(data, split, data_key=data_key, crop_size=config.crop_size,
                            crop_grid=config.crop_grid)  # fmt: skip
        self.storage, self.manifest = source.storage, source.manifest
        self.crop, self.block = source.crop, source.block
        self.config, self.rank, self.world_size = config, rank, world_size
        self.epoch, self.skip_batches = 0, 0
        self._indexes: dict[str, list[IndexedSample] | None] = {}
        self._counts = {s.name: s.samples for s in self.manifest.shards}
        self._hint = repair_hint(self.storage.url)
        self.workers = max(1, config.num_workers)
        rank_length = math.ceil(self.manifest.total_samples / world_size)
        self.worker_length = math.ceil(rank_length / self.workers)
        self.batches_per_worker = math.ceil(self.worker_length / config.batch_size)

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return self.batches_per_worker * self.workers

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def worker_pieces(self, worker: int) -> list[Piece]:
        """This worker's samples this epoch: the rank's cut of all shards, cut again."""
        cfg = self.config
        shards = epoch_pieces(self.manifest, epoch=self.epoch, seed=cfg.seed, shuffle=cfg.train)
        return cut(cut(shards, self.world_size, self.rank), self.workers, worker)

    def _read(self, name: str, start: int, stop: int) -> Iterator[tuple[memoryview, int]]:
        """Samples ``start..stop-1`` of shard ``name`` as (image bytes, label), each checked
        against the manifest (its files, image size and class; O(1) each): a damaged sample
        stops the run with a ``ShardError`` naming the shard and the sample."""
        shape, classes = self.manifest.image_shape, len(self.manifest.classes)
        self._index(name)  # an index that does not match the manifest names itself
        try:
            for number, (key, files) in enumerate(self._files(name, start, stop), start):
                where = f"{key} (#{number})"
                check_files(where, [ext for ext in files if not ext.startswith("__")])
                check_image(where, len(files["u8"]), shape)
                yield files["u8"], check_label(where, files["cls"], classes)
        except ShardError as exc:
            raise at_shard(self.storage.uri(name), exc, self._hint) from None

    def _files(self, name: str, start: int, stop: int) -> Iterator[tuple[str, dict]]:
        """(key, files) of samples ``start..stop-1``: read at the offsets of the shard's DALI
        index (no tar parsing), or by walking the tar when a shard has no index."""
        index = self._index(name)
        if index is None:
            yield from self._read_tar(name, start, stop)
            return
        if start >= stop:
            return
        position = min(offset for offset, _ in index[start].files.values())
        stream = self._open(name, position)
        try:
            for sample in index[start:stop]:
                end = max(offset + size for offset, size in sample.files.values())
                chunk = _read_exactly(stream, end - position, sample.key)
                yield sample.key, {ext: chunk[offset - position : offset - position + size]
                                   for ext, (offset, size) in sample.files.items()}  # fmt: skip
                position = end
        finally:
            stream.close()

    def _open(self, name: str, position: int):
        if self.storage.sealer is None:
            return open_shard(self.storage, name, start=position)
        opened = open_shard(self.storage, name)  # a sealed shard opens from its start
        _skip(opened, position, self.storage.uri(name))
        return opened

    def _index(self, name: str) -> list[IndexedSample] | None:
        """Per sample: its key and extension -> (data offset, size), from ``NAME.idx``
        (cached), checked: exactly the manifest's count of samples, each with its files and an
        image of the manifest's size."""
        if name not in self._indexes:
            try:
                data = self.storage.read_bytes(index_name(name))
            except FileNotFoundError:
                self._indexes[name] = None
            else:
                try:
                    self._indexes[name] = parse_index(
                        data, samples=self._counts[name], image_shape=self.manifest.image_shape
                    )
                except ShardError as exc:
                    uri = self.storage.uri(index_name(name))
                    raise at_shard(uri, exc, self._hint) from None
        return self._indexes[name]

    def _read_tar(self, name: str, start: int, stop: int) -> Iterator[tuple[str, dict]]:
        """Walk the tar to its samples ``start..stop-1``; one that ends too early, or holds more
        samples than the manifest says when read to its end, is a ``ShardError``."""
        stream = self._open(name, 0)
        count = 0
        try:
            files = tar_file_expander([{"url": self.storage.uri(name), "stream": stream}])
            for count, sample in enumerate(group_by_keys(files), 1):
                if count > stop:
                    break
                if count > start:
                    yield sample["__key__"], sample
        except (tarfile.TarError, ValueError) as exc:  # a damaged header, a repeated file
            why = exc.args[0] if exc.args else type(exc).__name__
            raise ShardError(f"unreadable tar after {count} samples ({why})") from None
        finally:
            stream.close()
        samples = self._counts[name]
        if count < stop:
            raise ShardError(f"the tar ends after {count} samples; the manifest says {samples}")
        if stop == samples and count > samples:
            raise ShardError(f"the tar holds more samples than the manifest's {samples}")

    def _samples(self, worker: int) -> Iterator[tuple[tuple[memoryview, int], bool]]:
        pieces = self.worker_pieces(worker)
        count, length = 0, self.worker_length
        for name, start, stop in pieces:
            for sample in self._read(name, start, stop):
                yield sample, True
                count += 1
        # padding: repeat this worker's first samples (or the first shard's, if it has none)
        source = pieces or [(self.manifest.shards[0].name, 0, self.manifest.shards[0].samples)]
        while count < length:
            for name, start, stop in source:
                for sample in self._read(name, start, stop):
                    if count >= length:
                        return
                    yield sample, False
                    count += 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, bool]]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(
                f"ShardDataset was built for {self.workers} workers but the DataLoader has "
                f"{info.num_workers}; pass the same num_workers to both"
            )
        cfg = self.config
        # The DataLoader takes batch i from worker i % workers. Resuming at batch s, its worker
        # j must play stream (j + s) % workers, whose first batches went into the first s.
        stream_id = (worker + self.skip_batches) % self.workers
        rng = random.Random(f"{cfg.seed}/{self.epoch}/{self.rank}/{stream_id}")
        stream: Iterator = self._samples(stream_id)
        if cfg.train and cfg.shuffle_buffer > 1:
            stream = wds.filters._shuffle(stream, bufsize=cfg.shuffle_buffer, rng=rng)
        skip = max(0, -(-(self.skip_batches - stream_id) // self.workers)) * cfg.batch_size
        for position, ((data, label), valid) in enumerate(stream):
            image = self._image(data, rng)  # draw crops even when skipping: same RNG stream
            if position >= skip:
                yield torch.from_numpy(image), label, valid

    def _image(self, data: memoryview, rng: random.Random) -> np.ndarray:
        height, width, channels = self.manifest.image_shape
        image = np.frombuffer(data, np.uint8).reshape(height, width, channels)
        if self.crop == height == width:  # a fresh writable buffer from _read is used as is
            return image if image.flags.writeable else image.copy()
        if not self.config.train:
            return centre_crop(image, self.crop, self.block).copy()
        top = rng.randrange(0, (height - self.crop) // self.block + 1) * self.block
        left = rng.randrange(0, (width - self.crop) // self.block + 1) * self.block
        return image[top : top + self.crop, left : left + self.crop].copy()


def make_loader(dataset: ShardDataset, *, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader whose workers match the dataset's split of the samples."""
    workers = dataset.config.num_workers
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=dataset.config.batch_size,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


def to_model_input(
    images: torch.Tensor,
    device: torch.device,
    *,
    dtype: torch.dtype = torch.float32,
    mean: float = INPUT_MEAN,
    std: float = INPUT_STD,
) -> torch.Tensor:
    """uint8 NHWC (pinned, on the host) -> normalised NCHW in channels_last on ``device``."""
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2)  # a channels_last view
    x = x.to(dtype, memory_format=torch.channels_last)
    return x.div_(255.0).sub_(mean).div_(std)
