"""Both loader backends behind one interface: the same samples, the same batch count, and
``set_epoch(skip_batches=k)`` drops exactly the first k batches."""

from __future__ import annotations

import hashlib
import importlib.util

import pytest

from pipeline.stream.dataset import LoaderConfig
from pipeline.stream.split import make_split_loader

HAS_DALI = importlib.util.find_spec("nvidia") is not None and (
    importlib.util.find_spec("nvidia.dali") is not None
)
BACKENDS = [
    "webdataset",
    pytest.param("dali", marks=pytest.mark.skipif(not HAS_DALI, reason="DALI: Linux x86_64 only")),
]


def passes(loader, epoch: int, skip: int) -> list[list[str]]:
    loader.set_epoch(epoch, skip_batches=skip)
    return [
        [hashlib.sha1(img.numpy().tobytes()).hexdigest() for img, ok in zip(x, v, strict=True)
         if ok]
        for x, _, v in loader
    ]  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_interface_same_samples_and_skip(shards, backend):
    config = LoaderConfig(batch_size=4, num_workers=1, train=False)
    loader = make_split_loader(backend, shards, "train", config=config)
    assert loader.manifest.total_samples == 40
    whole = passes(loader, 0, 0)
    assert len(whole) == len(loader) == 10
    assert len({h for batch in whole for h in batch}) == 40
    assert passes(loader, 0, 3) == whole[3:]  # val order is fixed: the skipped ones go
    assert passes(loader, 0, 0) == whole  # a later pass is whole again


def test_unknown_backend_is_named(shards):
    with pytest.raises(ValueError, match="'torchdata' is not one of webdataset, dali"):
        make_split_loader("torchdata", shards, "train", config=LoaderConfig())
