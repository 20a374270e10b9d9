"""PIL decoding: every mode PIL opens becomes the right 8-bit RGB (issue 21, item 2); the
decoding processes (issue 19): the same images in order, a dead one in one line."""

from __future__ import annotations

import io
import os
import signal
import time

import numpy as np
import pytest
from PIL import Image

from pipeline.offline.decode import DecodeError, DecoderCrashed, PilDecoder, decode_pil, to_rgb8

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


def jpeg_bytes(seed: int, size: tuple[int, int] = (90, 70)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_the_decoding_processes_give_the_images_decode_pil_gives_in_order() -> None:
    blobs = [jpeg_bytes(i) for i in range(7)] + [b"not an image"]
    decoder = PilDecoder(32, num_threads=2)
    try:
        images = decoder.decode(blobs)
    finally:
        decoder.close()
    for blob, image in zip(blobs[:-1], images, strict=False):
        assert np.array_equal(image, decode_pil(blob, 32))
    assert isinstance(images[-1], DecodeError) and "PIL could not decode" in images[-1].reason
    assert decoder.cpu_seconds > 0  # the workers' CPU time comes back to the caller


def test_a_decoding_process_that_dies_is_one_line_naming_what_to_do() -> None:
    decoder = PilDecoder(32, num_threads=1)
    try:
        decoder.decode([jpeg_bytes(0)])  # the pool is up
        pool = decoder._pool
        assert pool is not None
        for process in list(pool._processes.values()):
            os.kill(process.pid, signal.SIGKILL)
        with pytest.raises(DecoderCrashed) as caught:
            for _ in range(50):  # the pool notices the death on the next call at the latest
                decoder.decode([jpeg_bytes(1)])
                time.sleep(0.05)
        assert "\n" not in str(caught.value) and "a rerun resumes" in str(caught.value)
        assert "if __name__ == '__main__':" in str(caught.value)
    finally:
        decoder.close()


def test_a_ctrl_c_while_workers_start_is_held_to_the_end_of_the_block():
    """A Ctrl-C that lands while a pool starts a process is raised once the start is done (a
    process the pool never learned of printed a traceback after make_shards' one line)."""
    import os
    import signal
    import threading

    from pipeline.offline.decode import interrupts_held

    reached = []
    with pytest.raises(KeyboardInterrupt), interrupts_held():
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # a signal is handled between bytecodes: many of them here
            reached.append(1)
    assert len(reached) == 1000 and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with interrupts_held():  # none: nothing raised
        reached.clear()
    errors: list[BaseException] = []

    def elsewhere() -> None:  # another thread may not set handlers: a no-op there, no error
        try:
            with interrupts_held():
                reached.append(2)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert reached == [2] and not errors
