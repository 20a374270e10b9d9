"""Authorized inference: a trained model and its key, on ordinary image files.

    from pipeline.model.classifier import ProtectedClassifier
    clf = ProtectedClassifier.load("runs/demo/protected/checkpoint.pt", "runs/demo/k.bin")
    top = clf.predict_files(["a.jpg", "b.png"], k=5)  # per file: [(class name, probability)]
    logits = clf.logits(images)  # plain uint8 NHWC at the stored size; encrypted here

Files go through what the shards' images went through, so the model sees what it was trained
and evaluated on: PIL decoding to the stored size (RGB, shorter side resized, centre crop, as
``make_shards.py --decoder pil``), the loader's evaluation crop (the run's crop size at the
centre, on the block grid), encryption with the key, and ``to_model_input``.

A protected model is refused a key other than the one it was trained with (the fingerprints are
compared; the error shows both, never the secret), and refused no key. A model trained on plain
shards takes ``key=None`` and is refused a key: encrypting its inputs would only break it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.cipher.blockwise import encrypt
from pipeline.cipher.keys import Key, load_key
from pipeline.device import model_device, resolve_device
from pipeline.errors import KeyprotectError
from pipeline.model.checkpoint import DECODERS, Checkpoint, CheckpointError
from pipeline.model.evaluation import load_model, predict
from pipeline.offline.dali import DaliUnavailableError
from pipeline.offline.decode import (
    DEFAULT_MAX_PIXELS,
    DecodeError,
    decode_pil,
    is_grey,
    probe,
    to_rgb8,
)
from pipeline.stream.crop import centre_crop, check_crop

logger = logging.getLogger(__name__)


class ImageFileError(KeyprotectError, ValueError):
    """An input file that cannot be classified; the message names it and says why."""


def check_key(saved: Checkpoint, key: Key | None, checkpoint: str) -> None:
    """Refuse a key (or no key) that does not match the checkpoint's ``key_fingerprint``."""
    expected = saved.key_fingerprint
    if expected is None and key is not None:
        raise CheckpointError(
            f"{checkpoint}: this model was trained on plain (unencrypted) images, but a key was "
            f"given (fingerprint {key.fingerprint}); run it without a key"
        )
    if expected is not None and key is None:
        raise CheckpointError(
            f"{checkpoint}: this model is protected by key {expected}; pass that key"
        )
    if key is None:
        return
    if key.fingerprint != expected:
        raise CheckpointError(
            f"{checkpoint}: the model was trained with key {expected}, but the key given has "
            f"fingerprint {key.fingerprint}; pass the key the model was trained with"
        )
    if saved.transforms and saved.transforms != key.transforms:
        raise CheckpointError(
            f"{checkpoint}: the model was trained with transforms {'+'.join(saved.transforms)}"
            f", but the key file says {'+'.join(key.transforms)}"
        )
    if saved.block_size not in (None, key.block_size):
        raise CheckpointError(
            f"{checkpoint}: the model was trained with block size {saved.block_size}, but the "
            f"key file says {key.block_size}"
        )


def read_bytes(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """The file's bytes, after the header checks make_shards.py applies."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageFileError(f"{path}: image file not found") from None
    except IsADirectoryError:
        raise ImageFileError(f"{path}: is a directory, not an image file") from None
    except PermissionError:
        raise ImageFileError(f"{path}: permission denied reading the image") from None
    error = probe(data, max_pixels)
    if error is not None:
        raise ImageFileError(f"{path}: cannot be classified: {error.reason}")
    return data


def read_image(
    path: str | os.PathLike, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """``size x size x 3`` uint8 RGB, decoded as ``make_shards.py --decoder pil`` does."""
    data = read_bytes(path, max_pixels=max_pixels)
    try:
        return decode_pil(data, size, max_pixels=max_pixels)
    except Exception as exc:  # PIL raises many types on damaged data
        raise ImageFileError(
            f"{path}: cannot be classified: PIL could not decode it ({type(exc).__name__}: {exc})"
        ) from None


def read_images_dali(
    paths: Sequence[str | os.PathLike], size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """As :func:`read_image`, with DALI's CPU decoder (what ``--decoder dali`` stored)."""
    from pipeline.offline.dali import DaliDecoder

    blobs = [read_bytes(p, max_pixels=max_pixels) for p in paths]
    decoder = DaliDecoder(size, device="cpu", batch_size=max(1, min(64, len(blobs))))
    try:
        decoded = decoder.decode(blobs)
    finally:
        decoder.close()
    for path, image in zip(paths, decoded, strict=True):
        if isinstance(image, DecodeError):
            raise ImageFileError(f"{path}: cannot be classified: {image.reason}")
    return np.stack(decoded)


# inputs whose longer side is this many times the stored side get a remark in predict
FAR_SIZE_FACTOR = 4


class ProtectedClassifier:
    """A trained model (eval mode) with the key its inputs are encrypted with."""

    def __init__(
        self,
        model: torch.nn.Module,
        saved: Checkpoint,
        key: Key | None,
        *,
        checkpoint: str = "<checkpoint>",
        device: torch.device | str | None = None,
    ) -> None:
        """``device``: where to run (``auto``, ``cpu``, ``cuda[:N]``; the model is moved there);
        None: where the model already is."""
        check_key(saved, key, checkpoint)
        if device is not None:
            model = model.to(resolve_device(device))
        self.model, self.key, self.checkpoint = model.eval(), key, checkpoint
        self.device = model_device(model)
        self.classes: list[str] = list(saved.classes)
        self.image_shape: tuple[int, int, int] = saved.image_shape
        self.input_stats: dict | None = saved.input_stats
        # decode as the shards were (checkpoints before this field: PIL, which matches DALI's
        # CPU decoder to within a grey level on average)
        self.decoder: str = saved.decoder or "pil"
        if self.decoder not in DECODERS:  # Checkpoint.load refuses it; a record built here too
            raise CheckpointError(f"{checkpoint}: decoder {saved.decoder!r} is not one of "
                                  f"{', '.join(DECODERS)}")  # fmt: skip
        self.crop, self.grid = check_crop(self.image_shape, saved.block_size,
                                          crop_size=saved.crop_size)  # fmt: skip

    @classmethod
    def load(
        cls,
        checkpoint: str | os.PathLike,
        key: Key | str | os.PathLike | None,
        *,
        device: torch.device | str = "cpu",
    ) -> ProtectedClassifier:
        """The model of ``checkpoint`` with ``key`` (a ``Key`` or a key file; None: plain), on
        ``device`` (``auto``, ``cpu``, ``cuda[:N]``)."""
        model, saved = load_model(checkpoint, device)
        if key is not None and not isinstance(key, Key):
            key = load_key(key, expected=saved.key_fingerprint)
        return cls(model, saved, key, checkpoint=str(checkpoint))

    @property
    def stored_size(self) -> int:
        """The side images are decoded to, as in the shards the model was trained on."""
        return self.image_shape[0]

    @property
    def key_fingerprint(self) -> str | None:
        return None if self.key is None else self.key.fingerprint

    def read_files(
        self, paths: Sequence[str | os.PathLike], *, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> np.ndarray:
        """Plain uint8 NHWC images at the stored size, one per file, in order."""
        size = self.stored_size
        if not paths:
            return np.empty((0, *self.image_shape), np.uint8)
        if self.decoder == "dali":
            try:
                return read_images_dali(paths, size, max_pixels=max_pixels)
            except DaliUnavailableError:
                logger.warning("DALI is not installed; decoding with PIL instead (within about "
                               "a grey level of DALI's output)")  # fmt: skip
        return np.stack([read_image(p, size, max_pixels=max_pixels) for p in paths])

    def remarks(self, paths: Sequence[str | os.PathLike]) -> list[str | None]:
        """Per file, a remark when it is far from what the model was trained on, else None.

        The rules: the file's shorter side is under half, or its longer side over
        ``FAR_SIZE_FACTOR`` times, the stored side of the training images; and, where the
        checkpoint records the training images' colour statistics (``input_stats``), a colour
        input to a model trained on grey images only, or a grey input to one trained on colour
        images only.
        """
        from PIL import Image

        side = self.stored_size
        grey_trained = (self.input_stats or {}).get("grey_fraction")
        out: list[str | None] = []
        for path in paths:
            try:
                with Image.open(path) as image:
                    width, height = image.size
                    rgb = to_rgb8(image.reduce(max(1, min(width, height) // 64)))
            except Exception:  # read_files names undecodable files; no remark here
                out.append(None)
                continue
            said = []
            if min(width, height) * 2 < side or max(width, height) > FAR_SIZE_FACTOR * side:
                said.append(f"{width}x{height} is far from the {side}x{side} images this model "
                            "was trained on")  # fmt: skip
            if grey_trained is not None and grey_trained >= 0.95 and not is_grey(rgb):
                said.append("a colour image; this model was trained on grey images")
            if grey_trained is not None and grey_trained <= 0.05 and is_grey(rgb):
                said.append("a grey image; this model was trained on colour images")
            out.append("; ".join(said) + ": the prediction may mean little" if said else None)
        return out

    def logits(self, images: np.ndarray | torch.Tensor, *, batch_size: int = 64) -> np.ndarray:
        """Float32 logits, N x classes, for plain uint8 NHWC images at the stored size: the
        evaluation crop is taken and the key applied here."""
        if isinstance(images, torch.Tensor):
            images = images.cpu().numpy()
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != self.image_shape:
            raise ValueError(
                f"images must be uint8 NHWC of shape (N, {', '.join(map(str, self.image_shape))})"
                f", got {images.dtype} {images.shape}; read_files decodes files to that size"
            )
        x = np.ascontiguousarray(centre_crop(images, self.crop, self.grid))
        if self.key is not None:
            x = encrypt(x, self.key)
        return predict(self.model, x, batch_size=batch_size)

    def predict_files(
        self,
        paths: Sequence[str | os.PathLike],
        *,
        k: int = 5,
        batch_size: int = 64,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> list[list[tuple[str, float]]]:
        """Per file, its ``k`` most probable classes (at most all of them): (name, probability),
        most probable first. Files are read ``batch_size`` at a time."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k = min(k, len(self.classes))
        out: list[list[tuple[str, float]]] = []
        for start in range(0, len(paths), batch_size):
            images = self.read_files(paths[start : start + batch_size], max_pixels=max_pixels)
            probs = torch.from_numpy(self.logits(images)).softmax(1)
            top = probs.topk(k, dim=1)
            for values, indices in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                out.append([(self.classes[i], p) for i, p in zip(indices, values, strict=True)])
        return out
