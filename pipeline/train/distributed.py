"""One rank's place in the run: its device, and the process group under torchrun."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.device import resolve_device
from pipeline.train.config import TrainConfig


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


# What gloo and NCCL say when a collective's peer is gone (gloo raises plain RuntimeErrors)
# gloo and NCCL in words; "application timeout caused pair closure" is gloo's timeout of a
# collective that DDP runs itself (the buffer broadcast at the start of a forward)
_PEER_LOST = ("timed out", "connection reset", "connection closed", "broken pipe",
              "closed by peer", "application timeout", "pair closure")  # fmt: skip


def lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` says another rank is gone or silent (not a bug of this rank's own)."""
    return isinstance(exc, dist.DistError) or any(s in str(exc).lower() for s in _PEER_LOST)
