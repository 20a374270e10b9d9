"""--decoder nvjpeg and --decoder auto: the GPU decoder's geometry and routing, run on the CPU
(torchvision's CPU JPEG decoder stands in for nvJPEG), the choice of decoder, and, with a GPU,
a build on it."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import Key, decrypt
from pipeline.errors import ConfigError
from pipeline.offline import config as run_config
from pipeline.offline.build import build_shards
from pipeline.offline.config import ShardConfig, choose_decoder
from pipeline.offline.decode import DecodeError, decode_pil
from pipeline.offline.nvjpeg import NvjpegDecoder, nvjpeg_takes, resize_crop
from tests.conftest import FIXED_SECRET, sources_by_key, write_jpeg_tree

pytestmark = pytest.mark.filterwarnings(  # torchvision 0.29's notice (the module silences it)
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)

# measured on 200 photo crops of about 500x375 (bench_make_shards.make_source) against
# decode_pil: mean 0.134 (S=224) and 0.079 (S=64) grey levels, every pixel within 1
MEAN_BOUND, MAX_BOUND = 0.3, 2


def jpeg_blobs(tmp_path: Path, size=(500, 375), count=6) -> list[bytes]:
    tree = write_jpeg_tree(tmp_path / "src", classes=2, train=count // 2, val=0, size=size)
    return [p.read_bytes() for p in sorted((tree / "train").rglob("*.JPEG"))]


def encoded(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("size", [224, 64, 32])
@pytest.mark.parametrize("shape", [(500, 375), (375, 500), (160, 120)])
def test_resize_crop_matches_decode_pil_geometry(tmp_path, size, shape):
    from torchvision.io import ImageReadMode, decode_jpeg

    for blob in jpeg_blobs(tmp_path, size=shape, count=2):
        chw = decode_jpeg(torch.frombuffer(bytearray(blob), dtype=torch.uint8),
                          mode=ImageReadMode.RGB)  # fmt: skip
        got = resize_crop(chw, size).numpy().astype(int)
        want = decode_pil(blob, size).astype(int)
        assert got.shape == want.shape == (size, size, 3)
        diff = np.abs(got - want)
        assert diff.mean() < MEAN_BOUND and diff.max() <= MAX_BOUND


def test_upscaling_and_exact_sizes_follow_decode_pil(tmp_path):
    for shape, size in (((40, 30), 64), ((64, 64), 64), ((64, 80), 64)):
        blob = encoded(Image.fromarray(np.random.default_rng(0).integers(
            0, 256, (shape[1], shape[0], 3), dtype=np.uint8)), quality=95)  # fmt: skip
        got = NvjpegDecoder(size, device="cpu").decode([blob])[0].numpy().astype(int)
        assert np.abs(got - decode_pil(blob, size).astype(int)).max() <= MAX_BOUND


def test_files_nvjpeg_cannot_take_go_to_pil_or_are_rejected_as_with_pil(tmp_path):
    good = jpeg_blobs(tmp_path, count=2)[0]
    photo = Image.open(io.BytesIO(good)).convert("RGB")
    others = {
        "grey": encoded(photo.convert("L"), quality=95),
        "cmyk": encoded(photo.convert("CMYK"), quality=95),
        "png": encoded(photo, "PNG"),
        "progressive": encoded(photo, quality=90, progressive=True),
    }
    bad = {"truncated": good[: len(good) // 2], "garbage": b"\xff\xd8\xff" + b"x" * 500}
    assert nvjpeg_takes(good) and not any(nvjpeg_takes(b) for b in others.values())
    assert not nvjpeg_takes(bad["truncated"])  # PIL, which rejects it, decodes it
    decoder = NvjpegDecoder(64, device="cpu")
    blobs = [good, *others.values(), *bad.values()]
    results = decoder.decode(blobs)
    assert decoder.cpu_files == len(others) + len(bad)  # the bad JPEG header one too
    assert isinstance(results[0], torch.Tensor) and results[0].shape == (64, 64, 3)
    for blob, result in zip(others.values(), results[1 : 1 + len(others)], strict=True):
        assert np.array_equal(result.numpy(), decode_pil(blob, 64))  # PIL's own output
    from pipeline.offline.decode import PilDecoder

    pil_says = PilDecoder(64).decode(list(bad.values()))
    for got, want in zip(results[-len(bad) :], pil_says, strict=True):
        assert isinstance(got, DecodeError) and isinstance(want, DecodeError)
        assert re.sub("0x[0-9a-f]+", "", got.reason) == re.sub("0x[0-9a-f]+", "", want.reason)


def pil_would_send_to_nvjpeg(data: bytes) -> bool:
    """The rule read through PIL: a JPEG PIL opens as RGB, not progressive, ending in FFD9."""
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:
            progressive = img.info.get("progressive") or img.info.get("progression")
            return img.format == "JPEG" and img.mode == "RGB" and not progressive
    except Exception:
        return False


@pytest.mark.parametrize(
    "mode, kw",
    [
        ("RGB", {}),
        ("RGB", {"subsampling": 0}),
        ("RGB", {"subsampling": 2, "optimize": True}),
        ("RGB", {"progressive": True}),
        ("RGB", {"icc_profile": b"p" * 70000}),  # a profile over several APP2 segments
        ("RGB", {"exif": b"Exif\x00\x00" + bytes(100)}),
        ("L", {}),
        ("CMYK", {}),
        ("YCbCr", {}),
    ],
)
def test_which_files_go_to_nvjpeg_is_what_pil_reads_in_the_header(mode, kw):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 40, 3), np.uint8))
    data = encoded(image.convert(mode), quality=80, **kw)
    assert nvjpeg_takes(data) == pil_would_send_to_nvjpeg(data)
    assert nvjpeg_takes(data) == (mode in ("RGB", "YCbCr") and not kw.get("progressive"))


def test_a_bad_file_in_a_batch_costs_only_that_file(tmp_path):
    blobs = jpeg_blobs(tmp_path, count=4)
    broken = bytearray(blobs[1])
    table = broken.index(b"\xff\xc4")  # a Huffman table of 0xff bytes: the decoder fails
    broken[table + 5 : table + 25] = b"\xff" * 20
    assert nvjpeg_takes(bytes(broken))  # the header and the end look fine: it goes to nvJPEG
    decoder = NvjpegDecoder(32, device="cpu")
    results = decoder.decode([blobs[0], bytes(broken), *blobs[2:]])
    assert isinstance(results[1], DecodeError) and "PIL could not decode it" in results[1].reason
    assert decoder.cpu_files == 1  # the batch failed; each file again, then PIL for that one
    for i in (0, 2, 3):
        diff = np.abs(results[i].numpy().astype(int) - decode_pil(blobs[i], 32).astype(int))
        assert diff.max() <= MAX_BOUND


@pytest.mark.parametrize(
    "decoder, device, cuda, dali, chosen",
    [
        ("auto", "auto", True, True, ("dali", "gpu")),
        ("auto", "auto", True, False, ("nvjpeg", "gpu")),
        ("auto", "auto", False, True, ("dali", "cpu")),
        ("auto", "auto", False, False, ("pil", "cpu")),
        ("auto", "cpu", True, True, ("dali", "cpu")),
        ("auto", "cpu", True, False, ("pil", "cpu")),
        ("nvjpeg", "auto", True, True, ("nvjpeg", "gpu")),
        ("nvjpeg", "gpu", True, False, ("nvjpeg", "gpu")),
        ("dali", "auto", False, True, ("dali", "cpu")),
        ("pil", "auto", True, True, ("pil", "cpu")),
    ],
)
def test_choose_decoder(monkeypatch, decoder, device, cuda, dali, chosen):
    monkeypatch.setattr(run_config, "_cuda_available", lambda: cuda)
    monkeypatch.setattr(run_config, "_dali_available", lambda: dali)
    assert choose_decoder(decoder, device) == chosen


@pytest.mark.parametrize(
    "made_with, device, cuda, dali, chosen",
    [
        (("pil", "cpu"), "auto", True, True, ("pil", "cpu")),  # the output's, though a GPU is here
        (("dali", "cpu"), "auto", True, True, ("dali", "cpu")),
        (("nvjpeg", "gpu"), "auto", True, True, ("nvjpeg", "gpu")),
        (("dali", "gpu"), "auto", False, True, ("dali", "cpu")),  # no GPU here: auto's own
        (("nvjpeg", "gpu"), "auto", False, False, ("pil", "cpu")),
        (("dali", "cpu"), "auto", False, False, ("pil", "cpu")),  # no DALI here
        (("dali", "gpu"), "cpu", True, True, ("dali", "cpu")),  # --device cpu rules it out
        (("pil", "gpu"), "auto", True, True, ("dali", "gpu")),  # not a real record
    ],
)
def test_auto_keeps_the_decoder_an_output_was_made_with_where_it_can_run(
    monkeypatch, made_with, device, cuda, dali, chosen
):
    monkeypatch.setattr(run_config, "_cuda_available", lambda: cuda)
    monkeypatch.setattr(run_config, "_dali_available", lambda: dali)
    assert choose_decoder("auto", device, made_with) == chosen
    assert choose_decoder("pil", "auto", ("dali", "cpu")) == ("pil", "cpu")  # asked: never kept


def test_nvjpeg_without_cuda_is_refused_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setattr(run_config, "_cuda_available", lambda: False)
    with pytest.raises(ConfigError, match="--decoder nvjpeg decodes on a CUDA GPU and none"):
        choose_decoder("nvjpeg", "auto")
    with pytest.raises(ConfigError, match=r"\(--device cpu was given\)"):
        choose_decoder("nvjpeg", "cpu")
    with pytest.raises(ConfigError, match="must be one of auto, dali, nvjpeg, pil"):
        choose_decoder("turbo", "auto")
    src = write_jpeg_tree(tmp_path / "src", classes=2, train=2, val=1)
    config = ShardConfig(src=str(src), out=str(tmp_path / "out"), size=32, decoder="nvjpeg")
    with pytest.raises(ConfigError, match="nvjpeg"):
        build_shards(config, Key(FIXED_SECRET))
    assert not (tmp_path / "out").exists()


def test_auto_records_the_decoder_that_ran_and_makes_its_bytes(monkeypatch, tmp_path, caplog):
    """On a CPU machine auto is what the default was (DALI's CPU decoder; PIL without DALI):
    the same manifest options and bytes."""
    monkeypatch.setattr(run_config, "_cuda_available", lambda: False)
    src = write_jpeg_tree(tmp_path / "src", classes=2, train=3, val=1)
    key = Key(FIXED_SECRET)
    caplog.set_level("INFO", logger="pipeline.offline.build")

    def made(out: str, **kw) -> tuple[dict, list[str]]:
        config = ShardConfig(src=str(src), out=str(tmp_path / out), size=32, shard_size="4",
                             splits=("train",), **kw)  # fmt: skip
        manifest = build_shards(config, key)["train"]
        return manifest.options, [s.sha256 for s in manifest.shards]

    monkeypatch.setattr(run_config, "_dali_available", lambda: False)
    assert made("auto-pil") == made("pil", decoder="pil")
    assert made("auto-pil")[0]["decoder"] == "pil"
    assert "decoding with pil (--decoder auto) on the CPU" in caplog.text  # says which ran
    pytest.importorskip("nvidia.dali", reason="DALI is installed on Linux x86_64 only")
    monkeypatch.setattr(run_config, "_dali_available", lambda: True)
    options, hashes = made("auto-dali", decoder="auto")
    assert (options["decoder"], options["decode_device"]) == ("dali", "cpu")
    assert (options, hashes) == made("dali", decoder="dali", device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvjpeg_build_on_the_gpu(tmp_path):
    src = write_jpeg_tree(tmp_path / "src", classes=2, train=6, val=2, size=(200, 150))
    folder = src / "train" / "n00000000"
    Image.open(next(folder.glob("*.JPEG"))).convert("L").save(folder / "grey.JPEG")
    (folder / "truncated.JPEG").write_bytes((folder / "img_0_000.JPEG").read_bytes()[:800])
    key = Key(FIXED_SECRET)
    config = ShardConfig(src=str(src), out=str(tmp_path / "out"), size=64, shard_size="5",
                         decoder="nvjpeg", splits=("train",), max_reject_fraction=0.2)  # fmt: skip
    manifest = build_shards(config, key)["train"]
    assert (manifest.options["decoder"], manifest.options["decode_device"]) == ("nvjpeg", "gpu")
    assert [Path(r["source"]).name for r in manifest.rejects] == ["truncated.JPEG"]  # by PIL
    import tarfile

    sources = sources_by_key(src, tmp_path / "out", key, "train")
    diffs = []
    for record in manifest.shards:
        with tarfile.open(tmp_path / "out" / record.name) as tar:
            for member in tar:
                if member.name.endswith(".u8"):
                    image = np.frombuffer(tar.extractfile(member).read(), np.uint8)
                    plain = decrypt(image.reshape(64, 64, 3), key).astype(int)
                    want = decode_pil((src / sources[member.name[:-3]]).read_bytes(), 64)
                    diffs.append(np.abs(plain - want.astype(int)))
    assert len(diffs) == manifest.total_samples
    # nvJPEG's IDCT and chroma upsampling differ a little from libjpeg-turbo's
    assert np.mean([d.mean() for d in diffs]) < 2 and max(d.max() for d in diffs) < 40
