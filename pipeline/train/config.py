"""The training run's settings, and what a resume may and may not change."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import PurePath
from typing import Literal

from pipeline import paths
from pipeline.errors import KeyprotectError
from pipeline.model.checkpoint import Checkpoint


@dataclass(frozen=True)
class TrainConfig:
    data: str = paths.SHARDS  # where make_shards.py writes by default
    data_key: str | None = None  # sealed shards: the data key file (else $KEYPROTECT_DATA_KEY)
    out: str = paths.RUN
    model: str = "tf_efficientnet_lite0"
    model_kwargs: dict = field(default_factory=dict)  # timm architecture arguments
    pretrained: str = "package"
    init: str = "pretrained"  # or "checkpoint" / "absorb": the weights of init_checkpoint
    init_checkpoint: str | None = None
    key: str | None = None  # --init absorb only: the key to absorb (stored: its file name only)
    epochs: int = 8
    batch_size: int = 64  # per rank
    lr: float = 5e-3
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    crop_size: int | None = None
    workers: int = 2
    seed: int = 0
    ckpt_every: int = 0  # also checkpoint every N steps (0: at epoch ends only)
    resume: str | None = None  # the checkpoint to continue from
    overwrite: bool = False  # start over in an --out that holds a checkpoint
    compile: bool = False
    max_steps: int = 0  # stop after this many steps in all (0: no limit); for smoke runs
    loader: Literal["webdataset", "dali"] = "webdataset"
    dist_timeout: float = 600.0  # seconds a rank waits for the others in a collective

    def record(self) -> dict:
        """What config.json and every checkpoint store: the settings as given (a relative path
        stays relative: nothing here resolves one), but of ``key`` only its file name (where
        the owner keeps the key is not the training run's to record)."""
        return {**asdict(self), "key": None if self.key is None else PurePath(self.key).name}


class TrainError(KeyprotectError, RuntimeError):
    """A run that must not start: mismatched shards, a checkpoint from another key, ..."""


# Settings that shape the data order or the schedule: a resumed run must keep every one of
# them (world size too), or it would not continue the same run. The others may change.
RESUME_FIXED = ("model", "model_kwargs", "epochs", "batch_size", "lr", "weight_decay",
                "warmup_epochs", "label_smoothing", "crop_size", "workers", "seed",
                "loader")  # fmt: skip
RESUME_FREE = ("data (the same shards: checked by digest)", "data_key", "out", "ckpt_every",
               "compile", "max_steps", "overwrite", "pretrained, init, init_checkpoint and key "
               "(the weights come from the checkpoint)", "dist_timeout")  # fmt: skip


def check_resume(saved: Checkpoint, config: TrainConfig, world_size: int, source: str) -> None:
    """Refuse a resume whose settings differ from the checkpoint's, naming every change."""
    before = {"model_kwargs": {}, **saved.config,  # runs from before model_kwargs had none
              "world_size": saved.ranks}  # fmt: skip
    current = {**asdict(config), "world_size": world_size}
    changed = [
        f"{name} {before.get(name)!r} -> {current[name]!r}"
        for name in (*RESUME_FIXED, "world_size")
        if before.get(name) != current[name]
    ]
    if changed:
        raise TrainError(
            f"{source}: cannot resume exactly with changed settings: {'; '.join(changed)}. "
            f"Use the checkpoint's settings (its config.json); only these may change: "
            f"{', '.join(RESUME_FREE)}"
        )
