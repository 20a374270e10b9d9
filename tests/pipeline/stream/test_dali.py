"""The DALI loader backend reads the same shards: same samples, equal batches per rank, crops
on the block grid; sealed shards through its /dev/shm cache or streamed, to the same samples."""

from __future__ import annotations

import gc
import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline import Key
from pipeline.cipher.seal import SealError, generate_data_key
from pipeline.errors import ConfigError
from pipeline.offline.build import ShardConfig, build_shards
from pipeline.shards.checks import ShardError
from pipeline.shards.format import ShardWriter
from pipeline.shards.sealing import open_output
from pipeline.stream.dataset import LoaderConfig, ShardDataset
from tests.conftest import FIXED_SECRET, write_jpeg_tree

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


# Sealed shards: the cache in /dev/shm (default) and the stream through fn.external_source.

SHARD = "train-000001.tar"  # of train-000000..2: 15, 15 and 10 samples


def build_sealed(out: Path, data_key, tmp_path: Path) -> str:
    """The shards fixture's split (40 samples, 64x64, M=4), sealed with ``data_key``."""
    src = write_jpeg_tree(tmp_path / "src", classes=4, train=10, val=3, size=(96, 72))
    config = ShardConfig(src=str(src), out=str(out), size=64, decoder="pil", shard_size="15",
                         batch_size=8, splits=("train",))  # fmt: skip
    build_shards(config, Key(FIXED_SECRET), data_key=data_key)
    return str(out)


@pytest.fixture(scope="module")
def data_key():
    return generate_data_key()


@pytest.fixture(scope="module")
def sealed(data_key, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("sealed")
    return build_sealed(root / "shards", data_key, root)


def epoch_samples(loader, epoch: int) -> list[tuple[str, int]]:
    """(image digest, label) of the real samples of one pass, in the order they came."""
    loader.set_epoch(epoch)
    return [(digest(img.numpy()), int(label))
            for images, labels, valid in loader
            for img, label, ok in zip(images, labels, valid, strict=True) if ok]  # fmt: skip


@pytest.mark.parametrize("world", [1, 3])
def test_the_stream_gives_each_rank_the_cache_s_samples(sealed, data_key, world):
    config = LoaderConfig(batch_size=4, num_workers=1, seed=2)
    every = []
    for rank in range(world):
        cache, stream = (
            DaliShardLoader(
                sealed,
                "train",
                config=config,
                rank=rank,
                world_size=world,
                data_key=data_key,
                sealed_source=source,
            )  # fmt: skip
            for source in ("cache", "stream")
        )
        assert len(stream) == len(cache) and stream.real == cache.real
        for epoch in range(2):
            ours = epoch_samples(stream, epoch)
            assert sorted(ours) == sorted(epoch_samples(cache, epoch)), (rank, epoch)
        every += ours
    assert len(every) == 40 and len({d for d, _ in every}) == 40  # a disjoint cover


def test_the_stream_s_centre_crops_equal_the_cache_s(sealed, data_key):
    config = LoaderConfig(batch_size=8, num_workers=1, crop_size=40, train=False)
    cache, stream = (DaliShardLoader(sealed, "train", config=config, data_key=data_key,
                                     sealed_source=source)
                     for source in ("cache", "stream"))  # fmt: skip
    assert epoch_samples(stream, 0) == epoch_samples(cache, 0)  # unshuffled: the same order


def test_the_stream_order_is_seeded_by_epoch_and_replays_on_resume(sealed, data_key):
    config = LoaderConfig(batch_size=4, num_workers=1, seed=7)
    loader = DaliShardLoader(sealed, "train", config=config, data_key=data_key,
                             sealed_source="stream")  # fmt: skip
    first, second = epoch_samples(loader, 0), epoch_samples(loader, 1)
    assert first != second and sorted(first) == sorted(second)
    again = DaliShardLoader(sealed, "train", config=config, data_key=data_key,
                            sealed_source="stream")  # fmt: skip
    again.set_epoch(1, skip_batches=3)
    resumed = [(digest(img.numpy()), int(label)) for images, labels, valid in again
               for img, label, ok in zip(images, labels, valid, strict=True) if ok]  # fmt: skip
    assert resumed == second[3 * 4 :]


def test_an_unknown_sealed_source_is_refused(sealed, data_key):
    with pytest.raises(ConfigError, match="sealed_source 'disk' is not one of cache, stream"):
        DaliShardLoader(sealed, "train", config=LoaderConfig(), data_key=data_key,
                        sealed_source="disk")  # type: ignore[arg-type]  # fmt: skip


def loader_error(data: str, data_key) -> str:
    """The one error a stream pass over ``data`` ends in, as text; nothing of it is kept (its
    traceback would keep DALI's threads alive into the next tests' forks)."""
    config = LoaderConfig(batch_size=4, num_workers=1, train=False)
    try:
        list(DaliShardLoader(data, "train", config=config, data_key=data_key,
                             sealed_source="stream"))  # fmt: skip
    except (SealError, ShardError) as exc:
        text = f"{type(exc).__name__}: {exc}"
    else:
        pytest.fail("no SealError or ShardError")
    gc.collect()
    assert "\n" not in text and "Traceback" not in text, text
    return text


def test_a_tampered_sealed_shard_ends_the_stream_in_one_line(sealed, data_key, tmp_path):
    data = Path(shutil.copytree(sealed, tmp_path / "copy"))
    raw = bytearray((data / SHARD).read_bytes())
    raw[len(raw) // 2] ^= 1
    (data / SHARD).write_bytes(bytes(raw))
    text = loader_error(str(data), data_key)
    assert text.startswith("SealError: ") and f"train/{SHARD}: does not authenticate" in text


@pytest.mark.parametrize("damage", ["image size", "label"])
def test_a_damaged_sealed_sample_names_the_shard_and_sample(sealed, data_key, tmp_path, damage):
    data = Path(shutil.copytree(sealed, tmp_path / "copy"))
    storage = open_output(data, data_key)
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(SHARD))) as tar:
        for m in tar:
            key, _, ext = m.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    bad = sorted(samples)[3]
    if damage == "image size":
        samples[bad]["u8"] = bytes(32 * 32 * 3)  # a 32x32 sample among 64x64 ones
        said = "3072 image bytes, expected 12288"
    else:
        samples[bad]["cls"] = b"9"  # 4 classes
        said = "class 9 outside 0..3"
    with ShardWriter(data / SHARD, SHARD, sealer=storage.sealer) as writer:
        for key, files in samples.items():
            writer.write(key, files)
    text = loader_error(str(data), data_key)
    assert text.startswith(f"ShardError: {data / SHARD}: sample {bad} (#3): {said}"), text
    assert f"tools/verify_shards.py {data}" in text
