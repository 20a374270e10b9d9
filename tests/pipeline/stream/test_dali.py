"""The DALI loader backend reads the same shards: same samples, equal batches per rank, crops
on the block grid."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from pipeline.stream.dataset import LoaderConfig, ShardDataset

pytest.importorskip("nvidia.dali", reason="DALI is installed on Linux x86_64 only")

from pipeline.stream.dali import DaliShardLoader  # noqa: E402


def digest(image) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def full_images(shards) -> dict[str, np.ndarray]:
    config = LoaderConfig(train=False, num_workers=0)
    return {
        digest(img.numpy()): img.numpy()
        for img, _, _ in ShardDataset(shards, "train", config=config)
    }


@pytest.mark.parametrize("world", [1, 2, 3])
def test_same_samples_each_once_and_equal_batches(shards, world):
    expected = full_images(shards)
    seen, lengths = [], set()
    for rank in range(world):
        loader = DaliShardLoader(shards, "train", config=LoaderConfig(batch_size=4, num_workers=1),
                                 rank=rank, world_size=world)  # fmt: skip
        batches = list(loader)
        lengths.add(len(batches))
        assert len(batches) == len(loader)
        for images, labels, valid in batches:
            assert images.shape[1:] == (64, 64, 3) and len(labels) == len(images)
            seen += [digest(img.numpy()) for img, ok in zip(images, valid, strict=True) if ok]
    assert len(lengths) == 1
    assert sorted(seen) == sorted(expected)  # every sample once; padding flagged


def test_random_crops_are_on_the_block_grid(shards):
    images = list(full_images(shards).values())
    config = LoaderConfig(batch_size=8, num_workers=1, crop_size=48, seed=5)
    loader = DaliShardLoader(shards, "train", config=config)
    offsets = set()
    for batch, _, valid in loader:
        for crop, ok in zip(batch.numpy(), valid, strict=True):
            if not ok:
                continue
            found = [
                (top, left)
                for image in images
                for top in range(0, 17)
                for left in range(0, 17)
                if np.array_equal(image[top : top + 48, left : left + 48], crop)
            ]
            assert found and all(t % 4 == 0 and x % 4 == 0 for t, x in found), found
            offsets.update(found)
    assert len(offsets) > 3  # really random


def test_eval_centre_crop_matches_the_webdataset_loader(shards):
    config = LoaderConfig(batch_size=8, num_workers=1, crop_size=40, train=False)
    dali = [digest(img.numpy()) for b, _, v in DaliShardLoader(shards, "train", config=config)
            for img, ok in zip(b, v, strict=True) if ok]  # fmt: skip
    config = LoaderConfig(batch_size=8, num_workers=0, crop_size=40, train=False)
    ours = [digest(img.numpy()) for img, _, _ in ShardDataset(shards, "train", config=config)]
    assert sorted(dali) == sorted(ours)


@pytest.mark.parametrize("train", [False, True])
def test_every_epoch_each_rank_keeps_its_own_part(shards, train):
    """40 samples over 3 ranks (13, 13, 14): in every epoch each sample is counted once and no
    padding is. DALI moves each reader to the next part after an epoch unless told to stay;
    then from epoch 2 a rank flagged its old part's count of the new part's samples as real."""
    expected = sorted(full_images(shards))
    config = LoaderConfig(batch_size=4, num_workers=1, train=train, seed=3)
    loaders = [DaliShardLoader(shards, "train", config=config, rank=r, world_size=3)
               for r in range(3)]  # fmt: skip
    for epoch in range(3):
        seen = []
        for loader in loaders:
            loader.set_epoch(epoch)
            for images, _, valid in loader:
                seen += [digest(img.numpy()) for img, ok in zip(images, valid, strict=True) if ok]
        assert sorted(seen) == expected, f"epoch {epoch}"
