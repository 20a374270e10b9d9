"""Fixtures for training tests: small encrypted digit shards, and running train/ddp.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pipeline import Key
from pipeline.offline.build import ShardConfig, build_shards
from pipeline.offline.digits import write_digits_tree

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--model", "test_efficientnet", "--pretrained", "none", "--batch-size", "32",
        "--warmup-epochs", "0.5", "--workers", "2"]  # fmt: skip


def torchrun(
    *args: str, nproc: int = 2, timeout: int = 900, extra: tuple = ()
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", *extra]
    if not extra:
        cmd += ["--standalone"]
    cmd += [f"--nproc_per_node={nproc}", str(ROOT / "train" / "ddp.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def make_digit_shards(out: Path, key: Key | None, *, shard_size: str, size: int = 32) -> Path:
    src = write_digits_tree(out.parent / "digits-tree", size=64)
    config = ShardConfig(src=str(src), out=str(out), size=size, decoder="pil",
                         shard_size=shard_size, plain=key is None)  # fmt: skip
    build_shards(config, key)
    return out
