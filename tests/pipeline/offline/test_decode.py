"""PIL decoding: every mode PIL opens becomes the right 8-bit RGB (issue 21, item 2)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.offline.decode import decode_pil, to_rgb8

RNG = np.random.default_rng(0)
GREY16 = RNG.integers(0, 65536, size=(16, 24), dtype=np.uint16)


def expected_from_16bit(grey: np.ndarray) -> np.ndarray:
    """Independent conversion: x * 255 / 65535, rounded, replicated to three channels."""
    grey8 = np.rint(grey.astype(np.float64) * 255 / 65535).astype(np.uint8)
    return np.repeat(grey8[:, :, None], 3, axis=2)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_16bit_png_decodes_to_its_true_grey_levels() -> None:
    grey = np.full((16, 24), 34_000, dtype=np.uint16)  # about 132 in 8 bits, not white
    got = decode_pil(png_bytes(Image.fromarray(grey)), 16)
    assert abs(float(got.mean()) - 34_000 * 255 / 65535) < 0.5


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16bit_modes_scale_by_255_over_65535(mode: str) -> None:
    if mode == "I;16B":
        img = Image.frombytes(mode, (24, 16), GREY16.astype(">u2").tobytes())
    elif mode == "I":
        img = Image.fromarray(GREY16.astype(np.int32))
    else:
        img = Image.fromarray(GREY16)
    assert img.mode == mode
    np.testing.assert_array_equal(to_rgb8(img), expected_from_16bit(GREY16))


def test_float_mode_is_clipped_to_0_255() -> None:
    values = np.array([[-5.0, 0.4, 127.6, 300.0]], dtype=np.float32)
    got = to_rgb8(Image.fromarray(values, mode="F"))
    np.testing.assert_array_equal(got[0, :, 0], [0, 0, 128, 255])
    assert got.shape == (1, 4, 3)


def test_alpha_is_dropped_not_composited() -> None:
    la = np.stack([np.full((2, 2), 200, np.uint8), np.zeros((2, 2), np.uint8)], axis=2)
    np.testing.assert_array_equal(to_rgb8(Image.fromarray(la, mode="LA")), np.full((2, 2, 3), 200))
    pal = Image.new("P", (2, 2), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.info["transparency"] = 1
    np.testing.assert_array_equal(to_rgb8(pal), np.tile([10, 20, 30], (2, 2, 1)))
    pa = pal.convert("PA")
    np.testing.assert_array_equal(to_rgb8(pa), np.tile([10, 20, 30], (2, 2, 1)))


def test_cmyk_and_bilevel() -> None:
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red
    np.testing.assert_array_equal(to_rgb8(cmyk), np.tile([255, 0, 0], (2, 2, 1)))
    bits = Image.fromarray(np.array([[True, False]]))
    assert bits.mode == "1"
    np.testing.assert_array_equal(to_rgb8(bits)[0, :, 0], [255, 0])


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` 1-bit pixels (no pixel data needed to probe)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_max_pixels_not_overridden_by_pil_bomb_limit() -> None:
    from pipeline.offline.decode import probe

    data = huge_png_header(20_000, 10_000)  # 200 MP: over PIL's default bomb limit (2 x 89 MP)
    assert probe(data, 300_000_000) is None
    rejected = probe(data, 100_000_000)
    assert rejected is not None and "--max-pixels" in rejected.reason
