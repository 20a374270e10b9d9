"""Evaluating a trained model on shards, as they are or re-encrypted with other keys.

Plain shards decrypt nothing and hold the source images, so any scenario is one transform of
them away: the correct key, no key (plain), or a wrong key of the same scheme.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.device import model_device, resolve_device
from pipeline.model.checkpoint import Checkpoint, CheckpointError
from pipeline.model.factory import create_model
from pipeline.stream.dataset import LoaderConfig, ShardDataset, to_model_input

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSet:
    """All images and labels of one split, in shard order, as uint8 NHWC numpy."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    key_fingerprint: str | None
    block_size: int | None
    transforms: list[str]


def load_split(
    data: str,
    split: str = "val",
    *,
    crop_size: int | None = None,
    limit: int | None = None,
    data_key: str | None = None,
) -> EvalSet:
    """The split's images in shard order (centre crops of ``crop_size``); the first ``limit``
    when given, so that large splits need not fit in memory. ``data_key`` opens sealed shards."""
    dataset = ShardDataset(
        data, split, config=LoaderConfig(batch_size=256, train=False, crop_size=crop_size,
                                         num_workers=0), data_key=data_key,
    )  # fmt: skip
    images: list[np.ndarray] = []
    labels: list[int] = []
    for image, label, valid in dataset:
        if limit is not None and len(labels) >= limit:
            break
        if valid:
            images.append(image.numpy())
            labels.append(label)
    m = dataset.manifest
    return EvalSet(
        np.stack(images), np.array(labels), m.classes, m.key_fingerprint, m.block_size,
        list(m.transforms),
    )  # fmt: skip


def load_model(
    checkpoint: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, Checkpoint]:
    """The trained model of a checkpoint (eval mode) on ``device`` (``auto``, ``cpu``,
    ``cuda[:N]``), and the checkpoint's record without its tensors."""
    device = resolve_device(device)
    saved = Checkpoint.load(checkpoint)
    note = saved.unfinished_note(checkpoint)
    if note:
        logger.warning("warning: %s", note)
    try:
        model = create_model(saved.model_name, num_classes=saved.num_classes, pretrained="none",
                             model_kwargs=saved.model_kwargs)  # fmt: skip
    except (ValueError, TypeError) as exc:  # timm raises TypeError on an unknown argument
        raise CheckpointError(f"{checkpoint}: cannot build its model ({exc})") from None
    model.load_state_dict(saved.model)
    model.to(device, memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
    return model, saved.without_state()


def _batches(images: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), size):
        yield images[start : start + size]


@torch.inference_mode()
def predict(
    model: torch.nn.Module,
    images: np.ndarray,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Logits (numpy, on the host) for uint8 NHWC images, computed where the model is unless
    ``device`` says otherwise (batches of 64: the fastest on CPU, measured)."""
    target = model_device(model) if device is None else torch.device(device)
    out = []
    for batch in _batches(images, batch_size):
        out.append(model(to_model_input(torch.from_numpy(batch), target)).float().cpu())
    return torch.cat(out).numpy()


def top1(
    model: torch.nn.Module,
    data: EvalSet,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    *,
    device: torch.device | str | None = None,
) -> float:
    """Top-1 accuracy on ``data``, its images first passed through ``transform``; on the
    model's device unless ``device`` says otherwise."""
    images = data.images if transform is None else transform(data.images)
    logits = predict(model, images, device=device)
    return float((logits.argmax(1) == data.labels).mean())
