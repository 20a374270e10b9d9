"""DALI: CPU decoding against PIL, bad files, and DALI's own reader on our shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import Key, decrypt
from pipeline.offline.build import ShardConfig, build_shards
from pipeline.offline.decode import DecodeError, decode_pil
from tests.conftest import FIXED_SECRET, sources_by_key, write_jpeg_tree

dali = pytest.importorskip("nvidia.dali", reason="DALI is installed on Linux x86_64 only")

from pipeline.offline.dali import DaliDecoder  # noqa: E402


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[bytes]:
    root = write_jpeg_tree(
        tmp_path_factory.mktemp("dali"), classes=3, train=8, val=0, size=(500, 375)
    )
    return [p.read_bytes() for p in sorted(root.rglob("*.JPEG"))]


@pytest.mark.parametrize("size", [224, 64])
def test_cpu_decoder_is_close_to_pil(photos, size):
    dali_images = np.stack(DaliDecoder(size, batch_size=8).decode(photos))  # 3 batches
    pil_images = np.stack([decode_pil(b, size) for b in photos])
    assert dali_images.shape == pil_images.shape == (len(photos), size, size, 3)
    diff = np.abs(dali_images.astype(int) - pil_images.astype(int))
    assert diff.mean() < 0.3  # measured 0.13 (224) and 0.10 (64)
    assert (diff <= 1).mean() > 0.99  # a misaligned crop or filter would fail this badly


def test_16bit_greyscale_png_scales_as_the_pil_decoder_does():
    """DALI and PIL read a 16-bit PNG by the same convention, round(x * 255 / 65535): the
    whole range, pixel for pixel at the stored size (no resize to blur the comparison)."""
    import io

    from PIL import Image

    grey = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG")
    data = buffer.getvalue()
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    ours = decode_pil(data, 64)
    theirs = np.asarray(DaliDecoder(64, batch_size=1).decode([data])[0])
    np.testing.assert_array_equal(theirs, ours)
    assert ours[0, 0, 0] == 0 and ours[-1, -1, 0] == 255 and 120 < ours.mean() < 135


def test_a_bad_file_fails_alone(photos, tmp_path):
    import io

    from PIL import Image

    good = photos[:4]
    truncated = photos[4][: len(photos[4]) // 2]
    text = b"not an image at all"
    buffer = io.BytesIO()
    Image.open(io.BytesIO(photos[5])).convert("CMYK").save(buffer, "JPEG", quality=95)
    cmyk = buffer.getvalue()
    decoder = DaliDecoder(64, batch_size=8)
    results = decoder.decode([good[0], truncated, good[1], text, cmyk, good[2], good[3]])
    assert isinstance(results[1], DecodeError) and isinstance(results[3], DecodeError)
    alone = decoder.decode(good)  # the pipeline still works, and gives the same pixels
    for got, want in zip([results[i] for i in (0, 2, 5, 6)], alone, strict=True):
        assert np.array_equal(got, want)
    assert np.abs(results[4].astype(int) - decode_pil(cmyk, 64).astype(int)).mean() < 0.5


def test_make_shards_with_dali_decrypts_to_dali_output(tmp_path):
    src = write_jpeg_tree(tmp_path / "src", classes=2, train=3, val=2, size=(200, 150))
    key = Key(FIXED_SECRET)
    config = ShardConfig(src=str(src), out=str(tmp_path / "out"), size=64, decoder="dali",
                         device="cpu", shard_size="3", batch_size=4, splits=("val",))  # fmt: skip
    manifest = build_shards(config, key)["val"]
    assert manifest.options["decoder"] == "dali" and manifest.options["decode_device"] == "cpu"
    decoder = DaliDecoder(64)
    import webdataset as wds

    urls = [str(tmp_path / "out" / s.name) for s in manifest.shards]
    sources = sources_by_key(src, tmp_path / "out", key, "val")
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["json"])
        image = np.frombuffer(sample["u8"], np.uint8).reshape(meta["shape"])
        (expected,) = decoder.decode([(src / sources[sample["__key__"]]).read_bytes()])
        assert np.array_equal(decrypt(image, key), expected)  # exactly, for the same decoder


@pytest.mark.parametrize("use_index", [False, True])
def test_dali_reader_reads_our_shards(tmp_path, use_index):
    import webdataset as wds
    from nvidia.dali import fn, pipeline_def, types

    src = write_jpeg_tree(tmp_path / "src", classes=3, train=4, val=3, size=(120, 90))
    config = ShardConfig(src=str(src), out=str(tmp_path / "out"), size=32, decoder="pil",
                         plain=True, shard_size="4", splits=("val",))  # fmt: skip
    manifest = build_shards(config, None)["val"]
    paths = [str(tmp_path / "out" / s.name) for s in manifest.shards]
    indexes = [p[: -len(".tar")] + ".idx" for p in paths]
    assert all(Path(i).exists() for i in indexes)

    @pipeline_def(batch_size=3, num_threads=1, device_id=None)
    def pipe():
        return tuple(fn.readers.webdataset(
            paths=paths, index_paths=indexes if use_index else None, ext=["u8", "cls", "json"],
            dtypes=[types.UINT8] * 3, missing_component_behavior="error", name="reader",
        ))  # fmt: skip

    p = pipe()
    p.build()
    seen = []
    for _ in range(3):  # 9 samples, batches of 3
        images, labels, metas = p.run()
        for i in range(len(images)):
            meta = json.loads(np.array(metas.at(i)).tobytes())
            image = np.array(images.at(i)).reshape(meta["shape"])
            seen.append((meta["source"], int(np.array(labels.at(i)).tobytes()), image))
    expected = [
        (
            json.loads(s["json"])["source"],
            int(s["cls"]),
            np.frombuffer(s["u8"], np.uint8).reshape(32, 32, 3),
        )
        for s in wds.WebDataset(paths, shardshuffle=False)
    ]
    assert [(a, b) for a, b, _ in seen] == [(a, b) for a, b, _ in expected]
    assert all(np.array_equal(x[2], y[2]) for x, y in zip(seen, expected, strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_decoder_matches_cpu(photos):
    gpu = DaliDecoder(64, device="gpu", batch_size=8).decode(photos)
    cpu = np.stack(DaliDecoder(64, batch_size=8).decode(photos))
    assert all(isinstance(t, torch.Tensor) and t.is_cuda for t in gpu)
    diff = np.abs(torch.stack(gpu).cpu().numpy().astype(int) - cpu.astype(int))
    assert diff.mean() < 1.0  # nvJPEG and libjpeg-turbo differ slightly (DALI issue #2966)
