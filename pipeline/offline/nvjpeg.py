"""nvJPEG decoding on the GPU (``--decoder nvjpeg``): torchvision's batched ``decode_jpeg``,
then resize and centre crop on the GPU with the geometry of ``decode_pil``.

Geometry (:func:`resize_crop`): the shorter side is resized to ``size`` with
``pipeline.offline.decode.resized_shape`` (the longer side rounded half up), bilinear and
antialiased when shrinking (``torch.nn.functional.interpolate(..., antialias=True)``, which
follows PIL's filter), rounded to uint8, then the centre crop of ``crop_box`` (offsets rounded
down). It runs on CPU tensors too, which is how it is tested against ``decode_pil``.

nvJPEG takes whole baseline 3-channel (YCbCr or RGB) JPEGs. Everything else the other decoders
take (PNG and other formats, greyscale, CMYK, progressive JPEGs, files that do not end with the
JPEG end-of-image marker) is decoded on the CPU by ``decode_pil`` for that file and copied to
the GPU; a file nvJPEG refuses (corrupt) gets the same CPU decode, so it is kept or rejected as
``--decoder pil`` would. The images come back as CUDA uint8 ``size x size x 3`` tensors on this
rank's GPU, where the build encrypts them.

torchvision 0.29 marks its image decoding deprecated (TorchCodec supersedes it); its warning is
silenced here as the decoder is still what this module uses.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pipeline.offline.decode import (
    DEFAULT_MAX_PIXELS,
    DecodeError,
    PilDecoder,
    crop_box,
    resized_shape,
    use_max_pixels,
)

logger = logging.getLogger(__name__)

warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision are deprecated",
    category=DeprecationWarning,
)


def resize_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """A ``3 x H x W`` uint8 image (any device) as ``size x size x 3`` uint8, the geometry of
    ``decode_pil``: shorter side to ``size``, bilinear (antialiased when shrinking), centre
    crop."""
    _, height, width = image.shape
    new_width, new_height = resized_shape(width, height, size)
    resized = image
    if (new_width, new_height) != (width, height):
        scaled = torch.nn.functional.interpolate(
            image[None].float(),
            size=(new_height, new_width),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )[0]
        resized = scaled.round_().clamp_(0, 255).to(torch.uint8)
    left, top, right, bottom = crop_box(new_width, new_height, size)
    return resized[:, top:bottom, left:right].permute(1, 2, 0).contiguous()


_SEQUENTIAL = (0xC0, 0xC1)  # start-of-frame markers of the JPEGs nvJPEG takes (Huffman)
_STANDALONE = (0x01, *range(0xD0, 0xD8))  # markers without a length
_SCAN = 0xDA


def nvjpeg_takes(data: bytes) -> bool:
    """Whether a file is a whole baseline 3-channel JPEG (what nvJPEG decodes); the rest goes to
    PIL. Reads the markers up to the frame header (sequential, 8-bit, three components: PIL's
    ``RGB`` JPEGs, which leaves out progressive, lossless, arithmetic, grey and CMYK), then the
    end: a file that does not end with the end-of-image marker (truncated, or with data after
    the image) goes to PIL too, which rejects truncated files where a GPU decoder might return
    grey rows. No PIL here: parsing each header twice (``probe`` opens it too) cost the
    offline stage's one builder process about 35 us an image."""
    if not data.startswith(b"\xff\xd8") or not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return False
    pos, end = 2, len(data)
    while pos + 9 < end:
        if data[pos] != 0xFF:
            return False  # no marker where one must be
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte
            pos += 1
        elif marker in _STANDALONE:
            pos += 2
        elif marker in _SEQUENTIAL:  # FF Cn, length (2), precision, height (2), width (2), Nf
            return data[pos + 4] == 8 and data[pos + 9] == 3
        elif 0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker == _SCAN:
            return False  # another kind of frame, or a scan before any frame
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return False


class NvjpegDecoder:
    """Decode + resize + centre-crop batches with nvJPEG on GPU ``device_id``.

    ``device="cpu"`` runs the same code with torchvision's CPU JPEG decoder (libjpeg-turbo):
    for tests on machines without a GPU. ``decode`` may be called from several threads; the
    GPU work of one batch runs at a time.
    """

    def __init__(
        self,
        size: int,
        *,
        device_id: int = 0,
        device: str = "cuda",
        num_threads: int = 2,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        from torchvision.io import ImageReadMode, decode_jpeg

        self._decode_jpeg, self._rgb = decode_jpeg, ImageReadMode.RGB
        self.size, self.max_pixels = size, max_pixels
        self.device = torch.device("cuda", device_id) if device == "cuda" else torch.device(device)
        self._cpu = PilDecoder(size, num_threads=num_threads, max_pixels=max_pixels)
        self._lock = threading.Lock()
        self.cpu_files = 0  # files decoded by PIL (not nvJPEG's kind, or refused by it)

    def decode(self, blobs: Sequence[bytes]) -> list[Any]:
        """One ``size x size x 3`` uint8 tensor on the device, or a ``DecodeError``, per blob."""
        use_max_pixels(self.max_pixels)
        on_gpu = [nvjpeg_takes(b) for b in blobs]
        results: list[Any] = [None] * len(blobs)
        gpu = [i for i, takes in enumerate(on_gpu) if takes]
        with self._lock, _on(self.device):
            for i, resized in zip(gpu, self._decode_gpu([blobs[i] for i in gpu]), strict=True):
                results[i] = resized
        rest = [i for i, done in enumerate(results) if done is None]
        self.cpu_files += len(rest)
        for i, image in zip(rest, self._cpu.decode([blobs[i] for i in rest]), strict=True):
            results[i] = image if isinstance(image, DecodeError) else self._upload(image)
        return results

    def _decode_gpu(self, blobs: Sequence[bytes]) -> list[torch.Tensor | None]:
        """Resized images, or None where nvJPEG refused the file (PIL then tries it)."""
        if not blobs:
            return []
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        try:
            decoded: list[torch.Tensor | None] = list(
                self._decode_jpeg(data, mode=self._rgb, device=self.device)
            )
        except RuntimeError:  # one bad file fails the batch: find it
            decoded = [self._decode_one(d) for d in data]
        return [None if d is None else resize_crop(d, self.size) for d in decoded]

    def _decode_one(self, data: torch.Tensor) -> torch.Tensor | None:
        try:
            return self._decode_jpeg(data, mode=self._rgb, device=self.device)
        except RuntimeError:
            return None

    def _upload(self, image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(image).to(self.device)

    def close(self) -> None:
        self._cpu.close()


def _on(device: torch.device):
    """The CUDA device context of ``device`` (the calling thread's current device may be
    another), or nothing on the CPU."""

    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
