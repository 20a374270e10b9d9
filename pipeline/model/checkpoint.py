"""Checkpoints: written atomically, versioned, loaded with ``weights_only=True``.

A checkpoint holds the model and optimiser state, the scheduler, the epoch and step, RNG
states, the resolved run config, the shards' manifest digests and the key fingerprint: never
the key itself. It is written with mode 0600 (the weights are what the key protects, and they
let an attacker who also holds public weights match the two). A checkpoint is untrusted input:
every field is checked on load (one line naming the field) and the model name must be one of
timm's own architectures, so nothing in a checkpoint can make a tool reach the network.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import timm
import torch

from pipeline.atomic import atomic_open

CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, or from another key or data set."""


# Field -> allowed types, for everything train/ddp.py writes ("decoder" may be absent).
FIELDS: dict[str, tuple[type, ...]] = {
    "model": (dict,),
    "model_name": (str,),
    "classes": (list,),
    "image_shape": (list,),
    "block_size": (int, type(None)),
    "transforms": (list,),
    "key_fingerprint": (str, type(None)),
    "config": (dict,),
    "manifest_digests": (dict,),
    "optimizer": (dict,),
    "scheduler": (dict,),
    "epoch": (int,),
    "step_in_epoch": (int,),
    "global_step": (int,),
    "rng": (list,),
}
OPTIONAL = {"decoder": (str, type(None)), "world_size": (int,)}


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    with atomic_open(path, perm=0o600) as f:
        torch.save({**state, "version": CHECKPOINT_VERSION}, f)
    return Path(path)


def check_model_name(name: object, source: str) -> str:
    """A timm architecture known without the network (no ``hf-hub:`` or other remote names)."""
    if not isinstance(name, str) or ":" in name or "/" in name or not timm.is_model(name):
        raise CheckpointError(
            f"{source}: model_name {name!r} is not one of timm's local architectures; "
            "checkpoints may only name models that build offline"
        )
    return name


def check_fields(state: dict, source: str) -> None:
    for name, types in {**FIELDS, **OPTIONAL}.items():
        if name not in state:
            if name in OPTIONAL:
                continue
            raise CheckpointError(
                f"{source}: field {name!r} is missing; not a train/ddp.py checkpoint"
            )
        value = state[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            wanted = " or ".join("None" if t is type(None) else t.__name__ for t in types)
            raise CheckpointError(
                f"{source}: field {name!r} is a {type(value).__name__}, expected {wanted}"
            )
    check_model_name(state["model_name"], source)
    if not state["classes"] or not all(isinstance(c, str) for c in state["classes"]):
        raise CheckpointError(f"{source}: field 'classes' must be a non-empty list of names")
    shape = state["image_shape"]
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise CheckpointError(f"{source}: field 'image_shape' must be [height, width, channels]")


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types on a damaged file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
    version = state.get("version") if isinstance(state, dict) else None
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {version} is not {CHECKPOINT_VERSION}")
    check_fields(state, str(path))
    return state


def manifest_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
