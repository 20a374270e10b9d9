"""One interface for both loader backends: the batches of one split on one rank.

``make_split_loader`` opens the webdataset loader (``pipeline.stream.dataset``: a
``ShardDataset`` behind a fresh ``DataLoader`` per pass) or the DALI loader
(``pipeline.stream.dali``); either is a ``SplitLoader``: ``len()`` batches per epoch (the same
on every rank), ``set_epoch(epoch, skip_batches=k)`` before each pass, then iteration yields
``(images uint8 NHWC, labels, valid)`` batches from batch ``k`` of that epoch on. Training
needs nothing else, so it never asks which backend it has.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, Protocol

import torch

from pipeline.errors import ConfigError
from pipeline.shards.manifest import Manifest
from pipeline.storage import Storage
from pipeline.stream.dataset import LoaderConfig, ShardDataset, make_loader

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
BACKENDS = ("webdataset", "dali")


class SplitLoader(Protocol):
    storage: Storage
    manifest: Manifest

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, *, skip_batches: int = 0) -> None: ...

    def __iter__(self) -> Iterator[Batch]: ...


class WebDatasetLoader:
    """A ``ShardDataset`` read through a ``DataLoader`` whose workers match its split."""

    def __init__(self, dataset: ShardDataset, *, pin_memory: bool = False) -> None:
        self.dataset, self.pin_memory = dataset, pin_memory
        self.storage, self.manifest = dataset.storage, dataset.manifest

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int, *, skip_batches: int = 0) -> None:
        self.dataset.set_epoch(epoch)
        self.dataset.skip_batches = skip_batches  # exact: the skipped batches are replayed

    def __iter__(self) -> Iterator[Batch]:
        return iter(make_loader(self.dataset, pin_memory=self.pin_memory))


def make_split_loader(
    backend: Literal["webdataset", "dali"],
    data: str,
    split: str,
    *,
    config: LoaderConfig,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    data_key: str | None = None,
) -> SplitLoader:
    """The loader of ``split`` for this rank; ``device`` is where the batches go (pinned host
    memory for the webdataset loader, DALI's own GPU pipeline on ``cuda``)."""
    cuda = torch.device(device).type == "cuda"
    if backend == "dali":
        from pipeline.stream.dali import DaliShardLoader  # imports DALI: only when asked for

        return DaliShardLoader(data, split, config=config, rank=rank, world_size=world_size,
                               device="gpu" if cuda else "cpu", data_key=data_key)  # fmt: skip
    if backend != "webdataset":
        raise ConfigError(f"loader {backend!r} is not one of {', '.join(BACKENDS)}")
    dataset = ShardDataset(
        data, split, config=config, rank=rank, world_size=world_size, data_key=data_key
    )
    return WebDatasetLoader(dataset, pin_memory=cuda)
