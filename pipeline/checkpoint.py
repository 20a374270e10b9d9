"""Checkpoints: written atomically, versioned, loaded with ``weights_only=True``.

A checkpoint holds the model and optimiser state, the scheduler, the epoch and step, RNG
states, the resolved run config, the shards' manifest digests and the key fingerprint: never
the key itself.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, or from another key or data set."""


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({**state, "version": CHECKPOINT_VERSION}, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found (a missing --resume file is an error)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types on a damaged file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
    version = state.get("version") if isinstance(state, dict) else None
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {version} is not {CHECKPOINT_VERSION}")
    return state


def manifest_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
