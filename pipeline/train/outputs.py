"""The run folder: config.json, metrics.jsonl, summary.json, and the guard that keeps a
finished run from being overwritten by accident."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist

from pipeline.atomic import atomic_write
from pipeline.train.config import TrainConfig, TrainError

if TYPE_CHECKING:
    from pipeline.train.loop import Run

logger = logging.getLogger(__name__)


def check_out(config: TrainConfig, command: str) -> None:
    """Refuse a run into an ``--out`` that already holds a checkpoint, unless ``--resume``
    continues it or ``--overwrite`` starts over: a finished run is never lost by accident.
    ``command`` is the command line, to show the two that would go on."""
    checkpoint = Path(config.out) / "checkpoint.pt"
    if config.resume or config.overwrite or not checkpoint.exists():
        return
    finished = (Path(config.out) / "summary.json").exists()
    raise TrainError(
        f"{config.out} holds the checkpoint of {'a finished' if finished else 'an unfinished'} "
        f"run; continue it with `{command} --resume {checkpoint}`, or start over with "
        f"`{command} --overwrite` (the old checkpoint is then replaced), or pass another --out"
    )


def keep_metrics_before(path: Path, epoch: int) -> None:
    """Drop the lines of ``epoch`` and later (left by a killed run) and any torn last line."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["epoch"] < epoch:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by a kill
    atomic_write(path, "".join(f"{line}\n" for line in kept))


def start_outputs(run: Run, start_epoch: int) -> None:
    """config.json; metrics.jsonl cut back to the epochs before ``start_epoch``; no summary
    (written again when the run is complete)."""
    atomic_write(run.out / "config.json", json.dumps(run.config.record(), indent=1) + "\n")
    keep_metrics_before(run.out / "metrics.jsonl", start_epoch)  # a fresh run: empty
    (run.out / "summary.json").unlink(missing_ok=True)


def log_epoch(run: Run, metrics: dict) -> None:
    with open(run.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    logger.info("epoch %d: train loss %.3f top1 %.3f | val top1 %.4f top5 %.4f | %.0f s",
                metrics["epoch"], metrics["train_loss"], metrics["train_top1"],
                metrics["val_top1"], metrics["val_top5"], metrics["seconds"])  # fmt: skip


def write_summary(run: Run, metrics: dict, started: float) -> None:
    """summary.json, the mark of a complete run (what `make` looks for)."""
    if not metrics:  # resumed a complete run: nothing left to train
        metrics = json.loads((run.out / "metrics.jsonl").read_text().splitlines()[-1])
    summary = {**metrics, "train_seconds": time.perf_counter() - started,
               "world_size": run.env.world_size, "key_fingerprint": run.fingerprint,
               "backend": dist.get_backend() if dist.is_initialized() else None,
               "autocast": "bfloat16" if run.cuda else None, "channels_last": run.cuda,
               "compiled": run.config.compile}  # fmt: skip
    atomic_write(run.out / "summary.json", json.dumps(summary, indent=1) + "\n")
