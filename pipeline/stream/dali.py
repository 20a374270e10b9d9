"""The DALI loader backend (``--loader dali``): the same shards through ``fn.readers.webdataset``.

Rank r reads shard part r of ``world_size`` (DALI's ``shard_id``/``num_shards``: contiguous,
equal up to one sample) in every epoch (``stick_to_shard``: by default DALI moves each reader on
to the next part after an epoch, and the padding flags, computed for the rank's own part, would
then count a padded duplicate and drop a real sample; all ranks together still cover the data
every epoch), shuffled by DALI's own seeded buffer, padded to the largest part with
``pad_last_batch`` so every rank runs the same number of batches; padding is flagged
``valid=False`` like the webdataset loader's. Block-aligned random crops (``fn.slice`` at
offsets drawn from the block grid) or the centre crop on the grid; on ``device="gpu"`` the
images go to the GPU inside the pipeline. It yields the same ``(images uint8 NHWC, labels,
valid)`` batches as ``make_loader``.

Sealed shards (``make_shards --seal``), ``sealed_source="cache"`` (the default): DALI's reader
takes files, so the loader opens this split's shards once into a node-local cache in
``/dev/shm`` (memory, never persistent storage), removed when the loader goes; a split that does
not fit in half of it is refused in one line. ``sealed_source="stream"`` needs no cache: the
shards are opened while they are read and fed to DALI by ``fn.external_source``
(``pipeline.stream.dali_source``: the same samples per rank, checked the same way, its own
seeded shuffle); docs/sealing.md has the two measured against each other.

Unlike the webdataset loader, its order is not a pure function of (seed, epoch): DALI keeps
one RNG across epochs, so a resumed run restarts the interrupted epoch's order instead of
replaying it exactly (the stream source's order is one; its crops are still DALI's).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.offline.dali import _dali
from pipeline.shards.checks import ShardError, at_shard, check_label, parse_index, repair_hint
from pipeline.shards.format import ShardRecord, index_name
from pipeline.stream.dali_source import StreamSource
from pipeline.stream.dataset import LoaderConfig
from pipeline.stream.source import open_split

logger = logging.getLogger(__name__)

SEALED_SOURCES = ("cache", "stream")


class DaliShardLoader:
    """Batches ``(images, labels, valid)`` of one rank, read by DALI."""

    def __init__(
        self,
        data: str,
        split: str,
        *,
        config: LoaderConfig,
        rank: int = 0,
        world_size: int = 1,
        device: str = "cpu",
        data_key: str | None = None,
        sealed_source: Literal["cache", "stream"] = "cache",
    ) -> None:
        if sealed_source not in SEALED_SOURCES:
            raise ConfigError(
                f"sealed_source {sealed_source!r} is not one of {', '.join(SEALED_SOURCES)}"
            )
        fn, pipeline_def, types = _dali()
        source = open_split(data, split, data_key=data_key, crop_size=config.crop_size,
                            crop_grid=config.crop_grid)  # fmt: skip
        self.storage, self.manifest = source.storage, source.manifest
        self.config, self.device = config, device
        self.epoch, self.skip_batches = 0, 0
        height, width, channels = self.manifest.image_shape
        crop, block = source.crop, source.block
        total = self.manifest.total_samples
        lo, hi = rank * total // world_size, (rank + 1) * total // world_size
        self.real = hi - lo  # DALI's shard_id/num_shards split, before padding
        self.padded = math.ceil(total / world_size)
        self.batches = math.ceil(self.padded / config.batch_size)
        self._hint = repair_hint(self.storage.url)
        self._stream: StreamSource | None = None
        paths: list[str] = []
        index_paths: list[str] = []
        sealed = self.storage.sealer is not None
        if sealed and sealed_source == "stream":  # no files, no indexes: the tar is walked
            self._stream = StreamSource(self.storage, self.manifest, config=config, rank=rank,
                                        world_size=world_size, batches=self.batches)  # fmt: skip
        else:
            self._tmp = tempfile.TemporaryDirectory(
                prefix="dali-index-",
                dir=_memory_folder(self.manifest.total_bytes) if sealed else None,
            )
            if sealed:
                paths = [self._opened_copy(record.name) for record in self.manifest.shards]
            else:
                paths = [self.storage.uri(s.name) for s in self.manifest.shards]
            index_paths = [self._local_index(record) for record in self.manifest.shards]
        offsets = [float(v) for v in range(0, height - crop + 1, block)]
        centre = float((height - crop) // 2 // block * block)

        @pipeline_def(
            batch_size=config.batch_size,
            num_threads=max(1, config.num_workers),
            # the rank's own GPU (train/ddp.py sets cuda:LOCAL_RANK as current), not always 0
            device_id=torch.cuda.current_device() if device == "gpu" else None,
            seed=config.seed + 1000 * rank,
        )
        def pipe():
            if self._stream is not None:  # the same outputs as the reader's: bytes, .cls bytes
                image, label = fn.external_source(
                    source=self._stream.next_batch, num_outputs=2, batch=True,
                    dtype=[types.UINT8, types.UINT8],
                )  # fmt: skip
            else:
                image, label = fn.readers.webdataset(
                    paths=paths, index_paths=index_paths, ext=["u8", "cls"],
                    dtypes=[types.UINT8, types.UINT8], shard_id=rank, num_shards=world_size,
                    random_shuffle=config.train, initial_fill=max(1, config.shuffle_buffer),
                    pad_last_batch=True, stick_to_shard=True,
                    missing_component_behavior="error", name="reader",
                )  # fmt: skip
            image = fn.reshape(image, shape=[height, width, channels])
            if device == "gpu":
                image = image.gpu()
            if crop < height:
                if config.train:
                    anchor = fn.random.uniform(values=offsets, shape=[2])
                else:
                    anchor = types.Constant(np.array([centre, centre], np.float32))
                shape = types.Constant(np.array([crop, crop], np.float32))
                image = fn.slice(image, anchor, shape, axes=[0, 1],
                                 normalized_anchor=False, normalized_shape=False)  # fmt: skip
            return image, label

        self._pipe = pipe()
        self._pipe.build()

    def _local_index(self, record: ShardRecord) -> str:
        """A local copy of the shard's DALI index (DALI wants local files, even for s3://),
        checked first: exactly the manifest's samples, each with its files and an image of the
        manifest's size (else DALI would read fewer samples, or more, without a word)."""
        name = index_name(record.name)
        data = self.storage.read_bytes(name)
        try:
            parse_index(data, samples=record.samples, image_shape=self.manifest.image_shape)
        except ShardError as exc:
            raise at_shard(self.storage.uri(name), exc, self._hint) from None
        local = Path(self._tmp.name) / name
        local.write_bytes(data)
        return str(local)

    def __len__(self) -> int:
        return self.batches

    def _opened_copy(self, name: str) -> str:
        """Shard ``name`` opened into the loader's memory folder (it authenticates as it goes)."""
        local = Path(self._tmp.name) / name
        with self.storage.open(name) as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        return str(local)

    def set_epoch(self, epoch: int, *, skip_batches: int = 0) -> None:
        """DALI's reader reshuffles every epoch by itself (the stream source by ``epoch``); the
        next pass drops its first ``skip_batches`` batches (the same count as an uninterrupted
        epoch, in this epoch's order)."""
        self.epoch, self.skip_batches = epoch, skip_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self._stream is not None:
            self._stream.start(self.epoch)  # DALI asks for its first batches at the first run
        seen = 0
        for step in range(self.batches):
            images, labels = self._pipe.run()
            if step < self.skip_batches:
                seen += len(labels)
                continue
            batch = _to_torch(images, self.device)
            label = torch.tensor([self._label(labels[i]) for i in range(len(labels))])
            index = torch.arange(seen, seen + len(label))
            seen += len(label)
            yield batch, label, index < self.real
        self._pipe.reset()

    def _label(self, data: Any) -> int:
        """A sample's class, checked; a bad one names the shard and the sample it came from."""
        raw, classes = np.asarray(data).tobytes(), len(self.manifest.classes)
        try:
            return check_label("", raw, classes)
        except ShardError:
            shard, _, member = data.source_info().rsplit(":", 2)  # DALI: "SHARD:OFFSET:KEY.cls"
        try:
            return check_label(member.partition(".")[0], raw, classes)  # fails again, named
        except ShardError as exc:
            raise at_shard(shard, exc, self._hint) from None


def _memory_folder(needed: int) -> str:
    """Where opened sealed shards may go: /dev/shm (memory), when they fit in half its room."""
    folder = "/dev/shm"
    if not os.path.isdir(folder):
        raise ConfigError(
            "--loader dali on sealed shards needs /dev/shm for their opened copies; use "
            "--loader webdataset, which opens sealed shards while streaming"
        )
    free = shutil.disk_usage(folder).free
    if needed > free // 2:
        raise ConfigError(
            f"--loader dali on sealed shards: the split's {needed / 1e9:.1f} GB does not fit in "
            f"half of /dev/shm's {free / 1e9:.1f} GB free; use --loader webdataset, which opens "
            "sealed shards while streaming"
        )
    return folder


def _to_torch(images: Any, device: str) -> torch.Tensor:
    if device == "gpu":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        tensor = images.as_tensor()
        out = torch.empty(tuple(tensor.shape()), dtype=torch.uint8, device="cuda")
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream())
        return out
    return torch.from_numpy(images.as_array())
