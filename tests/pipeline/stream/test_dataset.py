"""The streaming loader: equal work per rank, every sample once, seeded order, exact resume."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import Key, decrypt, encrypt
from pipeline.offline.build import ShardConfig, build_shards
from pipeline.shards.format import ShardWriter
from pipeline.stream.dataset import LoaderConfig, ShardDataset, make_loader, to_model_input
from tests.conftest import FIXED_SECRET, write_jpeg_tree


def fingerprint(image: torch.Tensor) -> str:
    return hashlib.sha1(image.numpy().tobytes()).hexdigest()[:12]


def run(shards, *, world=1, rank=0, workers=2, epoch=0, skip=0, **kw):
    config = LoaderConfig(**{"batch_size": 4, "num_workers": workers, "shuffle_buffer": 8, **kw})
    dataset = ShardDataset(shards, "train", config=config, rank=rank, world_size=world)
    dataset.set_epoch(epoch)
    dataset.skip_batches = skip
    batches = [
        ([fingerprint(img) for img in images], labels.tolist(), valid.tolist())
        for images, labels, valid in make_loader(dataset)
    ]
    return dataset, batches


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 2), (3, 2), (2, 3), (8, 2)])
def test_every_rank_same_batches_and_every_sample_once(shards, world, workers):
    seen, lengths = Counter(), set()
    for rank in range(world):
        dataset, batches = run(shards, world=world, rank=rank, workers=workers)
        assert len(batches) == len(dataset)  # what the trainer plans with
        lengths.add(len(batches))
        for images, _, valid in batches:
            seen.update(img for img, ok in zip(images, valid, strict=True) if ok)
    assert len(lengths) == 1  # no rank waits for another: no DDP hang
    assert len(seen) == 40 and set(seen.values()) == {1}  # padding is flagged, never counted


def test_fewer_shards_than_ranks_times_workers(shards):
    # 3 shards over 2 ranks x 2 workers (and 8 ranks: some get no real sample at all)
    for world in (2, 8):
        counts = {len(run(shards, world=world, rank=r)[1]) for r in range(world)}
        assert len(counts) == 1


def test_seeded_order(shards):
    _, a = run(shards, seed=1)
    _, b = run(shards, seed=1)
    _, c = run(shards, seed=2)
    _, d = run(shards, seed=1, epoch=1)
    assert a == b
    assert a != c and a != d
    order = [img for images, _, _ in a for img in images]
    assert sorted(order) == sorted(img for images, _, _ in c for img in images)


@pytest.mark.parametrize("skip", [1, 2, 5])
def test_resume_gives_exactly_the_remaining_batches(shards, skip):
    _, full = run(shards, world=2, rank=1, epoch=3)
    _, resumed = run(shards, world=2, rank=1, epoch=3, skip=skip)
    assert resumed == full[skip:]


def test_eval_order_is_fixed_and_centre_cropped(shards):
    config = dict(train=False, crop_size=48)
    _, a = run(shards, **config)
    _, b = run(shards, epoch=5, **config)
    assert a == b


def test_eval_crop_takes_the_centre_pixels_on_the_block_grid(shards):
    def images(crop_size):
        config = LoaderConfig(batch_size=4, num_workers=0, train=False, crop_size=crop_size)
        dataset = ShardDataset(shards, "train", config=config)
        return torch.cat([x for x, _, valid in make_loader(dataset)]).numpy()

    full, cropped = images(None), images(44)
    assert full.shape[1:3] == (64, 64) and cropped.shape[1:3] == (44, 44)
    # (64 - 44) / 2 = 10, rounded down to the 4-pixel grid: rows and columns 8..51
    assert np.array_equal(cropped, full[:, 8:52, 8:52])
    assert not np.array_equal(cropped, full[:, 10:54, 10:54])


def decrypted_copy(out: Path, dest: Path, key: Key) -> Path:
    """The same shards, each image decrypted in place: same samples, order and sizes (plain
    shards of the same files are in another order, which only the key decides)."""
    shutil.copytree(out, dest)
    for path in sorted(dest.glob("*.tar")):
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tar:
            for member in tar:
                name, _, ext = member.name.partition(".")
                samples.setdefault(name, {})[ext] = tar.extractfile(member).read()
        with ShardWriter(path, path.name) as writer:
            for name, files in samples.items():
                image = np.frombuffer(files["u8"], np.uint8).reshape(
                    json.loads(files["json"])["shape"]
                )
                writer.write(name, {**files, "u8": decrypt(image, key).tobytes()})
    return dest


def test_random_crops_are_block_aligned_and_commute_with_encryption(tmp_path):
    src = write_jpeg_tree(tmp_path / "src", classes=2, train=3, val=1, size=(96, 72))
    key = Key(FIXED_SECRET)
    build_shards(ShardConfig(src=str(src), out=str(tmp_path / "enc"), size=64, decoder="pil",
                             splits=("train",)), key)  # fmt: skip
    config = LoaderConfig(batch_size=2, num_workers=0, crop_size=40, seed=7, shuffle_buffer=1,
                          crop_grid=4)  # fmt: skip
    plain_copy = decrypted_copy(tmp_path / "enc", tmp_path / "dec", key)
    plain = list(ShardDataset(str(plain_copy), "train", config=config))
    secret = list(ShardDataset(str(tmp_path / "enc"), "train", config=config))
    for (p, lp, _), (e, le, _) in zip(plain, secret, strict=True):
        assert lp == le and p.shape == e.shape == (40, 40, 3)
        assert np.array_equal(encrypt(p.numpy(), key), e.numpy())  # same crop, same offsets


def test_bad_crop_sizes_are_refused(shards):
    with pytest.raises(ValueError, match="multiple of the block size 4"):
        ShardDataset(shards, "train", config=LoaderConfig(crop_size=30))
    with pytest.raises(ValueError, match="at most the stored size 64"):
        ShardDataset(shards, "train", config=LoaderConfig(crop_size=128))
    with pytest.raises(ValueError, match="crop grid 6"):
        ShardDataset(shards, "train", config=LoaderConfig(crop_size=48, crop_grid=6))


def test_to_model_input_normalises_on_the_device():
    images = torch.tensor([[[[0, 255, 128]]]], dtype=torch.uint8).expand(2, 4, 4, 3)
    x = to_model_input(images, torch.device("cpu"))
    assert x.shape == (2, 3, 4, 4) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([-1.0, 1.0, 128 / 127.5 - 1.0]), atol=1e-6)


def test_shards_without_dali_index_read_the_same(shards, tmp_path):
    import shutil
    from pathlib import Path

    bare = tmp_path / "bare"
    shutil.copytree(shards, bare)
    for index in bare.glob("*.idx"):
        index.unlink()
    assert run(str(bare), world=2, rank=1, epoch=2)[1] == run(shards, world=2, rank=1, epoch=2)[1]
    assert not list(Path(bare).glob("*.idx"))
