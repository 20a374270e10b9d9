"""Which torch device: one reading of ``auto``/``cpu``/``cuda``/``cuda:N`` for every tool, and
the device a model already lives on (what evaluation and the attacks run on by default)."""

from __future__ import annotations

import re

import torch

from pipeline.errors import ConfigError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(
    name: str | torch.device = "auto", *, local_rank: int | None = None
) -> torch.device:
    """``auto``: the GPU when there is one (``cuda:local_rank`` under torchrun), else the CPU.
    ``cuda``/``cuda:N`` must exist here; anything else is an error naming the allowed values."""
    if isinstance(name, torch.device):
        name = str(name)
    text = name.strip().lower()
    if text == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", local_rank if local_rank is not None else 0)
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise ConfigError(f"device {name!r} is not one of {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: no CUDA device is visible here; use cpu or auto")
    index = int(match.group(1) or (local_rank or 0))
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here "
            f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
        )
    return torch.device("cuda", index)


def rank_gpu(local_rank: int) -> int:
    """The GPU of an offline-stage rank: ``LOCAL_RANK``, wrapping round when a node runs more
    ranks than it has GPUs. One make_shards rank cannot keep a GPU decoder busy (its own process
    handles every image: about 1,550 img/s on an H200), so several ranks may share a GPU.
    Training keeps one rank per GPU."""
    count = torch.cuda.device_count()
    if count == 0:
        raise ConfigError("no CUDA device is visible here; decode and encrypt on the cpu")
    return local_rank % count


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s weights are (its first parameter, else buffer; the CPU if it has none)."""
    for parameter in model.parameters():
        return parameter.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")
