"""One rank's whole run as ``train/ddp.py`` starts it: the process group, logging, the guard
on ``--out``, training, and the lines a user sees when it stops early.

Exit codes: 0 done; 2 a user error (one line); 3 another rank was lost (a rank died, hangs or
stopped early: one line with the command that resumes); 130 Ctrl-C (one line: where the run
stands and the command that resumes).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path

import torch.distributed as dist

from pipeline import cli
from pipeline.train.config import TrainConfig, TrainError
from pipeline.train.distributed import Dist, lost_peer, setup_distributed
from pipeline.train.loop import TrainProgress, train
from pipeline.train.outputs import check_out

logger = logging.getLogger("train")

EXIT_LOST_PEER = 3


def command_line(argv: list[str] | None, *, drop: tuple[str, ...] = ("--resume", "--overwrite")):
    """This run's command line without ``drop`` (and their values): the start of the commands
    that continue or redo it. Under torchrun the launcher's own options are not visible to a
    rank; they are written for one node as torchrun's --standalone form."""
    args = list(sys.argv[1:] if argv is None else argv)
    kept: list[str] = []
    skip = False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in drop:
            # --resume may come with a value (a path) or alone
            nxt = args[i + 1] if i + 1 < len(args) else None
            skip = "=" not in arg and name == "--resume" and nxt is not None
            skip = skip and nxt is not None and not nxt.startswith("--")
            continue
        kept.append(arg)
    world, local = (int(os.environ.get(v, "1")) for v in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"))
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        launcher = "python"
    elif world == local:
        launcher = f"torchrun --standalone --nproc_per_node={local}"
    else:
        launcher = "torchrun (with this job's --nnodes, --nproc_per_node and --rdzv options)"
    return f"{launcher} {shlex.join(['train/ddp.py', *kept])}"


def agree_on_out(config: TrainConfig, env: Dist, command: str) -> None:
    """Rank 0 checks ``--out`` (it is rank 0's folder) and every rank learns its verdict, so
    that a refused run ends on every rank at once instead of leaving the others waiting."""
    verdict: list[str | None] = [None]
    if env.primary:
        try:
            check_out(config, command)
        except TrainError as exc:
            verdict[0] = str(exc)
    if dist.is_initialized():
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise TrainError(verdict[0])


def stopped_line(config: TrainConfig, progress: TrainProgress, command: str) -> str:
    """What Ctrl-C prints: where the run stands and the command that goes on."""
    checkpoint = Path(config.out) / "checkpoint.pt"
    where = f"stopped in epoch {progress.epoch} at step {progress.step}"
    if progress.saved is None:
        return (
            f"{where}; no checkpoint of this run was written yet: start it again with "
            f"`{command} --overwrite`"
            if checkpoint.exists()
            else f"{where}; no checkpoint was written yet: start it again with `{command}`"
        )
    epoch, step = progress.saved
    return (
        f"{where}; {checkpoint} holds epoch {epoch}, step {step}: continue with "
        f"`{command} --resume {checkpoint}`"
    )


def run_training(config: TrainConfig, *, argv: list[str] | None = None) -> int:
    """This rank's run from start to exit code (see the module docstring)."""
    env = setup_distributed(config.dist_timeout)
    cli.setup_logging(rank=env.rank, world_size=env.world_size, tag_ranks=False)
    command = command_line(argv)
    progress = TrainProgress()

    def job() -> None:
        agree_on_out(config, env, command)
        train(config, env, progress=progress)

    try:
        return cli.run(
            "train",
            job,
            interrupted=lambda: stopped_line(config, progress, command),
            quiet_interrupt=not env.primary,  # rank 0 speaks for the job
        )
    except RuntimeError as exc:
        if env.world_size == 1 or not lost_peer(exc):
            raise
        line = (
            f"train: error: rank {env.rank} of {env.world_size} lost the other ranks "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); a rank died, hangs or "
            f"stopped early (--dist-timeout {config.dist_timeout:g} s). Check every rank's "
            f"log; continue with `{command} --resume {Path(config.out) / 'checkpoint.pt'}`"
        )
        logger.error("%s", line)
        cli.tell_launcher(line)
        return EXIT_LOST_PEER
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
