"""Streaming shards into training: DDP-safe, seeded, resumable mid-epoch, local or any fsspec URL.

Built on webdataset's tar readers. Each epoch, the shard order is shuffled by (seed, epoch) and
the samples, numbered in that order, are cut into equal contiguous ranges: first one per rank,
then one per DataLoader worker. A range one sample short is padded by repeating its first
samples (flagged ``valid=False``, so evaluation never counts them twice), so every rank and
every worker yields exactly the same number of samples: no rank waits for another at the end
of an epoch, whatever the shard count. Within a worker, samples go through a shuffle buffer
seeded by (seed, epoch, rank, worker). Everything is a pure function of (seed, epoch, rank,
worker), so resuming at step k replays the streams and drops the first k batches: the rest
is exactly what an uninterrupted run would have seen.

Workers yield uint8 HWC images (no float work there); ``to_model_input`` converts on the
device, after the transfer. Crops respect the key: offsets are multiples of the block size, so
cropping an encrypted image equals encrypting the crop of the plain one.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from webdataset.gopen import gopen, gopen_schemes
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline.manifest import Manifest, load_manifest
from pipeline.shards import index_name
from pipeline.storage import Storage

logger = logging.getLogger(__name__)


class ResumableFile(io.RawIOBase):
    """A read-only fsspec file that survives dropped connections: on an I/O error it reopens
    the object and continues from the byte where it broke, with backoff, ``retries`` times."""

    def __init__(self, url: str, *, start: int = 0, retries: int = 5, backoff: float = 0.5) -> None:
        import fsspec

        self.url, self.retries, self.backoff = url, retries, backoff
        self.fs, self.path = fsspec.core.url_to_fs(url)
        self.position = start
        self.reopened = 0
        self._file = self._open()

    def _open(self):
        f = self.fs.open(self.path, "rb", block_size=8 << 20, cache_type="readahead")
        if self.position:
            f.seek(self.position)
        return f

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        for attempt in range(self.retries + 1):
            try:
                data = self._file.read(len(buffer))
                break
            except Exception as exc:  # the transports raise many types; all mean "try again"
                if attempt == self.retries:
                    raise OSError(
                        f"{self.url}: read failed at byte {self.position}: {exc}"
                    ) from exc
                logger.warning("%s: %s at byte %d; reopening", self.url, exc, self.position)
                time.sleep(self.backoff * 2**attempt)
                with contextlib.suppress(Exception):  # the connection is gone anyway
                    self._file.close()
                self.fs.invalidate_cache()
                self._file = self._open()
                self.reopened += 1
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)

    def close(self) -> None:
        self._file.close()
        super().close()


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any):
    if mode != "rb":
        raise ValueError(f"{url}: shards are opened for reading only")
    return io.BufferedReader(ResumableFile(url), buffer_size=1 << 20)


def register_fsspec_schemes(schemes: tuple[str, ...] = ("s3", "gs", "gcs", "az", "abfs")) -> None:
    """webdataset 1.0.2 has no s3:// handler; open these URLs through fsspec, with retries."""
    for scheme in schemes:
        gopen_schemes[scheme] = _gopen_fsspec


register_fsspec_schemes()


@dataclass(frozen=True)
class LoaderConfig:
    batch_size: int = 64
    train: bool = True  # shuffle + random block-aligned crops; False: fixed order, centre crop
    crop_size: int | None = None  # None: the stored size
    seed: int = 0
    shuffle_buffer: int = 1000
    num_workers: int = 2
    crop_grid: int | None = None  # crop offsets are multiples of this; None: the block size


Piece = tuple[str, int, int]  # (shard name, first sample, end sample)


def cut(pieces: list[Piece], parts: int, part: int) -> list[Piece]:
    """Part ``part`` of ``parts`` equal contiguous ranges over the samples of ``pieces``
    (sizes differ by one at most; ``ceil(total / parts)`` is the padded length)."""
    total = sum(stop - start for _, start, stop in pieces)
    lo, hi = part * total // parts, (part + 1) * total // parts
    out, offset = [], 0
    for name, start, stop in pieces:
        a, b = max(lo, offset), min(hi, offset + stop - start)
        if a < b:
            out.append((name, start + a - offset, start + b - offset))
        offset += stop - start
    return out


def epoch_pieces(manifest: Manifest, *, epoch: int, seed: int, shuffle: bool) -> list[Piece]:
    """Every shard, whole, in this epoch's order (shuffled by (seed, epoch))."""
    pieces = [(s.name, 0, s.samples) for s in manifest.shards]
    if shuffle:
        random.Random(f"{seed}/{epoch}/shards").shuffle(pieces)
    return pieces


def crop_geometry(manifest: Manifest, config: LoaderConfig) -> tuple[int, int]:
    """(crop size, crop grid) for these shards, checked: crops must commute with the key."""
    return check_crop(
        manifest.image_shape,
        manifest.block_size,
        crop_size=config.crop_size,
        crop_grid=config.crop_grid,
    )


def check_crop(
    image_shape: Sequence[int],
    block_size: int | None,
    *,
    crop_size: int | None = None,
    crop_grid: int | None = None,
) -> tuple[int, int]:
    """(crop size, crop grid) for images of ``image_shape`` (HWC) encrypted with blocks of
    ``block_size`` (None: plain), checked: crops must commute with the key."""
    height, width, _ = image_shape
    grid = crop_grid or block_size or 1
    crop = crop_size or height
    if block_size and grid % block_size:
        raise ValueError(
            f"crop grid {grid} is not a multiple of the key's block size "
            f"{block_size}; crops would not commute with the encryption"
        )
    if crop > min(height, width) or crop % grid:
        raise ValueError(
            f"crop size {crop} must be at most the stored size {height} and a multiple "
            f"of the block size {grid} (so crops commute with the encryption)"
        )
    return crop, grid


def centre_crop(images: np.ndarray, crop: int, grid: int) -> np.ndarray:
    """The evaluation crop of HWC or NHWC images: ``crop x crop`` at the centre, its offsets
    rounded down to the grid (a view; the images themselves when nothing is cut)."""
    height, width = images.shape[-3:-1]
    top = (height - crop) // 2 // grid * grid
    left = (width - crop) // 2 // grid * grid
    return images[..., top : top + crop, left : left + crop, :]


def _read_exactly(stream, n: int, name: str) -> memoryview:
    """``n`` bytes into a fresh buffer (its slices and numpy views share it: no more copies)."""
    data = bytearray(n)
    view, got = memoryview(data), 0
    while got < n:
        count = stream.readinto(view[got:])
        if not count:
            raise OSError(f"{name}: shard ends early ({got} of {n} bytes); run verify_shards")
        got += count
    return view


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
    ) -> None:
        super().__init__()
        self.storage = Storage(data)
        self.manifest = load_manifest(self.storage, split)
        self.config, self.rank, self.world_size = config, rank, world_size
        self.epoch, self.skip_batches = 0, 0
        self._indexes: dict[str, list | None] = {}
        self.workers = max(1, config.num_workers)
        self.crop, self.block = crop_geometry(self.manifest, config)
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

    def _read(self, name: str, start: int, stop: int) -> Iterator[dict]:
        """Samples ``start..stop-1`` of shard ``name``: read at the offsets of its DALI index
        (no tar parsing), or by walking the tar when a shard has no index."""
        index = self._index(name)
        if index is None:
            yield from self._read_tar(name, start, stop)
            return
        if start >= stop:
            return
        position = min(offset for offset, _ in index[start].values())
        stream = self._open(name, position)
        try:
            for entries in index[start:stop]:
                end = max(offset + size for offset, size in entries.values())
                chunk = _read_exactly(stream, end - position, name)
                yield {ext: chunk[offset - position : offset - position + size]
                       for ext, (offset, size) in entries.items()}  # fmt: skip
                position = end
        finally:
            stream.close()

    def _open(self, name: str, position: int):
        if self.storage.is_local:
            f = open(self.storage.path(name), "rb")  # noqa: SIM115 - closed by the caller
            f.seek(position)
            return f
        return io.BufferedReader(ResumableFile(self.storage.uri(name), start=position), 1 << 20)

    def _index(self, name: str) -> list[dict[str, tuple[int, int]]] | None:
        """Per sample: extension -> (data offset, size), from ``NAME.idx`` (cached)."""
        if name not in self._indexes:
            try:
                text = self.storage.read_bytes(index_name(name)).decode()
            except FileNotFoundError:
                self._indexes[name] = None
            else:
                samples = []
                for line in text.splitlines()[1:]:
                    t = line.split()
                    samples.append(
                        {t[i]: (int(t[i + 1]), int(t[i + 2])) for i in range(0, len(t), 4)}
                    )
                self._indexes[name] = samples
        return self._indexes[name]

    def _read_tar(self, name: str, start: int, stop: int) -> Iterator[dict]:
        url = self.storage.uri(name)
        stream = gopen(url)
        try:
            files = tar_file_expander([{"url": url, "stream": stream}])
            for index, sample in enumerate(group_by_keys(files)):
                if index >= stop:
                    break
                if index >= start:
                    yield sample
        finally:
            stream.close()

    def _samples(self, worker: int) -> Iterator[tuple[dict, bool]]:
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
        for position, (sample, valid) in enumerate(stream):
            image = self._image(sample, rng)  # draw crops even when skipping: same RNG stream
            if position >= skip:
                yield torch.from_numpy(image), int(bytes(sample["cls"])), valid

    def _image(self, sample: dict, rng: random.Random) -> np.ndarray:
        height, width, channels = self.manifest.image_shape
        image = np.frombuffer(sample["u8"], np.uint8).reshape(height, width, channels)
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
    mean: float = 0.5,
    std: float = 0.5,
) -> torch.Tensor:
    """uint8 NHWC (pinned, on the host) -> normalised NCHW in channels_last on ``device``."""
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2)  # a channels_last view
    x = x.to(dtype, memory_format=torch.channels_last)
    return x.div_(255.0).sub_(mean).div_(std)
