"""The training loop: set up, resume, then per epoch train, evaluate, log and checkpoint."""

from __future__ import annotations

import itertools
import logging
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline import paths
from pipeline.cipher.keys import load_key
from pipeline.model.checkpoint import Checkpoint, manifest_digest
from pipeline.model.factory import create_model
from pipeline.model.patch import PatchAlignmentError, absorb_key, find_patch_embedding
from pipeline.shards.manifest import Manifest, ManifestError, manifest_name
from pipeline.stream.crop import crop_geometry
from pipeline.stream.dataset import LoaderConfig, to_model_input
from pipeline.stream.split import SplitLoader, make_split_loader
from pipeline.train.config import TrainConfig, TrainError, check_resume
from pipeline.train.distributed import Dist
from pipeline.train.outputs import log_epoch, start_outputs, write_summary
from pipeline.train.state import lr_lambda, rng_state, seed_everything, set_rng_state

logger = logging.getLogger(__name__)

# 1x1 convolutions in channels_last have two valid stride layouts; DDP warns that its bucket
# picked the other one. Harmless (one extra copy of a few small tensors), so keep logs clean.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
tqdm.monitor_interval = 0  # no monitor thread: DataLoader workers are forked from this process


# make_shards options that shape each sample's pixels; train and val must agree on them
CONTENT_OPTIONS = ("size", "decoder", "decode_device", "max_pixels")


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
    fields = {
        "image shape": (a.image_shape, b.image_shape),
        "block size": (a.block_size, b.block_size),
        "transforms": (a.transforms, b.transforms),
    }
    for name in CONTENT_OPTIONS:
        fields[f"option {name!r}"] = (a.options.get(name), b.options.get(name))
    for name, (mine, theirs) in fields.items():
        if mine != theirs:
            raise TrainError(
                f"{train.storage.url}: train shards have {name} {mine} but val shards "
                f"{theirs}; make both splits with the same make_shards options"
            )


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
                                       device=env.device, data_key=config.data_key)  # fmt: skip
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


@dataclass
class TrainProgress:
    """Where a run stands, as it goes (what Ctrl-C reports): the epoch and step being trained,
    and the position of the last checkpoint written (None: none yet)."""

    epoch: int = 0
    step: int = 0
    saved: tuple[int, int] | None = None


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
    progress: TrainProgress = field(default_factory=TrainProgress)

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
    assert source is not None  # --init checkpoint|absorb come with --init-checkpoint
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
        assert config.key is not None  # --init absorb comes with --key
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
    layout = torch.channels_last if cuda else torch.contiguous_format
    model = model.to(env.device, memory_format=layout)  # type: ignore[call-overload]
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
    assert config.resume is not None
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
        logger.info("train: resuming from %s at epoch %d, step %d", config.resume,
                    saved.epoch, saved.step_in_epoch)  # fmt: skip
    return saved.epoch, saved.step_in_epoch


def distribute(run: Run) -> Run:
    """The run with its training module under DDP (when distributed) and torch.compile."""
    net = (
        torch.nn.parallel.DistributedDataParallel(run.model, gradient_as_bucket_view=True)
        if dist.is_initialized()
        else run.model
    )
    compiled = torch.compile(net) if run.config.compile else net
    return replace(run, net=compiled)  # type: ignore[arg-type]  # a compiled module is one


def save_state(run: Run, epoch: int, step_in_epoch: int) -> None:
    """Checkpoint the run at ``(epoch, step_in_epoch)``, with every rank's RNG states (a
    collective: every rank calls it); rank 0 writes it."""
    env, manifest = run.env, run.train_loader.manifest
    states: list[dict] = [{} for _ in range(env.world_size)]
    if env.world_size > 1:
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    if env.primary:
        height, width, channels = manifest.image_shape
        Checkpoint(
            model_name=run.config.model, classes=tuple(manifest.classes),
            image_shape=(height, width, channels), key_fingerprint=run.fingerprint,
            block_size=manifest.block_size, transforms=tuple(manifest.transforms),
            decoder=manifest.options.get("decoder"), config=run.config.record(),
            manifest_digests=run.digests, model=run.model.state_dict(),
            optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
            rng=states, epoch=epoch, step_in_epoch=step_in_epoch,
            global_step=epoch * run.steps_per_epoch + step_in_epoch,
            world_size=env.world_size,
            finished=(epoch, step_in_epoch) == (run.config.epochs, 0),
            input_stats=manifest.input_stats,
        ).save(run.out / "checkpoint.pt")  # fmt: skip
    run.progress.saved = (epoch, step_in_epoch)  # before the line: Ctrl-C may follow it at once
    if env.primary:
        logger.info("train: checkpoint at epoch %d, step %d: %s", epoch, step_in_epoch,
                    run.out / "checkpoint.pt")  # fmt: skip


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
        run.progress.epoch, run.progress.step = epoch, step + 1
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
        steps_by_rank = [0] * env.world_size
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


def train(config: TrainConfig, env: Dist, *, progress: TrainProgress | None = None) -> dict:
    """The whole run: set up, resume, then per epoch train, evaluate, log and checkpoint;
    returns the last epoch's metrics. ``progress``, when given, follows where it stands."""
    run = setup(config, env)
    if progress is not None:
        run = replace(run, progress=progress)
    start_epoch, start_step = resume(run) if config.resume else (0, 0)
    run.progress.epoch, run.progress.step = start_epoch, start_step
    if config.resume:
        run.progress.saved = (start_epoch, start_step)
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
