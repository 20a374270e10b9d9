"""Checkpoints: one typed record, written atomically (mode 0600), loaded with ``weights_only``.

A ``Checkpoint`` holds what the model is and what input it expects (timm name, classes, stored
image shape, the key's block size, transforms and fingerprint: never the key itself, the
decoder), how it was trained (the resolved run config, the shards' manifest digests) and the
state to continue from (weights, optimiser, scheduler, epoch and step, every rank's RNG
states). train/ddp.py writes it; evaluation, predict, the audit and ``--resume`` read it, by
attribute.

On disk it is a plain dict of those fields plus ``version`` (what train/ddp.py has always
written), so older checkpoints load. It is written 0600: the weights are what the key
protects, and they let an attacker who also holds public weights match the two. A checkpoint
is untrusted input: every field is checked on load (one line naming the file, the field, its
value and what to do). The model name must be one of timm's own architectures, the decoder one
of make_shards' decoders, the image shape one make_shards can store; the run config's fields
that name weights or files (``pretrained``, ``init_checkpoint``, ...) are a record of how the
run started, checked for type and never opened: nothing in a checkpoint can make a tool reach
the network or ``torch.load`` another file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import timm
import torch

from pipeline.atomic import atomic_open
from pipeline.cipher.blockwise import TRANSFORMS
from pipeline.errors import ConfigError, KeyprotectError
from pipeline.model.factory import check_model_kwargs

CHECKPOINT_VERSION = 1


class CheckpointError(KeyprotectError, ValueError):
    """A checkpoint that is missing, damaged, or from another key or data set."""


# make_shards' decoders (``--decoder``); a checkpoint naming another is refused
DECODERS = ("pil", "dali")
# the stored image sides make_shards can write and tools can decode (pixels)
MIN_SIDE, MAX_SIDE = 8, 4096
# run-config fields that name weights or files: records of how the run started, never opened
CONFIG_PATHS = ("pretrained", "init_checkpoint", "resume", "key", "data", "data_key", "out")


# Field -> allowed types on disk, for everything train/ddp.py writes.
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
# absent in older checkpoints; absorbed_from only in tools/absorb_key.py's output
OPTIONAL = {"decoder": (str, type(None)), "world_size": (int,), "absorbed_from": (str,),
            "finished": (bool,), "input_stats": (dict,)}  # fmt: skip


@dataclass(frozen=True)
class Checkpoint:
    # what the model is and what input it expects (all that inference needs)
    model_name: str
    classes: tuple[str, ...]
    image_shape: tuple[int, int, int]  # stored (height, width, channels)
    key_fingerprint: str | None  # None: trained on plain images
    block_size: int | None = None
    transforms: tuple[str, ...] = ()
    decoder: str | None = None  # make_shards' decoder; None: PIL
    # how it was trained
    config: dict[str, Any] = field(default_factory=dict)  # train/ddp.py's TrainConfig
    manifest_digests: dict[str, str] = field(default_factory=dict)  # split -> sha256
    # where training stands (tensors: never in a repr)
    model: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    optimizer: dict = field(default_factory=dict, repr=False)
    scheduler: dict = field(default_factory=dict, repr=False)
    rng: list[dict] = field(default_factory=list, repr=False)  # one per rank
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    world_size: int | None = None  # None in older checkpoints: len(rng)
    absorbed_from: str | None = None  # a key absorbed into plain weights: their digest
    finished: bool | None = None  # whether its run trained every epoch (None: older files)
    input_stats: dict | None = None  # the train shards' colour statistics (the manifest's)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def crop_size(self) -> int | None:
        """The crop the run trained and evaluated on (None: the stored size)."""
        return self.config.get("crop_size")

    @property
    def pretrained(self) -> str:
        """The weights the run started from (``package`` when older configs lack it): a record
        only, never opened (it may name a file on the machine that trained, or the hub)."""
        return self.config.get("pretrained", "package")

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """timm architecture arguments the model was built with (none in older configs)."""
        return self.config.get("model_kwargs") or {}

    @property
    def ranks(self) -> int:
        return self.world_size if self.world_size is not None else len(self.rng)

    def unfinished_note(self, source: str | os.PathLike) -> str | None:
        """One line when this is the checkpoint of a run that has not trained every epoch (a
        stopped or interrupted run), else None."""
        if self.finished is not False:
            return None
        epochs = self.config.get("epochs")
        return (
            f"{source}: the checkpoint of an unfinished run (stopped at epoch {self.epoch}"
            + (f" of {epochs}" if epochs else "")
            + f", step {self.step_in_epoch}); finish it with `train/ddp.py --resume {source}` "
            "and its other settings (config.json)"
        )

    def without_state(self) -> Checkpoint:
        """The record without its tensors (weights, optimiser, scheduler, RNG): what describes
        the model, to hold on to once the weights are in a model."""
        return replace(self, model={}, optimizer={}, scheduler={}, rng=[])

    def to_dict(self) -> dict[str, Any]:
        """The on-disk form: a plain dict of the fields (lists, not tuples) and ``version``."""
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("world_size", "absorbed_from", "finished", "input_stats"):
            if state[name] is None:
                del state[name]
        state.update(classes=list(self.classes), image_shape=list(self.image_shape),
                     transforms=list(self.transforms), version=CHECKPOINT_VERSION)  # fmt: skip
        return state

    @classmethod
    def from_dict(cls, state: dict, source: str = "<checkpoint>") -> Checkpoint:
        """A checked record of an on-disk dict; a missing or wrong field is a
        ``CheckpointError`` naming it."""
        version = state.get("version") if isinstance(state, dict) else None
        if version != CHECKPOINT_VERSION:
            raise CheckpointError(
                f"{source}: checkpoint version {version} is not {CHECKPOINT_VERSION}"
            )
        check_fields(state, source)
        return cls(**{
            **{f.name: state[f.name] for f in fields(cls) if f.name in state},
            "classes": tuple(state["classes"]), "image_shape": tuple(state["image_shape"]),
            "transforms": tuple(state["transforms"]),
        })  # fmt: skip

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically, mode 0600 (a reader never sees half a checkpoint)."""
        with atomic_open(path, perm=0o600) as f:
            torch.save(self.to_dict(), f)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Checkpoint:
        """Read with ``weights_only=True`` (no code runs) and check every field."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint not found")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types on a damaged file
            raise CheckpointError(
                f"{path}: not a readable checkpoint ({type(exc).__name__})"
            ) from None
        return cls.from_dict(state, str(path))


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
    if not all(isinstance(t, str) for t in state["transforms"]):
        raise CheckpointError(f"{source}: field 'transforms' must be a list of names")
    if not all(t in TRANSFORMS for t in state["transforms"]):
        raise CheckpointError(
            f"{source}: field 'transforms' is {state['transforms']!r}; each must be one of "
            f"{', '.join(TRANSFORMS)}: not a train/ddp.py checkpoint"
        )
    block = state["block_size"]
    if block is not None and not 1 <= block <= 255:
        raise CheckpointError(f"{source}: field 'block_size' is {block}, not 1..255 (what key "
                              "files hold): not a train/ddp.py checkpoint")  # fmt: skip
    check_image_shape(state["image_shape"], block, source)
    decoder = state.get("decoder")
    if decoder is not None and decoder not in DECODERS:
        raise CheckpointError(
            f"{source}: field 'decoder' is {decoder!r}, not one of make_shards' decoders "
            f"({', '.join(DECODERS)}): not a train/ddp.py checkpoint; use the checkpoint "
            "train/ddp.py wrote"
        )
    check_config(state["config"], source)


def check_image_shape(shape: list, block_size: int | None, source: str) -> None:
    """[height, width, 3], sides in ``MIN_SIDE..MAX_SIDE`` and on the key's block grid."""
    if len(shape) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise CheckpointError(f"{source}: field 'image_shape' must be [height, width, channels]")
    height, width, channels = shape
    sides_ok = all(MIN_SIDE <= d <= MAX_SIDE for d in (height, width))
    grid_ok = not block_size or (height % block_size == 0 and width % block_size == 0)
    if channels != 3 or not sides_ok or not grid_ok:
        raise CheckpointError(
            f"{source}: field 'image_shape' is {shape}; make_shards stores [height, width, 3] "
            f"with sides {MIN_SIDE}..{MAX_SIDE}"
            + (f" and multiples of the block size {block_size}" if block_size else "")
            + ": not a train/ddp.py checkpoint; use the checkpoint train/ddp.py wrote"
        )


def check_config(config: dict, source: str) -> None:
    """The run config's fields that tools read: model kwargs as the factory takes them, the
    crop a whole number, the fields naming weights or files strings (records, never opened)."""
    try:
        check_model_kwargs(config.get("model_kwargs"), f"{source}: field 'config.model_kwargs'")
    except ConfigError as exc:
        raise CheckpointError(f"{exc}; not a train/ddp.py checkpoint") from None
    crop = config.get("crop_size")
    if crop is not None and (not isinstance(crop, int) or isinstance(crop, bool) or crop < 1):
        raise CheckpointError(f"{source}: field 'config.crop_size' is {crop!r}, expected a "
                              "positive whole number or None")  # fmt: skip
    for name in CONFIG_PATHS:
        value = config.get(name)
        if value is not None and (
            not isinstance(value, str) or len(value) > 4096 or not value.isprintable()
        ):
            raise CheckpointError(
                f"{source}: field 'config.{name}' is {str(value)[:80]!r}, expected a file name "
                "or None: not a train/ddp.py checkpoint"
            )


def manifest_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
