"""Decoding source images to the stored size: NVIDIA DALI (GPU or CPU), PIL as the fallback.

Every image becomes ``size x size x 3`` uint8 RGB: the shorter side is resized to ``size``
(bilinear, antialiased when shrinking), then the centre ``size x size`` is cropped. Every mode
PIL opens goes through :func:`to_rgb8` first: 16-bit greyscale (``I;16``, ``I;16B``, ``I``) is
scaled ``x * 255 / 65535`` and rounded, float (``F``) is clipped to 0..255 and rounded, alpha
(``LA``, ``PA``, ``RGBA``, palette transparency) is dropped, not composited, as DALI's RGB
output drops it; CMYK, palette and 1-bit images use PIL's own conversion.

Files that cannot be decoded are not fatal: each decoder returns a ``DecodeError`` with the
reason in that sample's place, and the caller records it as a reject.
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import signal
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import KeyprotectError

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 64_000_000  # about 8000 x 8000; ImageNet's largest is under 20 MP

# --max-pixels is the one limit: PIL's bomb check is set to it (use_max_pixels) and its warning,
# which would fire between max_pixels and twice that, is replaced by probe's reject.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def use_max_pixels(max_pixels: int) -> None:
    """Make PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, process-wide) agree with
    ``--max-pixels``; called by every probe and decode, so a worker process gets it too."""
    Image.MAX_IMAGE_PIXELS = max_pixels


@dataclass(frozen=True)
class DecodeError:
    """Why one file could not become an image."""

    reason: str


def probe(data: bytes, max_pixels: int) -> DecodeError | None:
    """Cheap header checks (no pixel decoding): empty, not an image, or too large."""
    if not data:
        return DecodeError("empty file (0 bytes)")
    use_max_pixels(max_pixels)
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            fmt = img.format
    except UnidentifiedImageError:
        return DecodeError("not a recognised image format")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return DecodeError(
            f"{exc}; over --max-pixels {max_pixels}: raise --max-pixels to accept it"
        )
    except Exception as exc:  # PIL raises many types on garbage headers
        return DecodeError(f"unreadable image header ({type(exc).__name__}: {exc})")
    if width * height > max_pixels:
        return DecodeError(
            f"{fmt} image is {width}x{height} = {width * height} pixels, over --max-pixels "
            f"{max_pixels}; raise --max-pixels to accept it"
        )
    return None


def resized_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to ``size``; the longer side is rounded
    half up, as DALI does (Python's ``round`` would round half to even)."""
    if width <= height:
        return size, max(size, int(height * size / width + 0.5))
    return max(size, int(width * size / height + 0.5)), size


def crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    left, top = (width - size) // 2, (height - size) // 2
    return left, top, left + size, top + size


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb8(image: Image.Image) -> np.ndarray:
    """``height x width x 3`` uint8 RGB of an opened image, whatever its mode.

    PIL's own ``convert("RGB")`` clips 16-bit values to 255 (a 16-bit PNG comes out white), so
    16-bit and 32-bit integer greyscale is scaled here: ``round(x * 255 / 65535)`` after clipping
    to 0..65535. Float greyscale is clipped to 0..255 and rounded. Alpha is dropped.
    """
    if image.mode in _SIXTEEN_BIT:
        grey = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        grey8 = ((grey * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey8[:, :, None], 3, axis=2)
    if image.mode == "F":
        grey8 = np.rint(np.clip(np.asarray(image, dtype=np.float64), 0, 255)).astype(np.uint8)
        return np.repeat(grey8[:, :, None], 3, axis=2)
    if image.mode == "PA":
        image = image.convert("P")  # keeps the palette; drops the alpha band
    if image.mode != "RGB":
        image = image.convert("RGB")  # CMYK, L, LA, P, RGBA, 1 ... -> RGB, alpha dropped
    return np.asarray(image, dtype=np.uint8).copy()


GREY_TOLERANCE = 2  # grey levels between channels that still count as grey (JPEG noise)


def is_grey(rgb: np.ndarray) -> bool:
    """Whether an HxWx3 uint8 image has three equal channels (within ``GREY_TOLERANCE``)."""
    wide = rgb.astype(np.int16)
    spread = np.abs(wide[..., 0] - wide[..., 1]).max(), np.abs(wide[..., 1] - wide[..., 2]).max()
    return bool(max(spread) <= GREY_TOLERANCE)


def decode_pil(data: bytes, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode, convert to RGB (:func:`to_rgb8`), resize the shorter side to ``size`` and
    centre-crop. ``max_pixels`` is PIL's bomb limit for the decode (:func:`use_max_pixels`)."""
    use_max_pixels(max_pixels)
    with Image.open(io.BytesIO(data)) as opened:
        opened.load()  # raises on truncated data instead of returning grey rows
        img: Image.Image = (
            opened if opened.mode == "RGB" else Image.fromarray(to_rgb8(opened), "RGB")
        )
        width, height = resized_shape(*img.size, size)
        if (width, height) != img.size:
            img = img.resize((width, height), Image.Resampling.BILINEAR)
        img = img.crop(crop_box(width, height, size))
        return np.asarray(img, dtype=np.uint8).copy()


def _decode_or_error(data: bytes, size: int, max_pixels: int) -> np.ndarray | DecodeError:
    try:
        return decode_pil(data, size, max_pixels=max_pixels)
    except Exception as exc:  # a bad file is a reject, not a crash
        return DecodeError(f"PIL could not decode it ({type(exc).__name__}: {exc})")


def _start_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def _decode_chunk(blobs: Sequence[bytes], size: int, max_pixels: int) -> tuple[list, float]:
    """Decode in a worker process: the images and the CPU seconds they took there."""
    started = time.process_time()
    images = [_decode_or_error(b, size, max_pixels) for b in blobs]
    return images, time.process_time() - started


_PRELOAD = {__name__}


def forkserver_context(*preload: str) -> multiprocessing.context.BaseContext:
    """Worker processes forked from a server that imported only these modules (and this one):
    they inherit no threads, locks or CUDA state from the caller (which has all three), and
    start without importing them again. The server starts on the first pool's first task."""
    _PRELOAD.update(preload)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(sorted(_PRELOAD))  # not __main__: a tool's imports
    return context


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """A Ctrl-C held until the block ends, then raised. Only the main thread receives one, so
    elsewhere this does nothing. One that lands while a pool starts a worker process leaves a
    process the pool never learns of: it fails once this one has exited, and prints a traceback
    under the one-line message."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    before = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
        if held and callable(before):
            before(signal.SIGINT, None)


class DecoderCrashed(KeyprotectError, RuntimeError):
    """A decoding process died (killed, out of memory, or a crash in an image library)."""

    @classmethod
    def of(cls, exc: BaseException) -> DecoderCrashed:
        return cls(
            f"a decoding process died ({exc}); finished shards are kept and a rerun resumes. "
            "If it happens again: a script that calls build_shards must guard its top level "
            "with `if __name__ == '__main__':` (the processes import it); else look for an "
            "image that crashes PIL, or a process killed for lack of memory"
        )


class InlinePilDecoder:
    """PIL in the calling thread: a shard-building process's decoder (the processes are the
    parallelism)."""

    def __init__(self, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.size, self.max_pixels = size, max_pixels

    def decode(self, blobs: Sequence[bytes]) -> list[np.ndarray | DecodeError]:
        return [_decode_or_error(b, self.size, self.max_pixels) for b in blobs]

    def close(self) -> None:
        pass


class PilDecoder:
    """Decodes a batch with PIL in ``num_threads`` worker processes.

    Processes, not threads: PIL releases the GIL while it decodes and resizes, but not in the
    Python around each image, and on a 16-core host 16 threads made 1.7x one thread's img/s
    (GPU check, 2026-12-04). The pool starts on the first batch and ends with :meth:`close`.
    make_shards builds whole shards in processes instead (``pipeline.offline.build``); this
    one serves the decoders that keep images in the caller (PIL before GPU encryption,
    nvJPEG's CPU fallback).
    """

    def __init__(
        self, size: int, *, num_threads: int = 2, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        self.size, self.max_pixels = size, max_pixels
        self.num_workers = max(1, num_threads)
        self.cpu_seconds = 0.0  # the workers' CPU seconds (a process's own time leaves them out)
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _workers(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self.num_workers, mp_context=forkserver_context(), initializer=_start_worker
                )
            return self._pool

    def decode(self, blobs: Sequence[bytes]) -> list[np.ndarray | DecodeError]:
        if not blobs:
            return []
        pool = self._workers()
        step = -(-len(blobs) // (2 * self.num_workers))  # two chunks a worker: an even finish
        futures = [
            pool.submit(_decode_chunk, blobs[i : i + step], self.size, self.max_pixels)
            for i in range(0, len(blobs), step)
        ]
        images: list[np.ndarray | DecodeError] = []
        try:
            for future in futures:
                chunk, cpu_s = future.result()
                images.extend(chunk)
                self.cpu_seconds += cpu_s
        except BrokenProcessPool as exc:
            raise DecoderCrashed.of(exc) from None
        return images

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(cancel_futures=True)
                self._pool = None
